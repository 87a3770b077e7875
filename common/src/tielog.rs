//! The tie-break log: one per training step, keyed by the ordinal of its rounding site.
//!
//! A step rounds its sites in a fixed order that the run's spec determines (the engine's code
//! path does not depend on the data), so a site is named by its *ordinal*: 0 for the first site
//! the step rounds, 1 for the next, and so on. Trainer and replayer count the same way; the
//! replayer resolves an ordinal to its own site, checks the length, and holds every entry to its
//! own bound, so an ordinal that points at the wrong site is a forged entry like any other.
//! Names stay out of the log: in a small model they were most of its bytes.
//!
//! # Canonical encoding (version 2)
//!
//! ```text
//! "TBLG" | version: u8 = 2 | n_sites: varint
//! per logged site, by ordinal (strictly increasing):
//!   ordinal: varint                  the first as is, each next one as delta − 1
//!   len: varint                      number of values rounded at this site
//!   n_dir: varint | indices          direction entries
//!   direction bits: ⌈n_dir/8⌉ bytes  LSB first, 1 = up, padding bits 0
//!   n_exact: varint | indices        exact entries
//!   exact values: n_exact × u32 LE   the trainer's FP32 bits
//! crc32: u32 LE                      CRC-32 (IEEE) of everything before it
//! ```
//! Indices are strictly increasing and below `len`; the first is stored as a varint, each next one
//! as the varint of `delta − 1`. The direction and exact index sets are disjoint, and a logged
//! site has at least one entry (a step logs only the sites that decided something). All varints
//! are minimal LEB128. Decoding rejects anything else, so one content has exactly one encoding, and
//! [`TieBreakLog::digest`] (SHA-256 of that encoding) is what leaves commit to.
//!
//! Version 1 (record format 2) keyed sites by name; it is refused with a message saying so.
//!
//! # Stored form
//!
//! For storage the encoding is zstd-compressed ([`TieBreakLog::compress`]) unless that would not
//! make it smaller: most logs are a few dozen bytes, and a zstd frame around them only adds its
//! header. The stored form is therefore a zstd frame or the canonical bytes themselves, told
//! apart by zstd's magic number (no canonical encoding starts with it). Stored bytes are never
//! hashed: different zstd versions or APIs may produce different bytes for the same input.

use std::collections::BTreeMap;
use std::io::Read as _;

use crate::codec::{self, DecodeError, Hash, Reader, put_varint};

const MAGIC: &[u8; 4] = b"TBLG";
const VERSION: u8 = 2;
/// zstd's frame magic number, as it appears at the start of a frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Longest site name accepted.
pub const SITE_NAME_MAX: usize = 128;
/// Most sites one step may log.
pub const SITES_MAX: usize = 65_536;

/// Which FP32 neighbour of a rounding midpoint the trainer's result is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Down,
    Up,
}

/// The tie-breaks of one rounding site: sorted, disjoint direction and exact entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SiteLog {
    len: u64,
    dir_index: Vec<u64>,
    dir_up: Vec<bool>,
    exact_index: Vec<u64>,
    exact_bits: Vec<u32>,
}

impl SiteLog {
    /// An empty log for a site that rounds `len` values.
    pub fn new(len: u64) -> Self {
        SiteLog { len, ..Default::default() }
    }

    /// Number of values rounded at this site.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no element is logged.
    pub fn is_empty(&self) -> bool {
        self.dir_index.is_empty() && self.exact_index.is_empty()
    }

    /// Number of logged elements.
    pub fn n_entries(&self) -> usize {
        self.dir_index.len() + self.exact_index.len()
    }

    fn last_index(&self) -> Option<u64> {
        match (self.dir_index.last(), self.exact_index.last()) {
            (Some(&a), Some(&b)) => Some(a.max(b)),
            (a, b) => a.or(b).copied(),
        }
    }

