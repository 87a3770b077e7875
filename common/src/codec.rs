//! Byte-level building blocks for the canonical formats: minimal LEB128 varints, a bounds-checked
//! reader that never panics, and the SHA-256 helpers every commitment uses.
//!
//! Canonical means: one content, one byte string. Decoders therefore reject every encoding a
//! writer would not produce (non-minimal varints, trailing bytes), so that two different byte
//! strings can never decode to the same value and be hashed differently.

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// Full lowercase hex of a digest (never truncated).
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Parses exactly `N` bytes written as `2N` lowercase hex digits, the form [`to_hex`] writes
/// (the only accepted form, so one value has one spelling). Never panics.
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Parses a 64-digit lowercase hex digest.
pub fn hash_from_hex(s: &str) -> Option<Hash> {
    from_hex::<32>(s)
}

/// Appends `x` as a minimal LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

/// Why a canonical byte string could not be decoded. `offset` is the byte position in the
/// (uncompressed) encoding where decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte {offset}")]
pub struct DecodeError {
    pub what: String,
    pub offset: usize,
}

/// A forward-only reader over a byte slice; every read is bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    pub fn offset(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// An error at the current offset.
    pub fn error(&self, what: impl Into<String>) -> DecodeError {
        DecodeError { what: what.into(), offset: self.pos }
    }

    pub fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(self.error(format!("truncated {what}: need {n} bytes, {} left", self.remaining())));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, what)?[0])
    }

    pub fn u32_le(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64_le(&mut self, what: &str) -> Result<u64, DecodeError> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub fn hash(&mut self, what: &str) -> Result<Hash, DecodeError> {
        let mut h = [0u8; 32];
        h.copy_from_slice(self.bytes(32, what)?);
        Ok(h)
    }

    /// Reads a minimal LEB128 varint (at most 10 bytes, no redundant trailing zero groups).
    pub fn varint(&mut self, what: &str) -> Result<u64, DecodeError> {
        let start = self.pos;
        let mut x: u64 = 0;
        for i in 0..10 {
            let b = self.u8(what)?;
            if i == 9 && b > 1 {
                self.pos = start;
                return Err(self.error(format!("{what}: varint overflows 64 bits")));
            }
            x |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    self.pos = start;
                    return Err(self.error(format!("{what}: non-minimal varint")));
                }
                return Ok(x);
            }
        }
        self.pos = start;
        Err(self.error(format!("{what}: varint longer than 10 bytes")))
    }

    /// A varint that counts items of at least `min_item_bytes` each still to come: rejects counts
    /// the remaining input cannot hold, so a corrupt count cannot trigger a huge allocation.
    pub fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, DecodeError> {
        let n = self.varint(what)?;
        let cap = self.remaining() / min_item_bytes.max(1);
        if n > cap as u64 {
            return Err(
                self.error(format!("{what} {n} exceeds what the remaining {} bytes can hold", self.remaining()))
            );
        }
        Ok(n as usize)
    }

    /// Requires that every byte has been consumed.
    pub fn finish(&self, what: &str) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(self.error(format!("{} trailing bytes after {what}", self.remaining())));
        }
        Ok(())
    }
}

/// Splits `bytes` into body and a trailing CRC-32 and checks it. A CRC-32 detects every error
/// burst of up to 32 bits, so every single flipped byte is caught.
pub fn check_crc<'a>(bytes: &'a [u8], what: &str) -> Result<&'a [u8], DecodeError> {
    if bytes.len() < 4 {
        return Err(DecodeError { what: format!("truncated {what}: no checksum"), offset: bytes.len() });
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let actual = crc32fast::hash(body);
    if stored != actual {
        return Err(DecodeError {
            what: format!("{what} checksum mismatch: stored {stored:08x}, computed {actual:08x}"),
            offset: body.len(),
        });
    }
    Ok(body)
}

/// Appends the CRC-32 of everything in `out` so far.
pub fn put_crc(out: &mut Vec<u8>) {
    let c = crc32fast::hash(out);
    out.extend_from_slice(&c.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_round_trips(x: u64) {
            let mut b = Vec::new();
            put_varint(&mut b, x);
            let mut r = Reader::new(&b);
            prop_assert_eq!(r.varint("x").unwrap(), x);
            prop_assert!(r.finish("x").is_ok());
        }
    }

    #[test]
    fn non_minimal_and_overlong_varints_are_rejected() {
        assert!(Reader::new(&[0x80, 0x00]).varint("x").is_err());
        assert!(Reader::new(&[0xff; 11]).varint("x").is_err());
        assert!(Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]).varint("x").is_err());
        assert_eq!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).varint("x").unwrap(),
            u64::MAX
        );
        assert!(Reader::new(&[0x80]).varint("x").is_err());
    }

    #[test]
    fn hex_round_trips() {
        let h = sha256(b"abc");
        assert_eq!(to_hex(&h), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(hash_from_hex(&to_hex(&h)), Some(h));
        assert_eq!(hash_from_hex("zz"), None);
        assert_eq!(hash_from_hex(&to_hex(&h).to_uppercase()), None, "one spelling only");
        assert_eq!(from_hex::<2>("00ff"), Some([0, 255]));
        assert_eq!(from_hex::<2>("00f"), None);
        assert_eq!(from_hex::<2>("é0f"), None, "non-ASCII input is refused, not a panic");
    }
}
