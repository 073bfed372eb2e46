/* Canonical-layout kernels (rbe_lut, see rbe_internal.h) shared by every ISA; included by
 * kern_impl.h. The ISA file provides: lutreg + FN(lutreg_load)(m) (the level table in
 * registers) and FN(lut_block32)(m, &t, p, VF out[NV]) (the 32 level values of one 32-column
 * block whose codes start at p), lutreg_codes(t) (the same table yielding the codes
 * themselves, for affine byte codes), optionally lut_wide(&t) (whether FN(lut_block64)(&t, p, VF
 * out[2 * NV]) gives the 64 values of the two consecutive TRELLIS blocks at p), half_to_float(h) (one float16), vload_h / vstore_h (VLEN float16 <-> VF, round to nearest
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

/* One K or V row chunk of VLEN values at element offset o, of a cache of `kind` (RBE_KV_*; int8
 * ones before their position's scale). */
static inline VF FN(kv_load)(const void *base, int64_t o, int kind) {
    return kind == RBE_KV_F16  ? vload_h((const uint16_t *)base + o)
           : kind == RBE_KV_I8 ? vload_i8((const int8_t *)base + o)
                               : vload((const float *)base + o);
}
static inline float FN(kv_at)(const void *base, int64_t o, int kind) {
    return kind == RBE_KV_F16  ? rbe_half_to_float(((const uint16_t *)base)[o])
           : kind == RBE_KV_I8 ? (float)((const int8_t *)base)[o]
                               : ((const float *)base)[o];
}

/* Value columns a pass of attend_values: 64 (four vectors) where 32 registers hold nr x 4
 * sums, else 16; a V row's columns of one pass are read once, in order. */
#define ATT_DIMS (VLEN >= 16 ? 64 : 16)

/* out + r * ldo (r < nr) = sum_p s[r * len + p] V_p for the columns [0, hd - hd % ATT_DIMS),
 * ATT_DIMS a pass over the positions (nr * ATT_DIMS / VLEN independent sums); returns
 * hd - hd % ATT_DIMS. */
static inline __attribute__((always_inline)) int64_t FN(attend_values)(const float *s, int64_t len, const void *V,
                                                                      int kind, int64_t hd, float *out,
                                                                      int64_t ldo, const int nr) {
    const int64_t hb = hd - hd % ATT_DIMS;
    for (int64_t d = 0; d < hb; d += ATT_DIMS) {
        VF acc[4][ATT_DIMS / VLEN];
        for (int r = 0; r < nr; r++)
            for (int j = 0; j < ATT_DIMS / VLEN; j++) acc[r][j] = vzero();
        for (int64_t p = 0; p < len; p++) {
            VF vv[ATT_DIMS / VLEN];
            for (int j = 0; j < ATT_DIMS / VLEN; j++) vv[j] = FN(kv_load)(V, p * hd + d + j * VLEN, kind);
            for (int r = 0; r < nr; r++) {
                const VF w = vset1(s[r * len + p]);
                for (int j = 0; j < ATT_DIMS / VLEN; j++) acc[r][j] = vfma(w, vv[j], acc[r][j]);
            }
        }
        for (int r = 0; r < nr; r++)
            for (int j = 0; j < ATT_DIMS / VLEN; j++) vstore(out + r * ldo + d + j * VLEN, acc[r][j]);
    }
    return hb;
}

/* Scores of nr (<= 4) query heads qp[r] against the first len positions of K (layout as
 * attend_group's; int8 ones times their positions' scales ks), 16 positions at a time (no
 * horizontal sums): scores + r * len gets scale * q K^T (softcapped; positions below skip -inf);
 * returns each row's maximum in mx[r]. */
