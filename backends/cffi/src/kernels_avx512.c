/* AVX-512 (F + BW, and F16C) path. Compiled on its own with -mavx512f -mavx512bw -mf16c; only called after the
 * dispatcher checked the CPU with __builtin_cpu_supports. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "rbe_internal.h"

#define ISA_SUFFIX avx512
#define VLEN 16
#define GEMV_ROWS 4
#define TILE_ROWS 4
#define TILE_BATCH 4
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

static inline __m512 load_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline void q4_unpack32(const uint8_t *p, __m512 *out) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)));
}
typedef __m512 lut16;
static inline lut16 lut16_load(const float *levels) { return _mm512_loadu_ps(levels); }
static inline void q4_lookup32(const uint8_t *p, lut16 t, __m512 *out) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    out[0] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), t);
    out[1] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), t);
}
static inline void halves_to_float(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i < n; i++) dst[i] = rbe_half_to_float(src[i]);
}

/* int4 batch-1 product with a per-(row, group) table: T[k] = k * scale + minimum (the exact
 * decoded values, since k * scale is exact in float32). vpermps picks w straight from the low
 * nibble of each byte (it ignores the upper index bits) and from the byte shifted right by 4,
 * giving even and odd columns; x is split into even/odd halves once per call to match. */
#define RBE_HAVE_INT4_GEMV
static void int4_gemv_avx512(const float *x, const uint8_t *q, const uint16_t *sh,
                             const uint16_t *mh, int64_t cols, int64_t gs, int64_t r0, int64_t r1,
                             float *y, float *scratch) {
    const int64_t cols_p = rbe_round_up(cols, gs), groups = cols_p / gs, half = cols_p / 2;
    float *sf = scratch, *mf = sf + GEMV_ROWS * groups, *xe = mf + GEMV_ROWS * groups;
    float *xo = xe + half;
    for (int64_t j = 0; j < half; j++) { /* padding columns meet x = 0 */
        xe[j] = 2 * j < cols ? x[2 * j] : 0.0f;
        xo[j] = 2 * j + 1 < cols ? x[2 * j + 1] : 0.0f;
    }
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t r = r0; r < r1; r += GEMV_ROWS) {
        const int nr = (int)rbe_min(GEMV_ROWS, r1 - r);
        const uint8_t *qr[GEMV_ROWS];
        const float *sr[GEMV_ROWS], *mr[GEMV_ROWS];
        __m512 acc[GEMV_ROWS][2];
        float tail[GEMV_ROWS];
        for (int i = 0; i < nr; i++) {
            halves_to_float(sh + (r + i) * groups, sf + i * groups, groups);
            halves_to_float(mh + (r + i) * groups, mf + i * groups, groups);
        }
        for (int i = 0; i < GEMV_ROWS; i++) {
            const int ii = i < nr ? i : nr - 1;
            qr[i] = q + (r + ii) * half;
            sr[i] = sf + ii * groups;
            mr[i] = mf + ii * groups;
            tail[i] = 0.0f;
            acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        }
        for (int64_t g = 0; g < groups; g++) {
            const int64_t ce = (g + 1) * gs;
            int64_t c = g * gs; /* even: group sizes are even */
            __m512 table[GEMV_ROWS];
            for (int i = 0; i < GEMV_ROWS; i++)
                table[i] = _mm512_fmadd_ps(iota, _mm512_set1_ps(sr[i][g]), _mm512_set1_ps(mr[i][g]));
            for (; c + 32 <= ce; c += 32) {
                const __m512 xev = _mm512_loadu_ps(xe + c / 2), xov = _mm512_loadu_ps(xo + c / 2);
                for (int i = 0; i < GEMV_ROWS; i++) {
                    const __m512i b =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr[i] + c / 2)));
                    const __m512 we = _mm512_permutexvar_ps(b, table[i]);
                    const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table[i]);
                    acc[i][0] = _mm512_fmadd_ps(we, xev, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(wo, xov, acc[i][1]);
                }
            }
            for (; c < rbe_min(ce, cols); c++) {
                for (int i = 0; i < nr; i++) {
                    const uint8_t b = qr[i][c >> 1];
                    const float qq = (float)((c & 1) ? (b >> 4) : (b & 15));
                    tail[i] += (qq * sr[i][g] + mr[i][g]) * x[c];
                }
            }
        }
        for (int i = 0; i < nr; i++)
            y[r + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])) + tail[i];
    }
}

/* hadamard 4-bit batch 1 with the same table trick: T[k] = levels[k] * step, the exact decoded
 * values (decode's own float32 arithmetic). x is split
 * into even/odd columns of each 32-column block once per call (into scratch). */
#define RBE_HAVE_HAD4_GEMV
static void had4_gemv_avx512(const float *xr, const uint8_t *codes, const uint8_t *sc,
                             const float *rs, const float *levels, int64_t cols_p, int64_t gs,
                             int64_t r0, int64_t r1, float *y, float *scratch) {
    const int64_t groups = cols_p / gs, qstride = cols_p / 2;
    for (int64_t c = 0; c < cols_p; c += 32)
        for (int t = 0; t < 16; t++) {
            scratch[c + t] = xr[c + 2 * t];
            scratch[c + 16 + t] = xr[c + 2 * t + 1];
        }
    const __m512 values = _mm512_loadu_ps(levels);
    for (int64_t r = r0; r < r1; r += GEMV_ROWS) {
        const int nr = (int)rbe_min(GEMV_ROWS, r1 - r);
        const uint8_t *qr[GEMV_ROWS], *sr[GEMV_ROWS];
        float rsr[GEMV_ROWS];
        __m512 acc[GEMV_ROWS][2];
        for (int i = 0; i < GEMV_ROWS; i++) {
            const int64_t ri = r + (i < nr ? i : nr - 1); /* tail rows repeat the last one */
            qr[i] = codes + ri * qstride;
            sr[i] = sc + ri * groups;
            rsr[i] = rs[ri];
            acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        }
        for (int64_t g = 0; g < groups; g++) {
            __m512 table[GEMV_ROWS];
            for (int i = 0; i < GEMV_ROWS; i++)
                table[i] = _mm512_mul_ps(values, _mm512_set1_ps(rsr[i] * (float)sr[i][g]));
            for (int64_t c = g * gs; c < (g + 1) * gs; c += 32) {
                const __m512 xev = _mm512_loadu_ps(scratch + c);
                const __m512 xov = _mm512_loadu_ps(scratch + c + 16);
                for (int i = 0; i < GEMV_ROWS; i++) {
                    const __m512i b =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr[i] + c / 2)));
                    const __m512 we = _mm512_permutexvar_ps(b, table[i]);
                    const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table[i]);
                    acc[i][0] = _mm512_fmadd_ps(we, xev, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(wo, xov, acc[i][1]);
                }
            }
        }
        for (int i = 0; i < nr; i++)
            y[r + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
    }
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
