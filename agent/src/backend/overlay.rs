//! `overlay`: outputs are written to per-directory scratch dirs under `PYPE_OVERLAY_SCRATCH`
//! and, when the step succeeds, copied back into their original directories; a failed step
//! leaves the originals untouched. As in bio-pype, an output whose directory equals, contains
//! or is inside an input's directory is written in place.
//!
//! The copy back ([`land`]) is done here, not by rsync: every file is written under a temporary
//! name beside its destination, the filesystem is synced once, then each file is renamed into
//! place, so a crash never leaves a half-written file at a real output path. Modes and mtimes
//! are kept.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use async_trait::async_trait;
use filetime::FileTime;
use tracing::info;

use super::{OverlayVolume, StepContext, StorageBackend, View, parent_of};
use crate::mounts::NsMount;

pub struct Overlay {
    /// `<scratch root>/attempt-<id>`.
    base: PathBuf,
    input_dirs: Vec<PathBuf>,
    /// Original dir → its scratch `upper` and overlayfs `work` dirs.
    scratch: BTreeMap<String, (PathBuf, PathBuf)>,
    outputs: Vec<(String, bool)>,
}

impl Overlay {
    pub fn new(ctx: &StepContext) -> Result<Self> {
        let root = ctx.settings.scratch_root()?;
        Ok(Self {
            base: root.join(format!("attempt-{}", ctx.attempt_id)),
            input_dirs: Vec::new(),
            scratch: BTreeMap::new(),
            outputs: Vec::new(),
        })
    }

    fn in_place(&self, dir: &Path) -> bool {
        self.input_dirs.iter().any(|i| dir == i || dir.starts_with(i) || i.starts_with(dir))
    }
}

#[async_trait]
impl StorageBackend for Overlay {
    fn name(&self) -> &str {
        "overlay"
    }

    async fn prepare_inputs(&mut self, inputs: &[String], _ovs: &mut Vec<OverlayVolume>) -> Result<()> {
        self.input_dirs = inputs.iter().map(|i| PathBuf::from(parent_of(i))).collect();
        Ok(())
    }

    async fn prepare_outputs(
        &mut self,
        outputs: &[String],
        output_harvest: &BTreeMap<String, bool>,
        ovs: &mut Vec<OverlayVolume>,
    ) -> Result<()> {
        for out in outputs {
            let dir = parent_of(out);
            if self.in_place(Path::new(&dir)) {
                info!(output = %out, "output shares a directory with an input: written in place");
                continue;
            }
            let n = self.scratch.len();
            let (upper, work) = self
                .scratch
                .entry(dir.clone())
                .or_insert_with(|| {
                    (self.base.join(format!("{n}/upper")), self.base.join(format!("{n}/work")))
                })
                .clone();
            for d in [&upper, &work] {
                fs::create_dir_all(d).with_context(|| format!("creating scratch dir {}", d.display()))?;
            }
            let name = Path::new(out).file_name().map(|n| n.to_os_string()).unwrap_or_default();
            let harvest = output_harvest.get(out).copied().unwrap_or(true);
            self.outputs.push((out.clone(), harvest));
            ovs.push(OverlayVolume {
                path: out.clone(),
                original_dir: dir,
                scratch_dir: upper.to_string_lossy().into_owned(),
                bind_file: upper.join(name).to_string_lossy().into_owned(),
                harvest,
            });
        }
        Ok(())
    }

    async fn harvest(&mut self, upper: &Path, original_dir: &Path) -> Result<()> {
        let mut names = Vec::new();
        for (out, harvest) in &self.outputs {
            if *harvest
                && Path::new(&parent_of(out)) == original_dir
                && let Some(n) = Path::new(out).file_name()
            {
                names.push(n.to_os_string());
            }
        }
        let (upper, original) = (upper.to_path_buf(), original_dir.to_path_buf());
        let landed = tokio::task::spawn_blocking(move || -> Result<u64> {
            let mut plan = Plan::default();
            for n in names {
                let src = upper.join(&n);
                if fs::symlink_metadata(&src).is_ok() {
                    plan_tree(&src, &original.join(&n), &mut plan)?;
                }
            }
            plan.execute()
        })
        .await??;
        info!(dir = %original_dir.display(), files = landed, "harvested scratch into place");
        Ok(())
    }

