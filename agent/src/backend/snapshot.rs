//! `snapshot`, the cloud backend: inputs and programs come from snapshots in the
//! coordinator's store, resolved through the snapshot registry, restored (once per agent, see
//! [`crate::cache`]) into read-only lower dirs; the step sees one merged view at
//! `<step>/merged`, an overlayfs mount (lower: program, then inputs; upper and work on the
//! step's scratch) when the agent can mount, else a tree of copies (reflinks where the
//! filesystem has them). Either way the step never gets an inode of the cache (see
//! [`super::layers`]). Outputs are written through the merged view, never into a mounted upper
//! dir. Harvest packs the declared outputs that exist into one snapshot per output directory,
//! streamed to the coordinator, and records one registry entry per output.
//!
//! Every symlink at or below a restored path must stay inside it (checked once per snapshot
//! and path, [`crate::cache::Cache::check_links`]), and nothing is written into the view
//! through a symlink.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use protocol::registry::Provenance;
use protocol::registry::program_key;
use protocol::{Registry, RegistryEntry};
use tracing::info;

use super::layers::{self, Copies, Share};
use super::{OverlayVolume, StepContext, StorageBackend, View, parent_of, read_registry};
use crate::cache::{Pin, remove_tree};
use crate::mounts::{self, NsMount};

pub struct Snapshot {
    ctx: StepContext,
    registry: Registry,
    pins: Vec<Pin>,
    /// Snapshot paths presented at other paths (topmost layer): hardlinks of cached files,
    /// never shown to the step itself (an overlayfs lower layer, or copied into the view).
    remap: PathBuf,
    remap_used: bool,
    program_layers: Vec<PathBuf>,
    input_layers: Vec<PathBuf>,
    program_binds: Vec<String>,
    merged: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    mounted: bool,
    /// What the copied view (no overlayfs) took from the layers.
    copies: Copies,
    outputs: Vec<(String, bool)>,
    /// Original directories of every volume: what a namespace binds.
    volume_dirs: Vec<String>,
    new_entries: Vec<(String, RegistryEntry)>,
}

fn rel(p: &str) -> &str {
    p.trim_start_matches('/')
}

impl Snapshot {
    pub fn new(ctx: &StepContext) -> Result<Self> {
        let registry = match &ctx.registry {
            Some(r) => (**r).clone(),
            None => read_registry(&ctx.settings.snapshot_registry)?,
        };
        let dir = &ctx.step_dir;
        Ok(Self {
            ctx: ctx.clone(),
            registry,
            pins: Vec::new(),
            remap: dir.join("layers/remap"),
            remap_used: false,
            program_layers: Vec::new(),
            input_layers: Vec::new(),
            program_binds: Vec::new(),
            merged: dir.join("merged"),
            upper: dir.join("scratch/upper"),
            work: dir.join("scratch/work"),
            mounted: false,
            copies: Copies::default(),
            outputs: Vec::new(),
            volume_dirs: Vec::new(),
            new_entries: Vec::new(),
        })
    }

    fn locate(&self, path: &str) -> Vec<(String, String, String)> {
        self.registry.locate(path)
    }

    async fn restore(&mut self, id: &str) -> Result<PathBuf> {
        let pin = self.ctx.cache.get(id, self.ctx.remote.as_ref()).await?;
        let path = pin.path.clone();
        self.pins.push(pin);
        Ok(path)
    }

    /// Presents `isp` of the snapshot `id` (restored at `tree`) at `at` through the remap
    /// layer. (A link into the cache would hand the step the cache itself.)
    async fn remap(&mut self, at: &str, id: &str, tree: &Path, isp: &str) -> Result<()> {
        let src = tree.join(layers::plain(Path::new(isp))?);
        if fs::symlink_metadata(&src).is_err() {
            bail!("snapshot {id} holds no {isp} (registered for {at})");
        }
        fs::create_dir_all(&self.remap).with_context(|| format!("creating {}", self.remap.display()))?;
        let remap = self.remap.clone();
        let at_rel = PathBuf::from(rel(at));
        tokio::task::spawn_blocking(move || layers::copy_tree(&src, &remap, &at_rel, Share::Hardlink, None))
            .await?
            .with_context(|| format!("presenting {at} from snapshot {id}"))?;
        self.remap_used = true;
        Ok(())
    }

