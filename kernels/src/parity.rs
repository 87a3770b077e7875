//! Cross-profile parity: runs every op on every profile from identical FP32 inputs and checks
//! the soundness contract for each ordered pair `(A, B)`: `|vA − vB| ≤ dA` and `≤ dB` for
//! every element, no NaN, and equal bits where both results claim a zero bound (exact results:
//! there the sign of a zero matters too, since the tie-break rule puts `−0` and `+0` in
//! different cells). Also measures tightness (the largest observed `|vA − vB| / d`), which the
//! benchmark binary prints.
//!
//! [`devices`] gives the CPU profiles and, when this build has the `cuda` feature and a GPU is
//! present, the `cuda` profile.
//!
//! Inputs come from a local splitmix64 (no global RNG) in several families: uniform random,
//! catastrophic cancellation, magnitudes from 1e-30 to 1e30, FP32 subnormals, long
//! reductions (K up to 4096).

use crate::{
    AdamWConfig, Bounded, Conv2dSpec, Device, ErrorBound, MatmulSpec, Pool2dSpec, Profile, Result, RowSpec, SgdConfig,
    Sums,
};

/// splitmix64: a tiny, seedable generator for test data.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [−scale, scale) as f32.
    pub fn uniform(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| ((2.0 * self.unit() - 1.0) * scale) as f32).collect()
    }

    /// Random signs and magnitudes spread log-uniformly over [1e-30, 1e30].
    pub fn wide(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let mag = 10f64.powf(60.0 * self.unit() - 30.0);
                (if self.next_u64() & 1 == 0 { mag } else { -mag }) as f32
            })
            .collect()
    }

    /// A mix of FP32 subnormals and ordinary values.
    pub fn subnormal(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let r = self.next_u64();
                if r & 3 == 0 {
                    (2.0 * self.unit() - 1.0) as f32
                } else {
                    let v = f32::from_bits((r >> 8) as u32 & 0x007F_FFFF);
                    if r & 4 == 0 { v } else { -v }
                }
            })
            .collect()
    }

    /// Catastrophic cancellation: large values followed by their negations plus small noise.
    pub fn cancel(&mut self, n: usize) -> Vec<f32> {
        let half = n / 2;
        let mut v = self.uniform(half, 1e6);
        for i in 0..n - half {
            let base = if i < half { -v[i] } else { 0.0 };
            v.push(base + ((2.0 * self.unit() - 1.0) * 1e-3) as f32);
        }
        v
    }

    /// Uniform integers below `n` as u32.
    pub fn ids(&mut self, len: usize, n: usize) -> Vec<u32> {
        (0..len).map(|_| (self.next_u64() % n as u64) as u32).collect()
    }
}

fn round32(b: &Bounded) -> Vec<f32> {
    b.values.iter().map(|&v| v as f32).collect()
}

type Run = Box<dyn Fn(&Device) -> Result<Vec<Bounded>> + Send + Sync>;

/// One op applied to one fixed input set.
pub struct Case {
    /// The op's name.
    pub op: &'static str,
    /// The input family (random, cancel, wide, subnormal, long).
    pub family: &'static str,
    run: Run,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Case({} / {})", self.op, self.family)
    }
}

impl Case {
    fn new(
        op: &'static str,
        family: &'static str,
        run: impl Fn(&Device) -> Result<Vec<Bounded>> + Send + Sync + 'static,
    ) -> Case {
        Case { op, family, run: Box::new(run) }
    }

    /// Runs the op on `dev`.
    pub fn run(&self, dev: &Device) -> Result<Vec<Bounded>> {
        (self.run)(dev)
    }
}