    async fn cleanup(&mut self) -> Result<()> {
        if fs::symlink_metadata(&self.base).is_ok() {
            let base = self.base.clone();
            tokio::task::spawn_blocking(move || fs::remove_dir_all(&base))
                .await?
                .with_context(|| format!("removing scratch {}", self.base.display()))?;
        }
        Ok(())
    }

    fn view(&self) -> View {
        if self.scratch.is_empty() {
            return View::Host;
        }
        View::Mounts(
            self.scratch
                .iter()
                .map(|(dir, (upper, work))| NsMount::Overlay {
                    lower: PathBuf::from(dir),
                    upper: upper.clone(),
                    work: work.clone(),
                    target: PathBuf::from(dir),
                })
                .collect(),
        )
    }
}

/// A copy back into place, in three phases (see the module docs).
#[derive(Default)]
struct Plan {
    /// Directories to create (mode, mtime applied after their contents).
    dirs: Vec<(PathBuf, u32, FileTime)>,
    /// Temporary name → final name.
    renames: Vec<(PathBuf, PathBuf)>,
}

fn temp_beside(dst: &Path) -> PathBuf {
    let name = dst.file_name().unwrap_or_default();
    dst.with_file_name(transport::fsafe::Dir::temp_name(name))
}

fn plan_tree(src: &Path, dst: &Path, plan: &mut Plan) -> Result<()> {
    let meta = fs::symlink_metadata(src).with_context(|| format!("reading {}", src.display()))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        match fs::symlink_metadata(dst) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(dst).with_context(|| format!("replacing {}", dst.display()))?;
                fs::create_dir(dst).with_context(|| format!("creating {}", dst.display()))?;
            }
            Err(_) => fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?,
        }
        plan.dirs.push((
            dst.to_path_buf(),
            meta.mode() & 0o7777,
            FileTime::from_last_modification_time(&meta),
        ));
        let mut entries: Vec<_> = fs::read_dir(src)
            .with_context(|| format!("listing {}", src.display()))?
            .collect::<io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            plan_tree(&e.path(), &dst.join(e.file_name()), plan)?;
        }
    } else if ft.is_file() {
        let tmp = temp_beside(dst);
        fs::copy(src, &tmp).with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        filetime::set_file_mtime(&tmp, FileTime::from_last_modification_time(&meta))?;
        plan.renames.push((tmp, dst.to_path_buf()));
    } else if ft.is_symlink() {
        let target = fs::read_link(src)?;
        let tmp = temp_beside(dst);
        std::os::unix::fs::symlink(&target, &tmp)
            .with_context(|| format!("creating link {}", tmp.display()))?;
        plan.renames.push((tmp, dst.to_path_buf()));
    } else if ft.is_char_device() && meta.rdev() == 0 {
        // An overlayfs whiteout: the snippet deleted something; nothing to land.
    } else {
        anyhow::bail!("{} is a device, fifo or socket: not harvested", src.display());
    }
    Ok(())
}

impl Plan {
    /// Syncs, renames into place, then applies directory modes and mtimes. Returns the number
    /// of files landed. On failure the temporary files are removed.
    fn execute(self) -> Result<u64> {
        let result = self.land();
        if result.is_err() {
            for (tmp, _) in &self.renames {
                let _ = fs::remove_file(tmp);
            }
        }
        result
    }

    fn land(&self) -> Result<u64> {
        if let Some(dir) = self.renames.first().and_then(|(tmp, _)| tmp.parent()) {
            sync_fs(dir)?;
        }
        for (tmp, dst) in &self.renames {
            if fs::symlink_metadata(dst).map(|m| m.is_dir()).unwrap_or(false) {
                fs::remove_dir_all(dst).with_context(|| format!("replacing directory {}", dst.display()))?;
            }
            fs::rename(tmp, dst).with_context(|| format!("moving {} into place", dst.display()))?;
        }
        for (dir, mode, mtime) in self.dirs.iter().rev() {
            fs::set_permissions(dir, fs::Permissions::from_mode(*mode))?;
            filetime::set_file_mtime(dir, *mtime)?;
        }
        Ok(self.renames.len() as u64)
    }
}

/// Flushes the filesystem holding `path` (one `syncfs` instead of an fsync per file).
fn sync_fs(path: &Path) -> Result<()> {
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::syncfs(&f)
        .map_err(io::Error::from)
        .with_context(|| format!("syncing the filesystem of {}", path.display()))
}
