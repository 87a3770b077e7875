//! Summary statistics of the benchmark's timings, and what machine they were taken on.
//!
//! A ratio of two kinds of step is taken from *pairs*: both kinds run side by side in the same
//! step of the same run, in alternating order, and the reported ratio is the median of the
//! per-pair ratios, with their minimum and maximum beside it. Load from other processes that
//! lasts longer than one pair hits both members alike and cancels in the pair's ratio; the
//! spread says how much was left.

use serde_json::{Value, json};

/// The median (mean of the middle two for an even count; NaN for none).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { 0.5 * (v[m - 1] + v[m]) }
}

pub fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::INFINITY, f64::min)
}

pub fn max(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Ratios `a/b` of paired timings (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Paired(Vec<f64>);

impl Paired {
    /// Records one pair: `a` and `b` seconds, timed side by side.
    pub fn push(&mut self, a: f64, b: f64) {
        self.0.push(a / b);
    }

    /// The median of the pairs' ratios: the reported figure.
    pub fn median(&self) -> f64 {
        median(&self.0)
    }

    /// `{"median", "min", "max", "pairs"}`.
    pub fn spread(&self) -> Value {
        json!({"median": self.median(), "min": min(&self.0), "max": max(&self.0), "pairs": self.0.len()})
    }
}

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`).
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The CPU extensions that tell this project's machine kinds apart, as `/proc/cpuinfo` spells
/// them: AVX2, FMA and AVX-512 (the GEMM kernels' width), AMX, SHA-NI (SHA-256, the state hash
/// of format-3 records, runs about 4× faster with it; format 4's BLAKE3 does not use it).
pub const CPU_FLAGS: [&str; 5] = ["avx2", "fma", "avx512f", "amx_tile", "sha_ni"];

/// The widest vector extension among `flags`: `avx512`, `avx2` or `baseline`.
pub fn simd_level(flags: &[&str]) -> &'static str {
    if flags.contains(&"avx512f") {
        "avx512"
    } else if flags.contains(&"avx2") {
        "avx2"
    } else {
        "baseline"
    }
}

/// The machine the run is on: CPU model, which of [`CPU_FLAGS`] it has, its SIMD level, cores.
pub fn machine() -> Value {
    let all_flags = kernels::host::cpuinfo_field("flags").unwrap_or_default();
    let flags: Vec<&str> = CPU_FLAGS.into_iter().filter(|f| all_flags.split_whitespace().any(|x| x == *f)).collect();
    json!({
        "cores_available": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpus_in_cpuinfo": kernels::host::cpuinfo_processors(),
        "cpu_model": kernels::host::cpuinfo_field("model name"),
        "cpu_flags": flags,
        "simd_level": simd_level(&flags),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn paired_ratios_report_median_and_spread() {
        let mut p = Paired::default();
        for (a, b) in [(2.0, 1.0), (9.0, 3.0), (4.0, 1.0)] {
            p.push(a, b);
        }
        assert_eq!(p.median(), 3.0);
        assert_eq!(p.spread(), json!({"median": 3.0, "min": 2.0, "max": 4.0, "pairs": 3}));
    }

    #[test]
    fn simd_levels() {
        assert_eq!(simd_level(&["avx2", "avx512f", "sha_ni"]), "avx512");
        assert_eq!(simd_level(&["fma", "avx2"]), "avx2");
        assert_eq!(simd_level(&["sha_ni"]), "baseline");
    }
}
