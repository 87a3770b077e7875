//! Embedding lookup (an exact gather) and its backward pass (a scatter-add, which is a
//! reduction and therefore order-dependent and bounded).

use rayon::prelude::*;

use crate::bound::ExactTerms;
use crate::reduce::sum_by;
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
        // Positions of each id in increasing order (counting sort).
        let mut start = vec![0usize; vocab + 1];
        for &id in ids {
            start[id as usize + 1] += 1;
        }
        for v in 0..vocab {
            start[v + 1] += start[v];
        }
        let mut fill = start.clone();
        let mut pos = vec![0usize; ids.len()];
        for (i, &id) in ids.iter().enumerate() {
            pos[fill[id as usize]] = i;
            fill[id as usize] += 1;
        }
        let p = self.profile();
        let mut values = vec![0.0; vocab * dim];
        let mut bounds = vec![0.0; vocab * dim];
        values.par_chunks_mut(dim.max(1)).zip(bounds.par_chunks_mut(dim.max(1))).enumerate().for_each(
            |(v, (out, bnd))| {
                let ps = &pos[start[v]..start[v + 1]];
                for j in 0..dim {
                    out[j] = sum_by(p, ps.len(), |i| gy[ps[i] * dim + j] as f64);
                    let mut terms = ExactTerms::new();
                    ps.iter().for_each(|&i| terms.value(gy[i * dim + j]));
                    // A sum of |ps| exact terms in any order: 2·γ_{|ps|−1}·Σ|gy|, or 0 when no
                    // order can round (`ExactTerms::is_exact`).
                    bnd[j] = terms.bound();
                }
            },
        );
        Ok(Bounded { values, bound: ErrorBound::PerElement(bounds) })
    }
}
