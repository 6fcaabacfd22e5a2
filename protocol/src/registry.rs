//! The snapshot registry, in bio-pype's JSON format: one flat object.
//!
//! Data entries are keyed by absolute path:
//! `"/data/x.bam": {"snapshot_id": "snap-…", "in_snapshot_path": "data/x.bam"}`.
//! Program entries are keyed `"{profile}/programs/{key}"`:
//! `{"snapshot_id": "…", "in_snapshot_path": "/opt/sif/tool.sif", "bind_path": "/opt/sif"}`.
//! Entries this implementation produces also carry `"produced_by": {"run", "step",
//! "attempt"}`; bio-pype ignores keys it does not know.
//!
//! Only text in and text out here; reading and writing the file is the caller's business.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One registry value. The wire (bincode) form carries every field; the JSON form leaves out
/// the empty ones, as bio-pype writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    pub snapshot_id: String,
    pub in_snapshot_path: String,
    pub bind_path: Option<String>,
    pub produced_by: Option<Provenance>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub run: String,
    pub step: String,
    pub attempt: u64,
}

/// JSON shape of an entry.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEntry {
    snapshot_id: String,
    in_snapshot_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bind_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    produced_by: Option<Provenance>,
}

/// The whole registry, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    pub entries: BTreeMap<String, RegistryEntry>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid snapshot registry: {0}")]
pub struct RegistryError(String);

/// Snapshot ids name files and directories on both sides: letters, digits, `.`, `_`, `-`,
/// not starting with `.`, at most 128 bytes.
pub fn valid_snapshot_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The key of a program entry.
pub fn program_key(profile: &str, key: &str) -> String {
    format!("{profile}/programs/{key}")
}

/// See [`Registry::size_queries`].
pub struct SizeQueries {
    /// What to ask the store, in order.
    pub queries: Vec<(String, String)>,
    owners: Vec<usize>,
    paths: usize,
}

impl SizeQueries {
    /// Each path's size from the store's answers (one per query, in order): the total of its
    /// places, `None` when the registry does not know it or a place is not in the store
    /// (bio-pype's conventions: a zero-byte file is present, a directory has its total).
    pub fn sizes(self, answers: Vec<Option<u64>>) -> Vec<Option<u64>> {
        let mut total: Vec<Option<u64>> = vec![None; self.paths];
        let mut missing = vec![false; self.paths];
        for (i, size) in self.owners.into_iter().zip(answers) {
            match size {
                Some(s) => total[i] = Some(total[i].unwrap_or(0) + s),
                None => missing[i] = true,
            }
        }
        total.into_iter().zip(missing).map(|(t, m)| if m { None } else { t }).collect()
    }
}

impl Registry {
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let raw: BTreeMap<String, JsonEntry> =
            serde_json::from_str(text).map_err(|e| RegistryError(e.to_string()))?;
        let mut entries = BTreeMap::new();
        for (key, e) in raw {
            if !valid_snapshot_id(&e.snapshot_id) {
                return Err(RegistryError(format!(
                    "entry {key:?} has an invalid snapshot_id {:?} (expected letters, digits, '.', '_', '-')",
                    e.snapshot_id
                )));
            }
            if !key.starts_with('/') && !key.contains("/programs/") {
                return Err(RegistryError(format!(
                    "key {key:?} is neither an absolute path nor {{profile}}/programs/{{key}}"
                )));
            }
            entries.insert(
                key,
                RegistryEntry {
                    snapshot_id: e.snapshot_id,
                    in_snapshot_path: e.in_snapshot_path,
                    bind_path: e.bind_path,
                    produced_by: e.produced_by,
                },
            );
        }
        Ok(Self { entries })
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let raw: BTreeMap<&String, JsonEntry> = self
            .entries
            .iter()
            .map(|(k, e)| {
                (
                    k,
                    JsonEntry {
                        snapshot_id: e.snapshot_id.clone(),
                        in_snapshot_path: e.in_snapshot_path.clone(),
                        bind_path: e.bind_path.clone(),
                        produced_by: e.produced_by.clone(),
                    },
                )
            })
            .collect();
        let mut s = serde_json::to_string_pretty(&raw).unwrap_or_else(|_| "{}".into());
        s.push('\n');
        s
    }

    pub fn get(&self, key: &str) -> Option<&RegistryEntry> {
        self.entries.get(key)
    }

    /// Adds or replaces entries; returns how many changed.
    pub fn merge(&mut self, new: impl IntoIterator<Item = (String, RegistryEntry)>) -> usize {
        let mut changed = 0;
        for (k, v) in new {
            if self.entries.get(&k) != Some(&v) {
                self.entries.insert(k, v);
                changed += 1;
            }
        }
        changed
    }
}

