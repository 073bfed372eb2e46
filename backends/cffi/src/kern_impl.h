/* Kernel bodies shared by every ISA. A kernels_<isa>.c file defines the vector vocabulary
 * below, then includes this file once; everything here is static except the exported table.
 *
 * Required: ISA_SUFFIX, VLEN (divides 32), VF (vector of VLEN floats), vzero(), vload(p),
 * vstore(p, v), vset1(f), vadd(a, b), vmul(a, b), vfma(a, b, c) = a * b + c, vhsum(v),
 * load_i8(p) (VLEN int8 -> VF), q4_unpack32(p, VF out[32 / VLEN]) (16 packed bytes -> 32
 * values in column order), lut16 + lut16_load(levels) + q4_lookup32(p, lut16, out) (the same
 * 32 codes looked up in a 16-entry float table), halves_to_float(src, dst, n), GEMV_ROWS, TILE_ROWS, TILE_BATCH,
 * GRAD_BATCH (rows of g per grad_tile; GRAD_BATCH * GRAD_NV accumulators, GRAD_NV default 2).
 * lutreg, lutreg_load and lut_block32 for the canonical-layout kernels (lut_impl.h).
 * Optional: define RBE_HAVE_INT4_GEMV and int4_gemv_<isa>, or RBE_HAVE_HAD4_GEMV and
 * had4_gemv_<isa> (same contracts) before including.
 */
#include "rbe_internal.h"

#define RBE_CAT_(a, b) a##_##b
#define RBE_CAT(a, b) RBE_CAT_(a, b)
#define FN(name) RBE_CAT(name, ISA_SUFFIX)
#define NV (32 / VLEN)
#ifndef GRAD_NV
#define GRAD_NV 2
#endif

static inline float FN(sum_nv)(const VF *acc) {
    VF s = acc[0];
    for (int k = 1; k < NV; k++) s = vadd(s, acc[k]);
    return vhsum(s);
}

static void FN(int8_gemv)(const float *x, const int8_t *q, const float *scale, int64_t cols,
                          int64_t r0, int64_t r1, float *y) {
    const int64_t c32 = cols & ~(int64_t)31;
    for (int64_t r = r0; r < r1; r += GEMV_ROWS) {
        const int nr = (int)rbe_min(GEMV_ROWS, r1 - r);
        const int8_t *qr[GEMV_ROWS];
        VF acc[GEMV_ROWS][NV];
        for (int i = 0; i < GEMV_ROWS; i++) {
            qr[i] = q + (r + (i < nr ? i : nr - 1)) * cols; /* tail rows repeat the last one */
            for (int k = 0; k < NV; k++) acc[i][k] = vzero();
        }
        for (int64_t c = 0; c < c32; c += 32) {
            VF xv[NV];
            for (int k = 0; k < NV; k++) xv[k] = vload(x + c + k * VLEN);
            for (int i = 0; i < GEMV_ROWS; i++)
                for (int k = 0; k < NV; k++)
                    acc[i][k] = vfma(load_i8(qr[i] + c + k * VLEN), xv[k], acc[i][k]);
        }
        for (int i = 0; i < nr; i++) {
            float t = FN(sum_nv)(acc[i]);
            for (int64_t c = c32; c < cols; c++) t += (float)qr[i][c] * x[c];
            y[r + i] = t * scale[r + i];
        }
    }
}

