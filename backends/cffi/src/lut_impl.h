/* Canonical-layout kernels (rbe_lut, see rbe_internal.h) shared by every ISA; included by
 * kern_impl.h. The ISA file provides: lutreg + FN(lutreg_load)(m) (the level table in
 * registers) and FN(lut_block32)(m, &t, p, VF out[NV]) (the 32 level values of one 32-column
 * block whose codes start at p), lutreg_codes(t) (the same table yielding the codes
 * themselves, for affine byte codes), half_to_float(h) (one float16), vload_h / vstore_h (VLEN float16 <-> VF, round to nearest
 * even), vdiv(a, b), vsub(a, b) and vexp(v) (expf within a few ulp, inputs <= 0
 * flushed to 0 below -87), on top of the vocabulary kern_impl.h documents. */
#include <math.h>
#include <string.h>

/* Codes of the 32-column block that starts at column c of row r. */
static inline const uint8_t *FN(lut_codes)(const rbe_lut *m, int64_t r, int64_t c) {
    return m->codes + r * m->row_bytes + (c >> 5) * m->block_bytes;
}

static float FN(vdot)(const float *a, const float *b, int64_t n) {
    VF acc[2] = {vzero(), vzero()};
    int64_t c = 0;
    for (; c + 2 * VLEN <= n; c += 2 * VLEN) {
        acc[0] = vfma(vload(a + c), vload(b + c), acc[0]);
        acc[1] = vfma(vload(a + c + VLEN), vload(b + c + VLEN), acc[1]);
    }
    for (; c + VLEN <= n; c += VLEN) acc[0] = vfma(vload(a + c), vload(b + c), acc[0]);
    float t = vhsum(vadd(acc[0], acc[1]));
    for (; c < n; c++) t += a[c] * b[c];
    return t;
}

static void FN(vaxpy)(float a, const float *x, float *y, int64_t n) {
    const VF av = vset1(a);
    int64_t c = 0;
    for (; c + VLEN <= n; c += VLEN) vstore(y + c, vfma(av, vload(x + c), vload(y + c)));
    for (; c < n; c++) y[c] += a * x[c];
}

/* s[j] = exp(s[j] - shift) for j < n (softmax numerators); returns their sum. */
static float FN(exp_sum)(float *s, int64_t n, float shift) {
    const VF sh = vset1(shift);
    VF acc = vzero();
    int64_t j = 0;
    for (; j + VLEN <= n; j += VLEN) {
        const VF v = vexp(vsub(vload(s + j), sh));
        vstore(s + j, v);
        acc = vadd(acc, v);
    }
    float t = vhsum(acc);
    for (; j < n; j++) {
        s[j] = expf(s[j] - shift);
        t += s[j];
    }
    return t;
}

/* One K or V row chunk of VLEN values at element offset o: float32, or float16 when half. */
static inline VF FN(kv_load)(const void *base, int64_t o, int half) {
    return half ? vload_h((const uint16_t *)base + o) : vload((const float *)base + o);
}
static inline float FN(kv_at)(const void *base, int64_t o, int half) {
    return half ? rbe_half_to_float(((const uint16_t *)base)[o]) : ((const float *)base)[o];
}

/* Causal attention of `rep` query heads (q + r * ldq) that share one kv head, over the first
 * `len` positions of K and V (float16 when half, else float32; K in blocks of 16 positions,
 * element (p, d) at (p / 16 * hd + d) * 16 + p % 16, so 16 scores come from hd vector FMAs; V in
 * rows of hd): out + r * ldo =
 * softmax(scale * q K^T) V. Each K and V row is loaded once for all `rep` heads. scores holds
 * rep * len floats. With ml, the output is left unnormalised (sum_p exp(s_p - max) V_p) and
 * ml[2r], ml[2r + 1] get each head's max and sum of exponentials, so a split over positions can
 * be merged. */
