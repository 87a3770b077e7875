/* Kernels of the `cuda` device profile, compiled at run time by NVRTC (options in mod.rs).
 *
 * Rules every kernel follows (see mod.rs for why):
 * - One thread per output element, row or column, identified by TB_THREAD; a thread past the
 *   end returns. A thread's result depends on its own index and inputs only, never on the grid
 *   or block size or on timing: no shared memory, no atomics, no warp shuffles.
 * - Every sum is a sequential loop that starts from +0.0 and visits its terms in increasing
 *   index order (so an exact zero sum is +0.0, as on every CPU profile).
 * - `a * b + c` may be contracted into an FMA (NVRTC's --fmad=true): the ops' bounds allow it.
 *   Where an op is defined as an exact unfused sequence (optimizers, dropout's product, the
 *   layer-norm mean and 1/sqrt), the __d*_rn intrinsics pin each operation.
 * - Parameters come in the order: inputs, outputs, then scalars (u64 sizes, double values).
 *   Scalars are always 8 bytes (u64 or double); the Rust side checks every launch against the
 *   parameter lists below.
 *
 * The source is plain C99 plus CUDA's thread indices and __d*_rn intrinsics, so the test
 * emulator (emu.rs) compiles the same text for the host with a C compiler.
 */

#define TB_THREAD ((u64)blockIdx.x * (u64)blockDim.x + (u64)threadIdx.x)

/* ---- elementwise, exact ---- */

/* max(x, 0), with −0 → +0 and NaN → 0 (the op's definition, see activation.rs). */
KERNEL relu_fwd(const float* x, double* y, u64 n) {
    u64 i = TB_THREAD;
    if (i >= n) return;
    double v = (double)x[i];
    y[i] = v > 0.0 ? v : 0.0;
}

KERNEL relu_bwd(const float* x, const float* gy, double* gx, u64 n) {
    u64 i = TB_THREAD;
    if (i >= n) return;
    gx[i] = x[i] > 0.0f ? (double)gy[i] : 0.0;
}

/* keep ? x·s : 0 with s = 1/(1−p) computed by the host. */
KERNEL dropout_fwd(const float* x, const bool* keep, double* y, u64 n, double s) {
    u64 i = TB_THREAD;
    if (i >= n) return;
    y[i] = keep[i] ? __dmul_rn((double)x[i], s) : 0.0;
}

/* out[i·dim + j] = table[ids[i]·dim + j]. */
KERNEL embedding_fwd(const float* table, const unsigned int* ids, double* out, u64 n_ids, u64 dim) {
    u64 i = TB_THREAD;
    if (i >= n_ids * dim) return;
    out[i] = (double)table[(u64)ids[i / dim] * dim + i % dim];
}

/* ---- sums ---- */

/* Scatter-add as a gather: out[g·dim + j] = Σ_{k in start[g]..start[g+1]} v[src[k]·dim + j]
 * (embedding backward with dim = model width, max-pool backward with dim = 1). */
KERNEL group_sum(const float* v, const u64* src, const u64* start, double* out, u64 groups, u64 dim) {
    u64 i = TB_THREAD;
    if (i >= groups * dim) return;
    u64 g = i / dim, j = i % dim;
    double s = 0.0;
    for (u64 k = start[g]; k < start[g + 1]; ++k) s += (double)v[src[k] * dim + j];
    out[i] = s;
}

/* Column sums of a rows×cols matrix (bias gradients). */
KERNEL sum_cols(const float* x, double* out, u64 rows, u64 cols) {
    u64 j = TB_THREAD;
    if (j >= cols) return;
    double s = 0.0;
    for (u64 r = 0; r < rows; ++r) s += (double)x[r * cols + j];
    out[j] = s;
}

/* Column dot products Σ_r a[r, j]·b[r, j] of two rows×cols matrices (layer-norm γ gradient). */
KERNEL col_dot(const float* a, const double* b, double* out, u64 rows, u64 cols) {
    u64 j = TB_THREAD;
    if (j >= cols) return;
    double s = 0.0;
    for (u64 r = 0; r < rows; ++r) s += (double)a[r * cols + j] * b[r * cols + j];
    out[j] = s;
}

/* ---- pooling (planes = n·c; windows skip padding, visited dy-major like Pool2dSpec::window) ---- */

#define TB_PADDING (~(u64)0)

/* Offset within its plane of element k (dy = k / kw, dx = k % kw) of window (oy, ox), or
 * TB_PADDING where it falls in the padding. */
