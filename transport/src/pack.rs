//! Packs: many blobs in one object, so 100,000 small files do not become 100,000 objects in an
//! object store. A pack is the concatenation of blob records (one encoding byte and the
//! payload, as [`crate::cas::BlobStore`] keeps a blob in a file); its index lists, for each
//! blob, the digest and length of the chunk it holds and where its record lies. A pack's name
//! is the BLAKE3 digest of its bytes.
//!
//! Nothing here trusts an index or a pack: [`PackIndex::check_layout`] refuses an index whose
//! records overlap, leave gaps, run past the pack or repeat a blob, and [`PackIndex::verify`]
//! checks the pack's digest and every record against its chunk before a pack is used.

use std::collections::HashSet;

use protocol::BlobPlace;
use serde::{Deserialize, Serialize};

use crate::cas::{self, Chunk, Digest, MAX_BLOB};
use crate::tree::TreeError;

/// A pack is sealed once it holds this many bytes.
pub const PACK_TARGET: u64 = 16 << 20;
/// Largest pack accepted: the target plus one blob record, with room for zstd's worst case.
pub const MAX_PACK: u64 = PACK_TARGET + 2 * MAX_BLOB;
/// Most blobs in one pack (a pack of empty files' records is 1 byte each... bounded anyway).
pub const MAX_PACK_BLOBS: usize = 1 << 20;
/// Pack index format version.
pub const PACK_VERSION: u32 = 1;

/// What a pack holds. Stored beside the pack (as JSON); its presence means the pack is whole
/// and was verified when it was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndex {
    pub version: u32,
    /// BLAKE3 of the pack's bytes, hex.
    pub digest: String,
    pub len: u64,
    pub blobs: Vec<Placed>,
}

/// One blob of a pack, as the index stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    #[serde(with = "hex_digest")]
    pub digest: Digest,
    /// Length of the chunk the record decodes to.
    pub len: u64,
    /// Where the record starts in the pack.
    pub offset: u64,
    /// Bytes of the record: the encoding byte and the payload.
    pub stored: u64,
}

impl From<Placed> for BlobPlace {
    fn from(p: Placed) -> Self {
        BlobPlace { digest: p.digest, len: p.len, offset: p.offset, stored: p.stored }
    }
}

impl From<BlobPlace> for Placed {
    fn from(p: BlobPlace) -> Self {
        Placed { digest: p.digest, len: p.len, offset: p.offset, stored: p.stored }
    }
}

mod hex_digest {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }
}

fn bad(msg: String) -> TreeError {
    TreeError::Mismatch(msg)
}

impl PackIndex {
    /// The pack's name: its digest, parsed.
    pub fn pack_digest(&self) -> Result<Digest, TreeError> {
        let mut d = [0u8; 32];
        hex::decode_to_slice(&self.digest, &mut d)
            .map_err(|e| bad(format!("pack digest {:?}: {e}", self.digest)))?;
        Ok(d)
    }

    /// Parses an index from a store and checks its layout.
    pub fn decode(bytes: &[u8]) -> Result<Self, TreeError> {
        let idx: PackIndex =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("malformed pack index: {e}")))?;
        idx.check_layout()?;
        Ok(idx)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Refuses an index this build does not know, or whose records are not laid end to end
    /// from the start of the pack to its end, or that names a blob twice, or sizes a record
    /// or a chunk beyond what a blob can be.
    pub fn check_layout(&self) -> Result<(), TreeError> {
        if self.version != PACK_VERSION {
            return Err(bad(format!("pack index version {} is not known", self.version)));
        }
        self.pack_digest()?;
        if self.len > MAX_PACK {
            return Err(bad(format!("pack of {} bytes is over the limit of {MAX_PACK}", self.len)));
        }
        if self.blobs.len() > MAX_PACK_BLOBS {
            return Err(bad(format!(
                "pack of {} blobs is over the limit of {MAX_PACK_BLOBS}",
                self.blobs.len()
            )));
        }
        check_places(&self.blobs, self.len)
    }

    /// Checks `bytes` as the pack this index describes: its length and digest, and every
    /// record against its chunk.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), TreeError> {
        self.check_layout()?;
        if bytes.len() as u64 != self.len || *blake3::hash(bytes).as_bytes() != self.pack_digest()? {
            return Err(bad(format!(
                "pack {} does not match its digest and length ({} bytes, {} expected)",
                self.digest,
                bytes.len(),
                self.len
            )));
        }
        for p in &self.blobs {
            let (enc, payload) = record(bytes, p)?;
            cas::decode_blob(&Chunk { digest: p.digest, len: p.len }, enc, payload)?;
        }
        Ok(())
    }
}

/// Checks that `places` lie end to end from 0 to `len`, each a plausible record of a distinct
/// blob.
pub fn check_places(places: &[Placed], len: u64) -> Result<(), TreeError> {
    let mut at = 0u64;
    let mut seen = HashSet::with_capacity(places.len());
    for p in places {
        if p.offset != at {
            return Err(bad(format!(
                "blob {} of a pack starts at {}, the record before ends at {at}",
                hex::encode(p.digest),
                p.offset
            )));
        }
        // zstd's worst case on incompressible data is a little over the input.
        if p.stored == 0 || p.stored > 1 + MAX_BLOB + MAX_BLOB / 64 + 1024 || p.len > MAX_BLOB {
            return Err(bad(format!(
                "blob {} of a pack has an impossible size ({} stored, {} long)",
                hex::encode(p.digest),
                p.stored,
                p.len
            )));
        }
        if !seen.insert(p.digest) {
            return Err(bad(format!("blob {} is in a pack twice", hex::encode(p.digest))));
        }
        at += p.stored;
    }
    if at != len {
        return Err(bad(format!("a pack's records add up to {at} bytes, the pack is {len}")));
    }
    Ok(())
}

