/* Kernel bodies shared by every ISA. A kernels_<isa>.c file defines the vector vocabulary
 * below, then includes this file once; everything here is static except the exported table.
 *
 * Required: ISA_SUFFIX, VLEN (divides 16), VF (vector of VLEN floats), vzero(), vload(p),
 * vstore(p, v), vset1(f), vadd(a, b), vsub(a, b), vmul(a, b), vmax(a, b), vdiv(a, b), vfma(a, b, c) =
 * a * b + c, vhsum(v), vexp(v), vload_h(p) / vstore_h(p, v), vload_i8(p), half_to_float(h), GEMV_ROWS (rows
 * per lut_gemv pass), GRAD_BATCH (rows of g per grad_tile; GRAD_BATCH * GRAD_NV accumulators),
 * and lutreg, lutreg_load, lutreg_codes and lut_block32 for the canonical-layout kernels (their
 * contracts are in lut_impl.h).
 * Optional: GRAD_NV (default 2), GEMM_MR (rows per lut_gemm pass, default 6), and the int8
 * product's vocabulary and options (lut_impl.h), Q8_OPTIONAL among them; Q8_ONE_KINDS (default:
 * nibble codes), rbe_kernels' q8_one_kinds; Q8_ONE_ROWS (rows per lut_gemv_q8 pass, default
 * GEMV_ROWS); Q8_ONE_TOKENS (default 1) and Q8_ONE_NIBBLE_TOKENS (default Q8_ONE_TOKENS),
 * rbe_kernels' q8_one_tokens and q8_one_nibble_tokens.
 */
#include "rbe_internal.h"

#define RBE_CAT_(a, b) a##_##b
#define RBE_CAT(a, b) RBE_CAT_(a, b)
#define FN(name) RBE_CAT(name, ISA_SUFFIX)
#define NV (32 / VLEN)
#ifndef GRAD_NV
#define GRAD_NV 2
#endif
#ifndef Q8_ONE_KINDS
#define Q8_ONE_KINDS (1 << RBE_LUT_NIBBLE)
#endif

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

#include "lut_impl.h"

/* Positional: the order of rbe_kernels' fields (rbe_internal.h); q8 is the int8 product. */
#define RBE_KERNEL_TABLE(q8, q8one)                                                              \
    {                                                                                            \
        FN(grad_tile), FN(lut_decode), FN(lut_gemv), FN(lut_gemv_t), FN(lut_gemv_few), FN(lut_gemm), \
        GEMM_NT,                                                                                 \
        GEMM_MR, FN(q8_quantize), q8, FN(q8_scratch), VLEN, Q8_RB, FN(q8_quantize1), q8one,      \
        Q8_ONE_KINDS, Q8_ONE_TOKENS, Q8_ONE_NIBBLE_TOKENS,                                       \
        FN(vdot), FN(vaxpy), FN(exp_sum), FN(attend_group), FN(kv_store), FN(fwht), FN(activate), \
        GRAD_BATCH,                                                                              \
    }
const rbe_kernels RBE_CAT(rbe_kernels, ISA_SUFFIX) = RBE_KERNEL_TABLE(FN(lut_gemm_q8), FN(lut_gemv_q8));
#ifdef Q8_OPTIONAL
/* Q8_OPTIONAL: the int8 product needs an instruction beyond the file's baseline (Q8_ATTR); this
 * table, for CPUs without it, has none (the engine then runs the float product). */
const rbe_kernels RBE_CAT(RBE_CAT(rbe_kernels, ISA_SUFFIX), noq8) = RBE_KERNEL_TABLE(NULL, NULL);
#endif