/// Inputs for one family: a generator of `n` FP32 values.
fn family_data(rng: &mut SplitMix64, family: &str, n: usize) -> Vec<f32> {
    match family {
        "cancel" => rng.cancel(n),
        "wide" => rng.wide(n),
        "subnormal" => rng.subnormal(n),
        // ReLU-like: about half exact zeros (the tight-bound refinement's main customer).
        "sparse" => rng.uniform(n, 1.0).into_iter().map(|x| if x < 0.0 { 0.0 } else { x }).collect(),
        // Small multiples of 1/8: most sums are exact in every order, many land on midpoints.
        "dyadic" => rng.uniform(n, 1.0).into_iter().map(|x| (x * 64.0).round() / 8.0).collect(),
        // Mostly zeros of both signs: products and sums whose exact value is zero, where the
        // sign of the result depends on whether a sum starts from +0 (the rule: it must give +0).
        "zeros" => (0..n)
            .map(|_| match rng.next_u64() % 8 {
                0..=2 => 0.0,
                3..=5 => -0.0,
                6 => 0.5,
                _ => -0.25,
            })
            .collect(),
        _ => rng.uniform(n, 1.0),
    }
}

const FAMILIES: [&str; 7] = ["random", "cancel", "wide", "subnormal", "sparse", "dyadic", "zeros"];