/// The encoding byte and payload of `p`'s record in `pack` (the caller checks the payload).
pub fn record<'a>(pack: &'a [u8], p: &Placed) -> Result<(u8, &'a [u8]), TreeError> {
    let end = p.offset.checked_add(p.stored).filter(|e| *e <= pack.len() as u64 && p.stored > 0);
    let Some(end) = end else {
        return Err(bad(format!("blob {} lies outside its pack", hex::encode(p.digest))));
    };
    let rec = &pack[p.offset as usize..end as usize];
    Ok((rec[0], &rec[1..]))
}

/// Builds a pack in memory from blob records.
#[derive(Default)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    blobs: Vec<Placed>,
    held: HashSet<Digest>,
}

impl PackBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a record (once per digest: a second one is ignored).
    pub fn push(&mut self, c: &Chunk, encoding: u8, payload: &[u8]) {
        if !self.held.insert(c.digest) {
            return;
        }
        let offset = self.bytes.len() as u64;
        self.bytes.push(encoding);
        self.bytes.extend_from_slice(payload);
        self.blobs.push(Placed { digest: c.digest, len: c.len, offset, stored: 1 + payload.len() as u64 });
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.held.contains(d)
    }

    /// The record of a blob added so far.
    pub fn get(&self, d: &Digest) -> Option<(u8, &[u8])> {
        if !self.held.contains(d) {
            return None;
        }
        let p = self.blobs.iter().find(|p| p.digest == *d)?;
        record(&self.bytes, p).ok()
    }

    /// Whether the pack is full.
    pub fn full(&self) -> bool {
        self.len() >= PACK_TARGET || self.blobs.len() >= MAX_PACK_BLOBS
    }

    /// The pack's bytes and index.
    pub fn finish(self) -> (Vec<u8>, PackIndex) {
        let digest = hex::encode(blake3::hash(&self.bytes).as_bytes());
        let idx =
            PackIndex { version: PACK_VERSION, digest, len: self.bytes.len() as u64, blobs: self.blobs };
        (self.bytes, idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &[u8]) -> Chunk {
        Chunk { digest: *blake3::hash(data).as_bytes(), len: data.len() as u64 }
    }

    fn pack_of(datas: &[&[u8]]) -> (Vec<u8>, PackIndex) {
        let mut b = PackBuilder::new();
        for d in datas {
            let (enc, payload) = cas::encode_blob(d, 3);
            b.push(&chunk(d), enc, &payload);
        }
        b.finish()
    }

    #[test]
    fn a_pack_round_trips_and_verifies() {
        let big = vec![7u8; 100_000];
        let (bytes, idx) = pack_of(&[b"hello", b"", &big, b"hello"]);
        assert_eq!(idx.blobs.len(), 3, "a repeated blob is packed once");
        let idx = PackIndex::decode(&idx.encode()).unwrap();
        idx.verify(&bytes).unwrap();
        for (p, want) in idx.blobs.iter().zip([&b"hello"[..], b"", &big]) {
            let (enc, payload) = record(&bytes, p).unwrap();
            assert_eq!(cas::decode_blob(&chunk(want), enc, payload).unwrap(), want);
        }
    }

    #[test]
    fn tampered_packs_and_indexes_are_refused() {
        let (bytes, idx) = pack_of(&[b"one", b"two", b"three"]);
        // A flipped byte: the pack's digest fails.
        let mut flipped = bytes.clone();
        flipped[2] ^= 1;
        assert!(idx.verify(&flipped).is_err());
        // An index that points a digest at another record (pack digest made to match).
        let mut swapped = idx.clone();
        swapped.blobs[0].digest = idx.blobs[1].digest;
        swapped.blobs[1].digest = idx.blobs[0].digest;
        assert!(swapped.verify(&bytes).is_err());
        // Gaps, overlaps, records past the end, repeats, a wrong total.
        let mut gap = idx.clone();
        gap.blobs[1].offset += 1;
        assert!(gap.check_layout().is_err());
        let mut past = idx.clone();
        past.blobs[2].stored += 10;
        assert!(past.check_layout().is_err());
        let mut repeat = idx.clone();
        repeat.blobs[2].digest = repeat.blobs[0].digest;
        assert!(repeat.check_layout().is_err());
        let mut total = idx.clone();
        total.len += 1;
        assert!(total.check_layout().is_err());
        let mut huge = idx.clone();
        huge.blobs[0].len = u64::MAX;
        assert!(huge.check_layout().is_err());
        let mut overflow = idx.clone();
        overflow.blobs[0].offset = u64::MAX;
        assert!(record(&bytes, &overflow.blobs[0]).is_err());
        assert!(PackIndex::decode(b"{\"version\":1}").is_err());
        let mut version = idx.clone();
        version.version = 9;
        assert!(version.check_layout().is_err());
    }
}
