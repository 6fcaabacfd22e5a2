//! Pipeline and profile files (TOML), read into a checked step graph.
//!
//! ```toml
//! name = "demo"
//! profile = "profile.toml"      # optional, relative to this file
//! data_root = "data"            # relative paths below resolve against it
//!
//! [[steps]]
//! name = "count"
//! command = "wc -l < {{data_root}}/in.txt > {{data_root}}/n.txt"
//! inputs = ["in.txt"]
//! outputs = ["n.txt"]
//! program = "tool"              # a program key of the profile
//! env = { LC_ALL = "C" }
//! resources = { cpus = 1, memory = "512M", labels = { partition = "bigmem" } }
//! timeout_secs = 600
//! retries = 1                   # re-runs after a failing command
//! after = ["other-step"]        # on top of the order the paths imply
//! ```
//!
//! Every error names the file, line and column it comes from: syntax, unknown keys, missing
//! fields, bad values, two producers of one path, unknown `after` names, cycles.

pub mod plan;
pub mod stepfile;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// An error located in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
    }
}

impl FileError {
    /// `file:line:col`.
    pub fn at(&self) -> String {
        format!("{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

impl std::error::Error for FileError {}

/// A source file and its text, for turning byte offsets into lines and columns.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> FileError {
        let at = span.map_or(0, |s| s.start).min(self.text.len());
        let before = &self.text[..at];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        FileError { file: self.file.to_path_buf(), line, column, message: message.into() }
    }

    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, FileError> {
        toml::from_str(self.text).map_err(|e| self.error(e.span(), e.message().trim().to_string()))
    }
}

fn read(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|e| FileError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    name: Spanned<String>,
    #[serde(default)]
    profile: Option<Spanned<String>>,
    #[serde(default)]
    data_root: Option<Spanned<String>>,
    #[serde(default)]
    roots: Vec<Spanned<String>>,
    #[serde(default)]
    write_roots: Vec<Spanned<String>>,
    #[serde(default)]
    imports: Vec<Spanned<String>>,
    #[serde(default)]
    write_back: bool,
    steps: Vec<StepFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    name: Spanned<String>,
    command: String,
    #[serde(default)]
    inputs: Vec<Spanned<String>>,
    #[serde(default)]
    outputs: Vec<Spanned<String>>,
    #[serde(default)]
    no_harvest: Vec<Spanned<String>>,
    #[serde(default)]
    program: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    resources: Option<ResourcesFile>,
    #[serde(default)]
    timeout_secs: Option<u64>,
    #[serde(default)]
    retries: u32,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    #[serde(default)]
    serve_backend: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    #[serde(default)]
    cpus: Option<f64>,
    #[serde(default)]
    memory: Option<Spanned<toml::Value>>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// What a step needs from the agent that runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: f64,
    pub memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
}

impl Default for Resources {
    fn default() -> Self {
        Self { cpus: 1.0, memory_bytes: 0, labels: BTreeMap::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    /// With `{{data_root}}` replaced.
    pub command: String,
    /// Absolute paths.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub no_harvest: Vec<String>,
    /// Program key in the pipeline's profile.
    pub program: Option<String>,
    pub env: Vec<(String, String)>,
    pub resources: Resources,
    pub timeout_secs: Option<u64>,
    /// Re-runs after the command fails.
    pub retries: u32,
    /// Indexes of the steps this one runs after (explicit and inferred), sorted.
    pub deps: Vec<usize>,
    /// The agent serves its storage backend to the step's processes (bio-pype's `pype_rs`
    /// backend, one call per code chunk); what they harvest under the pipeline's `roots` is
    /// merged like declared outputs.
    #[serde(default)]
    pub serve_backend: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    pub data_root: PathBuf,
    pub profile: Option<Profile>,
    /// In a topological order: every step comes after its dependencies.
    pub steps: Vec<Step>,
    /// Which step produces each declared output path.
    pub producers: HashMap<String, usize>,
    /// Where each input is first declared, as `file:line:col`, for errors about it.
    #[serde(default)]
    pub inputs_at: HashMap<String, String>,
    /// The directories a served backend may touch (absolute, never `/`).
    #[serde(default)]
    pub roots: Vec<String>,
    /// Those beneath which it may write and harvest (each inside a root; default: the roots).
    #[serde(default)]
    pub write_roots: Vec<String>,
    /// Paths imported into the store when the run starts, unless the registry has them.
    #[serde(default)]
    pub imports: Vec<String>,
    /// Write each successful attempt's harvested paths back to this host at once.
    #[serde(default)]
    pub write_back: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: Spanned<String>,
    #[serde(default)]
    programs: Vec<ProgramFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgramFile {
    key: Spanned<String>,
    kind: Spanned<String>,
    artifact_path: Spanned<String>,
    build: String,
}

/// Roots are never `/` nor hold a `:` (the agent's list separator); each write root lies
/// inside a root.
fn check_roots(roots: &[String], write_roots: &[String]) -> Result<(), String> {
    for r in roots.iter().chain(write_roots) {
        if r == "/" {
            return Err("a root must not be / (name the directories steps work in)".into());
        }
        if r.contains(':') {
            return Err(format!("root {r:?} holds a ':'"));
        }
    }
    for w in write_roots {
        if !roots.iter().any(|r| Path::new(w).starts_with(r)) {
            return Err(format!("write root {w} is inside none of the roots"));
        }
    }
    Ok(())
}

/// The version of the JSON pipeline format [`Pipeline::parse_json`] reads.
pub const JSON_PIPELINE_VERSION: u64 = 1;

/// Kinds of program artifacts a profile can name.
pub const PROGRAM_KINDS: &[&str] = &["file", "directory", "singularity", "conda"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub key: String,
    pub kind: String,
    pub artifact_path: String,
    /// Bash snippet that produces the artifact.
    pub build: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub file: PathBuf,
    pub programs: Vec<Program>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Normalises an absolute path lexically: no `.` or empty components, no trailing `/`;
/// `..` is refused.
fn normalize(p: &str) -> Option<String> {
    let mut out = String::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            c => {
                out.push('/');
                out.push_str(c);
            }
        }
    }
    if out.is_empty() { None } else { Some(out) }
}

impl Profile {
    pub fn load(path: &Path) -> Result<Profile, FileError> {
        let text = read(path)?;
        let src = Source { file: path, text: &text };
        let file: ProfileFile = src.parse()?;
        if !valid_name(file.name.get_ref()) {
            return Err(src.error(Some(file.name.span()), "profile name: use letters, digits, '.', '_', '-'"));
        }
        let mut programs: Vec<Program> = Vec::new();
        for p in file.programs {
            if !valid_name(p.key.get_ref()) {
                return Err(src.error(Some(p.key.span()), "program key: use letters, digits, '.', '_', '-'"));
            }
            if programs.iter().any(|q| &q.key == p.key.get_ref()) {
                return Err(
                    src.error(Some(p.key.span()), format!("program {:?} is defined twice", p.key.get_ref()))
                );
            }
            if !PROGRAM_KINDS.contains(&p.kind.get_ref().as_str()) {
                return Err(src.error(
                    Some(p.kind.span()),
                    format!(
                        "unknown program kind {:?}; expected one of {}",
                        p.kind.get_ref(),
                        PROGRAM_KINDS.join(", ")
                    ),
                ));
            }
            let artifact = p.artifact_path.get_ref();
            let Some(artifact_path) = artifact.starts_with('/').then(|| normalize(artifact)).flatten() else {
                return Err(src.error(
                    Some(p.artifact_path.span()),
                    format!("artifact_path {artifact:?} must be an absolute path without '..'"),
                ));
            };
            programs.push(Program {
                key: p.key.into_inner(),
                kind: p.kind.into_inner(),
                artifact_path,
                build: p.build,
            });
        }
        Ok(Profile { name: file.name.into_inner(), file: path.to_path_buf(), programs })
    }

    pub fn program(&self, key: &str) -> Option<&Program> {
        self.programs.iter().find(|p| p.key == key)
    }
}

/// Parses `memory`: bytes as an integer, or a string with a K/M/G/T suffix (powers of 1024).
fn parse_memory(v: &toml::Value) -> Result<u64, String> {
    let err = || format!("invalid memory {v}: expected bytes or a size like \"512M\", \"4G\"");
    match v {
        toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
        toml::Value::String(s) => {
            let s = s.trim();
            let (num, unit) =
                s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
            let n: f64 = num.parse().map_err(|_| err())?;
            let mult: u64 =
                match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                    "" => 1,
                    "K" => 1 << 10,
                    "M" => 1 << 20,
                    "G" => 1 << 30,
                    "T" => 1 << 40,
                    _ => return Err(err()),
                };
            Ok((n * mult as f64) as u64)
        }
        _ => Err(err()),
    }
}

impl Pipeline {
    /// Reads and checks a pipeline file and the profile it names.
    pub fn load(path: &Path) -> Result<Pipeline, FileError> {
        let text = read(path)?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Pipeline, FileError> {
        let src = Source { file: path, text };
        let file: PipelineFile = src.parse()?;
        let abs_file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = abs_file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        if !valid_name(file.name.get_ref()) {
            return Err(
                src.error(Some(file.name.span()), "pipeline name: use letters, digits, '.', '_', '-'")
            );
        }
        let data_root = match &file.data_root {
            None => base.clone(),
            Some(d) => {
                let joined = base.join(d.get_ref());
                match normalize(&joined.to_string_lossy()) {
                    Some(p) => PathBuf::from(p),
                    None => return Err(src.error(Some(d.span()), "data_root must not contain '..'")),
                }
            }
        };
        let root = data_root.to_string_lossy().into_owned();
        let profile = match &file.profile {
            None => None,
            Some(p) => {
                let ppath = base.join(p.get_ref());
                match Profile::load(&ppath) {
                    Ok(profile) => Some(profile),
                    Err(e) if e.line == 0 => {
                        return Err(
                            src.error(Some(p.span()), format!("profile {}: {}", ppath.display(), e.message))
                        );
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if file.steps.is_empty() {
            return Err(src.error(None, "the pipeline has no steps"));
        }
        let absolute = |p: &Spanned<String>, what: &str| -> Result<String, FileError> {
            let raw = p.get_ref();
            match raw.starts_with('/').then(|| normalize(raw)).flatten() {
                Some(n) => Ok(n),
                None => Err(src
                    .error(Some(p.span()), format!("{what} {raw:?} must be an absolute path without '..'"))),
            }
        };
        let mut roots = Vec::new();
        for r in &file.roots {
            if r.get_ref().trim_end_matches('/').is_empty() {
                return Err(
                    src.error(Some(r.span()), "a root must not be / (name the directories steps work in)")
                );
            }
            roots.push(absolute(r, "root")?);
        }
        let mut write_roots = Vec::new();
        for r in &file.write_roots {
            write_roots.push(absolute(r, "write root")?);
        }
        if let Err(e) = check_roots(&roots, &write_roots) {
            let at = file.roots.first().map(|r| r.span());
            return Err(src.error(at, e));
        }
        let imports = file.imports.iter().map(|i| absolute(i, "import")).collect::<Result<Vec<_>, _>>()?;
        let resolve = |p: &Spanned<String>| -> Result<String, FileError> {
            let raw = p.get_ref();
            let joined = if raw.starts_with('/') { raw.clone() } else { format!("{root}/{raw}") };
            normalize(&joined)
                .ok_or_else(|| src.error(Some(p.span()), format!("path {raw:?} is empty or contains '..'")))
        };
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut steps = Vec::with_capacity(file.steps.len());
        let mut producers: HashMap<String, usize> = HashMap::new();
        let mut afters: Vec<Vec<Spanned<String>>> = Vec::new();
        let mut name_spans = Vec::new();
        let mut declared: BTreeMap<String, usize> = BTreeMap::new();
        let mut inputs_at = HashMap::new();
        for (i, s) in file.steps.into_iter().enumerate() {
            let name = s.name.get_ref().clone();
            if !valid_name(&name) {
                return Err(src.error(
                    Some(s.name.span()),
                    format!("step name {name:?}: use letters, digits, '.', '_', '-'"),
                ));
            }
            if names.insert(name.clone(), i).is_some() {
                return Err(src.error(Some(s.name.span()), format!("two steps are named {name:?}")));
            }
            if s.command.trim().is_empty() {
                return Err(src.error(Some(s.name.span()), format!("step {name:?} has an empty command")));
            }
            let inputs = s.inputs.iter().map(&resolve).collect::<Result<Vec<_>, _>>()?;
            for (input, spanned) in inputs.iter().zip(&s.inputs) {
                inputs_at.entry(input.clone()).or_insert_with(|| src.error(Some(spanned.span()), "").at());
            }
            let outputs = s.outputs.iter().map(&resolve).collect::<Result<Vec<_>, _>>()?;
            let no_harvest = s.no_harvest.iter().map(&resolve).collect::<Result<Vec<_>, _>>()?;
            for (o, spanned) in outputs.iter().zip(&s.outputs) {
                if let Some(prev) = producers.insert(o.clone(), i) {
                    let other: &Step = &steps[prev];
                    let message = if prev == i {
                        format!("step {name:?} declares output {o} twice")
                    } else {
                        format!("{o} is produced by two steps: {:?} and {name:?}", other.name)
                    };
                    return Err(src.error(Some(spanned.span()), message));
                }
            }
            // An output inside another output: the two harvests would overlap, and writing one
            // out would replace part of the other.
            for (o, spanned) in outputs.iter().zip(&s.outputs) {
                if let Some((other, j)) = nested_output(&declared, o) {
                    let whose = if j == i {
                        format!("step {name:?} also declares")
                    } else {
                        format!("step {:?} declares", steps[j].name)
                    };
                    return Err(src.error(
                        Some(spanned.span()),
                        format!("output {o} overlaps output {other} that {whose}: outputs must not contain one another"),
                    ));
                }
                declared.insert(o.clone(), i);
            }
            for (n, spanned) in no_harvest.iter().zip(&s.no_harvest) {
                if !outputs.contains(n) {
                    return Err(src.error(
                        Some(spanned.span()),
                        format!("no_harvest {n} is not one of the step's outputs"),
                    ));
                }
            }
            if let Some(p) = &s.program {
                match &profile {
                    None => {
                        return Err(src.error(
                            Some(p.span()),
                            "the step names a program but the pipeline has no profile",
                        ));
                    }
                    Some(prof) if prof.program(p.get_ref()).is_none() => {
                        return Err(src.error(
                            Some(p.span()),
                            format!("profile {:?} has no program {:?}", prof.name, p.get_ref()),
                        ));
                    }
                    Some(_) => {}
                }
            }
            let resources = match s.resources {
                None => Resources::default(),
                Some(r) => {
                    let cpus = r.cpus.unwrap_or(1.0);
                    if !(0.0..=4096.0).contains(&cpus) {
                        return Err(src.error(
                            Some(s.name.span()),
                            format!("step {name:?}: cpus must be between 0 and 4096"),
                        ));
                    }
                    let memory_bytes = match &r.memory {
                        None => 0,
                        Some(m) => parse_memory(m.get_ref()).map_err(|e| src.error(Some(m.span()), e))?,
                    };
                    Resources { cpus, memory_bytes, labels: r.labels }
                }
            };
            let command = s.command.replace("{{data_root}}", &root);
            let env = s.env.into_iter().map(|(k, v)| (k, v.replace("{{data_root}}", &root))).collect();
            afters.push(s.after);
            name_spans.push(s.name.span());
            steps.push(Step {
                name,
                command,
                inputs,
                outputs,
                no_harvest,
                program: s.program.map(Spanned::into_inner),
                env,
                resources,
                timeout_secs: s.timeout_secs,
                retries: s.retries,
                deps: Vec::new(),
                serve_backend: s.serve_backend,
            });
        }
        if roots.is_empty()
            && let Some(i) = steps.iter().position(|s: &Step| s.serve_backend)
        {
            return Err(src.error(
                Some(name_spans[i].clone()),
                format!("step {:?} serves its backend: the pipeline must name its roots", steps[i].name),
            ));
        }
        // Dependencies: explicit `after`, and every input another step produces.
        for i in 0..steps.len() {
            let mut deps = Vec::new();
            for a in &afters[i] {
                match names.get(a.get_ref()) {
                    Some(&j) if j == i => {
                        return Err(
                            src.error(Some(a.span()), format!("step {:?} runs after itself", steps[i].name))
                        );
                    }
                    Some(&j) => deps.push(j),
                    None => {
                        return Err(
                            src.error(Some(a.span()), format!("after: no step named {:?}", a.get_ref()))
                        );
                    }
                }
            }
            for input in &steps[i].inputs {
                if let Some(&j) = producers.get(input) {
                    if j == i {
                        return Err(src.error(
                            Some(name_spans[i].clone()),
                            format!("step {:?} consumes its own output {input}", steps[i].name),
                        ));
                    }
                    deps.push(j);
                }
            }
            deps.sort_unstable();
            deps.dedup();
            steps[i].deps = deps;
        }
        let order = topological(&steps).map_err(|cycle| {
            let path: Vec<&str> = cycle.iter().map(|&i| steps[i].name.as_str()).collect();
            src.error(Some(name_spans[cycle[0]].clone()), format!("dependency cycle: {}", path.join(" -> ")))
        })?;
        // Reorder into the topological order, remapping indexes.
        let mut new_index = vec![0; steps.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old] = new;
        }
        let mut slots: Vec<Option<Step>> = steps.into_iter().map(Some).collect();
        let mut sorted = Vec::with_capacity(slots.len());
        for &old in &order {
            let mut s = slots[old].take().expect("each index once");
            s.deps = s.deps.iter().map(|&d| new_index[d]).collect();
            s.deps.sort_unstable();
            sorted.push(s);
        }
        let producers = producers.into_iter().map(|(p, i)| (p, new_index[i])).collect();
        Ok(Pipeline {
            name: file.name.into_inner(),
            file: abs_file,
            data_root,
            profile,
            steps: sorted,
            producers,
            inputs_at,
            roots,
            write_roots,
            imports,
            write_back: file.write_back,
        })
    }

    /// Reads a pipeline given as JSON (version 1: the TOML file's fields, plus `"version": 1`),
    /// as a program submits one. Relative paths resolve against the current directory.
    pub fn parse_json(text: &str) -> Result<Pipeline, FileError> {
        let file = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")).join("pipeline.json");
        let fail = |message: String| FileError { file: file.clone(), line: 0, column: 0, message };
        let mut v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| fail(format!("not JSON: {e}")))?;
        let Some(obj) = v.as_object_mut() else { return Err(fail("expected a JSON object".into())) };
        match obj.remove("version").and_then(|v| v.as_u64()) {
            Some(JSON_PIPELINE_VERSION) => {}
            Some(other) => {
                return Err(fail(format!(
                    "JSON pipeline version {other}: this coordinator reads version {JSON_PIPELINE_VERSION}"
                )));
            }
            None => return Err(fail(format!("missing \"version\": {JSON_PIPELINE_VERSION}"))),
        }
        let t: toml::Value =
            toml::Value::try_from(&v).map_err(|e| fail(format!("{e} (null is not a value)")))?;
        let text = toml::to_string(&t).map_err(|e| fail(format!("{e}")))?;
        Self::parse(&file, &text).map_err(|e| fail(e.message))
    }

    /// Re-checks what a submitted pipeline (deserialized, not parsed) says about where its
    /// steps may write: the same rules [`Pipeline::parse`] applies.
    pub fn check_submitted(&self) -> Result<(), String> {
        for r in self.roots.iter().chain(&self.write_roots).chain(&self.imports) {
            if normalize(r).as_deref() != Some(r.as_str()) || !r.starts_with('/') {
                return Err(format!("{r:?} is not an absolute normal path"));
            }
        }
        check_roots(&self.roots, &self.write_roots)?;
        if self.roots.is_empty()
            && let Some(s) = self.steps.iter().find(|s| s.serve_backend)
        {
            return Err(format!("step {:?} serves its backend: the pipeline must name its roots", s.name));
        }
        Ok(())
    }

    /// Where a step that serves its backend may write: the write roots, else the roots.
    pub fn harvest_roots(&self) -> &[String] {
        if self.write_roots.is_empty() { &self.roots } else { &self.write_roots }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// For each step, the steps that depend on it directly.
    pub fn dependents(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.steps.len()];
        for (i, s) in self.steps.iter().enumerate() {
            for &d in &s.deps {
                out[d].push(i);
            }
        }
        out
    }

    /// Where `input` is declared (`file:line:col`), or the pipeline file.
    pub fn input_at(&self, input: &str) -> String {
        self.inputs_at.get(input).cloned().unwrap_or_else(|| self.file.display().to_string())
    }

    /// Inputs no step of the pipeline produces: they must exist before the run.
    pub fn external_inputs(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .steps
            .iter()
            .flat_map(|s| s.inputs.iter())
            .filter(|p| !self.producers.contains_key(*p))
            .cloned()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Outputs no step consumes: what the run delivers.
    pub fn final_outputs(&self) -> Vec<String> {
        let consumed: std::collections::HashSet<&String> =
            self.steps.iter().flat_map(|s| &s.inputs).collect();
        let mut out: Vec<String> = self
            .steps
            .iter()
            .flat_map(|s| s.outputs.iter())
            .filter(|o| !consumed.contains(o))
            .cloned()
            .collect();
        out.sort();
        out
    }
}

/// An output already declared that contains `o` or lies inside it, with its step.
fn nested_output(declared: &BTreeMap<String, usize>, o: &str) -> Option<(String, usize)> {
    // Ancestors: each prefix of `o` that ends before a '/'.
    for (at, _) in o.match_indices('/').filter(|&(at, _)| at > 0) {
        if let Some(&j) = declared.get(&o[..at]) {
            return Some((o[..at].to_string(), j));
        }
    }
    if o == "/" {
        return declared.iter().next().map(|(k, &j)| (k.clone(), j));
    }
    // Descendants: the keys that start with `o/` sort together, right after `o/`.
    let below = format!("{o}/");
    declared
        .range(below.clone()..)
        .next()
        .filter(|(k, _)| k.starts_with(&below))
        .map(|(k, &j)| (k.clone(), j))
}

/// Kahn's algorithm, taking the lowest-numbered ready step first so the order follows the
/// file where it can. On a cycle, returns the steps of one cycle.
fn topological(steps: &[Step]) -> Result<Vec<usize>, Vec<usize>> {
    let n = steps.len();
    let mut indegree: Vec<usize> = steps.iter().map(|s| s.deps.len()).collect();
    let mut dependents = vec![Vec::new(); n];
    for (i, s) in steps.iter().enumerate() {
        for &d in &s.deps {
            dependents[d].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &dependents[i] {
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.insert(j);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk dependencies among the remaining steps until one repeats.
    let mut seen = vec![usize::MAX; n];
    let mut cur = (0..n).find(|&i| indegree[i] > 0).unwrap_or(0);
    let mut path = Vec::new();
    while seen[cur] == usize::MAX {
        seen[cur] = path.len();
        path.push(cur);
        cur = steps[cur].deps.iter().copied().find(|&d| indegree[d] > 0).unwrap_or(cur);
    }
    let mut cycle: Vec<usize> = path[seen[cur]..].to_vec();
    cycle.reverse();
    cycle.push(cycle[0]);
    Err(cycle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pipeline, FileError> {
        Pipeline::parse(Path::new("/p/pipe.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("should fail").to_string()
    }

    #[test]
    fn json_pipelines_are_checked_like_toml_ones() {
        let p = Pipeline::parse_json(
            r#"{"version": 1, "name": "bp", "roots": ["/data/run", "/logs/"], "imports": ["/data/in.txt"],
                "write_back": true,
                "steps": [{"name": "a.R1", "command": "echo a", "outputs": ["/logs/q1"], "serve_backend": true},
                          {"name": "b.R2", "command": "echo b", "after": ["a.R1"], "serve_backend": true,
                           "resources": {"cpus": 2, "memory": 1048576}, "timeout_secs": 60}]}"#,
        )
        .unwrap();
        assert_eq!(p.roots, vec!["/data/run".to_string(), "/logs".to_string()]);
        assert_eq!(p.imports, vec!["/data/in.txt".to_string()]);
        assert!(p.write_back && p.steps.iter().all(|s| s.serve_backend));
        assert_eq!(p.steps[1].deps, vec![0]);
        assert_eq!(p.steps[1].resources.memory_bytes, 1 << 20);
        let e = |t: &str| Pipeline::parse_json(t).expect_err("should fail").message;
        assert!(e(r#"{"name": "x", "steps": []}"#).contains("missing \"version\": 1"));
        assert!(
            e(r#"{"version": 2, "name": "x", "steps": []}"#)
                .contains("version 2: this coordinator reads version 1")
        );
        assert!(e("[1]").contains("expected a JSON object"));
        assert!(e("{").contains("not JSON"));
        assert!(
            e(r#"{"version": 1, "name": "x", "steps": [{"name": "a", "command": null}]}"#).contains("null")
        );
        assert!(
            e(r#"{"version": 1, "name": "x", "roots": ["/"], "steps": [{"name": "a", "command": "true"}]}"#)
                .contains("a root must not be /")
        );
        assert!(
            e(r#"{"version": 1, "name": "x", "roots": ["rel"], "steps": [{"name": "a", "command": "true"}]}"#)
                .contains("must be an absolute path")
        );
        assert!(
            e(r#"{"version": 1, "name": "x", "steps": [{"name": "a", "command": "true", "serve_backend": true}]}"#)
                .contains("must name its roots")
        );
        assert!(
            e(r#"{"version": 1, "name": "x", "steps": [{"name": "a", "command": "true", "bogus": 1}]}"#)
                .contains("unknown field")
        );
    }

    #[test]
    fn infers_dependencies_and_orders_steps() {
        let p = parse(
            r#"
name = "demo"
data_root = "data"
[[steps]]
name = "merge"
command = "cat {{data_root}}/a {{data_root}}/b > {{data_root}}/all"
inputs = ["a", "/p/data/b"]
outputs = ["all"]
[[steps]]
name = "make-a"
command = "echo a > {{data_root}}/a"
inputs = ["/ext/in"]
outputs = ["a"]
[[steps]]
name = "make-b"
command = "echo b"
outputs = ["./b/"]
after = ["make-a"]
resources = { cpus = 2, memory = "1.5G" }
"#,
        )
        .unwrap();
        let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["make-a", "make-b", "merge"]);
        assert_eq!(p.steps[2].deps, vec![0, 1]);
        assert_eq!(p.steps[1].deps, vec![0]);
        assert_eq!(p.steps[2].command, "cat /p/data/a /p/data/b > /p/data/all");
        assert_eq!(p.steps[1].outputs, ["/p/data/b"]);
        assert_eq!(p.steps[1].resources.memory_bytes, 3 << 29);
        assert_eq!(p.external_inputs(), ["/ext/in"]);
        assert_eq!(p.input_at("/ext/in"), "/p/pipe.toml:12:11");
        assert_eq!(p.input_at("/p/data/b"), "/p/pipe.toml:7:16");
        assert_eq!(p.final_outputs(), ["/p/data/all"]);
        assert_eq!(p.dependents()[0], vec![1, 2]);
    }

    #[test]
    fn errors_are_located() {
        assert_eq!(
            err("name = \"x\"\nsteps = [{ name = \"a\" }]\n"),
            "/p/pipe.toml:2:10: missing field `command`"
        );
        let e = err("name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\ncolour = 3\n");
        assert!(e.starts_with("/p/pipe.toml:5:1: unknown field `colour`"), "{e}");
        let e = err("name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\n");
        assert!(e.starts_with("/p/pipe.toml:4:"), "{e}");
        let two = "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\noutputs = [\"/o\"]\n\
                   [[steps]]\nname = \"b\"\ncommand = \"true\"\noutputs = [\"/x\", \"/o\"]\n";
        assert_eq!(err(two), "/p/pipe.toml:9:18: /o is produced by two steps: \"a\" and \"b\"");
        let nested = "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\noutputs = [\"/d/f\"]\n\
                      [[steps]]\nname = \"b\"\ncommand = \"true\"\noutputs = [\"/d/fx\", \"/d\"]\n";
        assert_eq!(
            err(nested),
            "/p/pipe.toml:9:21: output /d overlaps output /d/f that step \"a\" declares: \
             outputs must not contain one another"
        );
        let one =
            "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\noutputs = [\"/d\", \"/d/e/f\"]\n";
        assert_eq!(
            err(one),
            "/p/pipe.toml:5:18: output /d/e/f overlaps output /d that step \"a\" also declares: \
             outputs must not contain one another"
        );
        let siblings = "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\noutputs = [\"/d\", \"/d2\", \"/d.x\"]\n";
        assert!(parse(siblings).is_ok());
        let cycle = "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\ninputs = [\"/b\"]\noutputs = [\"/a\"]\n\
                     [[steps]]\nname = \"b\"\ncommand = \"true\"\ninputs = [\"/a\"]\noutputs = [\"/b\"]\n";
        let e = err(cycle);
        assert!(e.contains("dependency cycle: ") && e.contains("a -> b") || e.contains("b -> a"), "{e}");
        assert!(e.starts_with("/p/pipe.toml:3:8") || e.starts_with("/p/pipe.toml:8:8"), "{e}");
        let after = "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\nafter = [\"zz\"]\n";
        assert_eq!(err(after), "/p/pipe.toml:5:10: after: no step named \"zz\"");
        let dotdot = "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\noutputs = [\"../up\"]\n";
        assert!(err(dotdot).starts_with("/p/pipe.toml:5:12: path \"../up\""));
        let mem =
            "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\nresources = { memory = \"lots\" }\n";
        assert!(err(mem).starts_with("/p/pipe.toml:5:24: invalid memory"), "{}", err(mem));
        let prog = "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\nprogram = \"bwa\"\n";
        assert!(err(prog).contains("no profile"));
    }

    #[test]
    fn profiles_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "name = \"demo\"\n[[programs]]\nkey = \"t\"\nkind = \"file\"\nartifact_path = \"/opt/t/bin\"\nbuild = \"true\"\n",
        )
        .unwrap();
        let p = Profile::load(&good).unwrap();
        assert_eq!(p.program("t").unwrap().artifact_path, "/opt/t/bin");
        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "name = \"demo\"\n[[programs]]\nkey = \"t\"\nkind = \"rpm\"\nartifact_path = \"/opt/t\"\nbuild = \"true\"\n",
        )
        .unwrap();
        let e = Profile::load(&bad).unwrap_err();
        assert_eq!((e.line, e.column), (4, 8), "{e}");
        let pipe = dir.path().join("pipe.toml");
        let text = "name = \"x\"\nprofile = \"good.toml\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\nprogram = \"nope\"\n";
        let e = Pipeline::parse(&pipe, text).unwrap_err();
        assert_eq!((e.line, e.column), (6, 11), "{e}");
        let text = "name = \"x\"\nprofile = \"missing.toml\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\n";
        let e = Pipeline::parse(&pipe, text).unwrap_err();
        assert_eq!((e.line, e.column), (2, 11), "{e}");
    }
}