impl Registry {
    /// Where `path` lives: `(key, snapshot_id, in_snapshot_path)` from its own entry, from an
    /// entry of a directory above it (the path inside that directory's snapshot), or from the
    /// entries of the data paths below it (a directory made of harvested files). Empty when
    /// the registry does not know it.
    pub fn locate(&self, path: &str) -> Vec<(String, String, String)> {
        let rel = |p: &str| p.trim_start_matches('/').to_string();
        let path = path.trim_end_matches('/');
        if let Some(e) = self.get(path) {
            return vec![(path.to_string(), e.snapshot_id.clone(), rel(&e.in_snapshot_path))];
        }
        let mut at = path;
        while let Some(i) = at.rfind('/') {
            at = &at[..i];
            let ancestor = if at.is_empty() { "/" } else { at };
            if let Some(e) = self.get(ancestor) {
                let rest = path[at.len()..].trim_start_matches('/');
                let isp = format!("{}/{rest}", rel(&e.in_snapshot_path).trim_end_matches('/'));
                return vec![(
                    path.to_string(),
                    e.snapshot_id.clone(),
                    isp.trim_start_matches('/').to_string(),
                )];
            }
        }
        let below = format!("{path}/");
        self.entries
            .range(below.clone()..)
            .take_while(|(k, _)| k.starts_with(&below))
            .filter(|(k, _)| !k.contains("/programs/") || k.starts_with('/'))
            .map(|(k, e)| (k.clone(), e.snapshot_id.clone(), rel(&e.in_snapshot_path)))
            .collect()
    }