static void FN(attend_group)(const float *q, int64_t ldq, int rep, const void *K, const void *V,
                             int half, int64_t len, int64_t hd, float scale, float *out,
                             int64_t ldo, float *scores, float *ml) {
    const int64_t hv = hd - hd % VLEN;
    for (int r0 = 0; r0 < rep; r0 += 4) { /* scores, 16 positions at a time: no horizontal sums */
        const int nr = rep - r0 < 4 ? rep - r0 : 4;
        const float *qp[4]; /* missing heads repeat the last one: a fixed 4 keeps acc in registers */
        for (int r = 0; r < 4; r++) qp[r] = q + (r0 + (r < nr ? r : nr - 1)) * ldq;
        for (int64_t b = 0; b * 16 < len; b++) {
            VF acc[4][16 / VLEN];
            for (int r = 0; r < 4; r++)
                for (int j = 0; j < 16 / VLEN; j++) acc[r][j] = vzero();
            const int64_t kb = b * hd * 16;
            for (int64_t d = 0; d < hd; d++) {
                VF kv[16 / VLEN];
                for (int j = 0; j < 16 / VLEN; j++) kv[j] = FN(kv_load)(K, kb + d * 16 + j * VLEN, half);
                for (int r = 0; r < 4; r++) {
                    const VF qd = vset1(qp[r][d]);
                    for (int j = 0; j < 16 / VLEN; j++) acc[r][j] = vfma(qd, kv[j], acc[r][j]);
                }
            }
            const int64_t cnt = rbe_min(16, len - b * 16);
            for (int r = 0; r < nr; r++) {
                float tmp[16];
                for (int j = 0; j < 16 / VLEN; j++) vstore(tmp + j * VLEN, acc[r][j]);
                for (int64_t p = 0; p < cnt; p++) scores[(r0 + r) * len + b * 16 + p] = tmp[p] * scale;
            }
        }
    }
    for (int r = 0; r < rep; r++) {
        float *sr = scores + r * len, mx = -INFINITY;
        for (int64_t p = 0; p < len; p++) mx = sr[p] > mx ? sr[p] : mx;
        const float sum = FN(exp_sum)(sr, len, mx);
        if (ml) {
            ml[2 * r] = mx, ml[2 * r + 1] = sum;
        } else {
            const float inv = 1.0f / sum;
            for (int64_t p = 0; p < len; p++) sr[p] *= inv;
        }
    }
    for (int r0 = 0; r0 < rep; r0 += 4) {
        const int nr = rep - r0 < 4 ? rep - r0 : 4;
        for (int64_t d = 0; d < hv; d += VLEN) {
            VF acc[4] = {vzero(), vzero(), vzero(), vzero()};
            for (int64_t p = 0; p < len; p++) {
                const VF vv = FN(kv_load)(V, p * hd + d, half);
                for (int r = 0; r < nr; r++) acc[r] = vfma(vset1(scores[(r0 + r) * len + p]), vv, acc[r]);
            }
            for (int r = 0; r < nr; r++) vstore(out + (r0 + r) * ldo + d, acc[r]);
        }
        for (int64_t d = hv; d < hd; d++)
            for (int r = 0; r < nr; r++) {
                float t = 0.0f;
                for (int64_t p = 0; p < len; p++) t += scores[(r0 + r) * len + p] * FN(kv_at)(V, p * hd + d, half);
                out[(r0 + r) * ldo + d] = t;
            }
    }
}

/* dst[i] = src[i] for i < n, as float16 (round to nearest even) when half, else float32. */
static void FN(kv_store)(void *dst, const float *src, int64_t n, int half) {
    if (!half) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *h = dst;
    int64_t i = 0;
    for (; i + VLEN <= n; i += VLEN) vstore_h(h + i, vload(src + i));
    for (; i < n; i++) h[i] = rbe_float_to_half(src[i]);
}