    /// Appends a direction entry. Entries must be pushed in increasing index order.
    ///
    /// # Panics
    /// If `index` is out of range or not above every index pushed so far: the rounding loop
    /// visits elements in order, so this is a programming error, not an input error.
    pub fn push_direction(&mut self, index: u64, dir: Direction) {
        assert!(index < self.len && self.last_index().is_none_or(|l| l < index), "tie-break entries out of order");
        self.dir_index.push(index);
        self.dir_up.push(dir == Direction::Up);
    }

    /// Appends an exact entry (the trainer's FP32 bits). Same ordering rule as
    /// [`SiteLog::push_direction`].
    ///
    /// # Panics
    /// If `index` is out of range or out of order.
    pub fn push_exact(&mut self, index: u64, bits: u32) {
        assert!(index < self.len && self.last_index().is_none_or(|l| l < index), "tie-break entries out of order");
        self.exact_index.push(index);
        self.exact_bits.push(bits);
    }

    /// Inserts a direction entry at any position, keeping the order. Returns `false` (and
    /// changes nothing) if `index` is out of range or already logged.
    pub fn insert_direction(&mut self, index: u64, dir: Direction) -> bool {
        if index >= self.len || self.exact_index.binary_search(&index).is_ok() {
            return false;
        }
        match self.dir_index.binary_search(&index) {
            Ok(_) => false,
            Err(pos) => {
                self.dir_index.insert(pos, index);
                self.dir_up.insert(pos, dir == Direction::Up);
                true
            }
        }
    }

    /// Direction entries in index order.
    pub fn directions(&self) -> impl Iterator<Item = (u64, Direction)> + '_ {
        self.dir_index.iter().zip(&self.dir_up).map(|(&i, &up)| (i, if up { Direction::Up } else { Direction::Down }))
    }

    /// Exact entries in index order.
    pub fn exacts(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.exact_index.iter().copied().zip(self.exact_bits.iter().copied())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.len);
        put_indices(out, &self.dir_index);
        let mut bits = vec![0u8; self.dir_up.len().div_ceil(8)];
        for (k, &up) in self.dir_up.iter().enumerate() {
            if up {
                bits[k / 8] |= 1 << (k % 8);
            }
        }
        out.extend_from_slice(&bits);
        put_indices(out, &self.exact_index);
        for &b in &self.exact_bits {
            out.extend_from_slice(&b.to_le_bytes());
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<SiteLog, DecodeError> {
        let len = r.varint("site length")?;
        let dir_index = get_indices(r, len, "direction")?;
        let bits = r.bytes(dir_index.len().div_ceil(8), "direction bits")?;
        let dir_up: Vec<bool> = (0..dir_index.len()).map(|k| bits[k / 8] >> (k % 8) & 1 == 1).collect();
        let used = dir_index.len() % 8;
        if used != 0 && bits[bits.len() - 1] >> used != 0 {
            return Err(r.error("non-zero padding in direction bits"));
        }
        let exact_index = get_indices(r, len, "exact")?;
        let mut exact_bits = Vec::with_capacity(exact_index.len());
        for _ in 0..exact_index.len() {
            exact_bits.push(r.u32_le("exact value")?);
        }
        // Disjointness: merge the two sorted lists.
        let (mut a, mut b) = (0, 0);
        while a < dir_index.len() && b < exact_index.len() {
            match dir_index[a].cmp(&exact_index[b]) {
                std::cmp::Ordering::Less => a += 1,
                std::cmp::Ordering::Greater => b += 1,
                std::cmp::Ordering::Equal => {
                    return Err(r.error(format!("element {} has both a direction and an exact entry", dir_index[a])));
                }
            }
        }
        Ok(SiteLog { len, dir_index, dir_up, exact_index, exact_bits })
    }
}

fn put_indices(out: &mut Vec<u8>, idx: &[u64]) {
    put_varint(out, idx.len() as u64);
    let mut prev: Option<u64> = None;
    for &i in idx {
        put_varint(out, prev.map_or(i, |p| i - p - 1));
        prev = Some(i);
    }
}