    async fn restore_program_entry(&mut self, key: &str) -> Result<()> {
        let e = self.registry.get(key).cloned().ok_or_else(|| {
            anyhow!("program {key} is not in the snapshot registry (build the profile first)")
        })?;
        let tree = self.restore(&e.snapshot_id).await?;
        let isp = rel(&e.in_snapshot_path).to_string();
        self.ctx
            .cache
            .check_links(&e.snapshot_id, &tree, &isp)
            .await
            .with_context(|| format!("program {key}"))?;
        let bind = e.bind_path.clone().unwrap_or_else(|| parent_of(&format!("/{isp}")));
        let bind_rel = rel(&bind).trim_end_matches('/').to_string();
        layers::plain(Path::new(&bind_rel)).with_context(|| format!("program {key}: bind_path {bind}"))?;
        if bind_rel.is_empty() || isp == bind_rel || isp.starts_with(&format!("{bind_rel}/")) {
            if !self.program_layers.contains(&tree) {
                self.program_layers.push(tree);
            }
        } else {
            let name = Path::new(&isp)
                .file_name()
                .ok_or_else(|| anyhow!("program {key} has an empty in_snapshot_path"))?;
            let at = format!("/{bind_rel}/{}", name.to_string_lossy());
            self.remap(&at, &e.snapshot_id, &tree, &isp).await?;
        }
        info!(program = %key, snapshot = %e.snapshot_id, bind_path = %bind, "program restored");
        self.program_binds.push(format!("/{bind_rel}"));
        Ok(())
    }

    fn lowers(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if self.remap_used {
            out.push(self.remap.clone());
        }
        out.extend(self.program_layers.iter().cloned());
        out.extend(self.input_layers.iter().filter(|l| !self.program_layers.contains(l)).cloned());
        out
    }

    fn in_view(&self, path: &str) -> PathBuf {
        self.merged.join(rel(path))
    }

    fn volume(&self, path: &str, harvest: bool) -> OverlayVolume {
        let dir = parent_of(path);
        OverlayVolume {
            path: path.to_string(),
            original_dir: dir.clone(),
            scratch_dir: self.in_view(&dir).to_string_lossy().into_owned(),
            bind_file: self.in_view(path).to_string_lossy().into_owned(),
            harvest,
        }
    }

    fn provenance(&self) -> Provenance {
        Provenance { run: self.ctx.run.clone(), step: self.ctx.step.clone(), attempt: self.ctx.attempt_id }
    }

    /// Whether `rel_path` in the view was written by this step (not only seen in a lower).
    fn written_here(&self, rel_path: &str) -> bool {
        if self.mounted {
            return fs::symlink_metadata(self.upper.join(rel_path)).is_ok();
        }
        let path = self.merged.join(rel_path);
        fs::symlink_metadata(&path).is_ok() && !self.copies.untouched(&path)
    }
}

#[async_trait]
impl StorageBackend for Snapshot {
    fn name(&self) -> &str {
        "snapshot"
    }

    async fn prepare_inputs(&mut self, inputs: &[String], ovs: &mut Vec<OverlayVolume>) -> Result<()> {
        // Group by snapshot: each is restored once, whatever number of inputs it holds.
        let mut by_snapshot: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let mut order = Vec::new();
        for input in inputs {
            let found = self.locate(input);
            if found.is_empty() {
                bail!(
                    "input {input} is not in the snapshot registry {} (import it with `pype-coordinator import`)",
                    self.ctx.settings.snapshot_registry.display()
                );
            }
            for (at, id, isp) in found {
                if !by_snapshot.contains_key(&id) {
                    order.push(id.clone());
                }
                by_snapshot.entry(id).or_default().push((at, isp));
            }
            ovs.push(self.volume(input, false));
            self.volume_dirs.push(parent_of(input));
        }
        for id in order {
            let tree = self.restore(&id).await?;
            let mut direct = false;
            for (at, isp) in &by_snapshot[&id] {
                self.ctx.cache.check_links(&id, &tree, isp).await.with_context(|| format!("input {at}"))?;
                if rel(at) == isp {
                    direct = true;
                } else {
                    self.remap(at, &id, &tree, isp).await?;
                }
            }
            if direct {
                self.input_layers.push(tree);
            }
        }
        Ok(())
    }

    async fn restore_program(&mut self, profile_name: &str, program_key_name: &str) -> Result<()> {
        self.restore_program_entry(&program_key(profile_name, program_key_name)).await
    }

