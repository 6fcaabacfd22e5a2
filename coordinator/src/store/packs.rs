//! Blobs of an object store, kept in packs ([`transport::pack`]): the blobs that arrive are
//! gathered into an open pack in memory, sealed and uploaded once it reaches
//! [`transport::pack::PACK_TARGET`] (or when a snapshot commits), with the pack's index beside it. The index of
//! every pack (blob → pack, offset) is held in memory, loaded when the store opens; packs read
//! back are kept in the store's read cache, verified against their digest.
//!
//! The object store itself is behind [`Objects`], so this module names no SDK.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow, bail};
use tracing::{debug, info};
use transport::cas::{self, Chunk, Digest};
use transport::pack::{MAX_PACK, PackBuilder, PackIndex, Placed, record};

/// Largest pack index read from the object store.
const MAX_INDEX: u64 = 256 << 20;

/// What [`Packs`] needs of an object store. Keys are full keys.
pub trait Objects: Send + Sync {
    /// An object's bytes, `None` when absent; an error, before anything is read, when it is
    /// longer than `max` (objects agents wrote are not trusted for their size).
    fn get(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>>;
    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()>;
    /// Keys under `prefix`, with their last-modified time (seconds since the epoch).
    fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>>;
    fn delete(&self, key: &str) -> Result<()>;
}

/// Where one blob lies.
#[derive(Debug, Clone)]
pub struct Loc {
    pub pack: String,
    pub place: Placed,
}

#[derive(Default)]
struct State {
    index: HashMap<Digest, Loc>,
    /// Each pack's blobs.
    packs: HashMap<String, Vec<Digest>>,
    open: PackBuilder,
}

pub struct Packs {
    /// Key prefix of packs and their indexes (`<prefix>/cas/packs/`).
    prefix: String,
    /// The read cache (`pack-<digest>` files).
    cache: PathBuf,
    state: Mutex<State>,
}

impl Packs {
    /// Loads the index of every pack under `prefix` (each index read from the object store
    /// once, then from `cache`).
    pub fn load(objs: &dyn Objects, prefix: String, cache: PathBuf) -> Result<Self> {
        let idx_cache = cache.join("packidx");
        fs::create_dir_all(&idx_cache).with_context(|| format!("creating {}", idx_cache.display()))?;
        let packs = Self { prefix, cache, state: Mutex::new(State::default()) };
        let started = std::time::Instant::now();
        let (mut loaded, mut fetched) = (0u64, 0u64);
        for (key, _) in objs.list(&packs.prefix)? {
            let Some(name) = key.strip_prefix(&packs.prefix).and_then(|n| n.strip_suffix(".idx")) else {
                continue;
            };
            if !is_pack_name(name) {
                continue;
            }
            let local = idx_cache.join(name);
            let bytes = match fs::read(&local) {
                Ok(b) => b,
                Err(_) => {
                    let Some(b) = objs.get(&key, MAX_INDEX)? else { continue };
                    let _ = transport::pki::write_file(&local, &b, 0o644);
                    fetched += 1;
                    b
                }
            };
            match PackIndex::decode(&bytes).and_then(|i| {
                if i.digest == name {
                    Ok(i)
                } else {
                    Err(transport::TreeError::Mismatch("index names another pack".into()))
                }
            }) {
                Ok(idx) => {
                    packs.insert(&idx);
                    loaded += 1;
                }
                Err(e) => {
                    let _ = fs::remove_file(&local);
                    tracing::warn!(
                        pack = name,
                        "snapshot store: a pack index is refused, its blobs are not used: {e}"
                    );
                }
            }
        }
        if loaded > 0 {
            info!(
                packs = loaded,
                fetched,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "snapshot store: pack indexes loaded"
            );
        }
        Ok(packs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, idx: &PackIndex) {
        let mut st = self.lock();
        for p in &idx.blobs {
            st.index.insert(p.digest, Loc { pack: idx.digest.clone(), place: *p });
        }
        st.packs.insert(idx.digest.clone(), idx.blobs.iter().map(|p| p.digest).collect());
    }

    pub fn pack_key(&self, pack: &str) -> String {
        format!("{}{pack}", self.prefix)
    }

    fn idx_key(&self, pack: &str) -> String {
        format!("{}{pack}.idx", self.prefix)
    }

    fn cache_path(&self, pack: &str) -> PathBuf {
        self.cache.join(format!("pack-{pack}"))
    }

    /// Whether a blob is stored (sealed, or in the open pack).
    pub fn has(&self, d: &Digest) -> bool {
        let st = self.lock();
        st.index.contains_key(d) || st.open.contains(d)
    }

    /// Where a sealed blob lies.
    pub fn locate(&self, d: &Digest) -> Option<Loc> {
        self.lock().index.get(d).cloned()
    }

    /// Verifies and keeps a blob: into the open pack, sealed once full.
    pub fn put(&self, objs: &dyn Objects, c: &Chunk, encoding: u8, payload: &[u8]) -> Result<u64> {
        cas::decode_blob(c, encoding, payload)?;
        let mut st = self.lock();
        if st.index.contains_key(&c.digest) || st.open.contains(&c.digest) {
            return Ok(1 + payload.len() as u64);
        }
        st.open.push(c, encoding, payload);
        if st.open.full() {
            self.seal_locked(objs, &mut st)?;
        }
        Ok(1 + payload.len() as u64)
    }

    /// Uploads the open pack, if it holds anything.
    pub fn seal(&self, objs: &dyn Objects) -> Result<()> {
        let mut st = self.lock();
        self.seal_locked(objs, &mut st)
    }

    fn seal_locked(&self, objs: &dyn Objects, st: &mut State) -> Result<()> {
        if st.open.is_empty() {
            return Ok(());
        }
        let (bytes, idx) = std::mem::take(&mut st.open).finish();
        let blobs = idx.blobs.len();
        // The pack, then its index: an index names a pack that is whole.
        objs.put(&self.pack_key(&idx.digest), bytes.clone())?;
        objs.put(&self.idx_key(&idx.digest), idx.encode())?;
        let _ =
            transport::pki::write_file(&self.cache.join("packidx").join(&idx.digest), &idx.encode(), 0o644);
        let _ = transport::pki::write_file(&self.cache_path(&idx.digest), &bytes, 0o644);
        for p in &idx.blobs {
            st.index.insert(p.digest, Loc { pack: idx.digest.clone(), place: *p });
        }
        st.packs.insert(idx.digest.clone(), idx.blobs.iter().map(|p| p.digest).collect());
        debug!(pack = %idx.digest, bytes = idx.len, blobs, "snapshot store: pack sealed");
        Ok(())
    }

    /// A blob's record as stored (the reader verifies it).
    pub fn blob(&self, objs: &dyn Objects, d: &Digest) -> Result<(u8, Vec<u8>)> {
        let loc = {
            let st = self.lock();
            if let Some((enc, payload)) = st.open.get(d) {
                return Ok((enc, payload.to_vec()));
            }
            st.index.get(d).cloned()
        };
        let loc = loc.ok_or_else(|| anyhow!("blob {} is not in the store", hex::encode(d)))?;
        let pack = self.read_pack(objs, &loc.pack)?;
        let (enc, payload) = record(&pack, &loc.place)?;
        Ok((enc, payload.to_vec()))
    }

    /// A pack's bytes, from the read cache or the object store (checked against its
    /// digest before it is cached).
    fn read_pack(&self, objs: &dyn Objects, pack: &str) -> Result<Vec<u8>> {
        let path = self.cache_path(pack);
        if let Ok(b) = fs::read(&path)
            && hex::encode(blake3::hash(&b).as_bytes()) == pack
        {
            super::touch(&path);
            return Ok(b);
        }
        let key = self.pack_key(pack);
        let b = objs
            .get(&key, MAX_PACK)?
            .ok_or_else(|| anyhow!("pack {key} is missing from the object store"))?;
        if hex::encode(blake3::hash(&b).as_bytes()) != pack {
            bail!("pack {key} does not match its digest");
        }
        transport::pki::write_file(&path, &b, 0o644)?;
        Ok(b)
    }

    /// Whether a sealed pack of that name is stored (an upload must never replace one).
    pub fn has_pack(&self, pack: &str) -> bool {
        self.lock().packs.contains_key(pack)
    }

    /// Takes in a pack an agent uploaded at `pack_key`: reads it back, checks it against
    /// `idx` (digest, layout, every record), stores the index. A pack that fails is deleted.
    pub fn adopt(&self, objs: &dyn Objects, idx: &PackIndex) -> Result<()> {
        let key = self.pack_key(&idx.digest);
        let checked = (|| {
            idx.check_layout()?;
            let bytes =
                objs.get(&key, idx.len)?.ok_or_else(|| anyhow!("pack {} was not uploaded", idx.digest))?;
            idx.verify(&bytes).map_err(|e| anyhow!("uploaded pack refused: {e}"))?;
            anyhow::Ok(bytes)
        })();
        let bytes = match checked {
            Ok(b) => b,
            Err(e) => {
                if !self.lock().packs.contains_key(&idx.digest) {
                    let _ = objs.delete(&key);
                }
                return Err(e);
            }
        };
        objs.put(&self.idx_key(&idx.digest), idx.encode())?;
        let _ =
            transport::pki::write_file(&self.cache.join("packidx").join(&idx.digest), &idx.encode(), 0o644);
        let _ = transport::pki::write_file(&self.cache_path(&idx.digest), &bytes, 0o644);
        self.insert(idx);
        Ok(())
    }

    /// Stored bytes of the distinct blobs among `digests`.
    pub fn stored_bytes(&self, digests: impl IntoIterator<Item = Digest>) -> u64 {
        let st = self.lock();
        let distinct: HashSet<Digest> = digests.into_iter().collect();
        distinct.iter().filter_map(|d| st.index.get(d)).map(|l| l.place.stored).sum()
    }

    /// Deletes the packs none of whose blobs is in `referenced` and that are older than
    /// `min_age_secs` (a transfer under way may have sealed one for a snapshot it has not
    /// committed yet). A pack with some blobs referenced stays whole. Returns (blobs, bytes).
    pub fn gc(
        &self,
        objs: &dyn Objects,
        referenced: &HashSet<Digest>,
        min_age_secs: i64,
    ) -> Result<(u64, u64)> {
        let now = super::now_secs();
        let ages: HashMap<String, i64> = objs
            .list(&self.prefix)?
            .into_iter()
            .filter_map(|(k, t)| Some((k.strip_prefix(&self.prefix)?.to_string(), t)))
            .collect();
        let dead: Vec<(String, Vec<Digest>)> = {
            let st = self.lock();
            st.packs
                .iter()
                .filter(|(_, blobs)| !blobs.iter().any(|d| referenced.contains(d)))
                .filter(|(p, _)| ages.get(p.as_str()).is_none_or(|t| now - t >= min_age_secs))
                .map(|(p, b)| (p.clone(), b.clone()))
                .collect()
        };
        let (mut n, mut bytes) = (0u64, 0u64);
        for (pack, blobs) in dead {
            // The index first: without it the pack's blobs no longer count as stored.
            objs.delete(&self.idx_key(&pack))?;
            objs.delete(&self.pack_key(&pack))?;
            let _ = fs::remove_file(self.cache.join("packidx").join(&pack));
            let _ = fs::remove_file(self.cache_path(&pack));
            let mut st = self.lock();
            for d in &blobs {
                if let Some(l) = st.index.remove(d) {
                    bytes += l.place.stored;
                }
            }
            st.packs.remove(&pack);
            n += blobs.len() as u64;
        }
        Ok((n, bytes))
    }

    /// Number of sealed packs.
    pub fn count(&self) -> usize {
        self.lock().packs.len()
    }
}

/// A pack's name: 64 lowercase hex digits.
pub fn is_pack_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object store in a directory.
    struct Dir(PathBuf);