    /// The size queries that answer `check_outputs(paths)` from a store's index: one
    /// `(snapshot_id, in_snapshot_path)` per place [`Registry::locate`] finds each path.
    pub fn size_queries(&self, paths: &[String]) -> SizeQueries {
        let mut queries = Vec::new();
        let mut owners = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            for (_, id, isp) in self.locate(p) {
                queries.push((id, isp));
                owners.push(i);
            }
        }
        SizeQueries { queries, owners, paths: paths.len() }
    }

    /// The entries an attempt needs: those of the declared paths, of paths below or above
    /// them (a directory input restored from the entries of its files, or a file inside a
    /// harvested directory), and the program entries of `profiles`.
    pub fn relevant<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a str>,
        profiles: &[&str],
    ) -> Vec<(String, RegistryEntry)> {
        let mut out: BTreeMap<&String, &RegistryEntry> = BTreeMap::new();
        for p in paths {
            let p = p.trim_end_matches('/');
            if p.is_empty() {
                continue;
            }
            let below = format!("{p}/");
            for (k, v) in self.entries.range(p.to_string()..) {
                if k == p || k.starts_with(&below) {
                    out.insert(k, v);
                } else if k.as_str() > below.as_str() {
                    break;
                }
            }
            for ancestor in std::path::Path::new(p).ancestors().skip(1) {
                if let Some((k, v)) = ancestor.to_str().and_then(|a| self.entries.get_key_value(a)) {
                    out.insert(k, v);
                }
            }
        }
        for profile in profiles {
            let prefix = format!("{profile}/programs/");
            for (k, v) in self.entries.range(prefix.clone()..) {
                if !k.starts_with(&prefix) {
                    break;
                }
                out.insert(k, v);
            }
        }
        out.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_finds_a_path_by_its_entry_a_directory_above_or_the_entries_below() {
        let text = r#"{
  "/out/chunks": {"snapshot_id": "snap-d", "in_snapshot_path": "out/chunks"},
  "/out/counts/a.tsv": {"snapshot_id": "snap-a", "in_snapshot_path": "out/counts/a.tsv"},
  "/out/counts/b.tsv": {"snapshot_id": "snap-b", "in_snapshot_path": "out/counts/b.tsv"},
  "/out/countsx": {"snapshot_id": "snap-x", "in_snapshot_path": "out/countsx"},
  "p/programs/tool": {"snapshot_id": "snap-p", "in_snapshot_path": "/opt/tool"}
}"#;
        let reg = Registry::parse(text).unwrap();
        let t = |k: &str, id: &str, isp: &str| (k.to_string(), id.to_string(), isp.to_string());
        assert_eq!(reg.locate("/out/chunks"), vec![t("/out/chunks", "snap-d", "out/chunks")]);
        assert_eq!(
            reg.locate("/out/chunks/c1.txt"),
            vec![t("/out/chunks/c1.txt", "snap-d", "out/chunks/c1.txt")]
        );
        assert_eq!(
            reg.locate("/out/counts/"),
            vec![
                t("/out/counts/a.tsv", "snap-a", "out/counts/a.tsv"),
                t("/out/counts/b.tsv", "snap-b", "out/counts/b.tsv")
            ],
            "a directory made of harvested files; /out/countsx is not below it"
        );
        assert!(reg.locate("/out/missing").is_empty());
        let q = reg.size_queries(&["/out/counts".into(), "/out/chunks/c1.txt".into(), "/nope".into()]);
        assert_eq!(q.queries.len(), 3, "two entries below /out/counts, one above c1.txt");
        assert_eq!(
            q.sizes(vec![Some(2), Some(0), Some(5)]),
            vec![Some(2), Some(5), None],
            "0 bytes is present"
        );
        let q = reg.size_queries(&["/out/counts".into()]);
        assert_eq!(q.sizes(vec![Some(2), None]), vec![None], "one place missing from the store");
        assert!(reg.locate("/p").is_empty(), "program keys are not data paths");
    }

    #[test]
    fn bio_pype_registry_round_trips() {
        let text = r#"{
  "/data/sample.bam": {"snapshot_id": "snap-aaa", "in_snapshot_path": "data/sample.bam"},
  "hg38/programs/samtools": {"snapshot_id": "snap-bbb", "in_snapshot_path": "/samtools_1.21.sif", "bind_path": "/opt/sif"}
}"#;
        let reg = Registry::parse(text).unwrap();
        assert_eq!(reg.get("/data/sample.bam").unwrap().bind_path, None);
        assert_eq!(reg.get("hg38/programs/samtools").unwrap().bind_path.as_deref(), Some("/opt/sif"));
        let again = Registry::parse(&reg.to_json()).unwrap();
        assert_eq!(again, reg);
        assert!(!reg.to_json().contains("null"), "empty fields are left out: {}", reg.to_json());
    }

    #[test]
    fn relevant_entries_cover_paths_below_above_and_programs() {
        let e = |id: &str| RegistryEntry {
            snapshot_id: id.into(),
            in_snapshot_path: "x".into(),
            bind_path: None,
            produced_by: None,
        };
        let mut reg = Registry::default();
        for (k, id) in [
            ("/data/a", "s1"),
            ("/data/ab", "s2"),
            ("/data/a/inner", "s3"),
            ("/ref", "s4"),
            ("p/programs/tool", "s5"),
            ("q/programs/tool", "s6"),
        ] {
            reg.entries.insert(k.into(), e(id));
        }
        let keys: Vec<String> =
            reg.relevant(["/data/a", "/ref/genome.fa"], &["p"]).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["/data/a", "/data/a/inner", "/ref", "p/programs/tool"]);
    }

    #[test]
    fn bad_registries_are_refused() {
        for bad in [
            "[]",
            "{\"/x\": {\"snapshot_id\": \"\", \"in_snapshot_path\": \"x\"}}",
            "{\"/x\": {\"snapshot_id\": \"../etc\", \"in_snapshot_path\": \"x\"}}",
            "{\"relative\": {\"snapshot_id\": \"s\", \"in_snapshot_path\": \"x\"}}",
            "{\"/x\": {\"snapshot_id\": \"s\"}}",
            "{\"/x\": {\"snapshot_id\": \"s\", \"in_snapshot_path\": \"x\", \"bogus\": 1}}",
        ] {
            assert!(Registry::parse(bad).is_err(), "{bad}");
        }
    }
}