/* Sylvester Hadamard matrix of order 16 (its top-left 8 x 8 block is the order-8 one). */
static const float FN(hadamard16)[256] = {
     1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,  1,
     1, -1,  1, -1,  1, -1,  1, -1,  1, -1,  1, -1,  1, -1,  1, -1,
     1,  1, -1, -1,  1,  1, -1, -1,  1,  1, -1, -1,  1,  1, -1, -1,
     1, -1, -1,  1,  1, -1, -1,  1,  1, -1, -1,  1,  1, -1, -1,  1,
     1,  1,  1,  1, -1, -1, -1, -1,  1,  1,  1,  1, -1, -1, -1, -1,
     1, -1,  1, -1, -1,  1, -1,  1,  1, -1,  1, -1, -1,  1, -1,  1,
     1,  1, -1, -1, -1, -1,  1,  1,  1,  1, -1, -1, -1, -1,  1,  1,
     1, -1, -1,  1, -1,  1,  1, -1,  1, -1, -1,  1, -1,  1,  1, -1,
     1,  1,  1,  1,  1,  1,  1,  1, -1, -1, -1, -1, -1, -1, -1, -1,
     1, -1,  1, -1,  1, -1,  1, -1, -1,  1, -1,  1, -1,  1, -1,  1,
     1,  1, -1, -1,  1,  1, -1, -1, -1, -1,  1,  1, -1, -1,  1,  1,
     1, -1, -1,  1,  1, -1, -1,  1, -1,  1,  1, -1, -1,  1,  1, -1,
     1,  1,  1,  1, -1, -1, -1, -1, -1, -1, -1, -1,  1,  1,  1,  1,
     1, -1,  1, -1, -1,  1, -1,  1, -1,  1, -1,  1,  1, -1,  1, -1,
     1,  1, -1, -1, -1, -1,  1,  1, -1, -1,  1,  1,  1,  1, -1, -1,
     1, -1, -1,  1, -1,  1,  1, -1, -1,  1,  1, -1,  1, -1, -1,  1
};

/* Orthonormal block Walsh-Hadamard transform of v in place (blocks: powers of two). The stages
 * within each VLEN-long chunk are one multiply by H_VLEN (VLEN broadcasts and FMAs, exact: the
 * entries are +-1), the longer ones vector butterflies; then the float32 1/sqrt(b) scale. */
static void FN(fwht)(float *v, const long long *blocks, int nblocks) {
    for (int bi = 0; bi < nblocks; bi++) {
        const int64_t b = blocks[bi];
        int64_t h = 1;
        if (b >= VLEN) {
            for (int64_t c = 0; c < b; c += VLEN) {
                VF acc = vzero();
                for (int j = 0; j < VLEN; j++) acc = vfma(vset1(v[c + j]), vload(FN(hadamard16) + 16 * j), acc);
                vstore(v + c, acc);
            }
            h = VLEN;
        }
        for (; h < b; h *= 2)
            for (int64_t i = 0; i < b; i += 2 * h) {
                if (h >= VLEN) {
                    for (int64_t t = i; t < i + h; t += VLEN) {
                        const VF a = vload(v + t), c = vload(v + t + h);
                        vstore(v + t, vadd(a, c));
                        vstore(v + t + h, vsub(a, c));
                    }
                } else {
                    for (int64_t t = i; t < i + h; t++) {
                        const float a = v[t], c = v[t + h];
                        v[t] = a + c;
                        v[t + h] = a - c;
                    }
                }
            }
        const VF s = vset1((float)(1.0 / sqrt((double)b)));
        int64_t t = 0;
        for (; t + VLEN <= b; t += VLEN) vstore(v + t, vmul(vload(v + t), s));
        for (; t < b; t++) v[t] *= (float)(1.0 / sqrt((double)b));
        v += b;
    }
}

/* Activations in place over n values: kind 0 g = silu(g) * u (SwiGLU), 1 gelu (tanh form),
 * 2 gelu (erf), 3 relu; u is only read for kind 0. */