    impl Objects for Dir {
        fn get(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>> {
            let b = fs::read(self.0.join(key.replace('/', "_"))).ok();
            if b.as_ref().is_some_and(|b| b.len() as u64 > max) {
                bail!("{key} is longer than {max} bytes");
            }
            Ok(b)
        }
        fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
            Ok(fs::write(self.0.join(key.replace('/', "_")), bytes)?)
        }
        fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>> {
            let p = prefix.replace('/', "_");
            let mut out = Vec::new();
            for e in fs::read_dir(&self.0)? {
                let name = e?.file_name().to_string_lossy().into_owned();
                if let Some(rest) = name.strip_prefix(&p) {
                    out.push((format!("{prefix}{rest}"), 0));
                }
            }
            Ok(out)
        }
        fn delete(&self, key: &str) -> Result<()> {
            let _ = fs::remove_file(self.0.join(key.replace('/', "_")));
            Ok(())
        }
    }

    fn chunk(data: &[u8]) -> Chunk {
        Chunk { digest: *blake3::hash(data).as_bytes(), len: data.len() as u64 }
    }

    #[test]
    fn small_blobs_share_packs_survive_a_reload_and_unreferenced_packs_go() {
        let objs_dir = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let objs = Dir(objs_dir.path().to_path_buf());
        let packs = Packs::load(&objs, "p/cas/packs/".into(), cache.path().to_path_buf()).unwrap();
        let datas: Vec<Vec<u8>> = (0..1000u32).map(|i| format!("file {i}").into_bytes()).collect();
        for d in &datas {
            packs.put(&objs, &chunk(d), cas::ENC_RAW, d).unwrap();
        }
        // A blob whose bytes do not match its digest is refused.
        assert!(packs.put(&objs, &chunk(b"x"), cas::ENC_RAW, b"y").is_err());
        assert!(packs.has(&chunk(&datas[5]).digest), "the open pack counts");
        packs.seal(&objs).unwrap();
        assert_eq!(packs.count(), 1, "1,000 small blobs in one pack");
        assert_eq!(objs.list("p/cas/packs/").unwrap().len(), 2, "a pack and its index");
        // A fresh store (no local cache) finds them all through the indexes.
        let cache2 = tempfile::tempdir().unwrap();
        let again = Packs::load(&objs, "p/cas/packs/".into(), cache2.path().to_path_buf()).unwrap();
        for d in &datas {
            let (enc, payload) = again.blob(&objs, &chunk(d).digest).unwrap();
            assert_eq!(cas::decode_blob(&chunk(d), enc, &payload).unwrap(), *d);
        }
        // A pack tampered in the object store is refused on read.
        let pack = again.locate(&chunk(&datas[0]).digest).unwrap().pack;
        let key = again.pack_key(&pack);
        let mut bytes = objs.get(&key, MAX_PACK).unwrap().unwrap();
        bytes[10] ^= 1;
        objs.put(&key, bytes).unwrap();
        let cache3 = tempfile::tempdir().unwrap();
        let third = Packs::load(&objs, "p/cas/packs/".into(), cache3.path().to_path_buf()).unwrap();
        assert!(third.blob(&objs, &chunk(&datas[0]).digest).is_err());
        // Referenced: kept; unreferenced: gone.
        let referenced: HashSet<Digest> = [chunk(&datas[3]).digest].into();
        assert_eq!(third.gc(&objs, &referenced, 0).unwrap().0, 0);
        let (n, _) = third.gc(&objs, &HashSet::new(), 0).unwrap();
        assert_eq!(n, 1000);
        assert!(objs.list("p/cas/packs/").unwrap().is_empty());
        assert!(!third.has(&chunk(&datas[3]).digest));
    }