    async fn prepare_outputs(
        &mut self,
        outputs: &[String],
        output_harvest: &BTreeMap<String, bool>,
        ovs: &mut Vec<OverlayVolume>,
    ) -> Result<()> {
        if outputs.is_empty() && self.program_binds.is_empty() && self.lowers().is_empty() {
            // No inputs, program or outputs: no view to build.
            return Ok(());
        }
        for d in [&self.merged, &self.upper, &self.work] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut lowers = self.lowers();
        if lowers.is_empty() {
            let empty = self.ctx.step_dir.join("layers/empty");
            fs::create_dir_all(&empty)?;
            lowers.push(empty);
        }
        let settings = &self.ctx.settings;
        let mut why_not = if !settings.mount_overlay {
            Some("PYPE_OVERLAY_MOUNT=never".to_string())
        } else if !mounts::can_mount() {
            Some("the agent is not root".to_string())
        } else {
            None
        };
        if why_not.is_none() {
            match mounts::mount_overlay(&lowers, &self.upper, &self.work, &self.merged) {
                Ok(()) => {
                    self.mounted = true;
                    info!(layers = lowers.len(), merged = %self.merged.display(), "overlayfs view mounted");
                }
                Err(e) => why_not = Some(format!("mounting overlayfs failed: {e}")),
            }
        }
        if let Some(reason) = why_not {
            info!(layers = lowers.len(), reason = %reason, "building the merged view with copies (no overlayfs)");
            let merged = self.merged.clone();
            self.copies = tokio::task::spawn_blocking(move || copy_view(&lowers, &merged)).await??;
        }
        for bind in self.program_binds.clone() {
            let mut v = self.volume(&bind, false);
            v.original_dir = bind.clone();
            v.scratch_dir = v.bind_file.clone();
            ovs.push(v);
            self.volume_dirs.push(bind);
        }
        for out in outputs {
            let dir = parent_of(out);
            layers::create_dirs_beneath(&self.merged, Path::new(rel(&dir)), &self.in_view(out))
                .with_context(|| format!("output {out}"))?;
            let harvest = output_harvest.get(out).copied().unwrap_or(true);
            self.outputs.push((out.clone(), harvest));
            ovs.push(self.volume(out, harvest));
            self.volume_dirs.push(parent_of(out));
        }
        // The view shows these directories at their real paths: none may be a link in it.
        for d in &self.volume_dirs {
            layers::check_beneath(&self.merged, Path::new(rel(d)), true)
                .with_context(|| format!("showing {d} in the view"))?;
        }
        Ok(())
    }

    async fn harvest(&mut self, _upper: &Path, original_dir: &Path) -> Result<()> {
        let mut rels = Vec::new();
        let mut harvested = Vec::new();
        for (out, harvest) in &self.outputs {
            if !*harvest || Path::new(&parent_of(out)) != original_dir {
                continue;
            }
            // Never packed through a link the step left in the view.
            layers::check_beneath(&self.merged, Path::new(rel(out)), false)
                .with_context(|| format!("harvesting {out}"))?;
            if fs::symlink_metadata(self.in_view(out)).is_ok() {
                rels.push(PathBuf::from(rel(out)));
                harvested.push(out.clone());
            }
        }
        if rels.is_empty() {
            return Ok(());
        }
        let info = self.ctx.remote.store(&self.merged, rels).await?;
        info!(
            snapshot = %info.snapshot_id,
            dir = %original_dir.display(),
            outputs = harvested.len(),
            bytes = info.content_bytes,
            wire_bytes = info.wire_bytes,
            "outputs harvested into a snapshot"
        );
        for out in harvested {
            let entry = RegistryEntry {
                snapshot_id: info.snapshot_id.clone(),
                in_snapshot_path: rel(&out).to_string(),
                bind_path: None,
                produced_by: Some(self.provenance()),
            };
            self.registry.entries.insert(out.clone(), entry.clone());
            self.new_entries.push((out, entry));
        }
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        let merged = std::mem::take(&mut self.mounted).then(|| self.merged.clone());
        self.pins.clear();
        // A step that needed no view has no step directory: nothing can be mounted in one
        // that does not exist (and the mount table is not read, a cost that grows with the
        // number of mounts on the host, for every empty step).
        let dir = fs::symlink_metadata(&self.ctx.step_dir).is_ok().then(|| self.ctx.step_dir.clone());
        if merged.is_none() && dir.is_none() {
            return Ok(());
        }
        // Unmounting a view flushes what the step wrote into it, seconds for many files: on a
        // blocking thread, so that heartbeats and other steps go on meanwhile.
        let problems = tokio::task::spawn_blocking(move || {
            let mut problems = Vec::new();
            let mut unmount = |m: &Path| {
                if let Err(e) = mounts::unmount(m) {
                    problems.push(format!("unmounting {}: {e}", m.display()));
                }
            };
            if let Some(m) = merged {
                unmount(&m);
            }
            if let Some(dir) = dir {
                for m in mounts::mounts_under(&dir) {
                    unmount(&m);
                }
                remove_tree(&dir);
            }
            problems
        })
        .await?;
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        Ok(())
    }