#ifndef RBE_HAVE_INT4_GEMV /* the ISA file may bring its own */
static void FN(int4_gemv)(const float *x, const uint8_t *q, const uint16_t *sh,
                          const uint16_t *mh, int64_t cols, int64_t gs, int64_t r0, int64_t r1,
                          float *y, float *scratch) {
    const int64_t cols_p = rbe_round_up(cols, gs), groups = cols_p / gs, qstride = cols_p / 2;
    float *sf = scratch, *mf = scratch + GEMV_ROWS * groups;
    for (int64_t r = r0; r < r1; r += GEMV_ROWS) {
        const int nr = (int)rbe_min(GEMV_ROWS, r1 - r);
        const uint8_t *qr[GEMV_ROWS];
        const float *sr[GEMV_ROWS], *mr[GEMV_ROWS];
        VF acc[GEMV_ROWS][NV];
        float tail[GEMV_ROWS];
        for (int i = 0; i < nr; i++) {
            halves_to_float(sh + (r + i) * groups, sf + i * groups, groups);
            halves_to_float(mh + (r + i) * groups, mf + i * groups, groups);
        }
        for (int i = 0; i < GEMV_ROWS; i++) {
            const int ii = i < nr ? i : nr - 1;
            qr[i] = q + (r + ii) * qstride;
            sr[i] = sf + ii * groups;
            mr[i] = mf + ii * groups;
            tail[i] = 0.0f;
            for (int k = 0; k < NV; k++) acc[i][k] = vzero();
        }
        for (int64_t g = 0; g < groups; g++) {
            const int64_t ce = rbe_min((g + 1) * gs, cols);
            int64_t c = g * gs;
            if (!(c & 1)) {
                VF sv[GEMV_ROWS], mv[GEMV_ROWS];
                for (int i = 0; i < GEMV_ROWS; i++) {
                    sv[i] = vset1(sr[i][g]);
                    mv[i] = vset1(mr[i][g]);
                }
                for (; c + 32 <= ce; c += 32) {
                    VF xv[NV];
                    for (int k = 0; k < NV; k++) xv[k] = vload(x + c + k * VLEN);
                    for (int i = 0; i < GEMV_ROWS; i++) {
                        VF qv[NV];
                        q4_unpack32(qr[i] + c / 2, qv);
                        /* q * s is exact in float32, so fma(q, s, m) == q * s + m bit for bit */
                        for (int k = 0; k < NV; k++)
                            acc[i][k] = vfma(vfma(qv[k], sv[i], mv[i]), xv[k], acc[i][k]);
                    }
                }
            }
            for (; c < ce; c++) {
                for (int i = 0; i < nr; i++) {
                    const uint8_t b = qr[i][c >> 1];
                    const float qq = (float)((c & 1) ? (b >> 4) : (b & 15));
                    tail[i] += (qq * sr[i][g] + mr[i][g]) * x[c];
                }
            }
        }
        for (int i = 0; i < nr; i++) y[r + i] = FN(sum_nv)(acc[i]) + tail[i];
    }
}
#endif

static void FN(int8_decode)(const int8_t *q, const float *scale, int64_t cols, int64_t r0, int nr,
                            int64_t c0, int64_t c1, float *w, int64_t ldw) {
    for (int i = 0; i < nr; i++) {
        const int8_t *qr = q + (r0 + i) * cols;
        const float s = scale[r0 + i];
        const VF sv = vset1(s);
        float *wr = w + i * ldw - c0;
        int64_t c = c0;
        for (; c + VLEN <= c1; c += VLEN) vstore(wr + c, vmul(load_i8(qr + c), sv));
        for (; c < c1; c++) wr[c] = (float)qr[c] * s;
    }
}

static void FN(int4_decode)(const uint8_t *q, const uint16_t *sh, const uint16_t *mh,
                            int64_t cols, int64_t gs, int64_t r0, int nr, int64_t c0, int64_t c1,
                            float *w, int64_t ldw) {
    const int64_t cols_p = rbe_round_up(cols, gs), groups = cols_p / gs, qstride = cols_p / 2;
    for (int i = 0; i < nr; i++) {
        const uint8_t *qr = q + (r0 + i) * qstride;
        float *wr = w + i * ldw - c0;
        for (int64_t g = c0 / gs; g * gs < c1; g++) {
            const float s = rbe_half_to_float(sh[(r0 + i) * groups + g]);
            const float m = rbe_half_to_float(mh[(r0 + i) * groups + g]);
            const VF sv = vset1(s), mv = vset1(m);
            const int64_t ce = rbe_min((g + 1) * gs, c1);
            int64_t c = rbe_max(g * gs, c0);
            if (!(c & 1)) {
                for (; c + 32 <= ce; c += 32) {
                    VF qv[NV];
                    q4_unpack32(qr + c / 2, qv);
                    for (int k = 0; k < NV; k++) vstore(wr + c + k * VLEN, vfma(qv[k], sv, mv));
                }
            }
            for (; c < ce; c++) {
                const uint8_t b = qr[c >> 1];
                wr[c] = (float)((c & 1) ? (b >> 4) : (b & 15)) * s + m;
            }
        }
    }
}

static void FN(dot_tile)(const float *w, int64_t ldw, int nr, const float *x, int64_t ldx, int nb,
                         int64_t k, float *y, int64_t ldy) {
    const float *wp[TILE_ROWS], *xp[TILE_BATCH];
    VF acc[TILE_ROWS][TILE_BATCH];
    for (int i = 0; i < TILE_ROWS; i++) wp[i] = w + (i < nr ? i : nr - 1) * ldw;
    for (int b = 0; b < TILE_BATCH; b++) xp[b] = x + (b < nb ? b : nb - 1) * ldx;
    for (int i = 0; i < TILE_ROWS; i++)
        for (int b = 0; b < TILE_BATCH; b++) acc[i][b] = vzero();
    const int64_t kv = k - k % VLEN;
    for (int64_t c = 0; c < kv; c += VLEN) {
        VF wv[TILE_ROWS];
        for (int i = 0; i < TILE_ROWS; i++) wv[i] = vload(wp[i] + c);
        for (int b = 0; b < TILE_BATCH; b++) {
            const VF xv = vload(xp[b] + c);
            for (int i = 0; i < TILE_ROWS; i++) acc[i][b] = vfma(wv[i], xv, acc[i][b]);
        }
    }
    for (int b = 0; b < nb; b++) {
        for (int i = 0; i < nr; i++) {
            float t = vhsum(acc[i][b]);
            for (int64_t c = kv; c < k; c++) t += wp[i][c] * xp[b][c];
            y[b * ldy + i] = t;
        }
    }
}