DEVICE u64 window_at(u64 oy, u64 ox, u64 k, u64 h, u64 w, u64 kw, u64 stride, u64 pad) {
    u64 y = oy * stride + k / kw, x = ox * stride + k % kw;
    if (y < pad || y - pad >= h || x < pad || x - pad >= w) return TB_PADDING;
    return (y - pad) * w + (x - pad);
}

KERNEL max_pool_fwd(const float* x, double* y, double* idx, u64 planes, u64 h, u64 w, u64 oh, u64 ow, u64 kh,
                    u64 kw, u64 stride, u64 pad) {
    u64 i = TB_THREAD;
    if (i >= planes * oh * ow) return;
    u64 plane = i / (oh * ow);
    const float* xp = x + plane * h * w;
    u64 best = TB_PADDING;
    for (u64 k = 0; k < kh * kw; ++k) {
        u64 at = window_at(i / ow % oh, i % ow, k, h, w, kw, stride, pad);
        /* the first maximum in window order wins ties; NaN never replaces a value */
        if (at != TB_PADDING && (best == TB_PADDING || xp[at] > xp[best])) best = at;
    }
    /* every window holds an input element: the host checks pad < kh and pad < kw */
    y[i] = (double)xp[best];
    idx[i] = (double)(plane * h * w + best); /* exact: the host checks it is below 2^32 */
}

/* Window sum divided by kh·kw (padding counts as zeros). */
KERNEL avg_pool_fwd(const float* x, double* y, u64 planes, u64 h, u64 w, u64 oh, u64 ow, u64 kh, u64 kw,
                    u64 stride, u64 pad) {
    u64 i = TB_THREAD;
    if (i >= planes * oh * ow) return;
    const float* xp = x + i / (oh * ow) * h * w;
    double s = 0.0;
    for (u64 k = 0; k < kh * kw; ++k) {
        u64 at = window_at(i / ow % oh, i % ow, k, h, w, kw, stride, pad);
        if (at != TB_PADDING) s += (double)xp[at];
    }
    y[i] = s / (double)(kh * kw);
}

/* Each input element sums gy/(kh·kw) over the windows that contain it, in window order. */
KERNEL avg_pool_bwd(const float* gy, double* gx, u64 planes, u64 h, u64 w, u64 oh, u64 ow, u64 kh, u64 kw,
                    u64 stride, u64 pad) {
    u64 i = TB_THREAD;
    if (i >= planes * h * w) return;
    u64 plane = i / (h * w), iy = i / w % h, ix = i % w;
    const float* gp = gy + plane * oh * ow;
    double cnt = (double)(kh * kw);
    /* window oy covers iy when oy·stride ≤ iy + pad < oy·stride + kh */
    u64 oy_lo = iy + pad + 1 > kh ? (iy + pad + 1 - kh + stride - 1) / stride : 0;
    u64 ox_lo = ix + pad + 1 > kw ? (ix + pad + 1 - kw + stride - 1) / stride : 0;
    u64 oy_end = (iy + pad) / stride + 1 < oh ? (iy + pad) / stride + 1 : oh;
    u64 ox_end = (ix + pad) / stride + 1 < ow ? (ix + pad) / stride + 1 : ow;
    double s = 0.0;
    for (u64 oy = oy_lo; oy < oy_end; ++oy)
        for (u64 ox = ox_lo; ox < ox_end; ++ox) s += (double)gp[oy * ow + ox] / cnt;
    gx[i] = s;
}

/* ---- GELU (tanh approximation); c = √(2/π), a = 0.044715 passed from the host ---- */

KERNEL gelu_fwd(const float* x, double* y, double* t_out, u64 n, double c, double a) {
    u64 i = TB_THREAD;
    if (i >= n) return;
    double v = (double)x[i];
    double t = tanh(c * (v + a * (v * v * v)));
    y[i] = 0.5 * v * (1.0 + t);
    t_out[i] = t;
}

KERNEL gelu_bwd(const float* x, const float* gy, double* gx, double* t_out, u64 n, double c, double a) {
    u64 i = TB_THREAD;
    if (i >= n) return;
    double v = (double)x[i];
    double t = tanh(c * (v + a * (v * v * v)));
    double s = 1.0 + t;
    double q = 1.0 - t * t;
    double f = c * (1.0 + 3.0 * a * (v * v));
    double h = 0.5 * v * q * f;
    double g = 0.5 * s + h;
    gx[i] = (double)gy[i] * g;
    t_out[i] = t;
}

