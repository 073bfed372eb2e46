/* AVX-512 (F + BW, and F16C) path. Compiled on its own with -mavx512f -mavx512bw -mf16c; only
 * reached through rbe_kernels_for (dispatch.c), which checks the CPU with __builtin_cpu_supports. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "rbe_internal.h"

#define ISA_SUFFIX avx512
#define VLEN 16
#define GEMV_ROWS 4
#define GRAD_BATCH 8
#define GEMM_MR 8
#define VF __m512

#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps((p), (v))
#define vset1(f) _mm512_set1_ps(f)
#define vadd(a, b) _mm512_add_ps((a), (b))
#define vmul(a, b) _mm512_mul_ps((a), (b))
#define vfma(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define vhsum(v) _mm512_reduce_add_ps(v)
#define vdiv(a, b) _mm512_div_ps((a), (b))
#define vload_h(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define vstore_h(p, v) _mm256_storeu_si256((__m256i *)(p), _mm512_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT))
#define vsub(a, b) _mm512_sub_ps((a), (b))
/* expf by Cephes' polynomial on [-ln2/2, ln2/2] and an exponent shift; inputs below -87 give 0. */
static inline __m512 vexp(__m512 x) {
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps((__mmask16)~under, y, _mm512_castsi512_ps(e));
}

/* Canonical layout: tables of up to 64 levels live in registers (vpermps for 16, vpermt2ps for
 * 32, two of them and a blend for 64); affine levels (uniform grids, int8) are a convert; other
 * 7- and 8-bit tables are gathered. */
enum { LUT_PERM16, LUT_PERM32, LUT_PERM64, LUT_AFFINE, LUT_GATHER, LUT_PLANES5, LUT_PLANES6, LUT_CODES };
typedef struct {
    __m512 t0, t1, t2, t3, a0, da;
    const float *levels;
    int mode;
} lutreg;
static inline lutreg lutreg_load_avx512(const rbe_lut *m) {
    lutreg t;
    const float *lv = m->levels; /* 256 entries, unused ones zero */
    t.t0 = _mm512_loadu_ps(lv), t.t1 = _mm512_loadu_ps(lv + 16);
    t.t2 = _mm512_loadu_ps(lv + 32), t.t3 = _mm512_loadu_ps(lv + 48);
    t.a0 = _mm512_set1_ps(m->a0), t.da = _mm512_set1_ps(m->da);
    t.levels = lv;
    if (m->kind == RBE_LUT_NIBBLE) t.mode = LUT_PERM16;
    else if (m->kind == RBE_LUT_PLANES) t.mode = m->bits == 5 ? LUT_PLANES5 : LUT_PLANES6;
    else if (m->affine) t.mode = LUT_AFFINE;
    else if (m->bits <= 5) t.mode = LUT_PERM32;
    else if (m->bits == 6) t.mode = LUT_PERM64;
    else t.mode = LUT_GATHER;
    return t;
}
static inline lutreg lutreg_codes_avx512(lutreg t) {
    t.mode = LUT_CODES;
    return t;
}
static inline __m512 lut_bytes16(const lutreg *t, const uint8_t *p) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    switch (t->mode) {
        case LUT_PERM32: return _mm512_permutex2var_ps(t->t0, idx, t->t1);
        case LUT_PERM64: {
            const __m512 lo = _mm512_permutex2var_ps(t->t0, idx, t->t1);
            const __m512 hi = _mm512_permutex2var_ps(t->t2, idx, t->t3);
            return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), lo, hi);
        }
        case LUT_AFFINE: return _mm512_fmadd_ps(_mm512_cvtepi32_ps(idx), t->da, t->a0);
        case LUT_CODES: return _mm512_cvtepi32_ps(idx);
        default: return _mm512_i32gather_ps(idx, t->levels, 4);
    }
}
static inline void lut_block32_avx512(const rbe_lut *m, const lutreg *t, const uint8_t *p,
                                      __m512 *out) {
    (void)m;
    if (t->mode == LUT_PERM16) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
        out[0] = _mm512_permutexvar_ps(b, t->t0); /* vpermps reads the low 4 index bits */
        out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t->t0);
    } else if (t->mode == LUT_PLANES5 || t->mode == LUT_PLANES6) {
        /* low nibble through 16-entry tables; the high bits, as masks, pick the table */
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
        const __m512i idx[2] = {b, _mm512_srli_epi32(b, 4)};
        uint32_t w0, w1 = 0;
        memcpy(&w0, p + 16, 4);
        if (t->mode == LUT_PLANES6) memcpy(&w1, p + 20, 4);
        for (int h = 0; h < 2; h++) {
            const __mmask16 k0 = (__mmask16)(w0 >> (16 * h)), k1 = (__mmask16)(w1 >> (16 * h));
            const __m512 lo = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(idx[h], t->t0), k0, idx[h], t->t1);
            if (t->mode == LUT_PLANES5) {
                out[h] = lo;
            } else {
                const __m512 hi = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(idx[h], t->t2), k0, idx[h], t->t3);
                out[h] = _mm512_mask_blend_ps(k1, lo, hi);
            }
        }
    } else {
        out[0] = lut_bytes16(t, p);
        out[1] = lut_bytes16(t, p + 16);
    }
}

#define half_to_float(h) _cvtsh_ss(h)

#include "kern_impl.h"