static void FN(activate)(int kind, float *g, const float *u, int64_t n) {
    int64_t i = 0;
    const VF one = vset1(1.0f), zero = vzero();
    if (kind == 0) {
        for (; i + VLEN <= n; i += VLEN) {
            const VF x = vload(g + i);
            const VF e = vexp(vsub(zero, x)); /* silu(x) = x / (1 + exp(-x)) */
            vstore(g + i, vmul(vdiv(x, vadd(one, e)), vload(u + i)));
        }
        for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    } else if (kind == 1) {
        const VF c0 = vset1(0.7978845608028654f), c1 = vset1(0.044715f), half = vset1(0.5f), two = vset1(2.0f);
        for (; i + VLEN <= n; i += VLEN) {
            const VF x = vload(g + i);
            const VF z = vmul(c0, vadd(x, vmul(c1, vmul(x, vmul(x, x)))));
            /* 1 + tanh(z) = 2 - 2 / (exp(2z) + 1) */
            const VF t = vsub(two, vdiv(two, vadd(vexp(vmul(two, z)), one)));
            vstore(g + i, vmul(half, vmul(x, t)));
        }
        for (; i < n; i++)
            g[i] = 0.5f * g[i] * (1.0f + tanhf(0.7978845608028654f * (g[i] + 0.044715f * g[i] * g[i] * g[i])));
    } else if (kind == 2) {
        for (; i < n; i++) g[i] = 0.5f * g[i] * (1.0f + erff(g[i] * 0.7071067811865476f));
    } else {
        for (; i < n; i++) g[i] = g[i] > 0.0f ? g[i] : 0.0f;
    }
}

/* Row r, columns [c0, c1) into w: levels[q] * step (+ offset), multiply then add, as decode. */
static void FN(lut_decode)(const rbe_lut *m, int64_t r, int64_t c0, int64_t c1, float *w) {
    if (m->kind == RBE_LUT_F32) {
        memcpy(w, m->dense + r * m->cols_p + c0, (size_t)(c1 - c0) * sizeof(float));
        return;
    }
    const lutreg t = FN(lutreg_load)(m);
    for (int64_t c = c0; c < c1; c += 32) {
        VF v[NV];
        FN(lut_block32)(m, &t, FN(lut_codes)(m, r, c), v);
        const int64_t g = c / m->gs;
        const VF s = vset1(rbe_lut_step(m, r, g));
        float *o = w + (c - c0);
        if (m->has_offset) {
            const VF off = vset1(rbe_lut_offset(m, r, g));
            for (int k = 0; k < NV; k++) vstore(o + k * VLEN, vadd(vmul(v[k], s), off));
        } else {
            for (int k = 0; k < NV; k++) vstore(o + k * VLEN, vmul(v[k], s));
        }
    }
}

/* Steps (and offsets, when the matrix has them) of rows r .. r + n - 1, all groups, as float32:
 * st[i * groups + g]. Half-precision ones are converted VLEN at a time. */
static void FN(row_steps)(const rbe_lut *m, int64_t r, int n, float *st, float *off) {
    const int64_t groups = m->groups, total = n * groups, at = r * groups;
    if (m->step_kind == RBE_STEP_CODE) {
        for (int i = 0; i < n; i++) {
            const float rs = m->row_scale[r + i];
            const uint8_t *code = m->step_code + (r + i) * groups;
            for (int64_t g = 0; g < groups; g++) st[i * groups + g] = rs * (float)code[g];
        }
        return;
    }
    if (m->step_kind == RBE_STEP_F32) {
        memcpy(st, m->step + at, (size_t)total * sizeof(float));
        if (m->has_offset) memcpy(off, m->offset + at, (size_t)total * sizeof(float));
        return;
    }
    int64_t i = 0;
    for (; i + VLEN <= total; i += VLEN) {
        vstore(st + i, vload_h(m->step16 + at + i));
        if (m->has_offset) vstore(off + i, vload_h(m->offset16 + at + i));
    }
    for (; i < total; i++) {
        st[i] = half_to_float(m->step16[at + i]);
        if (m->has_offset) off[i] = half_to_float(m->offset16[at + i]);
    }
}