fn get_indices(r: &mut Reader<'_>, len: u64, kind: &str) -> Result<Vec<u64>, DecodeError> {
    let n = r.count(&format!("{kind} entry count"), 1)?;
    if n as u64 > len {
        return Err(r.error(format!("{n} {kind} entries for a site of {len} values")));
    }
    let mut out = Vec::with_capacity(n);
    let mut prev: Option<u64> = None;
    for _ in 0..n {
        let x = r.varint(&format!("{kind} index"))?;
        let i = match prev {
            None => Some(x),
            Some(p) => p.checked_add(x).and_then(|v| v.checked_add(1)),
        };
        match i {
            Some(i) if i < len => {
                out.push(i);
                prev = Some(i);
            }
            _ => return Err(r.error(format!("{kind} index beyond the site's {len} values"))),
        }
    }
    Ok(out)
}

/// Why a log cannot be built, decoded or loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TieLogError {
    #[error("site #{ordinal} is already in this step's log")]
    DuplicateSite { ordinal: u32 },
    #[error("more than {SITES_MAX} rounding sites logged in one step")]
    TooManySites,
    #[error("malformed tie-break log: {0}")]
    Decode(#[from] DecodeError),
    #[error("decompresses to more than {limit} bytes, the most this file may hold")]
    TooLarge { limit: usize },
    #[error("is not valid zstd data: {detail}")]
    Compression { detail: String },
}

/// Whether `name` is acceptable as a rounding site name (1..=128 printable ASCII, no spaces).
pub fn is_valid_site_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= SITE_NAME_MAX && name.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// All tie-breaks of one training step, keyed by site ordinal (see the module documentation).
/// Iteration is in ordinal order (a `BTreeMap`), so encodings never depend on insertion order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TieBreakLog {
    sites: BTreeMap<u32, SiteLog>,
}

impl TieBreakLog {
    /// Adds the log of the step's `ordinal`-th site.
    pub fn insert(&mut self, ordinal: u32, log: SiteLog) -> Result<(), TieLogError> {
        if self.sites.len() >= SITES_MAX {
            return Err(TieLogError::TooManySites);
        }
        if self.sites.contains_key(&ordinal) {
            return Err(TieLogError::DuplicateSite { ordinal });
        }
        self.sites.insert(ordinal, log);
        Ok(())
    }

    /// Replaces the log of a site already present. Returns the previous one, or `None` (and
    /// changes nothing) if the site is not in this log.
    pub fn replace(&mut self, ordinal: u32, log: SiteLog) -> Option<SiteLog> {
        self.sites.get_mut(&ordinal).map(|slot| std::mem::replace(slot, log))
    }

    /// The log of the `ordinal`-th site, if it was recorded.
    pub fn site(&self, ordinal: u32) -> Option<&SiteLog> {
        self.sites.get(&ordinal)
    }