/* out[b * ldo + j] (+)= sum_{i < nr} g[b * ldg + i] * w[i * ldw + j] for b < nb <= GRAD_BATCH,
 * j < k: written when accumulate is 0, added otherwise. Register-blocked: GRAD_BATCH rows of g
 * times GRAD_NV vectors of w stay in accumulators over the whole panel (one pass, no partial
 * sums in memory). */
static void FN(grad_tile)(const float *w, int64_t ldw, int64_t nr, const float *g, int64_t ldg,
                          int nb, int64_t k, float *out, int64_t ldo, int accumulate) {
    const float *gp[GRAD_BATCH];
    for (int b = 0; b < GRAD_BATCH; b++) gp[b] = g + (b < nb ? b : nb - 1) * ldg;
    int64_t c = 0;
    for (; c + GRAD_NV * VLEN <= k; c += GRAD_NV * VLEN) {
        VF acc[GRAD_BATCH][GRAD_NV];
        for (int b = 0; b < GRAD_BATCH; b++)
            for (int v = 0; v < GRAD_NV; v++) acc[b][v] = vzero();
        for (int64_t i = 0; i < nr; i++) {
            VF wv[GRAD_NV];
            for (int v = 0; v < GRAD_NV; v++) wv[v] = vload(w + i * ldw + c + v * VLEN);
            for (int b = 0; b < GRAD_BATCH; b++) {
                const VF gv = vset1(gp[b][i]);
                for (int v = 0; v < GRAD_NV; v++) acc[b][v] = vfma(gv, wv[v], acc[b][v]);
            }
        }
        for (int b = 0; b < nb; b++)
            for (int v = 0; v < GRAD_NV; v++) {
                float *o = out + b * ldo + c + v * VLEN;
                vstore(o, accumulate ? vadd(vload(o), acc[b][v]) : acc[b][v]);
            }
    }
    for (; c + VLEN <= k; c += VLEN) {
        VF acc[GRAD_BATCH];
        for (int b = 0; b < GRAD_BATCH; b++) acc[b] = vzero();
        for (int64_t i = 0; i < nr; i++) {
            const VF wv = vload(w + i * ldw + c);
            for (int b = 0; b < GRAD_BATCH; b++) acc[b] = vfma(vset1(gp[b][i]), wv, acc[b]);
        }
        for (int b = 0; b < nb; b++) {
            float *o = out + b * ldo + c;
            vstore(o, accumulate ? vadd(vload(o), acc[b]) : acc[b]);
        }
    }
    for (; c < k; c++)
        for (int b = 0; b < nb; b++) {
            float t = 0.0f;
            for (int64_t i = 0; i < nr; i++) t += gp[b][i] * w[i * ldw + c];
            out[b * ldo + c] = accumulate ? out[b * ldo + c] + t : t;
        }
}

/* hadamard: the code of column c of a row, from its little-endian bit stream (bits in 2..8;
 * a code spans at most two bytes; the second is read only when it is inside the row). */