/// Every op on every input family, from `seed`.
pub fn cases(seed: u64) -> Vec<Case> {
    let mut out = Vec::new();
    let mut rng = SplitMix64(seed);
    for (fi, &fam) in FAMILIES.iter().enumerate() {
        let mut r = SplitMix64(seed ^ (fi as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
        add_family(&mut out, &mut r, fam);
    }
    // Long reductions and realistic shapes.
    let (m, k, n) = (64, 784, 256);
    let a = rng.uniform(m * k, 1.0);
    let b = rng.uniform(k * n, 0.05);
    let bias = rng.uniform(n, 0.1);
    out.push(Case::new("matmul", "mlp-64x784x256", move |d| {
        Ok(vec![d.matmul(&a, &b, Some(&bias), MatmulSpec::new(m, k, n))?])
    }));
    for fam in ["random", "cancel"] {
        let a = family_data(&mut rng, fam, 4 * 4096);
        let b = rng.uniform(4096 * 3, 1.0);
        out.push(Case::new("matmul", if fam == "random" { "long-k4096" } else { "long-k4096-cancel" }, move |d| {
            Ok(vec![d.matmul(&a, &b, None, MatmulSpec::new(4, 4096, 3))?])
        }));
        let x = family_data(&mut rng, fam, 3 * 4096);
        out.push(Case::new("sum_rows", "long-4096", move |d| Ok(vec![d.sum_rows(&x, 4096, 3)?])));
    }
    let x = rng.uniform(2 * 4096, 4.0);
    out.push(Case::new("softmax", "long-4096", move |d| Ok(vec![d.softmax(&x, RowSpec::new(2, 4096))?])));
    add_short_sums(&mut out, &mut rng);
    out
}

/// Sums of one to three terms in every op that sums (matmul and its backward, `sum_rows`, conv
/// and its gradients, an embedding row hit once, layer and batch norm over rows of one to three
/// values, the softmax backward passes, cross-entropy and MSE over one to three rows, average
/// pooling over windows of one and two) on the "zeros" family: there a sum of `−0` terms is
/// `−0` if it starts from its first term and `+0` if it starts from `+0`, and every profile must
/// give `+0` (a zero-bound result is compared bit for bit).
fn add_short_sums(out: &mut Vec<Case>, r: &mut SplitMix64) {
    const FAM: &str = "zeros-short";
    for (m, k, n) in [(3, 1, 4), (1, 2, 5), (4, 2, 1), (1, 1, 1), (2, 3, 2)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut s = MatmulSpec::batched(2, m, k, n);
            s.a_trans = ta;
            s.b_trans = tb;
            let a = family_data(r, "zeros", 2 * m * k);
            let b = family_data(r, "zeros", 2 * k * n);
            let bias = family_data(r, "zeros", n);
            let gc = family_data(r, "zeros", 2 * m * n);
            out.push(Case::new("matmul", FAM, move |d| {
                let (ga, gb) = d.matmul_backward(&a, &b, &gc, s)?;
                Ok(vec![d.matmul(&a, &b, Some(&bias), s)?, d.matmul(&a, &b, None, s)?, ga, gb])
            }));
        }
    }
    for rows in [1, 2] {
        let x = family_data(r, "zeros", rows * 9);
        out.push(Case::new("sum_rows", FAM, move |d| Ok(vec![d.sum_rows(&x, rows, 9)?])));
    }
    // One image, one output position: the weight and bias gradients are sums of one term.
    let cs = Conv2dSpec { n: 1, c_in: 1, h: 3, w: 3, c_out: 2, kh: 3, kw: 3, stride: 1, pad: 0 };
    let (x, w, bias, gy) = (
        family_data(r, "zeros", 9),
        family_data(r, "zeros", 18),
        family_data(r, "zeros", 2),
        family_data(r, "zeros", 2),
    );
    out.push(Case::new("conv2d", FAM, move |d| {
        let g = d.conv2d_backward(&x, &w, &gy, cs)?;
        Ok(vec![d.conv2d(&x, &w, Some(&bias), cs)?, d.conv2d(&x, &w, None, cs)?, g.gx, g.gw, g.gb])
    }));
    let (vocab, dim) = (5, 4);
    let ids = vec![1u32, 3, 3];
    let gy = family_data(r, "zeros", 3 * dim);
    out.push(Case::new("embedding_backward", FAM, move |d| Ok(vec![d.embedding_backward(&gy, &ids, vocab, dim)?])));
    for (rows, cols) in [(3, 1), (1, 2), (2, 2), (1, 3)] {
        let x = family_data(r, "zeros", rows * cols);
        let (gamma, beta) = (family_data(r, "zeros", cols), family_data(r, "zeros", cols));
        let gy = family_data(r, "zeros", rows * cols);
        let (gb, bb) = (family_data(r, "zeros", rows), family_data(r, "zeros", rows));
        out.push(Case::new("layer_norm", FAM, move |d| {
            let o = d.layer_norm(&x, &gamma, &beta, rows, cols, 1e-5)?;
            let (mean, rstd) = (round32(&o.mean), round32(&o.rstd));
            let g = d.layer_norm_backward(&x, &gamma, &mean, &rstd, &gy, rows, cols)?;
            let mut outs = vec![o.y, o.mean, o.rstd, g.gx, g.ggamma, g.gbeta];
            for sums in [Sums::ProfileOrder, Sums::CorrectlyRounded] {
                let b = d.batch_norm(&x, &gb, &bb, rows, cols, 1e-5, sums)?;
                let (bmean, brstd) = (round32(&b.mean), round32(&b.rstd));
                let bg = d.batch_norm_backward(&x, &gb, &bmean, &brstd, &gy, rows, cols, sums)?;
                outs.extend([b.y, b.mean, b.rstd, bg.gx, bg.ggamma, bg.gbeta]);
            }
            Ok(outs)
        }));
        // Row sums of one to three terms in the softmax backward passes.
        let spec = RowSpec::new(rows, cols);
        let seq = Device::new(Profile::CpuSeq).expect("cpu-seq device");
        let z = family_data(r, "zeros", rows * cols);
        let y = round32(&seq.softmax(&z, spec).expect("softmax"));
        let ly = round32(&seq.log_softmax(&z, spec).expect("log_softmax"));
        let gy = family_data(r, "zeros", rows * cols);
        out.push(Case::new("softmax_backward", FAM, move |d| {
            Ok(vec![d.softmax_backward(&y, &gy, spec)?, d.log_softmax_backward(&ly, &gy, spec)?])
        }));
        // A loss over one to three rows and elements.
        let logits = family_data(r, "zeros", rows * (cols + 1));
        let targets = r.ids(rows, cols + 1);
        let (pred, target) = (family_data(r, "zeros", rows * cols), family_data(r, "zeros", rows * cols));
        out.push(Case::new("losses", FAM, move |d| {
            let (l, g) = d.cross_entropy(&logits, &targets, rows, cols + 1)?;
            let (ml, mg) = d.mse(&pred, &target)?;
            Ok(vec![l, g, ml, mg])
        }));
    }
    // Average pooling over windows of one and two values, forward and backward.
    for (kh, kw) in [(1, 1), (2, 1), (1, 2)] {
        let ps = Pool2dSpec { n: 1, c: 2, h: 2, w: 2, kh, kw, stride: 1, pad: 0 };
        let x = family_data(r, "zeros", 8);
        let gy = family_data(r, "zeros", 2 * (3 - kh) * (3 - kw));
        out.push(Case::new("avg_pool2d", FAM, move |d| {
            let (any, exact) =
                (d.avg_pool2d(&x, ps, Sums::ProfileOrder)?, d.avg_pool2d(&x, ps, Sums::CorrectlyRounded)?);
            Ok(vec![any, exact, d.avg_pool2d_backward(&gy, ps)?])
        }));
    }
}

fn add_family(out: &mut Vec<Case>, r: &mut SplitMix64, fam: &'static str) {
    // matmul with transposes, bias, batch, scale; and its backward.
    let spec = MatmulSpec::batched(2, 5, 37, 6);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut s = spec;
        s.a_trans = ta;
        s.b_trans = tb;
        let a = family_data(r, fam, 2 * 5 * 37);
        let b = family_data(r, fam, 2 * 37 * 6);
        let bias = family_data(r, fam, 6);
        let gc = family_data(r, fam, 2 * 5 * 6);
        let (a2, b2) = (a.clone(), b.clone());
        out.push(Case::new("matmul", fam, move |d| {
            Ok(vec![d.matmul(&a, &b, Some(&bias), s)?, d.matmul(&a, &b, None, s)?])
        }));
        out.push(Case::new("matmul_scaled", fam, {
            let (a, b) = (a2.clone(), b2.clone());
            move |d| Ok(vec![d.matmul_scaled(&a, &b, 0.125f64.sqrt(), s)?])
        }));
        out.push(Case::new("matmul_backward", fam, move |d| {
            let (ga, gb) = d.matmul_backward(&a2, &b2, &gc, s)?;
            Ok(vec![ga, gb])
        }));
    }
    let x = family_data(r, fam, 33 * 7);
    out.push(Case::new("sum_rows", fam, move |d| Ok(vec![d.sum_rows(&x, 33, 7)?])));

    // conv + pooling.
    let cs = Conv2dSpec { n: 2, c_in: 3, h: 9, w: 8, c_out: 4, kh: 3, kw: 3, stride: 2, pad: 1 };
    let x = family_data(r, fam, 2 * 3 * 9 * 8);
    let w = family_data(r, fam, 4 * 3 * 9);
    let bias = family_data(r, fam, 4);
    let seq = Device::new(Profile::CpuSeq).expect("cpu-seq device");
    let oshape = seq.conv2d(&x, &w, None, cs).map(|b| b.len()).unwrap_or(0);
    let gy = family_data(r, fam, oshape);
    let (x2, w2) = (x.clone(), w.clone());
    out.push(Case::new("conv2d", fam, move |d| {
        Ok(vec![d.conv2d(&x, &w, Some(&bias), cs)?, d.conv2d(&x, &w, None, cs)?])
    }));
    out.push(Case::new("conv2d_backward", fam, move |d| {
        let g = d.conv2d_backward(&x2, &w2, &gy, cs)?;
        Ok(vec![g.gx, g.gw, g.gb])
    }));
    for ps in [
        Pool2dSpec { n: 2, c: 3, h: 8, w: 7, kh: 2, kw: 2, stride: 2, pad: 0 },
        Pool2dSpec { n: 1, c: 2, h: 7, w: 7, kh: 3, kw: 3, stride: 1, pad: 1 },
    ] {
        let x = family_data(r, fam, ps.n * ps.c * ps.h * ps.w);
        let (y, idx) = seq.max_pool2d(&x, ps).expect("valid pool spec");
        let gy = family_data(r, fam, y.len());
        let gy2 = gy.clone();
        let x2 = x.clone();
        out.push(Case::new("max_pool2d", fam, move |d| Ok(vec![d.max_pool2d(&x, ps)?.0])));
        out.push(Case::new("max_pool2d_backward", fam, move |d| Ok(vec![d.max_pool2d_backward(&gy, &idx, ps)?])));
        out.push(Case::new("avg_pool2d", fam, move |d| {
            Ok(vec![d.avg_pool2d(&x2, ps, Sums::ProfileOrder)?, d.avg_pool2d(&x2, ps, Sums::CorrectlyRounded)?])
        }));
        out.push(Case::new("avg_pool2d_backward", fam, move |d| Ok(vec![d.avg_pool2d_backward(&gy2, ps)?])));
    }

    // elementwise.
    let x = {
        let mut x = family_data(r, fam, 300);
        x.extend(r.uniform(300, 12.0));
        x
    };
    let gy = family_data(r, fam, x.len());
    let mask: Vec<bool> = (0..x.len()).map(|_| !r.next_u64().is_multiple_of(10)).collect();
    let (x2, x3, gy2) = (x.clone(), x.clone(), gy.clone());
    out.push(Case::new("relu", fam, move |d| Ok(vec![d.relu(&x)?, d.relu_backward(&x, &gy)?])));
    out.push(Case::new("gelu", fam, move |d| Ok(vec![d.gelu(&x2)?])));
    out.push(Case::new("gelu_backward", fam, move |d| Ok(vec![d.gelu_backward(&x3, &gy2)?])));
    let x = family_data(r, fam, 100);
    out.push(Case::new("dropout", fam, move |d| Ok(vec![d.dropout(&x, &mask[..100], 0.1)?])));

    // row-wise ops.
    for spec in [RowSpec::new(6, 50), RowSpec::causal(16, 8)] {
        let mut x = family_data(r, fam, spec.rows * spec.cols);
        if fam == "cancel" {
            // near-equal logits: every term matters to the sum.
            x.iter_mut().for_each(|v| *v = 1000.0 + *v * 1e-9);
        }
        let y = round32(&seq.softmax(&x, spec).expect("softmax"));
        let ly = round32(&seq.log_softmax(&x, spec).expect("log_softmax"));
        let gy = family_data(r, fam, x.len());
        let gy2 = gy.clone();
        let x2 = x.clone();
        out.push(Case::new("softmax", fam, move |d| Ok(vec![d.softmax(&x, spec)?])));
        out.push(Case::new("log_softmax", fam, move |d| Ok(vec![d.log_softmax(&x2, spec)?])));
        out.push(Case::new("softmax_backward", fam, move |d| Ok(vec![d.softmax_backward(&y, &gy, spec)?])));
        out.push(Case::new("log_softmax_backward", fam, move |d| Ok(vec![d.log_softmax_backward(&ly, &gy2, spec)?])));
    }
    let logits = family_data(r, fam, 12 * 65);
    let targets = r.ids(12, 65);
    out.push(Case::new("cross_entropy", fam, move |d| {
        let (l, g) = d.cross_entropy(&logits, &targets, 12, 65)?;
        Ok(vec![l, g])
    }));

    // layer norm.
    let (rows, cols) = (9, 128);
    let mut x = family_data(r, fam, rows * cols);
    if fam == "cancel" {
        x.iter_mut().for_each(|v| *v = 1.0e4 + *v * 1e-6);
    }
    let gw = family_data(r, fam, cols);
    let bw = family_data(r, fam, cols);
    let ln = seq.layer_norm(&x, &gw, &bw, rows, cols, 1e-5).expect("layer_norm");
    let (mean, rstd) = (round32(&ln.mean), round32(&ln.rstd));
    let gy = family_data(r, fam, rows * cols);
    let (x2, gw2) = (x.clone(), gw.clone());
    out.push(Case::new("layer_norm", fam, move |d| {
        let o = d.layer_norm(&x, &gw, &bw, rows, cols, 1e-5)?;
        Ok(vec![o.y, o.mean, o.rstd])
    }));
    out.push(Case::new("layer_norm_backward", fam, move |d| {
        let g = d.layer_norm_backward(&x2, &gw2, &mean, &rstd, &gy, rows, cols)?;
        Ok(vec![g.gx, g.ggamma, g.gbeta])
    }));

    // batch norm: the layer-norm definition with the affine per row (channels × values).
    let (rows, cols) = (4, 150);
    let mut x = family_data(r, fam, rows * cols);
    if fam == "cancel" {
        x.iter_mut().for_each(|v| *v = 1.0e4 + *v * 1e-6);
    }
    let gw = family_data(r, fam, rows);
    let bw = family_data(r, fam, rows);
    let bn = seq.batch_norm(&x, &gw, &bw, rows, cols, 1e-5, Sums::ProfileOrder).expect("batch_norm");
    let (mean, rstd) = (round32(&bn.mean), round32(&bn.rstd));
    let gy = family_data(r, fam, rows * cols);
    for sums in [Sums::ProfileOrder, Sums::CorrectlyRounded] {
        let (x, gw, bw, mean, rstd, gy) = (x.clone(), gw.clone(), bw.clone(), mean.clone(), rstd.clone(), gy.clone());
        let (x2, gw2) = (x.clone(), gw.clone());
        out.push(Case::new("batch_norm", fam, move |d| {
            let o = d.batch_norm(&x2, &gw2, &bw, rows, cols, 1e-5, sums)?;
            Ok(vec![o.y, o.mean, o.rstd])
        }));
        out.push(Case::new("batch_norm_backward", fam, move |d| {
            let g = d.batch_norm_backward(&x, &gw, &mean, &rstd, &gy, rows, cols, sums)?;
            Ok(vec![g.gx, g.ggamma, g.gbeta])
        }));
    }

    // tanh, sigmoid (and their backward passes from the rounded outputs), mean squared error.
    let x = family_data(r, fam, 300);
    let gy = family_data(r, fam, 300);
    let t = round32(&seq.tanh(&x).expect("tanh"));
    let s = round32(&seq.sigmoid(&x).expect("sigmoid"));
    let target = family_data(r, fam, 300);
    let x2 = x.clone();
    out.push(Case::new("tanh", fam, move |d| Ok(vec![d.tanh(&x)?])));
    out.push(Case::new("sigmoid", fam, move |d| Ok(vec![d.sigmoid(&x2)?])));
    let gy2 = gy.clone();
    out.push(Case::new("tanh_backward", fam, move |d| Ok(vec![d.tanh_backward(&t, &gy)?])));
    out.push(Case::new("sigmoid_backward", fam, move |d| Ok(vec![d.sigmoid_backward(&s, &gy2)?])));
    let pred = family_data(r, fam, 300);
    out.push(Case::new("mse", fam, move |d| {
        let (l, g) = d.mse(&pred, &target)?;
        Ok(vec![l, g])
    }));

    // embedding.
    let (vocab, dim) = (11, 16);
    let table = family_data(r, fam, vocab * dim);
    let ids = r.ids(200, vocab);
    let gy = family_data(r, fam, 200 * dim);
    let ids2 = ids.clone();
    out.push(Case::new("embedding", fam, move |d| Ok(vec![d.embedding(&table, vocab, dim, &ids)?])));
    out.push(Case::new("embedding_backward", fam, move |d| Ok(vec![d.embedding_backward(&gy, &ids2, vocab, dim)?])));

    // optimizers.
    let n = 500;
    let (w, g, v, m) = (family_data(r, fam, n), family_data(r, fam, n), family_data(r, fam, n), family_data(r, fam, n));
    let v2: Vec<f32> = family_data(r, fam, n).iter().map(|x| x.abs()).collect();
    let (w2, g2) = (w.clone(), g.clone());
    out.push(Case::new("sgd", fam, move |d| {
        let o = d.sgd(&w, &g, &v, SgdConfig { lr: 0.01, momentum: 0.9, weight_decay: 5e-4 })?;
        Ok(vec![o.w, o.v])
    }));
    out.push(Case::new("adamw", fam, move |d| {
        let cfg = AdamWConfig { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let mut res = Vec::new();
        for step in [1, 7, 1000] {
            let o = d.adamw(&w2, &g2, &m, &v2, step, cfg)?;
            res.extend([o.w, o.m, o.v]);
        }
        Ok(res)
    }));
}

/// What one ordered pair of profiles showed on one case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairStats {
    /// Elements compared.
    pub elements: usize,
    /// Elements whose FP64 bits differ.
    pub differing: usize,
    /// Largest `|vA − vB| / dA` over elements with `dA > 0`.
    pub max_ratio: f64,
}