/* Batch-1 product of coded rows, instantiated once per code kind (each copy gets its own
 * inlined, unswitched lookup: measured 1.7x faster for 5-bit codes than one shared body): each
 * group's level-times-input products are summed, then multiplied once by the group's step;
 * offsets meet the per-group sums of x. */
static inline __attribute__((always_inline)) void FN(lut_gemv_body)(const rbe_lut *m,
                                                                    const float *x, int64_t r0,
                                                                    int64_t r1, float *y,
                                                                    float *xsum, const int kind) {
    /* affine byte codes (int8, uniform grids): sum code * x, and apply level = a0 + da * code per
     * group as step * (da * sum + a0 * sum(x)): one multiply-add less per weight */
    const int raw = kind == RBE_LUT_BYTE && m->affine;
    const int64_t groups = m->groups, gs = m->gs, cp = m->cols_p;
    float *stf = xsum + groups, *offf = stf + GEMV_ROWS * groups;
    if (m->has_offset || raw)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t c = g * gs; c < rbe_min((g + 1) * gs, cp); c++) s += x[c];
            xsum[g] = s;
        }
    const lutreg t = raw ? FN(lutreg_codes)(FN(lutreg_load)(m)) : FN(lutreg_load)(m);
    for (int64_t r = r0; r < r1; r += GEMV_ROWS) {
        const int nr = (int)rbe_min(GEMV_ROWS, r1 - r);
        const uint8_t *qr[GEMV_ROWS];
        const float *st[GEMV_ROWS];
        VF acc[GEMV_ROWS];
        float extra[GEMV_ROWS] = {0};
        FN(row_steps)(m, r, nr, stf, offf);
        for (int i = 0; i < GEMV_ROWS; i++) {
            const int ii = i < nr ? i : nr - 1; /* tail rows repeat the last one */
            qr[i] = m->codes + (r + ii) * m->row_bytes;
            st[i] = stf + ii * groups;
            acc[i] = vzero();
        }
        /* the next rows' codes and steps, requested now: one core streams them too slowly alone */
        for (int64_t pf = (r + GEMV_ROWS) * m->row_bytes; pf < rbe_min(r + 2 * GEMV_ROWS, r1) * m->row_bytes; pf += 64)
            __builtin_prefetch(m->codes + pf);
        for (int64_t g = 0; g < groups; g++) {
            VF ga[GEMV_ROWS][NV];
            for (int i = 0; i < GEMV_ROWS; i++)
                for (int k = 0; k < NV; k++) ga[i][k] = vzero();
            for (int64_t c = g * gs; c < rbe_min((g + 1) * gs, cp); c += 32) {
                VF xv[NV];
                for (int k = 0; k < NV; k++) xv[k] = vload(x + c + k * VLEN);
                for (int i = 0; i < GEMV_ROWS; i++) {
                    VF w[NV];
                    FN(lut_block32)(m, &t, qr[i] + (c >> 5) * m->block_bytes, w);
                    for (int k = 0; k < NV; k++) ga[i][k] = vfma(w[k], xv[k], ga[i][k]);
                }
            }
            for (int i = 0; i < GEMV_ROWS; i++) {
                VF s = ga[i][0];
                for (int k = 1; k < NV; k++) s = vadd(s, ga[i][k]);
                const float sg = st[i][g];
                acc[i] = vfma(s, vset1(raw ? sg * m->da : sg), acc[i]);
                if (raw) extra[i] += sg * m->a0 * xsum[g];
            }
        }
        for (int i = 0; i < nr; i++) {
            float v = vhsum(acc[i]) + extra[i];
            if (m->has_offset)
                for (int64_t g = 0; g < groups; g++) v += offf[i * groups + g] * xsum[g];
            y[r + i] = v;
        }
    }
}

