//! Test data: a deterministic byte source and a comparable listing of a tree.

use std::path::{Path, PathBuf};

/// A deterministic pseudo-random byte source (xorshift), for test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// One entry of a tree as compared by the round-trip tests.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub kind: &'static str,
    pub mode: u32,
    pub mtime: i64,
    /// BLAKE3 of file contents, or the link target.
    pub content: String,
}

/// Every entry under `root` (not `root` itself), sorted, with contents hashed.
pub fn manifest(root: &Path) -> Vec<Entry> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let rel_child = rel.join(e.file_name());
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let (kind, content) = if meta.is_dir() {
                stack.push(rel_child.clone());
                ("dir", String::new())
            } else if meta.file_type().is_symlink() {
                ("symlink", std::fs::read_link(&path).unwrap().display().to_string())
            } else {
                let mut h = blake3::Hasher::new();
                h.update_reader(std::fs::File::open(&path).unwrap()).unwrap();
                ("file", h.finalize().to_hex().to_string())
            };
            let mode = if kind == "symlink" { 0 } else { meta.mode() & 0o7777 };
            out.push(Entry { path: rel_child, kind, mode, mtime: meta.mtime(), content });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}