    #[test]
    fn an_uploaded_pack_is_adopted_only_when_it_matches_its_index() {
        let objs_dir = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let objs = Dir(objs_dir.path().to_path_buf());
        let packs = Packs::load(&objs, "cas/packs/".into(), cache.path().to_path_buf()).unwrap();
        let mut b = PackBuilder::new();
        b.push(&chunk(b"alpha"), cas::ENC_RAW, b"alpha");
        b.push(&chunk(b"beta"), cas::ENC_RAW, b"beta");
        let (bytes, idx) = b.finish();
        // Not uploaded at all.
        assert!(packs.adopt(&objs, &idx).is_err());
        // Uploaded with other bytes: refused and deleted.
        objs.put(&packs.pack_key(&idx.digest), b"alphabeta!!".to_vec()).unwrap();
        assert!(packs.adopt(&objs, &idx).is_err());
        assert!(objs.get(&packs.pack_key(&idx.digest), MAX_PACK).unwrap().is_none());
        assert!(!packs.has(&chunk(b"alpha").digest));
        // Longer than its index says: refused by its size, not read.
        let mut long = bytes.clone();
        long.extend_from_slice(&[0; 1 << 16]);
        objs.put(&packs.pack_key(&idx.digest), long).unwrap();
        let err = packs.adopt(&objs, &idx).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err:#}");
        assert!(!packs.has_pack(&idx.digest));
        objs.put(&packs.pack_key(&idx.digest), bytes).unwrap();
        packs.adopt(&objs, &idx).unwrap();
        assert!(packs.has_pack(&idx.digest));
        assert!(packs.has(&chunk(b"alpha").digest) && packs.has(&chunk(b"beta").digest));
        assert_eq!(packs.stored_bytes([chunk(b"alpha").digest, chunk(b"alpha").digest]), 6);
    }
}
