//! `registry` (get, remove, export, import, write-out) and `gc`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use protocol::Registry;

use crate::persist::state::now_ms;
use crate::persist::working::WorkingRegistry;

pub enum RegistryOp {
    Show,
    Get(String),
    Import(PathBuf),
    Export(Option<PathBuf>),
    Remove(Vec<String>),
    WriteOut(Vec<String>),
}

/// `pype-coordinator registry ...`.
pub fn registry(dir: &Path, op: RegistryOp) -> Result<()> {
    let working = WorkingRegistry::open(dir)?;
    match op {
        RegistryOp::Show => {
            let reg = working.load()?;
            println!("{:<48} {:<38} {:<32} PRODUCED_BY", "PATH", "SNAPSHOT", "IN_SNAPSHOT_PATH");
            for (k, e) in &reg.entries {
                let by = e
                    .produced_by
                    .as_ref()
                    .map(|p| format!("{}/{}/{}", p.run, p.step, p.attempt))
                    .unwrap_or_default();
                println!("{k:<48} {:<38} {:<32} {by}", e.snapshot_id, e.in_snapshot_path);
            }
            Ok(())
        }
        RegistryOp::Get(path) => {
            let reg = working.load()?;
            let e = reg.get(&path).ok_or_else(|| anyhow!("no registry entry for {path}"))?;
            let mut one = Registry::default();
            one.entries.insert(path, e.clone());
            print!("{}", one.to_json());
            Ok(())
        }
        RegistryOp::Import(file) => {
            let incoming = crate::pipeline::stepfile::read_registry(&file)?;
            let n = incoming.entries.len();
            let changed = working.merge(incoming.entries)?;
            println!("merged {n} entries from {} ({changed} new or changed)", file.display());
            Ok(())
        }
        RegistryOp::Export(out) => {
            let json = working.load()?.to_json();
            match out {
                Some(path) => transport::pki::write_file(&path, json.as_bytes(), 0o644),
                None => {
                    print!("{json}");
                    Ok(())
                }
            }
        }
        RegistryOp::WriteOut(paths) => {
            let reg = working.load()?;
            let store = crate::persist::config::open_store(dir)?;
            for path in &paths {
                let found = reg.locate(path);
                if found.is_empty() || !path.starts_with('/') {
                    bail!("{path} is not in the registry");
                }
                // Beneath the asked path's parent: nothing in the tree below it is followed.
                let root =
                    Path::new(path).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
                std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
                for (at, id, isp) in found {
                    let stats = store
                        .write_out(&id, &isp, Path::new(&at), &root)
                        .with_context(|| format!("writing {at} from snapshot {id}"))?;
                    println!("{at}\t{} written, {} unchanged (from {id})", stats.written, stats.unchanged);
                }
            }
            Ok(())
        }
        RegistryOp::Remove(paths) => {
            let removed =
                working.update(|reg| paths.iter().filter(|p| reg.entries.remove(*p).is_some()).count())?;
            if removed < paths.len() {
                bail!("removed {removed} of {} entries (the others were not in the registry)", paths.len());
            }
            println!("removed {removed} entries");
            Ok(())
        }
    }
}

/// `pype-coordinator gc`: removes snapshots no registry entry references and older than
/// `min_age` (younger ones may belong to a harvest whose entries are being merged).
pub fn gc(dir: &Path, min_age: Duration, dry_run: bool) -> Result<()> {
    let reg = WorkingRegistry::open(dir)?.load()?;
    let store = crate::persist::config::open_store(dir)?;
    let referenced: std::collections::HashSet<&str> =
        reg.entries.values().map(|e| e.snapshot_id.as_str()).collect();
    let now = (now_ms() / 1000) as i64;
    let (mut removed, mut bytes, mut kept) = (0, 0u64, 0);
    for id in store.list()? {
        if referenced.contains(id.as_str()) {
            kept += 1;
            continue;
        }
        let Some(meta) = store.meta(&id)? else { continue };
        if now - meta.created_at < min_age.as_secs() as i64 {
            kept += 1;
            continue;
        }
        if !dry_run {
            store.remove(&id)?;
        }
        removed += 1;
        bytes += meta.wire_bytes;
        println!("{} {id} ({} bytes)", if dry_run { "would remove" } else { "removed" }, meta.wire_bytes);
    }
    println!(
        "{removed} snapshots ({bytes} bytes) {}, {kept} kept",
        if dry_run { "to remove" } else { "removed" }
    );
    // Blobs no manifest references any more (chunks shared with a kept snapshot stay).
    if let Some(cas) = store.cas()
        && !dry_run
    {
        let (blobs, blob_bytes) = cas.gc_blobs(min_age)?;
        println!("{blobs} blobs ({blob_bytes} bytes) no snapshot references removed");
    }
    Ok(())
}