/* ---- row-wise ops: one thread per row of `cols`; with `causal`, row r sees r mod cols + 1 ---- */

DEVICE u64 visible(u64 r, u64 cols, u64 causal) { return causal ? r % cols + 1 : cols; }

/* e_i = exp(x_i − m) into out[0..v], m = the row max (exact); returns Σ e_i. */
DEVICE double exp_row(const float* x, double* out, u64 v, double* m_out) {
    double m = TB_NEG_INF;
    for (u64 i = 0; i < v; ++i) m = (double)x[i] > m ? (double)x[i] : m;
    for (u64 i = 0; i < v; ++i) out[i] = exp((double)x[i] - m);
    double s = 0.0;
    for (u64 i = 0; i < v; ++i) s += out[i];
    *m_out = m;
    return s;
}

KERNEL softmax_fwd(const float* x, double* y, u64 rows, u64 cols, u64 causal) {
    u64 r = TB_THREAD;
    if (r >= rows) return;
    u64 v = visible(r, cols, causal);
    double m;
    double s = exp_row(x + r * cols, y + r * cols, v, &m);
    for (u64 i = 0; i < v; ++i) y[r * cols + i] = y[r * cols + i] / s;
}

/* Also returns l = ln S per row (the bound needs it). */
KERNEL log_softmax_fwd(const float* x, double* y, double* row_l, u64 rows, u64 cols, u64 causal) {
    u64 r = TB_THREAD;
    if (r >= rows) return;
    u64 v = visible(r, cols, causal);
    double m;
    double l = log(exp_row(x + r * cols, y + r * cols, v, &m));
    for (u64 i = 0; i < v; ++i) y[r * cols + i] = ((double)x[r * cols + i] - m) - l;
    row_l[r] = l;
}

/* gx_i = y_i·(gy_i − D), D = Σ gy·y; returns D per row. */
KERNEL softmax_bwd(const float* y, const float* gy, double* gx, double* row_dot, u64 rows, u64 cols, u64 causal) {
    u64 r = TB_THREAD;
    if (r >= rows) return;
    u64 v = visible(r, cols, causal), o = r * cols;
    double d = 0.0;
    for (u64 i = 0; i < v; ++i) d += (double)gy[o + i] * (double)y[o + i];
    for (u64 i = 0; i < v; ++i) gx[o + i] = (double)y[o + i] * ((double)gy[o + i] - d);
    row_dot[r] = d;
}

/* gx_i = gy_i − exp(y_i)·G, G = Σ gy; returns exp(y_i) and G (the bound needs both). */
KERNEL log_softmax_bwd(const float* y, const float* gy, double* gx, double* e_out, double* row_g, u64 rows,
                       u64 cols, u64 causal) {
    u64 r = TB_THREAD;
    if (r >= rows) return;
    u64 v = visible(r, cols, causal), o = r * cols;
    double g = 0.0;
    for (u64 i = 0; i < v; ++i) g += (double)gy[o + i];
    for (u64 i = 0; i < v; ++i) {
        double e = exp((double)y[o + i]);
        gx[o + i] = (double)gy[o + i] - e * g;
        e_out[o + i] = e;
    }
    row_g[r] = g;
}

/* Per row: loss_r = ln S − (x_t − m); grad_i = (p_i − [i = t]) / rows with p_i = e_i / S.
 * Returns p_i, loss_r and ln S (the bounds need them). */
KERNEL cross_entropy_rows(const float* x, const unsigned int* t, double* grad, double* p_out, double* row_loss,
                          double* row_l, u64 rows, u64 cols) {
    u64 r = TB_THREAD;
    if (r >= rows) return;
    u64 o = r * cols, tr = t[r];
    double inv_b = (double)rows;
    double m;
    double s = exp_row(x + o, grad + o, cols, &m);
    double l = log(s);
    for (u64 i = 0; i < cols; ++i) {
        double p = grad[o + i] / s;
        double q = i == tr ? p - 1.0 : p;
        grad[o + i] = q / inv_b;
        p_out[o + i] = p;
    }
    row_loss[r] = l - ((double)x[o + tr] - m);
    row_l[r] = l;
}

/* One thread: (Σ v) / n, the mean of the per-row losses. */
KERNEL mean_seq(const double* v, double* out, u64 n) {
    if (TB_THREAD != 0) return;
    double s = 0.0;
    for (u64 i = 0; i < n; ++i) s += v[i];
    out[0] = s / (double)n;
}

/* ---- layer norm over rows of `cols` ---- */