static inline unsigned FN(had_code)(const uint8_t *qr, int64_t rowbytes, int bits, int64_t c) {
    const int64_t bit = c * bits, byte = bit >> 3;
    unsigned v = qr[byte];
    if (byte + 1 < rowbytes) v |= (unsigned)qr[byte + 1] << 8;
    return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

/* Rows [r0, r0 + nr), columns [c0, c1) (c0 even) of the rotated weight into w (row stride
 * ldw): w = levels[q] * (row_scale[r] * scale_code[r, c / gs]), decode's exact arithmetic. */
static void FN(had_decode)(const uint8_t *codes, const uint8_t *sc, const float *rs,
                           const float *levels, int64_t cols_p, int64_t gs, int bits, int64_t r0,
                           int nr, int64_t c0, int64_t c1, float *w, int64_t ldw) {
    const int64_t groups = cols_p / gs, rowbytes = (cols_p * bits + 7) / 8;
    for (int i = 0; i < nr; i++) {
        const int64_t r = r0 + i;
        const uint8_t *qr = codes + r * rowbytes;
        float *wr = w + i * ldw - c0;
        int64_t c = c0;
        if (bits == 4) {
            const lut16 t = lut16_load(levels);
            for (; c + 32 <= c1; c += 32) {
                VF qv[NV];
                q4_lookup32(qr + c / 2, t, qv);
                for (int k = 0; k < NV; k++) vstore(wr + c + k * VLEN, qv[k]);
            }
        } else if (bits == 8) {
            for (; c < c1; c++) wr[c] = levels[qr[c]];
        } else if (bits == 2) {
            for (; c < c1; c++) wr[c] = levels[(qr[c >> 2] >> ((c & 3) * 2)) & 3];
        }
        for (; c < c1; c++) wr[c] = levels[FN(had_code)(qr, rowbytes, bits, c)];
        for (int64_t g = c0 / gs; g * gs < c1; g++) {
            const float st = rs[r] * (float)sc[r * groups + g];
            const VF sv = vset1(st);
            const int64_t ce = rbe_min((g + 1) * gs, c1);
            c = rbe_max(g * gs, c0);
            for (; c + VLEN <= ce; c += VLEN) vstore(wr + c, vmul(vload(wr + c), sv));
            for (; c < ce; c++) wr[c] *= st;
        }
    }
}

#ifndef RBE_HAVE_HAD4_GEMV /* the ISA file may bring its own */
/* hadamard 4-bit, batch 1, group size a multiple of 32: y[r] = sum_g step[r, g] *
 * dot(levels[q[r, g]], xr[g]) for r in [r0, r1); codes are looked up in registers (exactly),
 * each group's products are summed before one multiply by its step. */
static void FN(had4_gemv)(const float *xr, const uint8_t *codes, const uint8_t *sc,
                          const float *rs, const float *levels, int64_t cols_p, int64_t gs,
                          int64_t r0, int64_t r1, float *y, float *scratch) {
    (void)scratch;
    const int64_t groups = cols_p / gs, qstride = cols_p / 2;
    const lut16 t = lut16_load(levels);
    for (int64_t r = r0; r < r1; r += GEMV_ROWS) {
        const int nr = (int)rbe_min(GEMV_ROWS, r1 - r);
        const uint8_t *qr[GEMV_ROWS], *sr[GEMV_ROWS];
        float rsr[GEMV_ROWS];
        VF acc[GEMV_ROWS];
        for (int i = 0; i < GEMV_ROWS; i++) {
            const int64_t ri = r + (i < nr ? i : nr - 1); /* tail rows repeat the last one */
            qr[i] = codes + ri * qstride;
            sr[i] = sc + ri * groups;
            rsr[i] = rs[ri];
            acc[i] = vzero();
        }
        for (int64_t g = 0; g < groups; g++) {
            VF ga[GEMV_ROWS][NV];
            for (int i = 0; i < GEMV_ROWS; i++)
                for (int k = 0; k < NV; k++) ga[i][k] = vzero();
            for (int64_t c = g * gs; c < (g + 1) * gs; c += 32) {
                VF xv[NV];
                for (int k = 0; k < NV; k++) xv[k] = vload(xr + c + k * VLEN);
                for (int i = 0; i < GEMV_ROWS; i++) {
                    VF qv[NV];
                    q4_lookup32(qr[i] + c / 2, t, qv);
                    for (int k = 0; k < NV; k++) ga[i][k] = vfma(qv[k], xv[k], ga[i][k]);
                }
            }
            for (int i = 0; i < GEMV_ROWS; i++) {
                const float st = rsr[i] * (float)sr[i][g];
                VF s = ga[i][0];
                for (int k = 1; k < NV; k++) s = vadd(s, ga[i][k]);
                acc[i] = vfma(s, vset1(st), acc[i]);
            }
        }
        for (int i = 0; i < nr; i++) y[r + i] = vhsum(acc[i]);
    }
}
#endif

#include "lut_impl.h"

const rbe_kernels RBE_CAT(rbe_kernels, ISA_SUFFIX) = {
    FN(int8_gemv), FN(int4_gemv),  FN(int8_decode), FN(int4_decode),
    FN(dot_tile),  FN(grad_tile),  FN(had_decode),  FN(had4_gemv),
    FN(lut_decode), FN(lut_gemv),  FN(lut_gemv_t),  FN(lut_gemm),  GEMM_NT, GEMM_MR, FN(vdot),       FN(vaxpy),      FN(exp_sum),   FN(attend_group), FN(kv_store), FN(fwht), FN(activate),
    GEMV_ROWS,     TILE_ROWS,      TILE_BATCH,     GRAD_BATCH,
};
