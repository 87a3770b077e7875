//! Ops that move values without computing any: permutations, slices and joins of the
//! per-example axes (the batch axis leads and stays put). Their outputs are FP32 values copied
//! from their inputs, and so are their gradients (or zeros), so they have no rounding site.

/// A per-example shape with the batch's `n` leading.
fn batched(n: usize, shape: &[usize]) -> Vec<usize> {
    std::iter::once(n).chain(shape.iter().copied()).collect()
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// `v` (`n` examples of `shape`) with its per-example axes permuted: output axis `i` is input
/// axis `perm[i]`. Works on any element type (FP32 values, FP64 results and their bounds).
/// Trailing axes that stay in place move together, one contiguous run at a time (the heads of
/// an attention keep their last axis, a batch norm's channels their spatial ones).
pub(crate) fn permute<T: Copy>(v: &[T], n: usize, shape: &[usize], perm: &[usize]) -> Vec<T> {
    let full = batched(n, shape);
    let perm: Vec<usize> = std::iter::once(0).chain(perm.iter().map(|&p| p + 1)).collect();
    let in_strides = strides(&full);
    let mut keep = perm.len();
    while keep > 0 && perm[keep - 1] == keep - 1 {
        keep -= 1;
    }
    let run: usize = full[keep..].iter().product();
    let mut out = Vec::with_capacity(v.len());
    if v.is_empty() || keep == 0 {
        out.extend_from_slice(v);
        return out;
    }
    let out_shape: Vec<usize> = perm[..keep].iter().map(|&p| full[p]).collect();
    // The input stride of each moved output axis: walk the output in order.
    let step: Vec<usize> = perm[..keep].iter().map(|&p| in_strides[p]).collect();
    let mut index = vec![0usize; keep];
    let mut src = 0usize;
    loop {
        out.extend_from_slice(&v[src..src + run]);
        // Advance the moved axes' index like an odometer, keeping `src` in step.
        let mut axis = keep;
        loop {
            if axis == 0 {
                return out;
            }
            axis -= 1;
            index[axis] += 1;
            src += step[axis];
            if index[axis] < out_shape[axis] {
                break;
            }
            src -= step[axis] * out_shape[axis];
            index[axis] = 0;
        }
    }
}

/// The inverse of a permutation.
pub(crate) fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// `(outer, size, inner)` of `axis` of a batched tensor: `outer` counts the batch and the axes
/// before, `inner` the values after.
fn around(n: usize, shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = n * shape[..axis].iter().product::<usize>();
    (outer, shape[axis], shape[axis + 1..].iter().product())
}

/// Elements `start..end` of `axis`.
pub(crate) fn slice(v: &[f32], n: usize, shape: &[usize], axis: usize, start: usize, end: usize) -> Vec<f32> {
    let (outer, size, inner) = around(n, shape, axis);
    let mut out = Vec::with_capacity(outer * (end - start) * inner);
    for o in 0..outer {
        let base = o * size * inner;
        out.extend_from_slice(&v[base + start * inner..base + end * inner]);
    }
    out
}

/// The gradient of [`slice`]: `g` in place `start..end` of `axis`, zeros elsewhere.
#[cfg(test)]
pub(crate) fn unslice(g: &[f32], n: usize, shape: &[usize], axis: usize, start: usize, end: usize) -> Vec<f32> {
    Padded::new(g.to_vec(), n, shape, axis, start, end).dense()
}

/// [`unslice`]'s result before it is padded: `values` (`outer` blocks of `width`) stand at
/// offset `at` of each row of `row` elements, and the rest is +0. The interpreter sums such
/// gradients row by row without building the zeros (three of them meet at an attention's
/// `split`).
#[derive(Debug)]
pub(crate) struct Padded {
    values: Vec<f32>,
    outer: usize,
    row: usize,
    at: usize,
    width: usize,
}

impl Padded {
    /// `g` in place `start..end` of `axis` of `n` examples of `shape`.
    pub(crate) fn new(g: Vec<f32>, n: usize, shape: &[usize], axis: usize, start: usize, end: usize) -> Padded {
        let (outer, size, inner) = around(n, shape, axis);
        Padded { values: g, outer, row: size * inner, at: start * inner, width: (end - start) * inner }
    }

    /// Elements of the padded tensor.
    pub(crate) fn len(&self) -> usize {
        self.outer * self.row
    }

    /// Elements per row.
    pub(crate) fn row(&self) -> usize {
        self.row
    }

    /// Row `o`'s values and where in the row they start.
    pub(crate) fn row_values(&self, o: usize) -> (usize, &[f32]) {
        (self.at, &self.values[o * self.width..(o + 1) * self.width])
    }

    /// The padded tensor.
    pub(crate) fn dense(self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        for o in 0..self.outer {
            let (at, values) = self.row_values(o);
            out[o * self.row + at..][..values.len()].copy_from_slice(values);
        }
        out
    }
}

/// Tensors of per-example shapes `shapes` (equal but on `axis`) joined along `axis`.
pub(crate) fn concat(parts: &[&[f32]], n: usize, shapes: &[Vec<usize>], axis: usize) -> Vec<f32> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(total);
    let outer = n * shapes[0][..axis].iter().product::<usize>();
    let widths: Vec<usize> = shapes.iter().map(|s| s[axis..].iter().product()).collect();
    for o in 0..outer {
        for (part, &w) in parts.iter().zip(&widths) {
            out.extend_from_slice(&part[o * w..(o + 1) * w]);
        }
    }
    out
}

