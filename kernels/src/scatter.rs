//! Scatter-adds computed as gathers: the sources that add into each target, in increasing
//! source order, so each target's sum is an ordinary reduction (in the profile's order on the
//! CPU, one GPU thread per target on `cuda`) and never depends on scheduling.

use crate::bound::ExactTerms;
use crate::cuda::{In, size};

/// Sources grouped by target: `src[start[t]..start[t + 1]]` are the sources of target `t`.
#[derive(Debug)]
pub(crate) struct Groups {
    pub(crate) start: Vec<usize>,
    pub(crate) src: Vec<usize>,
}

impl Groups {
    /// Groups the sources `0..targets.len()` by their target (each `< n`), by counting sort.
    pub(crate) fn new(targets: impl Iterator<Item = usize> + Clone, n: usize) -> Groups {
        let mut start = vec![0usize; n + 1];
        for t in targets.clone() {
            start[t + 1] += 1;
        }
        for t in 0..n {
            start[t + 1] += start[t];
        }
        let mut fill = start.clone();
        let mut src = vec![0usize; start[n]];
        for (i, t) in targets.enumerate() {
            src[fill[t]] = i;
            fill[t] += 1;
        }
        Groups { start, src }
    }

    /// The sources of target `t`.
    pub(crate) fn of(&self, t: usize) -> &[usize] {
        &self.src[self.start[t]..self.start[t + 1]]
    }

    /// Sum of `value(s)` over the sources `s` of every target on the GPU: `dim` values per
    /// target, `value(s)·dim + j` indexing `v` (kernel `group_sum`).
    pub(crate) fn sum_gpu(
        &self,
        gpu: &crate::cuda::GpuRef,
        op: &'static str,
        v: &[f32],
        dim: usize,
    ) -> crate::Result<Vec<f64>> {
        let groups = self.start.len() - 1;
        let (start, src): (Vec<u64>, Vec<u64>) =
            (self.start.iter().map(|&x| x as u64).collect(), self.src.iter().map(|&x| x as u64).collect());
        let [out] = gpu.run(
            op,
            "group_sum",
            groups * dim,
            &[In::F32(v), In::U64(&src), In::U64(&start)],
            [groups * dim],
            &[size(groups), size(dim)],
        )?;
        Ok(out)
    }
}

/// Bound of a sum of the exact FP32 terms `term(s)` over `sources`, in any order: 2·γ_{c−1}·Σ|t|,
/// or 0 when no order can round (`ExactTerms::is_exact`). From the inputs only.
pub(crate) fn group_bound(sources: &[usize], term: impl Fn(usize) -> f32) -> f64 {
    let mut terms = ExactTerms::new();
    sources.iter().for_each(|&s| terms.value(term(s)));
    terms.bound()
}
