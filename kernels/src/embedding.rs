//! Embedding lookup (an exact gather) and its backward pass (a scatter-add, which is a
//! reduction and therefore order-dependent and bounded).

use rayon::prelude::*;

use crate::cuda::{In, size};
use crate::reduce::sum_by;
use crate::scatter::{Groups, group_bound};
use crate::{Bounded, Device, ErrorBound, Result, arg_err, check_len, checked_prod};

fn check_ids(op: &'static str, ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
        Some((i, id)) => Err(arg_err(op, format!("id {id} at position {i} is not below vocab {vocab}"))),
        None => Ok(()),
    }
}

impl Device {
    /// Rows `table[id]` of a `vocab×dim` table for each id: `ids.len()×dim`. Exact.
    pub fn embedding(&self, table: &[f32], vocab: usize, dim: usize, ids: &[u32]) -> Result<Bounded> {
        const OP: &str = "embedding";
        check_len(OP, "table", table.len(), checked_prod(OP, &[vocab, dim])?)?;
        check_ids(OP, ids, vocab)?;
        if let Some(g) = self.gpu() {
            let n = ids.len() * dim;
            let [out] =
                g.run(OP, "embedding_fwd", n, &[In::F32(table), In::U32(ids)], [n], &[size(ids.len()), size(dim)])?;
            return Ok(Bounded::exact(out));
        }
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            out.extend(table[id as usize * dim..(id as usize + 1) * dim].iter().map(|&v| v as f64));
        }
        Ok(Bounded::exact(out))
    }

    /// Gradient of the table: `g[v] = Σ_{positions i with ids[i] = v} gy[i]` (`vocab×dim`).
    pub fn embedding_backward(&self, gy: &[f32], ids: &[u32], vocab: usize, dim: usize) -> Result<Bounded> {
        const OP: &str = "embedding_backward";
        check_len(OP, "grad_out", gy.len(), checked_prod(OP, &[ids.len(), dim])?)?;
        checked_prod(OP, &[vocab, dim])?;
        check_ids(OP, ids, vocab)?;
        // Positions of each id in increasing order.
        let groups = Groups::new(ids.iter().map(|&id| id as usize), vocab);
        // Each (row, j): a sum of the exact terms gy[i·dim + j] over the positions i of the row.
        let bound = |v: usize, j: usize| group_bound(groups.of(v), |i| gy[i * dim + j]);
        let mut bounds = vec![0.0; vocab * dim];
        bounds.par_chunks_mut(dim.max(1)).enumerate().for_each(|(v, bnd)| {
            for (j, d) in bnd.iter_mut().enumerate() {
                *d = bound(v, j);
            }
        });
        if let Some(g) = self.gpu() {
            let values = groups.sum_gpu(g, OP, gy, dim)?;
            return Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) });
        }
        let p = self.profile();
        let mut values = vec![0.0; vocab * dim];
        values.par_chunks_mut(dim.max(1)).enumerate().for_each(|(v, out)| {
            let ps = groups.of(v);
            for (j, o) in out.iter_mut().enumerate() {
                *o = sum_by(p, ps.len(), |i| gy[ps[i] * dim + j] as f64);
            }
        });
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }
}