    /// Logged site ordinals, increasing.
    pub fn ordinals(&self) -> impl Iterator<Item = u32> + '_ {
        self.sites.keys().copied()
    }

    /// Sites and their logs in ordinal order.
    pub fn sites(&self) -> impl Iterator<Item = (u32, &SiteLog)> {
        self.sites.iter().map(|(&k, v)| (k, v))
    }

    /// Total logged elements across sites.
    pub fn n_entries(&self) -> usize {
        self.sites.values().map(SiteLog::n_entries).sum()
    }

    /// Total values rounded across logged sites.
    pub fn n_values(&self) -> u64 {
        self.sites.values().map(SiteLog::len).sum()
    }

    /// The canonical encoding (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.n_entries() * 3);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        put_varint(&mut out, self.sites.len() as u64);
        let mut prev: Option<u32> = None;
        for (&ordinal, log) in &self.sites {
            put_varint(&mut out, prev.map_or(ordinal, |p| ordinal - p - 1) as u64);
            prev = Some(ordinal);
            log.encode(&mut out);
        }
        codec::put_crc(&mut out);
        out
    }

    /// Decodes a canonical encoding; rejects every byte string [`TieBreakLog::encode`] would not
    /// produce. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, TieLogError> {
        let body = codec::check_crc(bytes, "tie-break log")?;
        let mut r = Reader::new(body);
        if r.bytes(4, "magic")? != MAGIC {
            return Err(DecodeError { what: "not a tie-break log (bad magic)".into(), offset: 0 }.into());
        }
        match r.u8("version")? {
            VERSION => {}
            1 => {
                let what = "tie-break log version 1 (sites named, record format 2); this build reads version 2";
                return Err(DecodeError { what: what.into(), offset: 4 }.into());
            }
            v => {
                return Err(DecodeError { what: format!("unsupported tie-break log version {v}"), offset: 4 }.into());
            }
        }
        let n_sites = r.count("site count", 4)?;
        if n_sites > SITES_MAX {
            return Err(DecodeError { what: format!("{n_sites} sites, more than {SITES_MAX}"), offset: 5 }.into());
        }
        let mut sites = BTreeMap::new();
        let mut prev: Option<u32> = None;
        for _ in 0..n_sites {
            let at = r.offset();
            let x = r.varint("site ordinal")?;
            let ordinal = match prev {
                None => Some(x),
                Some(p) => (p as u64).checked_add(x).and_then(|v| v.checked_add(1)),
            }
            .and_then(|o| u32::try_from(o).ok())
            .ok_or_else(|| DecodeError { what: "site ordinal beyond 2^32 - 1".into(), offset: at })?;
            let log = SiteLog::decode(&mut r)?;
            // Steps log only the sites that decided something: a site with no entries is a
            // second encoding of the log without it, which no trainer writes.
            if log.is_empty() {
                return Err(DecodeError {
                    what: format!("site #{ordinal} logs nothing (no site is logged empty)"),
                    offset: at,
                }
                .into());
            }
            sites.insert(ordinal, log);
            prev = Some(ordinal);
        }
        r.finish("tie-break log")?;
        Ok(TieBreakLog { sites })
    }

    /// SHA-256 of the canonical encoding: what a leaf commits to.
    pub fn digest(&self) -> Hash {
        codec::sha256(&self.encode())
    }

    /// The stored form (see the module documentation).
    pub fn compress(&self) -> Vec<u8> {
        compress_canonical(&self.encode())
    }

    /// Loads a stored log (decompressing at most `raw_bytes_max` bytes) and decodes it.
    pub fn decompress(stored: &[u8], raw_bytes_max: usize) -> Result<Self, TieLogError> {
        Self::decode(&decompress_bounded(stored, raw_bytes_max)?)
    }
}

/// The stored form of a canonical encoding: zstd (level 3), or the bytes themselves when zstd
/// would not make them smaller. Bytes that start with zstd's magic number are always compressed,
/// so that the two forms cannot be confused (no canonical encoding of ours starts with it).
pub fn compress_canonical(raw: &[u8]) -> Vec<u8> {
    // Compressing an in-memory buffer cannot fail for a valid level.
    let z = zstd::bulk::compress(raw, 3).expect("zstd compression of an in-memory buffer");
    if z.len() < raw.len() || raw.starts_with(&ZSTD_MAGIC) { z } else { raw.to_vec() }
}