    async fn check_outputs(&mut self, paths: &[String]) -> Result<BTreeMap<String, Option<u64>>> {
        let q = self.registry.size_queries(paths);
        let answers =
            if q.queries.is_empty() { Vec::new() } else { self.ctx.remote.stat(q.queries.clone()).await? };
        Ok(paths.iter().cloned().zip(q.sizes(answers)).collect())
    }

    async fn prepare_build(&mut self, _paths: &[String], program_keys: &[String]) -> Result<()> {
        for key in program_keys {
            if self.registry.get(key).is_some() {
                self.restore_program_entry(key).await?;
            }
        }
        Ok(())
    }

    async fn stage_program(
        &mut self,
        profile_name: &str,
        program_key_name: &str,
        artifact_path: &Path,
    ) -> Result<()> {
        let key = program_key(profile_name, program_key_name);
        let artifact = artifact_path.to_string_lossy().into_owned();
        let rel_path = rel(&artifact).to_string();
        layers::check_beneath(&self.merged, Path::new(&rel_path), false)
            .with_context(|| format!("staging {artifact}"))?;
        let meta = fs::symlink_metadata(self.merged.join(&rel_path))
            .with_context(|| format!("the build did not produce {artifact}"))?;
        if self.registry.get(&key).is_some() && !self.written_here(&rel_path) {
            info!(program = %key, "program already staged; kept");
            return Ok(());
        }
        let info = self.ctx.remote.store(&self.merged, vec![PathBuf::from(&rel_path)]).await?;
        let bind_path = if meta.is_dir() { artifact.clone() } else { parent_of(&artifact) };
        info!(program = %key, snapshot = %info.snapshot_id, bytes = info.content_bytes, "program staged");
        let entry = RegistryEntry {
            snapshot_id: info.snapshot_id,
            in_snapshot_path: format!("/{rel_path}"),
            bind_path: Some(bind_path),
            produced_by: Some(self.provenance()),
        };
        self.registry.entries.insert(key.clone(), entry.clone());
        self.new_entries.push((key, entry));
        Ok(())
    }

    fn view(&self) -> View {
        let mut dirs: Vec<&str> = self.volume_dirs.iter().map(|d| d.trim_end_matches('/')).collect();
        dirs.sort();
        dirs.dedup();
        // Keep only the outermost: binding a directory shows everything below it.
        let mut outer: Vec<&str> = Vec::new();
        for d in dirs {
            if !outer.iter().any(|o| d.starts_with(&format!("{o}/"))) {
                outer.push(d);
            }
        }
        // Binding over `/`, or over a directory holding the agent's own files, would hide
        // what the snippet and the agent need: fall back to rewriting paths.
        if outer.is_empty() {
            // Nothing to show: the snippet runs on the host's view, no namespace needed.
            return View::Host;
        }
        let own = [&self.ctx.step_dir, &self.ctx.settings.work_dir];
        if outer.iter().any(|d| d.is_empty() || own.iter().any(|p| p.starts_with(d))) {
            return View::RewriteOnly;
        }
        View::Mounts(
            outer
                .into_iter()
                .map(|d| NsMount::Bind { src: self.in_view(d), dst: PathBuf::from(d) })
                .collect(),
        )
    }

    fn take_new_entries(&mut self) -> Vec<(String, RegistryEntry)> {
        std::mem::take(&mut self.new_entries)
    }
}

/// Builds a merged view without overlayfs: directories created, files copied (reflinked where
/// the filesystem can: never hardlinked, see [`super::layers`]), links copied; the first layer
/// holding a path wins.
fn copy_view(lowers: &[PathBuf], merged: &Path) -> Result<Copies> {
    let mut copies = Copies::default();
    for layer in lowers {
        layers::copy_tree(layer, merged, Path::new(""), Share::Copy, Some(&mut copies))?;
    }
    Ok(copies)
}