/* μ = Σx / n (a division, by definition), c = x − μ, SS = Σc², rstd = 1/√(SS/n + eps),
 * y = c·rstd·γ + β. Returns μ, rstd and SS per row (the bound needs SS). */
KERNEL layer_norm_fwd(const float* x, const float* gw, const float* bw, double* y, double* mean, double* rstd_out,
                      double* row_ss, u64 rows, u64 cols, double eps) {
    u64 r = TB_THREAD;
    if (r >= rows) return;
    u64 o = r * cols;
    double nf = (double)cols;
    double s1 = 0.0;
    for (u64 i = 0; i < cols; ++i) s1 += (double)x[o + i];
    double mu = __ddiv_rn(s1, nf);
    double ss = 0.0;
    for (u64 i = 0; i < cols; ++i) {
        double c = (double)x[o + i] - mu;
        y[o + i] = c;
        ss += c * c;
    }
    double rstd = __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(__ddiv_rn(ss, nf), eps)));
    for (u64 i = 0; i < cols; ++i) y[o + i] = y[o + i] * rstd * (double)gw[i] + (double)bw[i];
    mean[r] = mu;
    rstd_out[r] = rstd;
    row_ss[r] = ss;
}

/* gx = rstd·(g − a − x̂·b), g = gy·γ, a = Σg / n, b = Σg·x̂ / n; returns a and b per row. */
KERNEL layer_norm_bwd(const float* gy, const float* gw, const double* xhat, const float* rstd, double* gx,
                      double* row_a, double* row_b, u64 rows, u64 cols) {
    u64 r = TB_THREAD;
    if (r >= rows) return;
    u64 o = r * cols;
    double nf = (double)cols;
    double sa = 0.0, sb = 0.0;
    for (u64 i = 0; i < cols; ++i) sa += (double)gy[o + i] * (double)gw[i];
    for (u64 i = 0; i < cols; ++i) sb += (double)gy[o + i] * (double)gw[i] * xhat[o + i];
    double a = sa / nf, b = sb / nf, rs = (double)rstd[r];
    for (u64 i = 0; i < cols; ++i) {
        double g = (double)gy[o + i] * (double)gw[i];
        gx[o + i] = rs * (g - a - xhat[o + i] * b);
    }
    row_a[r] = a;
    row_b[r] = b;
}

/* ---- optimizers: the exact unfused sequences of optim.rs, one __d*_rn per operation ---- */

/* g' = g + wd·w; v' = μ·v + g'; w' = w − lr·v'. */
KERNEL sgd(const float* w, const float* g, const float* v, double* w_out, double* v_out, u64 n, double lr,
           double mu, double wd) {
    u64 i = TB_THREAD;
    if (i >= n) return;
    double wi = (double)w[i], gi = (double)g[i], vi = (double)v[i];
    double gd = __dadd_rn(gi, __dmul_rn(wd, wi));
    double vn = __dadd_rn(__dmul_rn(mu, vi), gd);
    w_out[i] = __dsub_rn(wi, __dmul_rn(lr, vn));
    v_out[i] = vn;
}

/* m' = β1·m + (1−β1)·g; v' = β2·v + (1−β2)·g²; w' = (w − (lr·wd)·w) − lr·(m'/c1)/(√(v'/c2) + eps),
 * with omb1 = 1−β1, omb2 = 1−β2, c1 = 1−β1^t, c2 = 1−β2^t, lrwd = lr·wd from the host. */
KERNEL adamw(const float* w, const float* g, const float* m, const float* v, double* w_out, double* m_out,
             double* v_out, u64 n, double lr, double beta1, double beta2, double omb1, double omb2, double c1,
             double c2, double lrwd, double eps) {
    u64 i = TB_THREAD;
    if (i >= n) return;
    double wi = (double)w[i], gi = (double)g[i], mi = (double)m[i], vi = (double)v[i];
    double mn = __dadd_rn(__dmul_rn(beta1, mi), __dmul_rn(omb1, gi));
    double vn = __dadd_rn(__dmul_rn(beta2, vi), __dmul_rn(omb2, __dmul_rn(gi, gi)));
    double mh = __ddiv_rn(mn, c1);
    double vh = __ddiv_rn(vn, c2);
    double den = __dadd_rn(__dsqrt_rn(vh), eps);
    double q = __ddiv_rn(mh, den);
    double w1 = __dsub_rn(wi, __dmul_rn(lrwd, wi));
    w_out[i] = __dsub_rn(w1, __dmul_rn(lr, q));
    m_out[i] = mn;
    v_out[i] = vn;
}