/// The gradient of [`concat`] for each input: its block of `g`.
pub(crate) fn unconcat(g: &[f32], n: usize, shapes: &[Vec<usize>], axis: usize) -> Vec<Vec<f32>> {
    let outer = n * shapes[0][..axis].iter().product::<usize>();
    let widths: Vec<usize> = shapes.iter().map(|s| s[axis..].iter().product()).collect();
    let row: usize = widths.iter().sum();
    let mut out: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(outer * w)).collect();
    for o in 0..outer {
        let mut at = o * row;
        for (part, &w) in out.iter_mut().zip(&widths) {
            part.extend_from_slice(&g[at..at + w]);
            at += w;
        }
    }
    out
}

/// Swaps the last two axes of blocks of `m×n` values.
pub(crate) fn swap_last2(v: &[f32], m: usize, n: usize) -> Vec<f32> {
    let block = (m * n).max(1);
    let mut out = vec![0.0; v.len()];
    for (src, dst) in v.chunks(block).zip(out.chunks_mut(block)) {
        for i in 0..m {
            for j in 0..n {
                dst[j * m + i] = src[i * n + j];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_moves_axes_and_inverts() {
        // Two examples of [2, 3]: transposing gives [3, 2].
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let t = permute(&v, 2, &[2, 3], &[1, 0]);
        assert_eq!(t, swap_last2(&v, 2, 3));
        let back = permute(&t, 2, &[3, 2], &inverse(&[1, 0]));
        assert_eq!(back, v);
        // A 3-axis rotation and its inverse.
        let v: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let r = permute(&v, 1, &[2, 3, 4], &[2, 0, 1]);
        // Output [0, 0, 1] is input [0, 1, 0] (axis 2 → 0, 0 → 1, 1 → 2): flat index 4.
        assert_eq!(r[1], v[4]);
        assert_eq!(permute(&r, 1, &[4, 2, 3], &inverse(&[2, 0, 1])), v);
    }

    /// Output element by output element, from its multi-index.
    fn permute_naive(v: &[u32], n: usize, shape: &[usize], perm: &[usize]) -> Vec<u32> {
        let full = batched(n, shape);
        let perm: Vec<usize> = std::iter::once(0).chain(perm.iter().map(|&p| p + 1)).collect();
        let out_shape: Vec<usize> = perm.iter().map(|&p| full[p]).collect();
        let (in_strides, out_strides) = (strides(&full), strides(&out_shape));
        (0..v.len())
            .map(|o| {
                let src: usize =
                    (0..perm.len()).map(|i| (o / out_strides[i]) % out_shape[i] * in_strides[perm[i]]).sum();
                v[src]
            })
            .collect()
    }

    #[test]
    fn permute_equals_the_index_formula_for_every_permutation() {
        let shapes: [&[usize]; 5] = [&[3], &[2, 3], &[3, 1, 4], &[2, 3, 4, 5], &[4, 0, 2]];
        for shape in shapes {
            let k = shape.len();
            // Every permutation of the k axes.
            let mut perms = vec![vec![]];
            for _ in 0..k {
                let mut longer = Vec::new();
                for p in &perms {
                    for a in (0..k).filter(|a| !p.contains(a)) {
                        longer.push([p.clone(), vec![a]].concat());
                    }
                }
                perms = longer;
            }
            for n in [1, 3] {
                let v: Vec<u32> = (0..n * shape.iter().product::<usize>()).map(|i| i as u32).collect();
                for perm in &perms {
                    assert_eq!(
                        permute(&v, n, shape, perm),
                        permute_naive(&v, n, shape, perm),
                        "{shape:?} {perm:?} n = {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn slice_concat_round_trip() {
        let v: Vec<f32> = (0..2 * 2 * 6).map(|i| i as f32).collect();
        let shape = [2, 6];
        let a = slice(&v, 2, &shape, 1, 0, 2);
        let b = slice(&v, 2, &shape, 1, 2, 6);
        let joined = concat(&[&a, &b], 2, &[vec![2, 2], vec![2, 4]], 1);
        assert_eq!(joined, v);
        let parts = unconcat(&v, 2, &[vec![2, 2], vec![2, 4]], 1);
        assert_eq!((parts[0].clone(), parts[1].clone()), (a.clone(), b));
        let g = unslice(&a, 2, &shape, 1, 0, 2);
        assert_eq!(g.iter().filter(|&&x| x != 0.0).count(), a.iter().filter(|&&x| x != 0.0).count());
        assert_eq!(slice(&g, 2, &shape, 1, 0, 2), a);
    }
}