/// Checks the contract of `ra` (from profile A) against `rb` (profile B), returning
/// statistics or a description of the first violation.
pub fn compare(ra: &[Bounded], rb: &[Bounded]) -> Result<PairStats, String> {
    if ra.len() != rb.len() {
        return Err(format!("{} outputs vs {}", ra.len(), rb.len()));
    }
    let mut st = PairStats { elements: 0, differing: 0, max_ratio: 0.0 };
    for (o, (a, b)) in ra.iter().zip(rb).enumerate() {
        if a.values.len() != b.values.len() {
            return Err(format!("output {o}: {} values vs {}", a.values.len(), b.values.len()));
        }
        if let (ErrorBound::PerElement(x), n) = (&a.bound, a.values.len())
            && x.len() != n
        {
            return Err(format!("output {o}: {} bounds for {n} values", x.len()));
        }
        for (i, (&va, &vb)) in a.values.iter().zip(&b.values).enumerate() {
            let (da, db) = (a.bound.at(i), b.bound.at(i));
            if va.is_nan() || vb.is_nan() || da.is_nan() || db.is_nan() {
                return Err(format!("output {o} element {i}: NaN (values {va:e} {vb:e}, bounds {da:e} {db:e})"));
            }
            let diff = (va - vb).abs();
            if da == 0.0 && db == 0.0 && va.to_bits() != vb.to_bits() {
                return Err(format!(
                    "output {o} element {i}: both sides claim exact results but {va:e} ≠ {vb:e} in bits"
                ));
            }
            st.elements += 1;
            if va.to_bits() != vb.to_bits() {
                st.differing += 1;
            }
            if va.to_bits() != vb.to_bits() && !(diff <= da && diff <= db) {
                return Err(format!(
                    "output {o} element {i}: |{va:e} − {vb:e}| = {diff:e} exceeds bound {da:e} / {db:e}"
                ));
            }
            if da > 0.0 {
                st.max_ratio = st.max_ratio.max(diff / da);
            }
        }
    }
    Ok(st)
}