static inline __attribute__((always_inline)) void FN(attend_scores)(const float *const *qp, const void *K, int kind,
                                                                   const float *ks,
                                                                   int64_t len, int64_t skip, int64_t hd,
                                                                   float scale, float softcap, float *scores,
                                                                   float *mx, const int nr) {
    VF vmx[4];
    for (int r = 0; r < nr; r++) vmx[r] = vset1(-INFINITY), mx[r] = -INFINITY;
    for (int64_t b = 0; b * 16 < len; b++) {
        VF acc[4][16 / VLEN];
        for (int r = 0; r < nr; r++)
            for (int j = 0; j < 16 / VLEN; j++) acc[r][j] = vzero();
        const int64_t kb = b * hd * 16;
        for (int64_t d = 0; d < hd; d++) {
            VF kv[16 / VLEN];
            for (int j = 0; j < 16 / VLEN; j++) kv[j] = FN(kv_load)(K, kb + d * 16 + j * VLEN, kind);
            for (int r = 0; r < nr; r++) {
                const VF qd = vset1(qp[r][d]);
                for (int j = 0; j < 16 / VLEN; j++) acc[r][j] = vfma(qd, kv[j], acc[r][j]);
            }
        }
        if (kind == RBE_KV_I8)
            for (int r = 0; r < nr; r++)
                for (int j = 0; j < 16 / VLEN; j++) acc[r][j] = vmul(acc[r][j], vload(ks + b * 16 + j * VLEN));
        const int64_t cnt = rbe_min(16, len - b * 16);
        const int plain = cnt == 16 && softcap <= 0.0f && b * 16 >= skip;
        for (int r = 0; r < nr; r++) {
            float *sr = scores + r * len + b * 16;
            if (plain) { /* the common block: scaled and its maximum taken in vectors */
                for (int j = 0; j < 16 / VLEN; j++) {
                    const VF v = vmul(acc[r][j], vset1(scale));
                    vstore(sr + j * VLEN, v);
                    vmx[r] = vmax(vmx[r], v);
                }
                continue;
            }
            float tmp[16];
            for (int j = 0; j < 16 / VLEN; j++) vstore(tmp + j * VLEN, acc[r][j]);
            for (int64_t p = 0; p < cnt; p++) {
                float v = tmp[p] * scale;
                if (softcap > 0.0f) v = softcap * tanhf(v / softcap);
                sr[p] = b * 16 + p < skip ? -INFINITY : v;
                mx[r] = sr[p] > mx[r] ? sr[p] : mx[r];
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        float lanes[VLEN];
        vstore(lanes, vmx[r]);
        for (int i = 0; i < VLEN; i++) mx[r] = lanes[i] > mx[r] ? lanes[i] : mx[r];
    }
}

/* Causal attention of `rep` query heads (q + r * ldq) that share one kv head, over the first
 * `len` positions of K and V (elements of `kind`, RBE_KV_*; int8 ones times their positions'
 * scales ks and vs, 16 of ks for every block begun; K in blocks of 16 positions,
 * element (p, d) at (p / 16 * hd + d) * 16 + p % 16, so 16 scores come from hd vector FMAs; V in
 * rows of hd): out + r * ldo =
 * softmax(scale * q K^T) V. Each K and V row is loaded once for every 4 heads. scores holds
 * rep * len floats. With ml, the output is left unnormalised (sum_p exp(s_p - max) V_p) and
 * ml[2r], ml[2r + 1] get each head's max and sum of exponentials, so a split over positions can
 * be merged. */
static void FN(attend_group)(const float *q, int64_t ldq, int rep, const void *K, const void *V,
                             int kind, const float *ks, const float *vs, int64_t len, int64_t skip,
                             int64_t hd, float scale, float softcap, float *out, int64_t ldo, float *scores,
                             float *ml) {
    const int64_t hv = hd - hd % VLEN;
    for (int r0 = 0; r0 < rep; r0 += 4) {
        const int nr = rep - r0 < 4 ? rep - r0 : 4;
        const float *qp[4];
        for (int r = 0; r < 4; r++) qp[r] = q + (r0 + (r < nr ? r : 0)) * ldq;
        float mx[4], *sp = scores + r0 * len;
        switch (nr) { /* a constant head count in each: sums in registers, no branch a position */
        case 1: FN(attend_scores)(qp, K, kind, ks, len, skip, hd, scale, softcap, sp, mx, 1); break;
        case 2: FN(attend_scores)(qp, K, kind, ks, len, skip, hd, scale, softcap, sp, mx, 2); break;
        case 3: FN(attend_scores)(qp, K, kind, ks, len, skip, hd, scale, softcap, sp, mx, 3); break;
        default: FN(attend_scores)(qp, K, kind, ks, len, skip, hd, scale, softcap, sp, mx, 4);
        }
        for (int r = 0; r < nr; r++) {
            float *sr = sp + r * len;
            const float sum = FN(exp_sum)(sr, len, mx[r]);
            if (ml) {
                ml[2 * (r0 + r)] = mx[r], ml[2 * (r0 + r) + 1] = sum;
            } else {
                const float inv = 1.0f / sum;
                for (int64_t p = 0; p < len; p++) sr[p] *= inv;
            }
            if (kind == RBE_KV_I8) /* the value rows' scales, taken with the weights */
                for (int64_t p = 0; p < len; p++) sr[p] *= vs[p];
        }
    }
    for (int r0 = 0; r0 < rep; r0 += 4) {
        const int nr = rep - r0 < 4 ? rep - r0 : 4;
        const float *sp = scores + r0 * len;
        float *op = out + r0 * ldo;
        int64_t d = 0;
        switch (nr) { /* a constant head count in each: no branch a position */
        case 1: d = FN(attend_values)(sp, len, V, kind, hd, op, ldo, 1); break;
        case 2: d = FN(attend_values)(sp, len, V, kind, hd, op, ldo, 2); break;
        case 3: d = FN(attend_values)(sp, len, V, kind, hd, op, ldo, 3); break;
        default: d = FN(attend_values)(sp, len, V, kind, hd, op, ldo, 4);
        }
        for (; d < hv; d += VLEN) {
            VF acc[4] = {vzero(), vzero(), vzero(), vzero()};
            for (int64_t p = 0; p < len; p++) {
                const VF vv = FN(kv_load)(V, p * hd + d, kind);
                for (int r = 0; r < nr; r++) acc[r] = vfma(vset1(scores[(r0 + r) * len + p]), vv, acc[r]);
            }
            for (int r = 0; r < nr; r++) vstore(out + (r0 + r) * ldo + d, acc[r]);
        }
        for (int64_t c = hv; c < hd; c++)
            for (int r = 0; r < nr; r++) {
                float t = 0.0f;
                for (int64_t p = 0; p < len; p++) t += scores[(r0 + r) * len + p] * FN(kv_at)(V, p * hd + c, kind);
                out[(r0 + r) * ldo + c] = t;
            }
    }
}

/* dst[i * stride] = src[i] for i < n as elements of `kind` (RBE_KV_*): float32, float16 (round
 * to nearest even), or int8 times *scale (rbe_kv_int8's). */
static void FN(kv_store)(void *dst, const float *src, int64_t n, int64_t stride, int kind, float *scale) {
    if (kind == RBE_KV_I8) {
        *scale = rbe_kv_int8(src, n, dst, stride);
        return;
    }
    if (kind == RBE_KV_F32) {
        for (int64_t i = 0; i < n; i++) ((float *)dst)[i * stride] = src[i];
        return;
    }
    uint16_t *h = dst, part[VLEN];
    int64_t i = 0;
    for (; i + VLEN <= n; i += VLEN) {
        if (stride == 1) {
            vstore_h(h + i, vload(src + i));
            continue;
        }
        vstore_h(part, vload(src + i));
        for (int v = 0; v < VLEN; v++) h[(i + v) * stride] = part[v];
    }
    for (; i < n; i++) h[i * stride] = rbe_float_to_half(src[i]);
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
 * 2 gelu (erf), 3 relu, 4 gelu (tanh form) * u (GeGLU); u is only read for kinds 0 and 4. */
static void FN(activate)(int kind, float *g, const float *u, int64_t n) {
    if (kind == 4) {
        FN(activate)(1, g, NULL, n);
        for (int64_t i = 0; i < n; i++) g[i] *= u[i];
        return;
    }
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

/* Steps times scale (and offsets, when the matrix has them) of rows r .. r + n - 1, all groups,
 * as float32: st[i * groups + g]. Half-precision ones are converted VLEN at a time. */
static void FN(row_steps)(const rbe_lut *m, int64_t r, int n, float scale, float *st, float *off) {
    const int64_t groups = m->groups, total = n * groups, at = r * groups;
    if (m->step_kind == RBE_STEP_CODE) {
        for (int i = 0; i < n; i++) {
            const float rs = scale * m->row_scale[r + i];
            const uint8_t *code = m->step_code + (r + i) * groups;
            for (int64_t g = 0; g < groups; g++) st[i * groups + g] = rs * (float)code[g];
        }
        return;
    }
    if (m->step_kind == RBE_STEP_F32) {
        for (int64_t i = 0; i < total; i++) st[i] = scale * m->step[at + i];
        if (m->has_offset) memcpy(off, m->offset + at, (size_t)total * sizeof(float));
        return;
    }
    int64_t i = 0;
    for (; i + VLEN <= total; i += VLEN) {
        vstore(st + i, vmul(vset1(scale), vload_h(m->step16 + at + i)));
        if (m->has_offset) vstore(off + i, vload_h(m->offset16 + at + i));
    }
    for (; i < total; i++) {
        st[i] = scale * half_to_float(m->step16[at + i]);
        if (m->has_offset) off[i] = half_to_float(m->offset16[at + i]);
    }
}

/* Prefetch requests for the code bytes [from, to) (a group's share of the next pass's rows),
 * into L1, or only into L2 (prefetcht2) where to_l2. */
static inline void FN(prefetch_codes)(const uint8_t *codes, int64_t from, int64_t to) {
    for (int64_t pf = from & ~(int64_t)63; pf < to; pf += 64) __builtin_prefetch(codes + pf);
}
static inline void FN(prefetch_codes_l2)(const uint8_t *codes, int64_t from, int64_t to) {
    for (int64_t pf = from & ~(int64_t)63; pf < to; pf += 64) __builtin_prefetch(codes + pf, 0, 1);
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
#ifdef lut_wide
    const int wide = lut_wide(&t);
#endif
    for (int64_t r = r0; r < r1; r += GEMV_ROWS) {
        const int nr = (int)rbe_min(GEMV_ROWS, r1 - r);
        const uint8_t *qr[GEMV_ROWS];
        const float *st[GEMV_ROWS];
        VF acc[GEMV_ROWS];
        float extra[GEMV_ROWS] = {0};
        FN(row_steps)(m, r, nr, 1.0f, stf, offf);
        for (int i = 0; i < GEMV_ROWS; i++) {
            const int ii = i < nr ? i : nr - 1; /* tail rows repeat the last one */
            qr[i] = m->codes + (r + ii) * m->row_bytes;
            st[i] = stf + ii * groups;
            acc[i] = vzero();
        }
        /* the next pass's codes (one core streams them too slowly alone), requested a group's
         * share at a time: all at the pass's start, the requests queued behind each other and
         * decode at the 1B shape measured ~15% slower (benchmarks/scale.py) */
        const int64_t share = (GEMV_ROWS * m->row_bytes + groups - 1) / groups, ahead = (r + GEMV_ROWS) * m->row_bytes;
        const int64_t ahead_end = rbe_min(r + 2 * GEMV_ROWS, r1) * m->row_bytes;
        for (int64_t g = 0; g < groups; g++) {
            FN(prefetch_codes)(m->codes, ahead + g * share, rbe_min(ahead + (g + 1) * share, ahead_end));
            VF ga[GEMV_ROWS][NV];
            for (int i = 0; i < GEMV_ROWS; i++)
                for (int k = 0; k < NV; k++) ga[i][k] = vzero();
            int64_t c = g * gs;
#ifdef lut_wide
            if (kind == RBE_LUT_TRELLIS && wide)
                for (; c + 64 <= rbe_min((g + 1) * gs, cp); c += 64) {
                    VF xv[2 * NV];
                    for (int k = 0; k < 2 * NV; k++) xv[k] = vload(x + c + k * VLEN);
                    for (int i = 0; i < GEMV_ROWS; i++) {
                        VF w[2 * NV];
                        FN(lut_block64)(&t, qr[i] + (c >> 5) * m->block_bytes, w);
                        for (int k = 0; k < 2 * NV; k++) ga[i][k % NV] = vfma(w[k], xv[k], ga[i][k % NV]);
                    }
                }
#endif
            for (; c < rbe_min((g + 1) * gs, cp); c += 32) {
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
    } else if (m->kind == RBE_LUT_TRELLIS) {
        FN(lut_gemv_body)(m, x, r0, r1, y, scratch, RBE_LUT_TRELLIS);
    } else {
        FN(lut_gemv_body)(m, x, r0, r1, y, scratch, RBE_LUT_BYTE);
    }
}

#ifndef FEW_TOKENS
#define FEW_TOKENS 4 /* tokens per lut_gemv_few pass (an ISA file may set it and FEW_ROWS) */
#endif
#ifndef FEW_ROWS
#define FEW_ROWS 2 /* rows per lut_gemv_few pass */
#endif
_Static_assert(FEW_TOKENS + 2 * FEW_ROWS <= 17, "lut_gemv_few's scratch is 17 floats per group");

/* lut_gemv_body for up to FEW_TOKENS inputs at once: each 32-column block of FEW_ROWS rows is
 * decoded once and meets every input (several sequences' decode steps in one pass). */
static inline __attribute__((always_inline)) void FN(lut_gemv_few_body)(const rbe_lut *m, const float *const *xb,
                                                                        int nb, int64_t r0, int64_t r1, float *y,
                                                                        int64_t ldy, float *scratch,
                                                                        const int kind) {
    const int raw = kind == RBE_LUT_BYTE && m->affine;
    const int64_t groups = m->groups, gs = m->gs, cp = m->cols_p;
    float *xsum = scratch, *stf = xsum + FEW_TOKENS * groups, *offf = stf + FEW_ROWS * groups;
    if (m->has_offset || raw)
        for (int j = 0; j < FEW_TOKENS; j++)
            for (int64_t g = 0; g < groups; g++) {
                float s = 0.0f;
                for (int64_t c = g * gs; c < rbe_min((g + 1) * gs, cp); c++) s += xb[j][c];
                xsum[j * groups + g] = s;
            }
    const lutreg t = raw ? FN(lutreg_codes)(FN(lutreg_load)(m)) : FN(lutreg_load)(m);
#ifdef lut_wide
    const int wide = lut_wide(&t);
#endif
    for (int64_t r = r0; r < r1; r += FEW_ROWS) {
        const int nr = (int)rbe_min(FEW_ROWS, r1 - r);
        const uint8_t *qr[FEW_ROWS];
        VF acc[FEW_TOKENS][FEW_ROWS];
        float extra[FEW_TOKENS][FEW_ROWS] = {{0}};
        FN(row_steps)(m, r, nr, 1.0f, stf, offf);
        for (int i = 0; i < FEW_ROWS; i++) {
            qr[i] = m->codes + (r + (i < nr ? i : nr - 1)) * m->row_bytes;
            for (int j = 0; j < FEW_TOKENS; j++) acc[j][i] = vzero();
        }
        for (int64_t g = 0; g < groups; g++) {
            VF ga[FEW_TOKENS][FEW_ROWS][NV];
            for (int j = 0; j < FEW_TOKENS; j++)
                for (int i = 0; i < FEW_ROWS; i++)
                    for (int k = 0; k < NV; k++) ga[j][i][k] = vzero();
            int64_t c = g * gs;
#ifdef lut_wide
            if (kind == RBE_LUT_TRELLIS && wide)
                for (; c + 64 <= rbe_min((g + 1) * gs, cp); c += 64) {
                    VF w[FEW_ROWS][2 * NV];
                    for (int i = 0; i < FEW_ROWS; i++) FN(lut_block64)(&t, qr[i] + (c >> 5) * m->block_bytes, w[i]);
                    for (int j = 0; j < FEW_TOKENS; j++)
                        for (int k = 0; k < 2 * NV; k++) {
                            const VF xv = vload(xb[j] + c + k * VLEN);
                            for (int i = 0; i < FEW_ROWS; i++) ga[j][i][k % NV] = vfma(w[i][k], xv, ga[j][i][k % NV]);
                        }
                }
#endif
            for (; c < rbe_min((g + 1) * gs, cp); c += 32) {
                VF w[FEW_ROWS][NV];
                for (int i = 0; i < FEW_ROWS; i++) FN(lut_block32)(m, &t, qr[i] + (c >> 5) * m->block_bytes, w[i]);
                for (int j = 0; j < FEW_TOKENS; j++)
                    for (int k = 0; k < NV; k++) {
                        const VF xv = vload(xb[j] + c + k * VLEN);
                        for (int i = 0; i < FEW_ROWS; i++) ga[j][i][k] = vfma(w[i][k], xv, ga[j][i][k]);
                    }
            }
            for (int i = 0; i < FEW_ROWS; i++) {
                const float sg = stf[(i < nr ? i : nr - 1) * groups + g];
                for (int j = 0; j < FEW_TOKENS; j++) {
                    VF sum = ga[j][i][0];
                    for (int k = 1; k < NV; k++) sum = vadd(sum, ga[j][i][k]);
                    acc[j][i] = vfma(sum, vset1(raw ? sg * m->da : sg), acc[j][i]);
                    if (raw) extra[j][i] += sg * m->a0 * xsum[j * groups + g];
                }
            }
        }
        for (int j = 0; j < nb; j++)
            for (int i = 0; i < nr; i++) {
                float v = vhsum(acc[j][i]) + extra[j][i];
                if (m->has_offset)
                    for (int64_t g = 0; g < groups; g++) v += offf[i * groups + g] * xsum[j * groups + g];
                y[j * ldy + r + i] = v;
            }
    }
}

/* y[b * ldy + r] = dot(W[r], x + b * ldx) for b < n, r in [r0, r1): FEW_TOKENS inputs per pass
 * over the rows (the few sequences of a batched decode step). scratch holds 17 * groups floats. */
static void FN(lut_gemv_few)(const rbe_lut *m, const float *x, int64_t ldx, int64_t n, int64_t r0, int64_t r1,
                             float *y, int64_t ldy, float *scratch) {
    for (int64_t b0 = 0; b0 < n; b0 += FEW_TOKENS) {
        const int nb = (int)rbe_min(FEW_TOKENS, n - b0);
        const float *xb[FEW_TOKENS];
        for (int j = 0; j < FEW_TOKENS; j++) xb[j] = x + (b0 + (j < nb ? j : nb - 1)) * ldx; /* tails repeat */
        float *yb = y + b0 * ldy;
        if (m->kind == RBE_LUT_F32) {
            for (int j = 0; j < nb; j++)
                for (int64_t r = r0; r < r1; r++) yb[j * ldy + r] = FN(vdot)(m->dense + r * m->cols_p, xb[j], m->cols_p);
        } else if (m->kind == RBE_LUT_NIBBLE) {
            FN(lut_gemv_few_body)(m, xb, nb, r0, r1, yb, ldy, scratch, RBE_LUT_NIBBLE);
        } else if (m->kind == RBE_LUT_PLANES) {
            FN(lut_gemv_few_body)(m, xb, nb, r0, r1, yb, ldy, scratch, RBE_LUT_PLANES);
        } else if (m->kind == RBE_LUT_TRELLIS) {
            FN(lut_gemv_few_body)(m, xb, nb, r0, r1, yb, ldy, scratch, RBE_LUT_TRELLIS);
        } else {
            FN(lut_gemv_few_body)(m, xb, nb, r0, r1, yb, ldy, scratch, RBE_LUT_BYTE);
        }
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

/* ---- int8 batched product (lut_gemm_q8; the pack layout is RBE_Q8_REC's) ----
 * The ISA file adds: VI (VLEN int32 lanes), vi_load(p), vi_cvt(v) (to VF), vi_dot4(acc, w, x)
 * (acc plus, per lane, the four byte products of w and x; w is a weight dword broadcast from
 * memory, its bytes as the panel holds them, x's bytes signed), Q8_ZP (the panel's zero point: a
 * weight byte is lv8 + Q8_ZP, 0 or 128), q8_planes(m, tab, p, out) (a PLANES block's 32 weight
 * bytes through the 64-entry table tab), q8_nibble_row, q8_trellis_row, q8_rotate and q8_block
 * (the contracts of rbe_q8_nibble_row, rbe_q8_trellis_row, rbe_q8_rotate and rbe_q8_block in
 * rbe_internal.h), vi_dot(acc, w, x) (acc plus, per lane, the four byte products of weight bytes
 * w and signed input bytes x: lut_gemv_q8's), optionally Q8_NIBBLE_PAIR and Q8_TRELLIS_PAIR (see
 * kernels_avx512.c) or Q8_NIBBLE_BLOCK (kernels_avx2.c);
 * optionally Q8_MR (rows per pass, default 4), Q8_NV (token vectors per pass, default 1), Q8_MR1
 * (rows per pass when the product has one token vector, default Q8_MR: a second vector would
 * only repeat the first) and Q8_ATTR (attributes of the product, e.g. a target it needs). */
#ifndef Q8_MR
#define Q8_MR 4
#endif
#ifndef Q8_ONE_TOKENS
#define Q8_ONE_TOKENS 1
#endif
#ifndef Q8_ONE_NIBBLE_TOKENS
#define Q8_ONE_NIBBLE_TOKENS Q8_ONE_TOKENS
#endif
#ifndef Q8_NV
#define Q8_NV 1
#endif
#ifndef Q8_MR1
#define Q8_MR1 Q8_MR
#endif
#ifndef Q8_ATTR
#define Q8_ATTR
#endif
#define Q8_REC RBE_Q8_REC(VLEN)
#ifndef Q8_NARROW /* an ISA's unsigned-weight product for narrow nibble levels (kernels_avx2.c) */
#define q8_narrow_levels(m) 0
#define vi_dot4_narrow vi_dot4
#define Q8_NARROW_BIAS 0
#endif
#define Q8_MRMAX (Q8_MR1 > Q8_MR ? Q8_MR1 : Q8_MR)
/* How lut_gemm_q8's weight bytes meet the inputs: signed (vi_dot4), narrow (lv8 +
 * Q8_NARROW_BIAS, vi_dot4_narrow; with Q8_WEIGHT_FORMS two dwords at a time, vi_dot8_narrow), or
 * signed against the inputs' absolute values (Q8_WEIGHT_FORMS' vi_dot4_abs: every byte above
 * -128). */
enum { Q8_WEIGHTS_SIGNED, Q8_WEIGHTS_NARROW, Q8_WEIGHTS_SIGNED_ABS };
#ifdef Q8_WEIGHT_FORMS
#define q8_formed(weights) ((weights) != Q8_WEIGHTS_SIGNED) /* a form's own loop takes the block */
#else
#define q8_formed(weights) 0
#endif

/* v = x (32 values) times blockdiag(H_rot, ..) (hm, of order 16, per half): each output a
 * sequence of exact +-x[j] additions, j ascending (a zero entry adds nothing). */
static inline void FN(q8_rotate_input)(const float *x, const float *hm, float *v) {
    for (int half = 0; half < 32; half += 16) {
        VF acc[16 / VLEN];
        for (int k = 0; k < 16 / VLEN; k++) acc[k] = vzero();
        for (int j = 0; j < 16; j++) {
            const VF s = vset1(x[half + j]);
            for (int k = 0; k < 16 / VLEN; k++) acc[k] = vfma(s, vload(hm + 16 * j + k * VLEN), acc[k]);
        }
        for (int k = 0; k < 16 / VLEN; k++) vstore(v + half + k * VLEN, acc[k]);
    }
}

/* hm = blockdiag(H_rot, ..) of order 16 (Sylvester matrices nest), for q8_rotate_input. */
static void FN(q8_rotation)(int rot, float *hm) {
    for (int j = 0; j < 16; j++)
        for (int c = 0; c < 16; c++) hm[16 * j + c] = j / rot == c / rot ? FN(hadamard16)[16 * (j % rot) + c % rot] : 0.0f;
}

/* x[b * ldx + c] for b < n, c < cp rotated by rot into pack, tiles of VLEN tokens (see
 * RBE_Q8_REC). */
static void FN(q8_quantize)(const float *x, int64_t ldx, int64_t n, int64_t cp, int rot,
                            uint8_t *pack) {
    const int64_t nblk = cp / 32, tiles = (n + VLEN - 1) / VLEN;
    float hm[256];
    FN(q8_rotation)(rot, hm);
    if (n % VLEN) /* the last tile's missing tokens */
        memset(pack + (tiles - 1) * nblk * Q8_REC, 0, (size_t)(nblk * Q8_REC));
    for (int64_t b = 0; b < n; b++) {
        const int t = (int)(b % VLEN);
        uint8_t *rec = pack + (b / VLEN) * nblk * Q8_REC;
        for (int64_t k = 0; k < nblk; k++, rec += Q8_REC) {
            float v[32];
            if (rot > 1) FN(q8_rotate_input)(x + b * ldx + k * 32, hm, v);
            else memcpy(v, x + b * ldx + k * 32, sizeof(v));
            int8_t x8[32];
            int32_t sum, lead;
            const float d = q8_block(v, rot, x8, &sum, &lead);
            const float ds = d * (float)lead;
            const int32_t init = -Q8_ZP * sum;
            for (int q = 0; q < 8; q++) memcpy(rec + (q * VLEN + t) * 4, x8 + 4 * q, 4);
            memcpy(rec + 32 * VLEN + 4 * t, &d, 4);
            memcpy(rec + 36 * VLEN + 4 * t, &ds, 4);
            memcpy(rec + 40 * VLEN + 4 * t, &init, 4);
        }
    }
}

/* One token (cp values) rotated by rot and quantized per block as q8_quantize does, laid out for
 * lut_gemv_q8 (RBE_Q8_ONE). */
static void FN(q8_quantize1)(const float *x, int64_t cp, int rot, uint8_t *out) {
    float hm[256];
    FN(q8_rotation)(rot, hm);
#ifdef Q8_PLANES16
    int16_t *x16 = (int16_t *)(out + RBE_Q8_X16(cp));
#endif
    float *d8 = (float *)(out + cp), *ds = (float *)(out + 3 * cp);
    int32_t *z8 = (int32_t *)(out + 2 * cp);
    for (int64_t k = 0; k < cp / 32; k++) {
        float v[32];
        if (rot > 1) FN(q8_rotate_input)(x + k * 32, hm, v);
        else memcpy(v, x + k * 32, sizeof(v));
        int32_t sum, lead;
        const float d = q8_block(v, rot, (int8_t *)out + k * 32, &sum, &lead);
        for (int l = 0; l < 8; l++) d8[8 * k + l] = d, z8[8 * k + l] = l ? 0 : -Q8_ZP * sum;
        ds[k] = d * (float)lead;
#ifdef Q8_PLANES16
        q8_x16(v, x16 + 32 * k);
#endif
    }
}

/* lut_gemm_q8 works in bands of Q8_RB rows, their weight bytes unpacked at once (sequential
 * reads of the codes); then column slices small enough that the pack's slice of every token
 * (Q8_L1 bytes at most: L1, or L2 where an ISA file sets it larger) stays near while the band's
 * rows pass over it; each row's partial sums wait in scratch between slices. */
#ifndef Q8_L1
#define Q8_L1 (24 << 10)
#endif
#define Q8_RB (Q8_MR * (32 / Q8_MR)) /* a whole number of passes */
_Static_assert(Q8_RB % Q8_MR1 == 0, "a band is a whole number of one-vector passes too");
#define Q8_FS ((Q8_RB + 7) / 8 * 8) /* a band's factors per group: rows rounded up to whole lane groups */
#ifdef Q8_LANE_ROWS
/* lut_gemm_q8 of at most VLEN / 2 tokens: a vector's lanes hold rl rows times VLEN / rl tokens
 * (lane t * rl + r: row r, token t), rl = VLEN over the token count rounded up to a power of
 * two. Each weight dword of rl rows is broadcast together (the ISA file's vi_rows(p, rl), from
 * a band's rows interleaved by q8_interleave(rows, rl, blocks, out): block k's dword q of row r
 * at out + (k * 8 + q) * 4 * rl + 4 * r), the tokens' inputs spread over rl lanes each
 * (vi_spread(v, rl): lane l gets v's lane l / rl), the rows' factors broadcast likewise
 * (vf_rows(p, rl)): every lane computes, where a lane a token computed only n of VLEN. Passes
 * of Q8_LANE_MR lane groups. */
#define Q8_LANE_MR 4
/* Groups of two rows a pass: 5 where a band's rows then make whole passes (Q8_RB 30: 15 groups,
 * where 4 a pass computed a 16th; SmolLM2 int4, 8 sequences a step: 11.25 -> 10.80 ms). */
#define Q8_LANE_MR2 ((Q8_RB / 2) % 5 == 0 ? 5 : Q8_LANE_MR)
_Static_assert(Q8_LANE_MR2 <= Q8_MRMAX, "a pass's lane groups fit its accumulators");
#define Q8_LANE_ROOM(cp) (Q8_FS * (cp) + (cp) / 32 * Q8_REC + 64)
#else
#define Q8_LANE_ROOM(cp) 0
#endif

/* Whether every weight byte of m rotated by rot (q8_panel's) is above -128: m's int8 levels
 * (rbe_lut's lv8, zero past its codes) within [lo, hi], a rotated group's first byte sums rot of
 * them, the others rot / 2 minus rot / 2. */
static inline int q8_above_min(const rbe_lut *m, int rot) {
    int lo = 0, hi = 0;
    for (int k = 0; k < 256; k++) lo = m->lv8[k] < lo ? m->lv8[k] : lo, hi = m->lv8[k] > hi ? m->lv8[k] : hi;
    return rot == 1 ? lo > -128 : rot * lo > -128 && rot / 2 * (lo - hi) > -128;
}

/* Bytes of lut_gemm_q8's scratch for up to `tokens` tokens: a band's weight bytes, factors (2
 * per row and group, and 2 more of room to make them) and partial sums, and the input sums per
 * token and group (lut_gemv_q8: one more per group, and its tokens' quads, 64-byte aligned). */
#ifdef Q8_NIBBLE_QUAD
#define Q8_QUADS(cp) (((cp) + 127) / 128)
#define Q8_QUAD_ROOM(cp, tokens) (64 + rbe_min(tokens, Q8_ONE_NIBBLE_TOKENS) * Q8_QUADS(cp) * 256)
#else
#define Q8_QUAD_ROOM(cp, tokens) 0
#endif
static int64_t FN(q8_scratch)(const rbe_lut *m, int64_t tokens) {
    const int64_t vecs = (tokens + Q8_NV * VLEN - 1) / (Q8_NV * VLEN) * Q8_NV;
    return Q8_FS * (m->cols_p + (4 * m->groups + vecs * VLEN) * (int64_t)sizeof(float)) +
           (vecs * VLEN + 1) * m->groups * (int64_t)sizeof(float) + Q8_QUAD_ROOM(m->cols_p, tokens) +
           Q8_LANE_ROOM(m->cols_p);
}

/* Weight bytes (lv8[code] through tab, then rotated by rot (plus Q8_ZP) unless rot is 1) of rows
 * [r, r + nr), 32 per block, into panel (cols_p bytes a row); w[i] points at row i's. Byte codes
 * whose weight byte is the code itself are read in place; shift is that constant, or -1. */
static void FN(q8_panel)(const rbe_lut *m, const uint8_t *tab, int shift, int rot, int64_t r,
                         int64_t nr, uint8_t *panel, const uint8_t **w) {
    const int64_t cp = m->cols_p;
    for (int64_t i = 0; i < nr; i++) {
        const uint8_t *p = FN(lut_codes)(m, r + i, 0);
        uint8_t *out = panel + i * cp;
        w[i] = out;
        if (m->kind == RBE_LUT_NIBBLE) {
            q8_nibble_row(tab, p, cp / 32, rot, Q8_ZP, out); /* rotates too */
            continue;
        }
        if (m->kind == RBE_LUT_TRELLIS) {
            q8_trellis_row(m, tab, p, cp / 32, out);
        } else if (m->kind == RBE_LUT_PLANES) {
            for (int64_t c = 0; c < cp; c += 32, p += m->block_bytes) q8_planes(m, tab, p, out + c);
        } else if (shift == 0 && rot == 1) {
            w[i] = p;
            continue;
        } else if (shift >= 0) {
            for (int64_t c = 0; c < cp; c++) out[c] = (uint8_t)(p[c] + shift);
        } else {
            for (int64_t c = 0; c < cp; c++) out[c] = tab[p[c]];
        }
        if (rot > 1) q8_rotate(out, cp, rot, Q8_ZP);
    }
}

/* The band's factors, per group g and band row i: at fac[g * 2 * Q8_FS + i] that of the integer
 * sums (q8_alpha / rot * step, rot a power of two), where sums at fac[(g * 2 + 1) * Q8_FS + i]
 * that of the input sums (q8_beta * step + offset); rows [r, r + nr), zero past nr. st, off:
 * scratch for nr * groups floats each. */
static void FN(q8_factors)(const rbe_lut *m, int rot, float beta, int sums, int64_t r, int nr, float *st, float *off,
                           float *fac) {
    const float alpha = m->q8_alpha / (float)rot, scale = alpha != 0.0f ? alpha : 1.0f;
    FN(row_steps)(m, r, nr, scale, st, off); /* st: the steps times alpha (times 1 where alpha is 0) */
    const int64_t groups = m->groups;
    const float ka = alpha / scale, kb = beta / scale;
    for (int64_t g = 0; g < groups; g++) { /* rows, then zeros: loops without branches */
        float *fa = fac + g * 2 * Q8_FS, *fb = fa + Q8_FS;
        for (int i = 0; i < nr; i++) fa[i] = ka * st[i * groups + g];
        for (int i = nr; i < Q8_FS; i++) fa[i] = 0.0f, fb[i] = 0.0f;
        for (int i = 0; i < nr && sums; i++) fb[i] = kb * st[i * groups + g] + (m->has_offset ? off[i * groups + g] : 0.0f);
    }
}

#ifdef Q8_LANE_ROWS
#define q8_dot_rows(acc, w, x, rl) ((rl) == 1 ? vi_dot4(acc, w, x) : vi_dot(acc, vi_rows(w, rl), x))
#define q8_factor_rows(f, rl) ((rl) == 1 ? vset1(*(f)) : vf_rows(f, rl))
#else
#define q8_dot_rows(acc, w, x, rl) vi_dot4(acc, w, x)
#define q8_factor_rows(f, rl) vset1(*(f))
#endif
/* Code bytes [at, end) requested from memory into L2 (prefetcht2: the band's weight bytes fill
 * L1; into L1 the 1B shape's step of 2 tokens in lane groups took 73 against 53 ms, 1B trellis k
 * = 4 65 against 53), per_block lines per block of a pass. */
typedef struct {
    const uint8_t *at, *end;
    int64_t per_block;
} q8_fetch;

/* One pass of lut_gemm_q8 over the blocks [k0, k1) of a slice (requesting fetch's lines): lane groups w[0..mr) of rl rows
 * each (weight bytes of block k at w[i] + k * 32 * rl, Q8_LANE_ROWS' order; factors of group g
 * at fac + g * 2 * Q8_FS + i * rl, q8_factors') against the nv token vectors whose pack records
 * start at tile[v] (block k at tile[v] + k * Q8_REC; input sums of group g at xs[v] + g * VLEN);
 * at the end of every group and of the slice, added to the partial sums at part[(i * nv + v) *
 * VLEN] (a token per lane, or rl rows of a token per rl lanes), with the input sums' term when
 * sums (in a group's first slice); weights: how the weight bytes meet the inputs
 * (Q8_WEIGHTS_*; other than signed only where rl is 1). Instantiated per (mr, nv, rl), weights,
 * with and without sums. */
static inline __attribute__((always_inline)) void FN(q8_pass)(
    const uint8_t *const *w, const float *fac, const uint8_t *const *tile, const float *const *xs,
    int64_t k0, int64_t k1, int64_t bpg, float *part, q8_fetch *fetch, const int sums, const int weights, const int mr,
    const int nv, const int rl) {
    for (int64_t k = k0; k < k1;) {
        const int64_t g = k / bpg, end = rbe_min(k1, (g + 1) * bpg);
        const int first = sums && k0 <= g * bpg, fresh = k == 0; /* fresh: the partial sums start here */
        VF ga[Q8_MRMAX][Q8_NV];
        for (int i = 0; i < mr; i++)
            for (int v = 0; v < nv; v++) ga[i][v] = vzero();
        for (; k < end; k++) {
            for (int64_t l = 0; l < fetch->per_block && fetch->at < fetch->end; l++, fetch->at += 64) __builtin_prefetch(fetch->at, 0, 1);
            VI ia[Q8_MRMAX][Q8_NV];
            for (int v = 0; v < nv; v++) {
                const VI init = vi_load(tile[v] + k * Q8_REC + 40 * VLEN);
                for (int i = 0; i < mr; i++) ia[i][v] = init;
            }
#ifdef Q8_WEIGHT_FORMS
            for (int q = 0; q < 8 && weights == Q8_WEIGHTS_NARROW; q += 2)
                for (int v = 0; v < nv; v++) {
                    const uint8_t *x = tile[v] + k * Q8_REC + q * 4 * VLEN;
                    const VI x0 = vi_load(x), x1 = vi_load(x + 4 * VLEN);
                    for (int i = 0; i < mr; i++) ia[i][v] = vi_dot8_narrow(ia[i][v], w[i] + k * 32 + q * 4, x0, x1);
                }
            for (int q = 0; q < 8 && weights == Q8_WEIGHTS_SIGNED_ABS; q++)
                for (int v = 0; v < nv; v++) {
                    const VI x = vi_load(tile[v] + k * Q8_REC + q * 4 * VLEN), ax = vi_abs(x);
                    for (int i = 0; i < mr; i++) ia[i][v] = vi_dot4_abs(ia[i][v], w[i] + k * 32 + q * 4, x, ax);
                }
#endif
            for (int q = 0; q < 8 && !q8_formed(weights); q++)
                for (int i = 0; i < mr; i++)
                    for (int v = 0; v < nv; v++) {
                        const VI x = vi_load(tile[v] + k * Q8_REC + q * 4 * VLEN);
                        ia[i][v] = weights == Q8_WEIGHTS_NARROW ? vi_dot4_narrow(ia[i][v], w[i] + k * 32 + q * 4, x)
                                                                : q8_dot_rows(ia[i][v], w[i] + (k * 32 + q * 4) * rl, x, rl);
                    }
            for (int v = 0; v < nv; v++) {
                const VF d = vload((const float *)(tile[v] + k * Q8_REC + 32 * VLEN));
                for (int i = 0; i < mr; i++) ga[i][v] = vfma(vi_cvt(ia[i][v]), d, ga[i][v]);
            }
        }
        const float *f = fac + g * 2 * Q8_FS;
        for (int i = 0; i < mr; i++) {
            const VF s = q8_factor_rows(f + i * rl, rl), o = q8_factor_rows(f + Q8_FS + i * rl, rl);
            for (int v = 0; v < nv; v++) {
                float *p = part + (i * nv + v) * VLEN;
                VF a = fresh ? vmul(ga[i][v], s) : vfma(ga[i][v], s, vload(p));
                if (first) a = vfma(vload(xs[v] + g * VLEN), o, a);
                vstore(p, a);
            }
        }
    }
}

/* A band's partial sums, a pass's (mr rows, nv vectors) together: row r, token vector v. */
static inline float *FN(q8_part)(float *part, int64_t vecs, int64_t r, int64_t v, int mr, int nv) {
    const int64_t pass = r / mr * (vecs / nv) + v / nv;
    return part + (pass * mr * nv + r % mr * nv + v % nv) * VLEN;
}

/* xs[v * groups + g] = sum over group g's blocks of d * sum(x8), for the tiles of the pack (the
 * input sums that offsets and q8_beta meet). */
static void FN(q8_input_sums)(const rbe_lut *m, const uint8_t *pack, int64_t tiles, float *xs) {
    const int64_t bpg = m->gs / 32;
    for (int64_t v = 0; v < tiles; v++)
        for (int64_t g = 0; g < m->groups; g++) {
            VF a = vzero();
            for (int64_t k = g * bpg; k < (g + 1) * bpg; k++)
                a = vadd(a, vload((const float *)(pack + (v * (m->cols_p / 32) + k) * Q8_REC + 36 * VLEN)));
            vstore(xs + (v * m->groups + g) * VLEN, a);
        }
}

/* q8_panel's weight byte table of m for inputs rotated by rot: lv8 (plus Q8_ZP unless rotated:
 * the zero point comes after the rotation); returns q8_panel's shift (the constant with tab[k] ==
 * k + shift for byte codes, else -1). */
static int FN(q8_table)(const rbe_lut *m, int rot, uint8_t *tab) {
    for (int k = 0; k < 256; k++) tab[k] = (uint8_t)(m->lv8[k] + (rot > 1 ? 0 : Q8_ZP));
    int shift = m->kind == RBE_LUT_BYTE ? tab[0] : -1;
    for (int k = 1; k < 256 && shift >= 0; k++)
        if (tab[k] != (uint8_t)(k + shift)) shift = -1;
    return shift;
}

/* What lut_gemm_q8's bands share: the matrix, the pack and its rotation, the weight byte table
 * (and the byte codes' shift, q8_panel's), the token tiles (vecs: one, or rounded up to Q8_NV),
 * rows per lane group (rl: 1, or Q8_LANE_ROWS' count), blocks per slice, whether input sums meet
 * offsets, and the scratch areas (lanes: Q8_LANE_ROWS' interleaved rows). */
typedef struct {
    const rbe_lut *m;
    const uint8_t *pack;
    int rot, shift, sums, rl;
    int weights; /* q8_pass's weights (Q8_WEIGHTS_*); narrow ones are lv8 + Q8_NARROW_BIAS, beta taking it off */
    float beta;
    int64_t n, tiles, vecs, kc;
    uint8_t tab[256], *panel, *lanes;
    float *fac, *st, *off, *part, *xs;
} q8_job;

/* Whether a band's lane groups of rl rows are made straight from the codes (Q8_NIBBLE_LANES: two
 * rows of unrotated nibble codes), without q8_panel's rows. */
#ifdef Q8_NIBBLE_LANES
#define q8_lanes_from_codes(j, rl) ((rl) == 2 && (j)->m->kind == RBE_LUT_NIBBLE && (j)->rot == 1)
#else
#define q8_lanes_from_codes(j, rl) 0
#endif

/* The lane groups of a band's rows [rb, rb + nr) (q8_panel's rows wb[0..nr), unless
 * q8_lanes_from_codes; rl rows each, the last one's missing rows repeating row nr - 1) into w:
 * the rows themselves where rl is 1, else interleaved into lanes (Q8_LANE_ROWS); returns their
 * count. */
static inline __attribute__((always_inline)) int64_t FN(q8_lane_groups)(const q8_job *j, int64_t rb, const uint8_t *const *wb,
                                                                        int64_t nr, const uint8_t **w, const int rl) {
    if (rl == 1) {
        for (int64_t i = 0; i < nr; i++) w[i] = wb[i];
        return nr;
    }
#ifdef Q8_LANE_ROWS
    const int64_t cp = j->m->cols_p, groups = (nr + rl - 1) / rl;
    for (int64_t g = 0; g < groups; g++) {
        w[g] = j->lanes + g * rl * cp;
#ifdef Q8_NIBBLE_LANES
        if (q8_lanes_from_codes(j, rl)) {
            q8_nibble_lanes2(j->tab, FN(lut_codes)(j->m, rb + 2 * g, 0), FN(lut_codes)(j->m, rb + rbe_min(2 * g + 1, nr - 1), 0),
                             cp / 32, j->lanes + g * rl * cp);
            continue;
        }
#endif
        const uint8_t *rows[VLEN];
        for (int r = 0; r < rl; r++) rows[r] = wb[rbe_min(g * rl + r, nr - 1)];
        q8_interleave(rows, rl, cp / 32, j->lanes + g * rl * cp);
    }
    return groups;
#else
    (void)j, (void)rb, (void)w;
    return 0;
#endif
}

/* Rows [rb, rb + nr) (nr <= Q8_RB) into y: weight bytes and factors of the band, then its passes
 * of mr lane groups (of rl rows) and nv token vectors slice by slice (requesting the next band's
 * codes meanwhile), then its partial sums token-major into y. */
static inline __attribute__((always_inline)) void FN(q8_band_body)(const q8_job *j, int64_t rb, int64_t nr,
                                                                   int64_t r1, float *y, int64_t ldy,
                                                                   const int mr, const int nv, const int rl) {
    const rbe_lut *m = j->m;
    const int64_t nblk = m->cols_p / 32, vecs = j->vecs;
    const uint8_t *wb[Q8_RB], *gw[Q8_FS];
    if (!q8_lanes_from_codes(j, rl)) FN(q8_panel)(m, j->tab, j->shift, j->rot, rb, nr, j->panel, wb);
    const int64_t ng = FN(q8_lane_groups)(j, rb, wb, nr, gw, rl);
    FN(q8_factors)(m, j->rot, j->beta, j->sums, rb, (int)nr, j->st, j->off, j->fac);
    q8_fetch fetch = {FN(lut_codes)(m, rbe_min(rb + nr, r1 - 1), 0), /* the next band's codes (contiguous) */
                      FN(lut_codes)(m, rbe_min(rb + nr + Q8_RB, r1) - 1, 0) + m->row_bytes, 0},
             idle = {NULL, NULL, 0};
    const int64_t blocks = nblk * ((ng + mr - 1) / mr); /* those of every pass: the lines spread evenly */
    fetch.per_block = ((fetch.end - fetch.at) / 64 + blocks) / blocks;
    for (int64_t k0 = 0; k0 < nblk; k0 += j->kc) {
        const int64_t k1 = rbe_min(k0 + j->kc, nblk);
        for (int64_t r = 0; r < ng; r += mr) {
            const uint8_t *w[Q8_MRMAX]; /* groups past the band's repeat its last */
            for (int i = 0; i < mr; i++) w[i] = gw[rbe_min(r + i, ng - 1)];
            for (int64_t v0 = 0; v0 < vecs; v0 += nv) {
                const uint8_t *tile[Q8_NV]; /* vectors past the last repeat it */
                const float *xv[Q8_NV];
                for (int v = 0; v < nv; v++) {
                    const int64_t t = rbe_min(v0 + v, j->tiles - 1);
                    tile[v] = j->pack + t * nblk * Q8_REC, xv[v] = j->xs + t * m->groups * VLEN;
                }
                float *p = FN(q8_part)(j->part, vecs, r, v0, mr, nv);
                const float *f = j->fac + r * rl;
                const int64_t bpg = m->gs / 32;
                if (rl > 1 && j->sums) FN(q8_pass)(w, f, tile, xv, k0, k1, bpg, p, v0 ? &idle : &fetch, 1, Q8_WEIGHTS_SIGNED, mr, nv, rl);
                else if (rl > 1) FN(q8_pass)(w, f, tile, xv, k0, k1, bpg, p, v0 ? &idle : &fetch, 0, Q8_WEIGHTS_SIGNED, mr, nv, rl);
                else if (j->weights == Q8_WEIGHTS_NARROW && j->sums) FN(q8_pass)(w, f, tile, xv, k0, k1, bpg, p, v0 ? &idle : &fetch, 1, Q8_WEIGHTS_NARROW, mr, nv, 1);
                else if (j->weights == Q8_WEIGHTS_NARROW) FN(q8_pass)(w, f, tile, xv, k0, k1, bpg, p, v0 ? &idle : &fetch, 0, Q8_WEIGHTS_NARROW, mr, nv, 1);
#ifdef Q8_WEIGHT_FORMS
                else if (j->weights == Q8_WEIGHTS_SIGNED_ABS && j->sums) FN(q8_pass)(w, f, tile, xv, k0, k1, bpg, p, v0 ? &idle : &fetch, 1, Q8_WEIGHTS_SIGNED_ABS, mr, nv, 1);
                else if (j->weights == Q8_WEIGHTS_SIGNED_ABS) FN(q8_pass)(w, f, tile, xv, k0, k1, bpg, p, v0 ? &idle : &fetch, 0, Q8_WEIGHTS_SIGNED_ABS, mr, nv, 1);
#endif
                else if (j->sums) FN(q8_pass)(w, f, tile, xv, k0, k1, bpg, p, v0 ? &idle : &fetch, 1, Q8_WEIGHTS_SIGNED, mr, nv, 1);
                else FN(q8_pass)(w, f, tile, xv, k0, k1, bpg, p, v0 ? &idle : &fetch, 0, Q8_WEIGHTS_SIGNED, mr, nv, 1);
            }
        }
    }
    if (rl > 1) { /* lane t * rl + i of group g: row g * rl + i, token t */
        for (int64_t g = 0; g < ng; g++)
            for (int l = 0; l < VLEN; l++) {
                const int64_t b = l / rl, i = g * rl + l % rl;
                if (b < j->n && i < nr) y[b * ldy + rb + i] = FN(q8_part)(j->part, 1, g, 0, mr, 1)[l];
            }
        return;
    }
    for (int64_t b = 0; b < j->n; b++) /* token by token: each token's rows of the band are contiguous in y */
        for (int64_t r = 0; r < nr; r += mr) {
            const int64_t rows = rbe_min(mr, nr - r);
            const float *p = FN(q8_part)(j->part, vecs, r, b / VLEN, mr, nv) + b % VLEN;
            float *o = y + b * ldy + rb + r;
            if (rows == mr) /* a fixed count: unrolled */
                for (int i = 0; i < mr; i++) o[i] = p[i * nv * VLEN];
            else
                for (int64_t i = 0; i < rows; i++) o[i] = p[i * nv * VLEN];
        }
}

/* q8_band with passes of Q8_MR rows and Q8_NV vectors, of Q8_MR1 rows when there is one vector,
 * or of Q8_LANE_MR (two-row groups: Q8_LANE_MR2) lane groups of rl rows. */
static Q8_ATTR void FN(q8_band)(const q8_job *j, int64_t rb, int64_t nr, int64_t r1, float *y, int64_t ldy) {
#ifdef Q8_LANE_ROWS
    if (j->rl == 2) FN(q8_band_body)(j, rb, nr, r1, y, ldy, Q8_LANE_MR2, 1, 2);
    else if (j->rl == 4) FN(q8_band_body)(j, rb, nr, r1, y, ldy, Q8_LANE_MR, 1, 4);
    else if (j->rl == 8) FN(q8_band_body)(j, rb, nr, r1, y, ldy, Q8_LANE_MR, 1, 8);
    else
#endif
    if (j->vecs == 1) FN(q8_band_body)(j, rb, nr, r1, y, ldy, Q8_MR1, 1, 1);
    else FN(q8_band_body)(j, rb, nr, r1, y, ldy, Q8_MR, Q8_NV, 1);
}

/* The int8 product (rbe_kernels.lut_gemm_q8). Bands of Q8_RB rows; in a band, column slices of
 * kc blocks; in a slice, passes of Q8_MR rows against Q8_NV vectors of VLEN tokens, a token per
 * lane: per block, each row's weight dword broadcast against a vector's four columns of its
 * tokens feeds Q8_MR * Q8_NV integer accumulators (started at the pack's zero-point correction);
 * at the block's end they are converted and scaled by the tokens' d, at the group's end by the
 * rows' factors. No horizontal sums: a row's result is a vector of tokens. */
static void FN(lut_gemm_q8)(const rbe_lut *m, const uint8_t *pack, int rot, int64_t n, int64_t r0,
                            int64_t r1, float *y, int64_t ldy, void *scratch) {
    q8_job j = {.m = m, .pack = pack, .rot = rot, .n = n, .tiles = (n + VLEN - 1) / VLEN};
    j.vecs = j.tiles == 1 ? 1 : (j.tiles + Q8_NV - 1) / Q8_NV * Q8_NV;
    const int64_t bpg = m->gs / 32, fit = Q8_L1 / (j.vecs * Q8_REC) + 1; /* blocks per slice: */
    j.kc = rbe_min(m->cols_p / 32, fit >= bpg ? fit / bpg * bpg : fit); /* whole groups if they fit */
    const int narrow = rot == 1 && m->kind == RBE_LUT_NIBBLE && q8_narrow_levels(m);
    j.weights = narrow ? Q8_WEIGHTS_NARROW : Q8_WEIGHTS_SIGNED;
#ifdef Q8_WEIGHT_FORMS
    /* |x| pays from two tiles on (AMD EPYC, 2 threads, ms): 128 tokens, 1B hadamard ffn_down 24.0
     * -> 19.5, SmolLM2 flagship ffn_up 1.53 -> 1.41; one tile, flagship ffn_up 0.136 -> 0.160 */
    if (!narrow && j.vecs > 1 && q8_above_min(m, rot)) j.weights = Q8_WEIGHTS_SIGNED_ABS;
#endif
    j.beta = m->q8_beta - (narrow ? (float)Q8_NARROW_BIAS * m->q8_alpha : 0.0f);
    j.sums = m->has_offset || j.beta != 0.0f;
    j.panel = scratch, j.rl = 1;
    j.fac = (float *)(j.panel + Q8_FS * m->cols_p), j.st = j.fac + 2 * Q8_FS * m->groups;
    j.off = j.st + Q8_FS * m->groups, j.part = j.off + Q8_FS * m->groups, j.xs = j.part + Q8_FS * j.vecs * VLEN;
#ifdef Q8_LANE_ROWS
    if (n <= VLEN / 2 && j.weights == Q8_WEIGHTS_SIGNED) {
        j.rl = VLEN / 2;
        while (VLEN / j.rl < n) j.rl /= 2;
        j.lanes = (uint8_t *)(j.xs + (j.vecs * VLEN + 1) * m->groups);
        uint8_t *spread = (uint8_t *)(((uintptr_t)j.lanes + Q8_FS * m->cols_p + 63) & ~(uintptr_t)63);
        for (int64_t c = 0; c < m->cols_p / 32 * Q8_REC; c += 4 * VLEN) /* every vector of every record */
            vi_store(spread + c, vi_spread(vi_load(pack + c), j.rl));
        j.pack = spread;
    }
#endif
    if (j.sums) FN(q8_input_sums)(m, j.pack, j.tiles, j.xs);
    j.shift = FN(q8_table)(m, rot, j.tab);
    for (int k = 0; k < 16 && narrow; k++) j.tab[k] = (uint8_t)(j.tab[k] + Q8_NARROW_BIAS);
    for (int64_t rb = r0; rb < r1; rb += Q8_RB) FN(q8_band)(&j, rb, rbe_min(Q8_RB, r1 - rb), r1, y, ldy);
}

/* Sum over a row's groups g of (beta * st[g] + off[g]) * lead[g] (off only where m has offsets),
 * VLEN groups at a time (a serial sum here cost ~10% of a 2048-wide row's product): lead_lanes
 * sums the groups [0, *done) in VLEN lanes, all of them where an ISA file has the optional
 * vload_part(p, k) (k < VLEN floats, zeros after them); lead_terms adds the lanes and the rest. */
static inline VF FN(lead_lanes)(const rbe_lut *m, float beta, const float *st, const float *off, const float *lead,
                                int64_t *done) {
    const int64_t groups = m->groups;
    VF acc = vzero();
    int64_t g = 0;
    for (; g + VLEN <= groups; g += VLEN) {
        const VF b = vmul(vset1(beta), vload(st + g));
        acc = vfma(m->has_offset ? vadd(b, vload(off + g)) : b, vload(lead + g), acc);
    }
#ifdef vload_part /* SmolLM2's 9-group rows ran a serial sum */
    if (g < groups) {
        const int64_t k = groups - g;
        const VF b = vmul(vset1(beta), vload_part(st + g, k));
        acc = vfma(m->has_offset ? vadd(b, vload_part(off + g, k)) : b, vload_part(lead + g, k), acc);
        g = groups;
    }
#endif
    *done = g;
    return acc;
}
static inline float FN(lead_terms)(const rbe_lut *m, float beta, const float *st, const float *off, const float *lead) {
    int64_t g;
    float v = vhsum(FN(lead_lanes)(m, beta, st, off, lead, &g));
    for (; g < m->groups; g++) v += (beta * st[g] + (m->has_offset ? off[g] : 0.0f)) * lead[g];
    return v;
}

#ifndef Q8_ONE_ROWS
#define Q8_ONE_ROWS GEMV_ROWS
#endif
_Static_assert(Q8_ONE_ROWS <= Q8_RB && Q8_ONE_TOKENS <= Q8_ONE_NIBBLE_TOKENS && Q8_ONE_NIBBLE_TOKENS <= 2 * Q8_RB + VLEN + 1,
               "lut_gemv_q8's factors and input sums fit q8_scratch");

#if defined(Q8_NIBBLE_BLOCK) || defined(Q8_NIBBLE_QUAD)
/* Where lut_gemv_q8 requests the next pass's codes: [from, end) of codes, a share a group (or
 * a quad). */
typedef struct {
    const uint8_t *codes;
    int64_t from, share, end;
    int to_l2;
} q8_ahead;
#endif
#ifdef Q8_NIBBLE_QUAD
#ifndef vload_part
#error "q8_one_quads starts its sums at lead_lanes', which covers every group only with vload_part"
#endif
/* One token's inputs for q8_one_quads, per 128 columns (four blocks): the 16 columns each
 * block's low nibbles meet (q8_nibble_quad's lo), the 16 its high nibbles meet, d per lane (a
 * block's four lanes alike), and the zero-point corrections, at each block's first lane; zeros
 * past the last block. */
typedef struct {
    int8_t lo[64], hi[64];
    float d[16];
    int32_t z[16];
} q8_quad;
_Static_assert(sizeof(q8_quad) == 256, "Q8_QUAD_ROOM's quad");
/* The Q8_QUADS(cp) quads of a RBE_Q8_ONE record xb over cp columns into q; with `parity` (the
 * inputs of Q8_TRELLIS_QUAD's 4-bit trellis windows) lo holds a quad's even columns and hi its
 * odd ones instead (lane l: columns 8l .. 8l + 7 of the quad, block l / 4, as the nibbles'). */
static void FN(q8_quad_inputs)(const uint8_t *xb, int64_t cp, q8_quad *q, int parity) {
    const int8_t *x8 = (const int8_t *)xb;
    const float *d8 = (const float *)(xb + cp);
    const int32_t *z8 = (const int32_t *)(xb + 2 * cp);
    memset(q, 0, (size_t)Q8_QUADS(cp) * sizeof(*q));
    for (int64_t k = 0; k < cp / 32; k++) {
        q8_quad *o = q + k / 4;
        const int b = (int)(k % 4);
        for (int c = 0; c < 16 && parity; c++) o->lo[16 * b + c] = x8[32 * k + 2 * c], o->hi[16 * b + c] = x8[32 * k + 2 * c + 1];
        if (!parity) memcpy(o->lo + 16 * b, x8 + 32 * k, 16), memcpy(o->hi + 16 * b, x8 + 32 * k + 16, 16);
        for (int l = 0; l < 4; l++) o->d[4 * b + l] = d8[8 * k], o->z[4 * b + l] = l ? 0 : z8[8 * k];
    }
}
/* lut_gemv_q8's pass over Q8_ONE_ROWS rows of m's nibble codes (unrotated, table t, groups of gs
 * columns, gs dividing 128 or a multiple of it; sel holds each lane's group counted from its
 * quad's first) for nt tokens (token b's quads at x + b *
 * Q8_QUADS(cols_p), its input sums at lead + b * groups when the product meets them): per quad
 * and row, the codes unpacked once (one load and two lookups for 128 weights, what a nibble
 * pair's 64 cost); per token, the two products (low and high nibbles, started at the
 * corrections) times d and the row's factors st[i * groups + g] of the quad's groups, lane by
 * lane, added to lead_lanes' terms (beta, the row's st and off), into out[b * Q8_ONE_ROWS + i]. */
#define Q8_QUAD_TOKENS 4
/* Rows at least this wide have the next pass's codes prefetched into L2 only (prefetcht2):
 * into L1 they cost the 8B shape's decode step 137-147 ms against 86-92 (AMD EPYC Zen 4, min of
 * 3 rounds of 8 steps; the 1B shape, whose widest rows are 8192, 19.1 against 17.1); every row
 * into L2 made SmolLM2's 576-column rows slower (3.5 against 4.2 ms a step). */
#define Q8_L2_COLS 4096
static inline __attribute__((always_inline)) void FN(q8_one_quads_body)(
    const rbe_lut *m, const uint8_t *const *w, const q8_quad *x, const float *st, const float *off, const float *lead,
    float beta, const VI *tab, VI sel, const q8_ahead *next, float *out, const int nt, const int trellis) {
    const VI t = tab[0];
#ifdef Q8_TRELLIS_QUAD
    VI t256[4];
    for (int k = 0; k < 4 && trellis; k++) t256[k] = tab[k];
#endif
    const int64_t gs = m->gs, groups = m->groups, quads = Q8_QUADS(m->cols_p), last = m->cols_p / 32 % 4;
    int64_t g = 0, g_end = gs; /* the quad's first group, and where the group after it starts */
    const uint8_t *row[Q8_ONE_ROWS];
    VF a[Q8_QUAD_TOKENS][Q8_ONE_ROWS];
    for (int i = 0; i < Q8_ONE_ROWS; i++) {
        row[i] = w[i];
        for (int b = 0; b < nt; b++) {
            int64_t done;
            a[b][i] = lead ? FN(lead_lanes)(m, beta, st + i * groups, off + i * groups, lead + b * groups, &done) : vzero();
        }
    }
    for (int64_t q = 0; q < quads; q++) {
        const int64_t pf = next->from + q * next->share, pf_end = rbe_min(pf + next->share, next->end);
        if (next->to_l2) FN(prefetch_codes_l2)(next->codes, pf, pf_end);
        else FN(prefetch_codes)(next->codes, pf, pf_end);
        for (; g_end <= 128 * q; g_end += gs) g++;
        const int part = last && q == quads - 1;
        const __mmask64 load = part ? ((__mmask64)1 << 16 * last) - 1 : ~(__mmask64)0;
        const __mmask16 lanes = part ? (__mmask16)((1u << 4 * last) - 1) : (__mmask16)0xffff;
        for (int i = 0; i < Q8_ONE_ROWS; i++) {
            VI lo, hi;
#ifdef Q8_TRELLIS_QUAD
            if (trellis) q8_trellis_quad(t256, row[i] + 64 * q, load, &lo, &hi);
            else
#endif
                q8_nibble_quad(t, row[i] + 64 * q, load, &lo, &hi);
            const VF f = q8_quad_factors(sel, st + i * groups + g, lanes);
            for (int b = 0; b < nt; b++) {
                const q8_quad *xb = x + b * quads + q;
                const VI dot = vi_dot(vi_dot(vi_load(xb->z), lo, vi_load(xb->lo)), hi, vi_load(xb->hi));
                a[b][i] = vfma(vi_cvt(dot), vmul(vload(xb->d), f), a[b][i]);
            }
        }
    }
    for (int b = 0; b < nt; b++) vhsum4(a[b], out + b * Q8_ONE_ROWS);
}
_Static_assert(Q8_ONE_ROWS == 4, "vhsum4 reduces four rows");
typedef void (*q8_quads_fn)(const rbe_lut *, const uint8_t *const *, const q8_quad *, const float *, const float *,
                            const float *, float, const VI *, VI, const q8_ahead *, float *);
#define Q8_ONE_QUADS(name, nt, trellis)                                                                          \
    static __attribute__((noinline)) Q8_ATTR void FN(name)(                                                      \
        const rbe_lut *m, const uint8_t *const *w, const q8_quad *x, const float *st, const float *off,          \
        const float *lead, float beta, const VI *t, VI sel, const q8_ahead *next, float *out) {                  \
        FN(q8_one_quads_body)(m, w, x, st, off, lead, beta, t, sel, next, out, nt, trellis);                     \
    }
Q8_ONE_QUADS(q8_one_quads1, 1, 0)
Q8_ONE_QUADS(q8_one_quads2, 2, 0)
Q8_ONE_QUADS(q8_one_quads3, 3, 0)
Q8_ONE_QUADS(q8_one_quads4, 4, 0)
#ifdef Q8_TRELLIS_QUAD
Q8_ONE_QUADS(q8_one_trellis_quads1, 1, 1)
Q8_ONE_QUADS(q8_one_trellis_quads2, 2, 1)
#endif
#endif
#ifdef Q8_NIBBLE_BLOCK
/* lut_gemv_q8's pass over rows of one nibble pair a group (64-column groups, unrotated, table
 * t16): per group g, each row's pair dot times the pair's d, plus the group's input-sum term
 * lead[g] * c (c spreads it over the lanes), times the row's factor fac[i * groups + g] (alpha
 * in it), into the row's sum out[i]. A function of its own, per narrow, so that the accumulators, the
 * rows' pointers and the table stay in registers (inside lut_gemv_q8 they were spilled). */
static inline __attribute__((always_inline)) void FN(q8_one_pairs_body)(
    const uint8_t *const *w, const int8_t *x8, const float *d8, const float *lead, float c, const float *fac,
    int64_t groups, VI t16, const q8_ahead *next, float *out, const int narrow) {
    const uint8_t *row[Q8_ONE_ROWS];
    VF a[Q8_ONE_ROWS];
    for (int i = 0; i < Q8_ONE_ROWS; i++) row[i] = w[i], a[i] = vzero();
    for (int64_t g = 0; g < groups; g++) {
        FN(prefetch_codes)(next->codes, next->from + g * next->share, rbe_min(next->from + (g + 1) * next->share, next->end));
        VI x[4];
        VF d;
        q8_pair_inputs(x8 + 64 * g, d8 + 16 * g, x, &d);
        const VF e = vset1(c * lead[g]);
        for (int i = 0; i < Q8_ONE_ROWS; i++)
            a[i] = vfma(vfma(vi_cvt(q8_nibble_pair_dot(t16, row[i] + 32 * g, x, narrow)), d, e), vset1(fac[i * groups + g]), a[i]);
    }
    vhsum_rows(a, out);
}
#define Q8_ONE_PAIRS(name, narrow)                                                                                        \
    static __attribute__((noinline)) Q8_ATTR void FN(name)(const uint8_t *const *w, const int8_t *x8, const float *d8,  \
                                                          const float *lead, float c, const float *fac, int64_t groups, \
                                                          VI t16, const q8_ahead *next, float *out) {                   \
        FN(q8_one_pairs_body)(w, x8, d8, lead, c, fac, groups, t16, next, out, narrow);                                \
    }
Q8_ONE_PAIRS(q8_one_pairs_narrow, 1)
Q8_ONE_PAIRS(q8_one_pairs_raw, Q8_RAW_NIBBLES)
Q8_ONE_PAIRS(q8_one_pairs_signed, 0)
#endif
/* The int8 product of one to Q8_ONE_TOKENS tokens (Q8_ONE_NIBBLE_TOKENS of nibble codes), each on its own (rbe_kernels.lut_gemv_q8):
 * lut_gemm_q8's sum for each input q8_quantize1 made (rotated by rot; token b's record at xq + b
 * * RBE_Q8_ONE(cp)) into y + b * ldy, Q8_ONE_ROWS rows a pass: their weight bytes unpacked by
 * q8_panel (or, Q8_NIBBLE_PAIR / Q8_NIBBLE_BLOCK / Q8_TRELLIS_PAIR, nibble or trellis codes in
 * registers as they are used) and their factors made once, then each token in turn (the pass's
 * codes in L1 after the first): per VLEN / 8 blocks one element-wise product a row (vi_dot,
 * started at the blocks' zero-point corrections), converted and scaled by the blocks' d; per
 * group by the rows' factors (q8_factors'). m->gs / 32 is a multiple of VLEN / 8. */
static Q8_ATTR void FN(lut_gemv_q8)(const rbe_lut *m, const uint8_t *xq, int rot, int64_t n, int64_t r0, int64_t r1,
                                    float *y, int64_t ldy, void *scratch) {
    const int64_t cp = m->cols_p, groups = m->groups, bpg = m->gs / 32, rec = RBE_Q8_ONE(cp);
    uint8_t *panel = scratch, tab[256];
    float *st = (float *)(panel + Q8_RB * cp), *off = st + Q8_RB * groups;
    float *lead = off + Q8_RB * groups; /* per token and group: sum of d * lead, what q8_beta and offsets meet */
    const int shift = FN(q8_table)(m, rot, tab);
#ifdef Q8_PLANES16
    const int wide = m->kind == RBE_LUT_PLANES; /* 16-bit levels (rbe_lut's lv16) */
    planes16_tables t5;
    if (wide) t5 = planes16_tables_for(m);
#else
    const int wide = 0;
#endif
    const float alpha8 = wide ? m->q16_alpha / 254.0f : m->q8_alpha / (float)rot; /* x16 ~ 254 x8 */
#if defined(Q8_NIBBLE_PAIR) || defined(Q8_NIBBLE_BLOCK)
    const int nibbles = m->kind == RBE_LUT_NIBBLE && rot == 1; /* unrotated: the table is the weight bytes */
#else
    const int nibbles = 0;
#endif
#ifndef Q8_NIBBLE_QUAD
    const int64_t quads = 0;
#endif
#ifdef Q8_NIBBLE_PAIR
    const __m512i t16 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)tab));
#endif
#ifdef Q8_NIBBLE_BLOCK
    /* lv8 = l0 + dl * code: the codes themselves are the (unsigned) weight bytes, no table; else
     * narrow levels: weight bytes lv8 + Q8_NARROW_BIAS, unsigned */
    int l0 = 0, dl = 1;
    const int raw = nibbles && q8_raw_levels(m, &l0, &dl);
    const int narrow = raw ? Q8_RAW_NIBBLES : nibbles && q8_narrow_levels(m);
    const int pairs = nibbles && (narrow || q8_signed_pair_levels(m));
    const VI t16 = q8_nibble_table(tab, narrow);
#else
    const int l0 = 0, dl = 1, raw = 0, narrow = 0, pairs = nibbles;
#endif
    const float alpha = raw ? alpha8 * (float)dl : alpha8;
    /* what the input sums meet */
    const float beta = wide ? 0.0f
                       : raw ? m->q8_beta + alpha8 * (float)l0
                             : m->q8_beta - (narrow ? (float)Q8_NARROW_BIAS * alpha8 : 0.0f);
#ifdef Q8_TRELLIS_PAIR
    const int cut = m->kind == RBE_LUT_TRELLIS && rot == 1;
    const __m512i wbyte = trellis_bytes(m->tbits), wshift = trellis_shifts(m->tbits);
    const __mmask64 wload = trellis_reach(m->tbits, 64);
    __m512i t256[4];
    for (int k = 0; k < 4; k++) t256[k] = _mm512_loadu_si512((const void *)(tab + 64 * k));
#else
    const int cut = 0;
#endif
#ifdef Q8_NIBBLE_BLOCK
    /* one pair a group: q8_one_pairs_* do the passes, beta's input-sum terms inside them (lead
     * times lead_scale meets the factors alpha * st, spread over the VLEN lanes); offsets' terms
     * stay in lead_terms */
    const int one_pair = pairs && bpg == 2 && alpha != 0.0f;
#else
    const int one_pair = 0;
#endif
    const int sums = m->has_offset || beta != 0.0f; /* else the input sums meet nothing */
    const float lead_scale = one_pair ? beta / alpha / VLEN : 0.0f;
#ifdef Q8_NIBBLE_QUAD
    /* q8_one_quads takes the rows whole, the input sums' terms inside (factors alpha * st, so
     * beta / alpha meets them); each token's quads after the input sums */
#ifdef Q8_TRELLIS_QUAD
    const int trellis4 = cut && m->tbits == 4; /* 4-bit windows: whole bytes and shifted pairs (q8_trellis_quad) */
    const int quad_tokens = trellis4 ? 2 : Q8_QUAD_TOKENS;
#else
    const int trellis4 = 0, quad_tokens = Q8_QUAD_TOKENS;
#endif
    const int64_t quads = (nibbles || trellis4) && alpha != 0.0f && (128 % m->gs == 0 || m->gs % 128 == 0) ? Q8_QUADS(cp) : 0;
    q8_quad *quad = (q8_quad *)(((uintptr_t)(lead + n * groups) + 63) & ~(uintptr_t)63);
    for (int64_t b = 0; b < n && quads; b++) FN(q8_quad_inputs)(xq + b * rec, cp, quad + b * quads, trellis4);
    int32_t lane_group[16]; /* a quad lane's group, counted from the quad's first (q8_one_quads' sel) */
    for (int l = 0; l < 16; l++) lane_group[l] = m->gs <= 128 ? (int32_t)(32 * (l / 4) / m->gs) : 0;
    const VI quad_sel = vi_load(lane_group);
#endif
    for (int64_t b = 0; b < n && (sums || one_pair); b++) {
        const float *ds = (const float *)(xq + b * rec + 3 * cp);
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t k = g * bpg; k < (g + 1) * bpg; k++) s += ds[k];
            lead[b * groups + g] = s;
        }
    }
    for (int64_t r = r0; r < r1; r += Q8_ONE_ROWS) {
        const int nr = (int)rbe_min(Q8_ONE_ROWS, r1 - r);
        const uint8_t *w[Q8_ONE_ROWS];
        if (pairs || cut || wide) /* read in place */
            for (int i = 0; i < nr; i++) w[i] = FN(lut_codes)(m, r + i, 0);
        else
            FN(q8_panel)(m, tab, shift, rot, r, nr, panel, w);
        for (int i = nr; i < Q8_ONE_ROWS; i++) w[i] = w[nr - 1]; /* tail rows repeat the last one */
        FN(row_steps)(m, r, nr, one_pair || quads ? alpha : 1.0f, st, off); /* one_pair's and quads' factors */
        for (int64_t b = 0; b < n && !quads; b++) /* each token's input sums' terms first */
            for (int i = 0; i < nr; i++)
                y[b * ldy + r + i] = (one_pair ? m->has_offset : sums)
                                         ? FN(lead_terms)(m, one_pair ? 0.0f : beta, st + i * groups, off + i * groups, lead + b * groups)
                                         : 0.0f;
        for (int i = nr; i < Q8_ONE_ROWS; i++) { /* tail rows repeat the last one (a fixed count: acc stays in registers) */
            memcpy(st + i * groups, st + (nr - 1) * groups, (size_t)groups * sizeof(float));
            if (m->has_offset) memcpy(off + i * groups, off + (nr - 1) * groups, (size_t)groups * sizeof(float));
        }
        /* the next pass's codes, a group's share at a time (as lut_gemv_body), with the first token */
        const int64_t share = (Q8_ONE_ROWS * m->row_bytes + groups - 1) / groups, ahead = (r + Q8_ONE_ROWS) * m->row_bytes;
        const int64_t ahead_end = rbe_min(r + 2 * Q8_ONE_ROWS, r1) * m->row_bytes;
#ifdef Q8_NIBBLE_QUAD
        for (int64_t b = 0; b < n && quads; b += quad_tokens) { /* quad_tokens tokens at a time */
            const q8_ahead next = {m->codes, ahead, (Q8_ONE_ROWS * m->row_bytes + quads - 1) / quads, b ? 0 : ahead_end,
                                   cp >= Q8_L2_COLS};
            float out[Q8_QUAD_TOKENS * Q8_ONE_ROWS];
            const int nt = (int)rbe_min(quad_tokens, n - b);
#ifdef Q8_TRELLIS_QUAD
            const q8_quads_fn tpass[] = {FN(q8_one_trellis_quads1), FN(q8_one_trellis_quads2)};
            if (trellis4)
                tpass[nt - 1](m, w, quad + b * quads, st, off, sums ? lead + b * groups : NULL, beta / alpha, t256, quad_sel, &next, out);
            else
#endif
            {
                const q8_quads_fn pass[] = {FN(q8_one_quads1), FN(q8_one_quads2), FN(q8_one_quads3), FN(q8_one_quads4)};
                pass[nt - 1](m, w, quad + b * quads, st, off, sums ? lead + b * groups : NULL, beta / alpha, &t16, quad_sel, &next, out);
            }
            for (int k = 0; k < nt; k++)
                for (int i = 0; i < nr; i++) y[(b + k) * ldy + r + i] = out[k * Q8_ONE_ROWS + i];
        }
#endif
        for (int64_t b = 0; b < n; b++) {
            const uint8_t *xb = xq + b * rec;
            const int8_t *x8 = (const int8_t *)xb;
            const float *d8 = (const float *)(xb + cp);
            const int32_t *z8 = (const int32_t *)(xb + 2 * cp);
#ifdef Q8_PLANES16
            const int16_t *x16 = (const int16_t *)(xb + RBE_Q8_X16(cp));
#endif
            const int64_t fetch_end = b ? 0 : ahead_end;
            VF acc[Q8_ONE_ROWS];
            for (int i = 0; i < Q8_ONE_ROWS; i++) acc[i] = vzero();
#ifdef Q8_NIBBLE_BLOCK
            if (one_pair) {
                const q8_ahead next = {m->codes, ahead, share, fetch_end, 0};
                const float *lb = lead + b * groups;
                float out[Q8_ONE_ROWS];
                if (raw) FN(q8_one_pairs_raw)(w, x8, d8, lb, lead_scale, st, groups, t16, &next, out);
                else if (narrow) FN(q8_one_pairs_narrow)(w, x8, d8, lb, lead_scale, st, groups, t16, &next, out);
                else FN(q8_one_pairs_signed)(w, x8, d8, lb, lead_scale, st, groups, t16, &next, out);
                for (int i = 0; i < nr; i++) y[b * ldy + r + i] += out[i];
                continue;
            }
#endif
            for (int64_t g = quads ? groups : 0; g < groups; g++) {
                FN(prefetch_codes)(m->codes, ahead + g * share, rbe_min(ahead + (g + 1) * share, fetch_end));
                VF ga[Q8_ONE_ROWS];
                for (int i = 0; i < Q8_ONE_ROWS; i++) ga[i] = vzero();
                int64_t k = g * bpg;
#ifdef Q8_NIBBLE_PAIR
                for (; pairs && k < (g + 1) * bpg; k += 2) {
                    const VI z = q8_pair_order(vi_load(z8 + 8 * k)), x = q8_pair_order(vi_load(x8 + 32 * k));
                    const VF d = _mm512_castsi512_ps(q8_pair_order(_mm512_castps_si512(vload(d8 + 8 * k))));
                    for (int i = 0; i < Q8_ONE_ROWS; i++)
                        ga[i] = vfma(vi_cvt(vi_dot(z, q8_nibble_pair(t16, w[i] + 16 * k), x)), d, ga[i]);
                }
#endif
#ifdef Q8_NIBBLE_BLOCK
                for (; pairs && k + 2 <= (g + 1) * bpg; k += 2) {
                    VI x[4];
                    VF d;
                    q8_pair_inputs(x8 + 32 * k, d8 + 8 * k, x, &d);
                    for (int i = 0; i < Q8_ONE_ROWS; i++)
                        ga[i] = vfma(vi_cvt(q8_nibble_pair_dot(t16, w[i] + 16 * k, x, narrow)), d, ga[i]);
                }
                for (; pairs && k < (g + 1) * bpg; k++) {
                    const VI z = vi_load(z8 + 8 * k), x = vi_load(x8 + 32 * k);
                    const VF d = vload(d8 + 8 * k);
                    for (int i = 0; i < Q8_ONE_ROWS; i++)
                        ga[i] = vfma(vi_cvt(q8_nibble_block_dot(z, t16, w[i] + 16 * k, x, narrow)), d, ga[i]);
                }
#endif
#ifdef Q8_PLANES16
                for (; wide && k < (g + 1) * bpg; k++) {
                    const VF d = vload(d8 + 8 * k);
                    for (int i = 0; i < Q8_ONE_ROWS; i++)
                        ga[i] = vfma(vi_cvt(q8_planes16_dot(m, &t5, w[i] + k * m->block_bytes, x16 + 32 * k)), d, ga[i]);
                }
#endif
#ifdef Q8_TRELLIS_PAIR
                for (; cut && k < (g + 1) * bpg; k += 2) {
                    const VI z = vi_load(z8 + 8 * k), x = vi_load(x8 + 32 * k);
                    const VF d = vload(d8 + 8 * k);
                    for (int i = 0; i < Q8_ONE_ROWS; i++)
                        ga[i] = vfma(vi_cvt(vi_dot(z, q8_trellis_pair(t256, wbyte, wshift, wload, w[i] + k * m->block_bytes), x)), d, ga[i]);
                }
#endif
                for (; k < (g + 1) * bpg; k += VLEN / 8) {
                    const VI z = vi_load(z8 + 8 * k), x = vi_load(x8 + 32 * k);
                    const VF d = vload(d8 + 8 * k);
                    for (int i = 0; i < Q8_ONE_ROWS; i++) ga[i] = vfma(vi_cvt(vi_dot(z, vi_load(w[i] + 32 * k), x)), d, ga[i]);
                }
                for (int i = 0; i < Q8_ONE_ROWS; i++) acc[i] = vfma(ga[i], vset1(alpha * st[i * groups + g]), acc[i]);
            }
            for (int i = 0; i < nr; i++) y[b * ldy + r + i] += vhsum(acc[i]);
        }
    }
}
