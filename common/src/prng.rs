//! The counter-based PRNG behind every random choice of a run (data order, augmentation,
//! initialisation, dropout): Philox4x32-10 keyed by (seed, purpose, step, layer), so the trainer
//! and the auditor regenerate the same numbers for any step, in any order, on any machine.
//!
//! Nothing here touches a global or thread-local RNG, and no output goes through a
//! transcendental function (`ln`, `exp`, `cos`, …): those are not correctly rounded and differ
//! between libms, which would break bit-exact replay. Only integer arithmetic, exact conversions
//! and correctly rounded `+ − ×` are used.
//!
//! # The stream, exactly (so an independent implementation can reproduce it)
//!
//! 1. **Key.** `d = SHA-256("tiebreak/prng/v1" ‖ seed ‖ len(purpose) ‖ purpose ‖ step ‖ layer)`
//!    where the tag is the 16 ASCII bytes shown, `seed` and `step` are u64 little-endian,
//!    `len(purpose)` is the byte length of the UTF-8 `purpose` as a u32 little-endian, and
//!    `layer` is a u32 little-endian. The 64-bit Philox key is `d[0..8]`, read as two u32
//!    little-endian words: `key = [le32(d[0..4]), le32(d[4..8])]`.
//! 2. **Blocks.** Block `b` (a 128-bit index, starting at 0) is
//!    `philox4x32_10(ctr, key)` with `ctr = [b mod 2³², (b ≫ 32) mod 2³², (b ≫ 64) mod 2³²,
//!    b ≫ 96]` (Random123's Philox4x32 with 10 rounds; its word 0 is the low word).
//! 3. **Words.** The stream is the sequence of 32-bit words `x0, x1, x2, x3` of block 0, then of
//!    block 1, and so on. Every draw consumes whole words from the front of the stream;
//!    nothing is discarded except by rejection sampling as stated below.
//! 4. **Draws.** `next_u32` = one word. `next_u64` = `w0 | w1 ≪ 32` for the next two words
//!    `w0, w1` (possibly straddling two blocks). `next_f64` = `(next_u64 ≫ 11) · 2⁻⁵³`, exact,
//!    in `[0, 1)`. `below(n)` = Lemire's multiply-shift on `next_u64` with rejection
//!    (unbiased; see [`Stream::below`]). `uniform(lo, hi)` = `lo + (hi − lo) · next_f64`,
//!    redrawn if rounding gives `hi`. `bernoulli(p)` = `next_f64 < p`. `shuffle` = Fisher–Yates
//!    from the last element down: for `i = len−1, …, 1` swap `i` with `below(i + 1)`.
//!    `irwin_hall_normal` = `(u₁ + u₂ + … + u₁₂) − 6` over 12 `next_f64`, summed left to right.

use sha2::{Digest, Sha256};

/// The domain-separation tag that starts every key derivation (16 ASCII bytes).
pub const KEY_TAG: &[u8; 16] = b"tiebreak/prng/v1";

// Philox4x32 constants (Salmon et al., SC'11; Random123 `philox.h`).
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9; // golden ratio
const PHILOX_W1: u32 = 0xBB67_AE85; // sqrt(3) - 1

/// One Philox4x32 round: two 32×32→64 multiplications, their high halves mixed with the other
/// two words and the round key.
#[inline]
fn philox_round(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let p0 = u64::from(PHILOX_M0) * u64::from(ctr[0]);
    let p1 = u64::from(PHILOX_M1) * u64::from(ctr[2]);
    let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
    let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
    [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]
}

/// The Philox4x32-10 block function of Random123: 10 rounds, the key bumped by the Weyl
/// constants between rounds.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut ctr = ctr;
    let mut key = key;
    for round in 0..10 {
        if round > 0 {
            key = [key[0].wrapping_add(PHILOX_W0), key[1].wrapping_add(PHILOX_W1)];
        }
        ctr = philox_round(ctr, key);
    }
    ctr
}

/// The Philox key for a (seed, purpose, step, layer) context; see the module doc, step 1.
///
/// # Panics
/// If `purpose` is 4 GiB or longer (its length must fit the u32 length prefix).
pub fn derive_key(seed: u64, purpose: &str, step: u64, layer: u32) -> [u32; 2] {
    let purpose_len = u32::try_from(purpose.len()).expect("a PRNG purpose shorter than 4 GiB");
    let mut h = Sha256::new();
    h.update(KEY_TAG);
    h.update(seed.to_le_bytes());
    h.update(purpose_len.to_le_bytes());
    h.update(purpose.as_bytes());
    h.update(step.to_le_bytes());
    h.update(layer.to_le_bytes());
    let d = h.finalize();
    [u32::from_le_bytes([d[0], d[1], d[2], d[3]]), u32::from_le_bytes([d[4], d[5], d[6], d[7]])]
}

/// The counter words of block `block`: little-endian word order.
fn block_counter(block: u128) -> [u32; 4] {
    [block as u32, (block >> 32) as u32, (block >> 64) as u32, (block >> 96) as u32]
}