/// The devices a parity run compares: every CPU profile, then `cuda` when it can run here.
/// The second value says why `cuda` is missing, if it is (no feature, no driver, no GPU).
pub fn devices() -> (Vec<Device>, Option<String>) {
    let mut devs: Vec<Device> = Profile::CPU.iter().map(|&p| Device::new(p).expect("cpu device")).collect();
    match Device::new(Profile::Cuda) {
        Ok(d) => {
            devs.push(d);
            (devs, None)
        }
        Err(e) => (devs, Some(e.to_string())),
    }
}

/// Largest observed `|vA − vB| / d` per op over every ordered pair of CPU profiles and every
/// input family from `seed`. A contract violation is reported as a ratio above 1.
pub fn tightness(seed: u64) -> Vec<(&'static str, f64)> {
    let devs: Vec<Device> = Profile::CPU.iter().map(|&p| Device::new(p).expect("cpu device")).collect();
    tightness_on(&devs, seed)
}

/// [`tightness`] over the given devices.
pub fn tightness_on(devs: &[Device], seed: u64) -> Vec<(&'static str, f64)> {
    let mut out: Vec<(&'static str, f64)> = Vec::new();
    for case in cases(seed) {
        let results: Vec<_> = devs.iter().map(|d| case.run(d)).collect();
        let mut worst = 0.0f64;
        for (i, ra) in results.iter().enumerate() {
            for (j, rb) in results.iter().enumerate() {
                if i == j {
                    continue;
                }
                if let (Ok(ra), Ok(rb)) = (ra, rb) {
                    match compare(ra, rb) {
                        Ok(s) => worst = worst.max(s.max_ratio),
                        Err(_) => worst = f64::INFINITY,
                    }
                }
            }
        }
        match out.iter_mut().find(|(op, _)| *op == case.op) {
            Some(e) => e.1 = e.1.max(worst),
            None => out.push((case.op, worst)),
        }
    }
    out
}