static void FN(lut_gemv)(const rbe_lut *m, const float *x, int64_t r0, int64_t r1, float *y,
                         float *scratch) {
    if (m->kind == RBE_LUT_F32) {
        for (int64_t r = r0; r < r1; r++) y[r] = FN(vdot)(m->dense + r * m->cols_p, x, m->cols_p);
    } else if (m->kind == RBE_LUT_NIBBLE) {
        FN(lut_gemv_body)(m, x, r0, r1, y, scratch, RBE_LUT_NIBBLE);
    } else if (m->kind == RBE_LUT_PLANES) {
        FN(lut_gemv_body)(m, x, r0, r1, y, scratch, RBE_LUT_PLANES);
    } else {
        FN(lut_gemv_body)(m, x, r0, r1, y, scratch, RBE_LUT_BYTE);
    }
}

#ifndef GEMM_MR
#define GEMM_MR 6 /* rows per microkernel pass */
#endif
#define GEMM_NT (2 * VLEN) /* tokens per microkernel pass */

/* Batched product y[b * ldy + r] = dot(W[r], x_b) for b < n, r in [r0, r1), with the input
 * transposed: xt[c * ldt + b] (ldt a multiple of GEMM_NT, tokens past n zero). GEMM_MR rows are
 * decoded once into scratch, then per column one broadcast of each row's weight and two vector
 * loads of GEMM_NT tokens feed 2 * GEMM_MR FMAs: no transposition of weights and no horizontal
 * sums. scratch holds GEMM_MR * (cols_p + GEMM_NT) floats. */
static void FN(lut_gemm)(const rbe_lut *m, const float *xt, int64_t ldt, int64_t n, int64_t r0,
                         int64_t r1, float *y, int64_t ldy, float *scratch) {
    const int64_t cp = m->cols_p;
    float *panel = scratch, *out = scratch + GEMM_MR * cp;
    for (int64_t r = r0; r < r1; r += GEMM_MR) {
        const int nr = (int)rbe_min(GEMM_MR, r1 - r);
        for (int i = 0; i < GEMM_MR; i++) {
            if (i < nr) FN(lut_decode)(m, r + i, 0, cp, panel + i * cp);
            else memset(panel + i * cp, 0, (size_t)cp * sizeof(float));
        }
        for (int64_t b = 0; b < n; b += GEMM_NT) {
            VF acc[GEMM_MR][2];
            for (int i = 0; i < GEMM_MR; i++) acc[i][0] = acc[i][1] = vzero();
            const float *xc = xt + b;
            for (int64_t c = 0; c < cp; c++, xc += ldt) {
                const VF x0 = vload(xc), x1 = vload(xc + VLEN);
                for (int i = 0; i < GEMM_MR; i++) {
                    const VF w = vset1(panel[i * cp + c]);
                    acc[i][0] = vfma(w, x0, acc[i][0]);
                    acc[i][1] = vfma(w, x1, acc[i][1]);
                }
            }
            const int nb = (int)rbe_min(GEMM_NT, n - b);
            for (int i = 0; i < nr; i++) {
                vstore(out + i * GEMM_NT, acc[i][0]);
                vstore(out + i * GEMM_NT + VLEN, acc[i][1]);
            }
            for (int t = 0; t < nb; t++)
                for (int i = 0; i < nr; i++) y[(b + t) * ldy + r + i] = out[i * GEMM_NT + t];
        }
    }
}

/* y[c] = sum_r x[r] W[r, c], c in [c0, c1): each row's slice decoded into scratch. */
static void FN(lut_gemv_t)(const rbe_lut *m, const float *x, int64_t c0, int64_t c1, float *y,
                           float *scratch) {
    const int64_t width = c1 - c0;
    memset(y + c0, 0, (size_t)width * sizeof(float));
    for (int64_t r = 0; r < m->rows; r++) {
        FN(lut_decode)(m, r, c0, c1, scratch);
        FN(vaxpy)(x[r], scratch, y + c0, width);
    }
}