/// A stream of random words for one (seed, purpose, step, layer) context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    key: [u32; 2],
    /// The index of the next block to generate.
    next_block: u128,
    /// The current block's words.
    words: [u32; 4],
    /// How many of `words` have been consumed; 4 means the buffer is spent.
    used: usize,
}

impl Stream {
    /// The stream for a context, positioned at its first word.
    pub fn new(seed: u64, purpose: &str, step: u64, layer: u32) -> Self {
        Self::from_key(derive_key(seed, purpose, step, layer))
    }

    /// The stream for a context, positioned at the first word of block `block` (each block
    /// holds 4 words), in O(1): e.g. a worker can start at its share of a long stream.
    pub fn at_block(seed: u64, purpose: &str, step: u64, layer: u32, block: u128) -> Self {
        let mut s = Self::new(seed, purpose, step, layer);
        s.seek(block);
        s
    }

    /// The stream for a raw Philox key, positioned at block 0.
    pub fn from_key(key: [u32; 2]) -> Self {
        Self { key, next_block: 0, words: [0; 4], used: 4 }
    }

    /// The Philox key of this stream.
    pub fn key(&self) -> [u32; 2] {
        self.key
    }

    /// Repositions the stream at the first word of block `block`.
    pub fn seek(&mut self, block: u128) {
        self.next_block = block;
        self.used = 4;
    }

    /// The next 32-bit word.
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            self.words = philox4x32_10(block_counter(self.next_block), self.key);
            // 2^128 blocks are never consumed; wrapping keeps this total without a panic path.
            self.next_block = self.next_block.wrapping_add(1);
            self.used = 0;
        }
        let w = self.words[self.used];
        self.used += 1;
        w
    }

    /// The next 64 bits: the next word is the low half, the one after it the high half.
    pub fn next_u64(&mut self) -> u64 {
        let lo = u64::from(self.next_u32());
        let hi = u64::from(self.next_u32());
        lo | (hi << 32)
    }

    /// A uniform double in `[0, 1)`: the top 53 bits of [`next_u64`](Self::next_u64) times
    /// 2⁻⁵³, which is exact, so every multiple of 2⁻⁵³ in range is equally likely.
    pub fn next_f64(&mut self) -> f64 {
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        (self.next_u64() >> 11) as f64 * SCALE
    }

    /// A uniform integer in `[0, n)`, exactly unbiased.
    ///
    /// Lemire's method (*Fast Random Integer Generation in an Interval*, 2019): with
    /// `m = x · n` (128-bit) for `x = next_u64`, the answer is `m ≫ 64`; `x` is redrawn while
    /// the low half of `m` is below `2⁶⁴ mod n`, which removes exactly the over-represented
    /// values. The expected number of draws is below 2 for every `n`.
    ///
    /// # Panics
    /// If `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0): cannot draw from an empty range");
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            // 2^64 mod n, computed in 64 bits as (2^64 - n) mod n.
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }

    /// A uniform double in `[lo, hi)`: `lo + (hi − lo) · next_f64()`, redrawn in the rare case
    /// that rounding of the sum lands on `hi`.
    ///
    /// # Panics
    /// Unless `lo < hi` and `hi − lo` is finite.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        assert!(lo < hi && (hi - lo).is_finite(), "uniform({lo}, {hi}): need lo < hi with a finite width");
        loop {
            let x = lo + (hi - lo) * self.next_f64();
            if x < hi {
                return x;
            }
        }
    }

    /// `true` with probability `p` (to within 2⁻⁵³): one `next_f64() < p`. Used for dropout
    /// masks, where `p` is the keep (or drop) probability as the caller documents.
    ///
    /// # Panics
    /// Unless `0 ≤ p ≤ 1`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        assert!((0.0..=1.0).contains(&p), "bernoulli({p}): p must lie in [0, 1]");
        self.next_f64() < p
    }

    /// Shuffles `items` uniformly in place: Fisher–Yates from the last element down — for
    /// `i = len−1, …, 1`, swap `items[i]` with `items[below(i + 1)]`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// An approximately standard normal sample without transcendental functions: the
    /// Irwin–Hall sum of 12 uniforms minus 6 (mean 0, variance 1, support `[−6, 6)`), added left
    /// to right so every machine rounds the same way.
    pub fn irwin_hall_normal(&mut self) -> f64 {
        let mut sum = 0.0;
        for _ in 0..12 {
            sum += self.next_f64();
        }
        sum - 6.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_counter_is_little_endian_words() {
        let b = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10u128;
        assert_eq!(block_counter(b), [0x0d0e_0f10, 0x090a_0b0c, 0x0506_0708, 0x0102_0304]);
    }

    #[test]
    fn words_come_from_consecutive_blocks_in_order() {
        let key = [7, 9];
        let mut s = Stream::from_key(key);
        let mut expected = Vec::new();
        for b in 0..3u128 {
            expected.extend(philox4x32_10(block_counter(b), key));
        }
        let got: Vec<u32> = (0..12).map(|_| s.next_u32()).collect();
        assert_eq!(got, expected);
    }
}