/// Loads stored bytes: a zstd frame is decompressed, refusing output larger than
/// `raw_bytes_max` (a zip bomb or a corrupt frame header cannot make us allocate more); bytes
/// that do not start with zstd's magic number are the canonical bytes themselves, refused above
/// the same bound.
///
/// Memory follows what the data declares, not the bound: the output buffer is reserved at the
/// size the frames declare (refused outright above `raw_bytes_max`), and the frames are
/// stream-decoded through a reader that stops one byte past the bound, so a frame that does not
/// declare its size (or declares too little) grows the buffer only as far as it really decodes.
/// The output bytes are those of a one-shot decompression.
pub fn decompress_bounded(stored: &[u8], raw_bytes_max: usize) -> Result<Vec<u8>, TieLogError> {
    let too_large = || TieLogError::TooLarge { limit: raw_bytes_max };
    if !stored.starts_with(&ZSTD_MAGIC) {
        return if stored.len() > raw_bytes_max { Err(too_large()) } else { Ok(stored.to_vec()) };
    }
    // What the (first) frame declares; our writers always declare it, in one frame. A corrupt
    // header is left for the decoder to report.
    let declared = zstd::zstd_safe::get_frame_content_size(stored).ok().flatten();
    let mut out = Vec::new();
    if let Some(n) = declared {
        if n > raw_bytes_max as u64 {
            return Err(too_large());
        }
        // `n` is within the caller's bound; a failed reservation is this machine's limit.
        out.try_reserve_exact(n as usize).map_err(|e| TieLogError::Compression {
            detail: format!("cannot reserve the {n} bytes the frame declares: {e}"),
        })?;
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(stored)
        .map_err(|e| TieLogError::Compression { detail: e.to_string() })?;
    decoder
        .take(raw_bytes_max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| TieLogError::Compression { detail: e.to_string() })?;
    if out.len() > raw_bytes_max {
        return Err(too_large());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> TieBreakLog {
        let mut log = TieBreakLog::default();
        let mut a = SiteLog::new(1000);
        a.push_direction(3, Direction::Up);
        a.push_exact(7, 0x3f80_0000);
        a.push_direction(8, Direction::Down);
        a.push_direction(900, Direction::Up);
        log.insert(2, a).unwrap();
        let mut b = SiteLog::new(10);
        b.push_direction(0, Direction::Down);
        log.insert(3, b).unwrap();
        let mut c = SiteLog::new(1 << 40);
        c.push_exact((1 << 40) - 1, 0x8000_0000);
        log.insert(300, c).unwrap();
        log
    }

    #[test]
    fn round_trips_and_is_canonical() {
        let log = sample();
        let enc = log.encode();
        assert_eq!(TieBreakLog::decode(&enc).unwrap(), log);
        // Insertion order does not matter.
        let mut other = TieBreakLog::default();
        for ordinal in [300, 3, 2] {
            other.insert(ordinal, log.site(ordinal).unwrap().clone()).unwrap();
        }
        assert_eq!(other.encode(), enc);
        assert_eq!(other.digest(), log.digest());
        let stored = log.compress();
        assert_eq!(TieBreakLog::decompress(&stored, 1 << 20).unwrap(), log);
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_an_error() {
        let enc = sample().encode();
        for cut in 0..enc.len() {
            assert!(TieBreakLog::decode(&enc[..cut]).is_err(), "truncation at {cut} decoded");
        }
        for i in 0..enc.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = enc.clone();
                bad[i] ^= flip;
                assert!(TieBreakLog::decode(&bad).is_err(), "flip {flip:#x} at byte {i} decoded");
            }
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert!(TieBreakLog::decode(&longer).is_err());
    }

    #[test]
    fn corrupt_compressed_logs_are_errors_not_panics() {
        let stored = sample().compress();
        for i in 0..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x55;
            assert!(
                TieBreakLog::decompress(&bad, 1 << 20).is_err()
                    || TieBreakLog::decompress(&bad, 1 << 20).unwrap() == sample()
            );
        }
        for cut in 0..stored.len() {
            assert!(TieBreakLog::decompress(&stored[..cut], 1 << 20).is_err(), "truncation at {cut}");
        }
        assert!(matches!(TieBreakLog::decompress(&stored, 16), Err(TieLogError::TooLarge { .. })));
    }

    #[test]
    fn structurally_invalid_content_is_rejected_even_with_a_valid_checksum() {
        let reseal = |mut body: Vec<u8>| {
            codec::put_crc(&mut body);
            body
        };
        let strip = |enc: Vec<u8>| enc[..enc.len() - 4].to_vec();
        // Overlapping direction and exact entries.
        let mut body = strip(TieBreakLog::default().encode());
        body.truncate(5);
        put_varint(&mut body, 1); // one site
        put_varint(&mut body, 0); // ordinal 0
        put_varint(&mut body, 10); // len
        put_varint(&mut body, 1); // one direction entry
        put_varint(&mut body, 4);
        body.push(1);
        put_varint(&mut body, 1); // one exact entry, same index
        put_varint(&mut body, 4);
        body.extend_from_slice(&0u32.to_le_bytes());
        let err = TieBreakLog::decode(&reseal(body.clone())).unwrap_err();
        assert!(err.to_string().contains("both a direction and an exact entry"), "{err}");
        // A site with no entries: what encoding a log with that site taken out gives, in more
        // bytes, so a second encoding of the same content.
        let mut empty = TieBreakLog::default();
        empty.insert(7, SiteLog::new(2048)).unwrap();
        let err = TieBreakLog::decode(&empty.encode()).unwrap_err();
        assert!(err.to_string().contains("site #7 logs nothing"), "{err}");
        // Index beyond the site length.
        let mut bad = body.clone();
        let len_at = 7;
        assert_eq!(bad[len_at], 10);
        bad[len_at] = 4;
        assert!(TieBreakLog::decode(&reseal(bad)).is_err());
        // The same site twice, and an ordinal past u32.
        let mut log = TieBreakLog::default();
        log.insert(7, SiteLog::new(1)).unwrap();
        assert_eq!(log.insert(7, SiteLog::new(1)), Err(TieLogError::DuplicateSite { ordinal: 7 }));
        let mut far = strip(TieBreakLog::default().encode());
        far.truncate(5);
        put_varint(&mut far, 1);
        put_varint(&mut far, 1 << 32);
        put_varint(&mut far, 1);
        put_varint(&mut far, 0);
        put_varint(&mut far, 0);
        let err = TieBreakLog::decode(&reseal(far)).unwrap_err();
        assert!(err.to_string().contains("site ordinal beyond"), "{err}");
    }

    #[test]
    fn a_version_1_log_is_refused_saying_which_format_it_belongs_to() {
        let mut v1 = TieBreakLog::default().encode();
        v1.truncate(v1.len() - 4);
        v1[4] = 1;
        codec::put_crc(&mut v1);
        let err = TieBreakLog::decode(&v1).unwrap_err().to_string();
        assert!(err.contains("version 1") && err.contains("record format 2"), "{err}");
    }

    #[test]
    fn small_logs_are_stored_raw_and_large_ones_compressed() {
        let small = sample();
        assert_eq!(small.compress(), small.encode(), "zstd cannot shrink a few dozen bytes");
        let mut big = TieBreakLog::default();
        for ordinal in 0..200 {
            let mut s = SiteLog::new(1000);
            (0..50).for_each(|i| s.push_direction(i * 3, Direction::Up));
            big.insert(ordinal, s).unwrap();
        }
        let stored = big.compress();
        assert!(stored.starts_with(&ZSTD_MAGIC) && stored.len() < big.encode().len());
        for log in [small, big] {
            let raw = log.encode();
            assert_eq!(TieBreakLog::decompress(&log.compress(), raw.len()).unwrap(), log);
            let refused = TieBreakLog::decompress(&log.compress(), raw.len() - 1);
            assert!(matches!(refused, Err(TieLogError::TooLarge { .. })), "{refused:?}");
        }
        // Raw bytes that happen to start like a zstd frame are compressed, whatever their size.
        assert!(compress_canonical(&ZSTD_MAGIC).starts_with(&ZSTD_MAGIC));
        assert_eq!(decompress_bounded(&compress_canonical(&ZSTD_MAGIC), 4).unwrap(), ZSTD_MAGIC);
    }

    proptest! {
        #[test]
        fn arbitrary_logs_round_trip(
            sites in proptest::collection::btree_map(any::<u32>(), (1u64..5000, proptest::collection::vec((0u8..3, any::<u32>()), 1..50)), 0..6)
        ) {
            let mut log = TieBreakLog::default();
            for (&ordinal, (len, entries)) in &sites {
                let mut s = SiteLog::new(*len);
                let step = (*len / (entries.len() as u64 + 1)).max(1);
                for (k, (kind, bits)) in entries.iter().enumerate() {
                    let i = k as u64 * step;
                    if i >= *len { break; }
                    match kind {
                        0 => s.push_direction(i, Direction::Down),
                        1 => s.push_direction(i, Direction::Up),
                        _ => s.push_exact(i, *bits),
                    }
                }
                log.insert(ordinal, s).unwrap();
            }
            let enc = log.encode();
            prop_assert_eq!(TieBreakLog::decode(&enc).unwrap(), log.clone());
            prop_assert_eq!(TieBreakLog::decompress(&log.compress(), 1 << 24).unwrap(), log);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = TieBreakLog::decode(&bytes);
            let _ = TieBreakLog::decompress(&bytes, 1 << 16);
        }
    }

    /// A frame header declaring `content_size` bytes, followed by one empty last block.
    fn frame_declaring(content_size: u64) -> Vec<u8> {
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
        // Frame header descriptor: 8-byte content size, no single segment, no checksum; then a
        // window descriptor (the smallest window).
        f.extend([0xc0, 0x00]);
        f.extend(content_size.to_le_bytes());
        f.extend([0x01, 0x00, 0x00]);
        f
    }

    #[test]
    fn a_declared_size_above_the_bound_is_refused_before_allocating() {
        // 1 TiB declared: reserving it would abort the process.
        let bomb = frame_declaring(1 << 40);
        assert!(matches!(decompress_bounded(&bomb, 4 << 30), Err(TieLogError::TooLarge { limit }) if limit == 4 << 30));
        assert!(matches!(decompress_bounded(&bomb, 1 << 20), Err(TieLogError::TooLarge { .. })));
    }

    #[test]
    fn memory_follows_the_frame_not_the_bound() {
        let raw: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let stored = compress_canonical(&raw);
        // A bound of 1 TiB must not be reserved: only what the frame declares is.
        let out = decompress_bounded(&stored, 1 << 40).unwrap();
        assert_eq!(out, raw);
        assert!(out.capacity() <= raw.len() + 64, "reserved {} for {} bytes", out.capacity(), raw.len());
        // The bound itself is exact.
        assert_eq!(decompress_bounded(&stored, raw.len()).unwrap(), raw);
        assert!(matches!(decompress_bounded(&stored, raw.len() - 1), Err(TieLogError::TooLarge { .. })));
        assert_eq!(
            decompress_bounded(&stored, raw.len()).unwrap(),
            zstd::bulk::decompress(&stored, raw.len()).unwrap()
        );
    }

    #[test]
    fn a_frame_without_a_declared_size_is_decoded_up_to_the_bound_only() {
        // A streaming encoder does not write the content size.
        let raw = vec![0u8; 8 << 20];
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, &raw).unwrap();
        let stored = enc.finish().unwrap();
        assert_eq!(zstd::zstd_safe::get_frame_content_size(&stored).unwrap(), None);
        assert!(stored.len() < 4096, "a bomb: {} stored bytes for {} raw", stored.len(), raw.len());
        assert!(
            matches!(decompress_bounded(&stored, 1 << 20), Err(TieLogError::TooLarge { limit }) if limit == 1 << 20)
        );
        assert_eq!(decompress_bounded(&stored, 8 << 20).unwrap(), raw);
        assert!(decompress_bounded(&stored[..stored.len() / 2], 8 << 20).is_err());
        // Bytes that are not a zstd frame are taken as they are, and then are not a log.
        assert_eq!(decompress_bounded(b"not zstd at all", 1 << 20).unwrap(), b"not zstd at all");
        assert!(TieBreakLog::decompress(b"not zstd at all", 1 << 20).is_err());
    }
}
