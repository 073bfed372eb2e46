/* AVX-512 (F + BW, and F16C) path. Compiled on its own with -mavx512f -mavx512bw -mf16c; only
 * reached through rbe_kernels_for (dispatch.c), which checks the CPU with __builtin_cpu_supports.
 * The int8 product alone also needs VNNI (its own target attribute, not a file flag: nothing
 * else here may use it); without VNNI, dispatch.c hands out rbe_kernels_avx512_noq8. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "rbe_internal.h"

#ifdef RBE_AVX512_VBMI /* kernels_avx512vbmi.c */
#define ISA_SUFFIX avx512vbmi
#else
#define ISA_SUFFIX avx512
#endif
#define VLEN 16
#define GEMV_ROWS 4
#define GRAD_BATCH 8
#define GEMM_MR 8
/* lut_gemv_few: 2 tokens x 4 rows per pass measured faster than 4 x 2 at 2, 4 and 8 tokens
 * (4096 x 4096, one thread: 1.8x, 1.2x, 1.3x); a pass never computes tokens it was not given past
 * the next even count */
#define FEW_TOKENS 2
#define FEW_ROWS 4
#define VF __m512

#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vload_part(p, k) _mm512_maskz_loadu_ps((__mmask16)((1u << (k)) - 1), (p))
#define vstore(p, v) _mm512_storeu_ps((p), (v))
#define vset1(f) _mm512_set1_ps(f)
#define vadd(a, b) _mm512_add_ps((a), (b))
#define vmul(a, b) _mm512_mul_ps((a), (b))
#define vfma(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define vhsum(v) _mm512_reduce_add_ps(v)
#define vdiv(a, b) _mm512_div_ps((a), (b))
#define vload_h(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define vload_i8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define vstore_h(p, v) _mm256_storeu_si256((__m256i *)(p), _mm512_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT))
#define vsub(a, b) _mm512_sub_ps((a), (b))
#define vmax(a, b) _mm512_max_ps((a), (b))
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
 * 7- and 8-bit tables are gathered (eight permutes and seven blends for 256 levels measured
 * slower), trellis windows too, straight from their 32-bit words; with VBMI, trellis windows
 * whose levels are the integers lv8 are cut by byte permutes and looked up as bytes (TRELLIS8). */
enum { LUT_PERM16, LUT_PERM32, LUT_PERM64, LUT_AFFINE, LUT_GATHER, LUT_PLANES5, LUT_PLANES6, LUT_CODES, LUT_TRELLIS8 };
typedef struct {
    __m512 t0, t1, t2, t3, a0, da;
    __m512i tbyte[2], tshift[2]; /* TRELLIS: each window's byte in the block, and bit in that byte */
#ifdef RBE_AVX512_VBMI
    __m512i lv8[4];        /* TRELLIS8: the byte table, 64 entries a register */
    __m256i wbyte, wshift; /* TRELLIS8: trellis_windows' controls */
    __mmask32 wload;
    __m512i wbyte64, wshift64; /* TRELLIS8: lut_block64's */
    __mmask64 wload64;
#endif
    const float *levels;
    int mode;
} lutreg;
#ifdef RBE_AVX512_VBMI
/* The controls that cut 64 windows of tbits bits a code (trellis_windows' for 32: their low
 * halves): qword k gets bytes k * tbits .. k * tbits + 7 of the blocks (from its first window's),
 * and in each qword window i starts at bit i * tbits; trellis_reach(tbits, n) masks the bytes n
 * windows read (within a row's padding). */
static inline __m512i trellis_bytes(int tbits) {
    const uint64_t step = (uint64_t)tbits * 0x0101010101010101ull, first = 0x0706050403020100ull;
    return _mm512_set_epi64((long long)(first + 7 * step), (long long)(first + 6 * step), (long long)(first + 5 * step),
                            (long long)(first + 4 * step), (long long)(first + 3 * step), (long long)(first + 2 * step),
                            (long long)(first + step), (long long)first);
}
static inline __m512i trellis_shifts(int tbits) {
    return _mm512_set1_epi64((long long)((uint64_t)tbits * 0x0706050403020100ull));
}
static inline uint64_t trellis_reach(int tbits, int n) {
    return ((uint64_t)1 << ((n / 8 - 1) * tbits + 8)) - 1u;
}
/* The 32 windows (codes) of the TRELLIS block at p. */
static inline __m256i trellis_windows(__m256i wbyte, __m256i wshift, __mmask32 wload, const uint8_t *p) {
    return _mm256_multishift_epi64_epi8(wshift, _mm256_permutexvar_epi8(wbyte, _mm256_maskz_loadu_epi8(wload, p)));
}
/* Bytes tab[idx] for 64 byte indices, tab in four registers of 64. */
static inline __m512i bytes_through(const __m512i *tab, __m512i idx) {
    const __m512i lo = _mm512_permutex2var_epi8(tab[0], idx, tab[1]), hi = _mm512_permutex2var_epi8(tab[2], idx, tab[3]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi);
}
#endif
static inline lutreg lutreg_load_avx512(const rbe_lut *m) {
    lutreg t;
    const float *lv = m->levels; /* 256 entries, unused ones zero */
    t.t0 = _mm512_loadu_ps(lv), t.t1 = _mm512_loadu_ps(lv + 16);
    t.t2 = _mm512_loadu_ps(lv + 32), t.t3 = _mm512_loadu_ps(lv + 48);
    t.a0 = _mm512_set1_ps(m->a0), t.da = _mm512_set1_ps(m->da);
    t.levels = lv;
    for (int h = 0; h < 2 && m->kind == RBE_LUT_TRELLIS; h++) {
        const __m512i bit = _mm512_mullo_epi32(
            _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(16 * h)),
            _mm512_set1_epi32(m->tbits));
        t.tbyte[h] = _mm512_srli_epi32(bit, 3), t.tshift[h] = _mm512_and_si512(bit, _mm512_set1_epi32(7));
    }
    if (m->kind == RBE_LUT_NIBBLE) t.mode = LUT_PERM16;
    else if (m->kind == RBE_LUT_PLANES) t.mode = m->bits == 5 ? LUT_PLANES5 : LUT_PLANES6;
    else if (m->affine) t.mode = LUT_AFFINE;
    else if (m->bits <= 5) t.mode = LUT_PERM32;
    else if (m->bits == 6) t.mode = LUT_PERM64;
    else t.mode = LUT_GATHER;
#ifdef RBE_AVX512_VBMI
    if (m->kind == RBE_LUT_TRELLIS && rbe_lut_integer_levels(m)) {
        t.mode = LUT_TRELLIS8;
        for (int k = 0; k < 4; k++) t.lv8[k] = _mm512_loadu_si512((const void *)(m->lv8 + 64 * k));
        t.wbyte64 = trellis_bytes(m->tbits), t.wshift64 = trellis_shifts(m->tbits);
        t.wload64 = trellis_reach(m->tbits, 64), t.wload = (__mmask32)trellis_reach(m->tbits, 32);
        t.wbyte = _mm512_castsi512_si256(t.wbyte64), t.wshift = _mm512_castsi512_si256(t.wshift64);
    }
#endif
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
#ifdef RBE_AVX512_VBMI
    if (t->mode == LUT_TRELLIS8) {
        const __m512i v = bytes_through(t->lv8, _mm512_castsi256_si512(trellis_windows(t->wbyte, t->wshift, t->wload, p)));
        out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(v)));
        out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1)));
        return;
    }
#endif
    if (m->kind == RBE_LUT_TRELLIS) { /* each window from the 32-bit word at its byte */
        for (int h = 0; h < 2; h++) {
            const __m512i word = _mm512_i32gather_epi32(t->tbyte[h], (const void *)p, 1);
            const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(word, t->tshift[h]), _mm512_set1_epi32(255));
            out[h] = _mm512_i32gather_ps(idx, t->levels, 4);
        }
    } else if (t->mode == LUT_PERM16) {
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

#ifdef RBE_AVX512_VBMI
/* lut_impl.h's optional wide blocks: the 64 level values of two consecutive 32-column blocks at
 * p, for TRELLIS8 tables (lut_wide): one byte permute, shift and lookup for both. */
#define lut_wide(t) ((t)->mode == LUT_TRELLIS8)
/* one token on int8 (2048 x 2048, 1 thread): nibbles 226 us against 349 in float32, trellis 4-bit
 * 330 against 419; 6-bit planes 642 against 591 (q8_panel's unpacking): float32 */
#define Q8_ONE_KINDS (1 << RBE_LUT_NIBBLE | 1 << RBE_LUT_TRELLIS)
/* Two trellis blocks' 64 windows, in column order, through the byte table tab (four registers),
 * with the controls trellis_bytes, trellis_shifts and trellis_reach(tbits, 64) give: lut_block64's
 * levels, q8_trellis_row's and lut_gemv_q8's (Q8_TRELLIS_PAIR) weight bytes. */
#define Q8_TRELLIS_PAIR 1
static inline __m512i q8_trellis_pair(const __m512i *tab, __m512i wbyte, __m512i wshift, __mmask64 wload,
                                      const uint8_t *p) {
    const __m512i src = _mm512_maskz_loadu_epi8(wload, p);
    return bytes_through(tab, _mm512_multishift_epi64_epi8(wshift, _mm512_permutexvar_epi8(wbyte, src)));
}
/* lut_gemv_q8's 4-bit trellis quads (Q8_TRELLIS_QUAD): the 128 windows of four blocks at p (load:
 * the bytes the quad's blocks hold) through the byte table tab, without permutes to cut them:
 * window 2i is stream byte i, window 2i + 1 the byte between i and i + 1 (both 64-bit lanes
 * shifted by 4, the next lane's low nibble from a load one byte on); lo gets the even windows,
 * hi the odd ones (q8_quad_inputs' parity order). */
#define Q8_TRELLIS_QUAD 1
static inline void q8_trellis_quad(const __m512i *tab, const uint8_t *p, __mmask64 load, __m512i *lo, __m512i *hi) {
    const __m512i even = _mm512_maskz_loadu_epi8(load, p), next = _mm512_maskz_loadu_epi8(load, p + 1);
    const __m512i top = _mm512_set1_epi64((long long)0xf000000000000000ull); /* a lane's last nibble */
    const __m512i odd = _mm512_ternarylogic_epi64(top, _mm512_slli_epi64(next, 4), _mm512_srli_epi64(even, 4), 0xca);
    *lo = bytes_through(tab, even);
    *hi = bytes_through(tab, odd);
}
static inline void lut_block64_avx512vbmi(const lutreg *t, const uint8_t *p, __m512 *out) {
    const __m512i v = q8_trellis_pair(t->lv8, t->wbyte64, t->wshift64, t->wload64, p);
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(v)));
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1)));
    out[2] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 2)));
    out[3] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 3)));
}
#endif

#define half_to_float(h) _cvtsh_ss(h)

/* Int8 product (lut_impl.h): vpdpbusd, unsigned weight bytes (lv8 + 128) times signed inputs;
 * each block's accumulator starts at -128 * sum(x8) (in the pack), which cancels the zero point
 * exactly. */
#ifndef RBE_AVX512_VBMI /* dispatch.c hands the VBMI path out only with VNNI */
#define Q8_OPTIONAL 1
#endif
/* decode steps of 2 sequences run each token through lut_gemv_q8 rather than lut_gemv_few in
 * float32 (lut_gemm_q8's int8 tiles start at 3); AMD EPYC Zen 4, 2 threads, best step ms of 12-30
 * in a noisy hour, one by one / as before: 1B hadamard 4-bit k = 2: 44-53 / 70, 3: 65-70 / 94-98,
 * 4: 82-85 / 95-101, 6: 119-121 / 97-107; SmolLM2 int4 k = 2: 8.0-10.0 / 13.7-13.9, 4: 15.3-15.7 /
 * 16.3-18.0; SmolLM2 trellis 4.25 k = 2: 10.5-12.7 / 16.1-20.0, 3: 16.1-20.3 / 16.1-18.9, 4:
 * 23.1-24.1 / 17.4-19.8: 3 and more stay in tiles. On Zen 4 lut_gemm_q8 costs about the same
 * from 3 to 16 tokens (1B hadamard 94-113 ms a step, against 53-62 at 8 on the Intel Xeon of
 * docs/serving.md); a pass on 256-bit vectors for tiles of at most 8 tokens did not change that
 * (docs/serving.md, end), so its idle lanes are not the cost. Nibble codes one by
 * one (q8_one_quads: 4 tokens a pass over the codes), AMD EPYC Zen 4, min of 3 rounds of 12-30
 * steps, quads / tiles: 1B hadamard 4-bit k = 3: 29-39 / 109, 8: 65-76 / 99, 12: 94 / 123;
 * SmolLM2 int4 k = 4: 8.9 / 15.6, 8: 17.2 / 16.7 (its 576-column rows pay per-row costs per token).
 * Tiles of at most 8 tokens hold several rows a token (Q8_LANE_ROWS), min of 2 rounds, before /
 * after: 1B trellis 4-bit k = 3: 99.7 / 52.3, 4: 101.7 / 52.9, 8: 103.8 / 65.4; SmolLM2 trellis
 * 4.25 k = 4: 16.9 / 13.3, 8: 18.6 / 15.3 (k = 2 one by one: 11.7, in lane groups 12.7). Nibble
 * codes run one by one to 5: quads / lane groups of two rows made straight from the codes
 * (q8_nibble_lanes2), 1B hadamard 4-bit k = 5: 46.5 / 52.2, 6: 54.6 / 52.1, 7: 61.5 / 51.4, 8: 65.9
 * / 52.5; SmolLM2 int4 k = 5: 10.4 / 9.7, 6: 12.1 / 9.8, 7: 13.4 / 10.0, 8: 15.7 / 10.6 (lane
 * groups of 4 rows, k = 3-4, are made through q8_panel and lose: 1B k = 4 34.6 / 65.4). */
#define Q8_ONE_TOKENS 2
#define Q8_ONE_NIBBLE_TOKENS 5
#define Q8_ATTR __attribute__((target("avx512vnni")))
#define Q8_MR 6
#define Q8_NV 2
#define Q8_MR1 10
#define Q8_ZP 128
#define VI __m512i
#define vi_load(p) _mm512_loadu_si512((const void *)(p))
#define vi_cvt(v) _mm512_cvtepi32_ps(v)
static inline Q8_ATTR __m512i vi_dot4(__m512i acc, const uint8_t *w, __m512i x) {
    int32_t w4;
    memcpy(&w4, w, 4);
    return _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(w4), x);
}
static inline Q8_ATTR __m512i vi_dot(__m512i acc, __m512i w, __m512i x) {
    return _mm512_dpbusd_epi32(acc, w, x);
}
/* lut_gemm_q8's lane groups (Q8_LANE_ROWS, lut_impl.h): rl of 2, 4 or 8 rows a vector. */
#define Q8_LANE_ROWS 1
#define vi_store(p, v) _mm512_storeu_si512((void *)(p), (v))
/* rl dwords at p (rl floats) in every group of rl lanes */
static inline __m512i vi_rows(const uint8_t *p, int rl) {
    if (rl == 2) {
        long long v;
        memcpy(&v, p, 8);
        return _mm512_set1_epi64(v);
    }
    if (rl == 4) return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p));
    return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
}
static inline __m512 vf_rows(const float *p, int rl) {
    if (rl == 2) return _mm512_castpd_ps(_mm512_set1_pd(*(const double *)p));
    if (rl == 4) return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd((const double *)p)));
}
/* lane l of the result: v's lane l / rl */
static inline __m512i vi_spread(__m512i v, int rl) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_permutexvar_epi32(_mm512_srl_epi32(lane, _mm_cvtsi32_si128(__builtin_ctz((unsigned)rl))), v);
}
/* blocks 32-byte blocks of rows[0..rl) interleaved: block k's dword q of row r at out + (k * 8 +
 * q) * 4 * rl + 4 * r. Two rows share a vector (the first's dwords in lanes 0-7); a 4 x 8 dword
 * transpose picks lanes (r / 2) * 16 + (r % 2) * 8 + q for lane q * 4 + r, and 8 rows are two of
 * those (rows 0-3 and 4-7) merged. */
static inline __m512i q8_row_pair(const uint8_t *a, const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}
static inline void q8_interleave(const uint8_t *const *rows, int rl, int64_t blocks, uint8_t *out) {
    const __m512i pair = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const __m512i lo4 = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
    const __m512i hi4 = _mm512_add_epi32(lo4, _mm512_set1_epi32(4));
    const __m512i lo8 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi8 = _mm512_add_epi32(lo8, _mm512_set1_epi32(8));
    for (int64_t k = 0; k < blocks; k++, out += 32 * rl) {
        const int64_t c = 32 * k;
        if (rl == 2) {
            _mm512_storeu_si512((void *)out, _mm512_permutexvar_epi32(pair, q8_row_pair(rows[0] + c, rows[1] + c)));
            continue;
        }
        const __m512i a = q8_row_pair(rows[0] + c, rows[1] + c), b = q8_row_pair(rows[2] + c, rows[3] + c);
        const __m512i p0 = _mm512_permutex2var_epi32(a, lo4, b), p1 = _mm512_permutex2var_epi32(a, hi4, b);
        if (rl == 4) {
            _mm512_storeu_si512((void *)out, p0);
            _mm512_storeu_si512((void *)(out + 64), p1);
            continue;
        }
        const __m512i e = q8_row_pair(rows[4] + c, rows[5] + c), f = q8_row_pair(rows[6] + c, rows[7] + c);
        const __m512i q0 = _mm512_permutex2var_epi32(e, lo4, f), q1 = _mm512_permutex2var_epi32(e, hi4, f);
        _mm512_storeu_si512((void *)out, _mm512_permutex2var_epi32(p0, lo8, q0));
        _mm512_storeu_si512((void *)(out + 64), _mm512_permutex2var_epi32(p0, hi8, q0));
        _mm512_storeu_si512((void *)(out + 128), _mm512_permutex2var_epi32(p1, lo8, q1));
        _mm512_storeu_si512((void *)(out + 192), _mm512_permutex2var_epi32(p1, hi8, q1));
    }
}
/* lut_gemv_q8's nibble blocks unpacked in registers (Q8_NIBBLE_PAIR): two blocks' weight bytes
 * through the 16-entry table t (in every 128-bit lane) come out as the low nibbles of both, then
 * the high ones; q8_pair_order puts inputs (bytes, or a dword's d or correction) in that order. */
#define Q8_NIBBLE_PAIR 1
static inline __m512i q8_nibble_pair(__m512i t, const uint8_t *p) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    return _mm512_shuffle_epi8(t, _mm512_and_si512(both, _mm512_set1_epi8(15)));
}
/* lut_gemv_q8's nibble quads (Q8_NIBBLE_QUAD): the code bytes at p of four blocks (or of the
 * first ones, the bytes load picks) through the 16-entry table t (in every 128-bit lane, so t[j] =
 * t[j & 15]) come out as the low nibbles' weight bytes (each block's columns 0-15) in lo and the
 * high ones' (16-31) in hi. VBMI looks the bytes up by vpermb, whose index ignores bits 6-7, and
 * t's repeats ignore bits 4-5: no masks. */
#define Q8_NIBBLE_QUAD 1
static inline void q8_nibble_quad(__m512i t, const uint8_t *p, __mmask64 load, __m512i *lo, __m512i *hi) {
    const __m512i v = _mm512_maskz_loadu_epi8(load, p), v4 = _mm512_srli_epi16(v, 4);
#ifdef RBE_AVX512_VBMI
    *lo = _mm512_permutexvar_epi8(v, t);
    *hi = _mm512_permutexvar_epi8(v4, t);
#else
    const __m512i k = _mm512_set1_epi8(15);
    *lo = _mm512_shuffle_epi8(t, _mm512_and_si512(v, k));
    *hi = _mm512_shuffle_epi8(t, _mm512_and_si512(v4, k));
#endif
}
/* q8_interleave's two-row layout made straight from two rows' nibble codes a and b (unrotated,
 * through the 16-entry table tab, by q8_nibble_quad): per four blocks, each row's low and high
 * nibbles looked up, the rows' dwords paired (block k's dword q of row r, q < 4 from the low
 * nibbles, else the high, at out + (k * 8 + q) * 8 + 4 * r), no column-order row in between. */
#define Q8_NIBBLE_LANES 1
static inline void q8_nibble_lanes2(const uint8_t *tab, const uint8_t *a, const uint8_t *b, int64_t blocks,
                                    uint8_t *out) {
    const __m512i t = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)tab));
    const __m512i pair0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i pair1 = _mm512_add_epi32(pair0, _mm512_set1_epi32(8));
    for (int64_t c = 0; c < blocks; c += 4, a += 64, b += 64, out += 256) {
        const int64_t n = blocks - c < 4 ? blocks - c : 4; /* blocks in this vector */
        const __mmask64 load = (__mmask64)(~0ull >> (64 - 16 * n));
        __m512i lo_a, hi_a, lo_b, hi_b;
        q8_nibble_quad(t, a, load, &lo_a, &hi_a);
        q8_nibble_quad(t, b, load, &lo_b, &hi_b);
        const __m512i lo[2] = {_mm512_permutex2var_epi32(lo_a, pair0, lo_b), _mm512_permutex2var_epi32(lo_a, pair1, lo_b)};
        const __m512i hi[2] = {_mm512_permutex2var_epi32(hi_a, pair0, hi_b), _mm512_permutex2var_epi32(hi_a, pair1, hi_b)};
        for (int64_t i = 0; i < n; i++) /* block i: its low dwords (two 128-bit lanes), then its high ones */
            _mm512_storeu_si512((void *)(out + 64 * i), i % 2 ? _mm512_shuffle_i64x2(lo[i / 2], hi[i / 2], 0xee)
                                                              : _mm512_shuffle_i64x2(lo[i / 2], hi[i / 2], 0x44));
    }
}
/* A quad's factors lane by lane: lane l gets st[sel[l]] where l is in lanes, else 0. */
static inline __m512 q8_quad_factors(__m512i sel, const float *st, __mmask16 lanes) {
    return _mm512_maskz_permutexvar_ps(lanes, sel, _mm512_castps128_ps512(_mm_loadu_ps(st)));
}
/* Four rows' sums: out[i] = the sum of a[i]'s lanes. */
static inline void vhsum4(const __m512 *a, float *out) {
    const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xee));
    const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xee));
    __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xdd));
    u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4e));
    u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xb1));
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), u)));
}
static inline __m512i q8_pair_order(__m512i v) {
    return _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7), v);
}
/* 64 signed bytes times H_rot per group (rbe_q8_rotate's butterflies, no zero point): each
 * byte's partner (index ^ h, within 16-byte lanes) by vpshufb; partner + self where bit h of the
 * index is clear, else partner - self. */
static inline __m512i q8_rotate64(__m512i v, int rot) {
    static const uint64_t upper[4] = {0xaaaaaaaaaaaaaaaaull, 0xccccccccccccccccull, 0xf0f0f0f0f0f0f0f0ull,
                                      0xff00ff00ff00ff00ull}; /* bytes whose index has bit h set */
    const __m512i lane = _mm512_set4_epi32(0x0f0e0d0c, 0x0b0a0908, 0x07060504, 0x03020100);
    for (int h = 1, s = 0; h < rot; h *= 2, s++) {
        const __m512i partner = _mm512_shuffle_epi8(v, _mm512_xor_si512(lane, _mm512_set1_epi8((char)h)));
        v = _mm512_mask_sub_epi8(_mm512_add_epi8(partner, v), (__mmask64)upper[s], partner, v);
    }
    return v;
}
static inline void q8_rotate(uint8_t *p, int64_t bytes, int rot, int zp) {
    int64_t c = 0;
    for (; c + 64 <= bytes; c += 64)
        _mm512_storeu_si512((void *)(p + c), _mm512_add_epi8(q8_rotate64(_mm512_loadu_si512((const void *)(p + c)), rot),
                                                             _mm512_set1_epi8((char)zp)));
    rbe_q8_rotate(p + c, bytes - c, rot, zp);
}
/* rbe_q8_nibble_row, four blocks per 64-byte vector: the low and high nibbles of each through
 * the table, then their 16-byte lanes interleaved back into column order; the last one to three
 * blocks through masked loads and stores. */
static inline void q8_nibble_row(const uint8_t *tab, const uint8_t *p, int64_t blocks, int rot, int zp,
                                 uint8_t *out) {
    const __m512i t = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)tab));
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int64_t b = 0; b < blocks; b += 4, p += 64, out += 128) {
        const int64_t n = blocks - b < 4 ? blocks - b : 4; /* blocks in this vector */
        __m512i lo, hi;
        q8_nibble_quad(t, p, (__mmask64)(~0ull >> (64 - 16 * n)), &lo, &hi);
        __m512i o[2] = {_mm512_permutex2var_epi64(lo, first, hi), _mm512_permutex2var_epi64(lo, second, hi)};
        for (int i = 0; i < 2 && 2 * i < n; i++) {
            if (rot > 1) o[i] = _mm512_add_epi8(q8_rotate64(o[i], rot), _mm512_set1_epi8((char)zp));
            _mm512_mask_storeu_epi8((void *)(out + 64 * i), (__mmask64)(n >= 2 * i + 2 ? ~0ull : ~0ull >> 32), o[i]);
        }
    }
}
/* rbe_q8_block on two vectors: vcvtps2dq rounds as lrintf (the current mode, ties to even). */
static inline float q8_block(const float *v, int rot, int8_t *x8, int32_t *sum, int32_t *lead) {
    const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128((__m128i *)x8, _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(x8 + 16), _mm512_cvtepi32_epi8(qb));
    const __m512i s = _mm512_add_epi32(qa, qb);
    const __mmask16 first = (__mmask16)(rot == 1 ? 0xffff : rot == 2 ? 0x5555 : rot == 4 ? 0x1111 : rot == 8 ? 0x0101 : 0x0001);
    *sum = _mm512_reduce_add_epi32(s);
    *lead = _mm512_mask_reduce_add_epi32(first, s);
    return amax / 127.0f;
}
#ifdef RBE_AVX512_VBMI
/* rbe_q8_trellis_row by byte permutes: 64 windows cut and looked up at a time. */
static inline void q8_trellis_row(const rbe_lut *m, const uint8_t *tab, const uint8_t *p, int64_t blocks, uint8_t *out) {
    __m512i t[4];
    for (int k = 0; k < 4; k++) t[k] = _mm512_loadu_si512((const void *)(tab + 64 * k));
    const __mmask64 wload = trellis_reach(m->tbits, 64);
    const __m512i wbyte = trellis_bytes(m->tbits), wshift = trellis_shifts(m->tbits);
    int64_t k = 0;
    for (; k + 2 <= blocks; k += 2, p += 2 * m->block_bytes, out += 64) {
        _mm512_storeu_si512((void *)out, q8_trellis_pair(t, wbyte, wshift, wload, p));
    }
    rbe_q8_trellis_row(m, tab, p, blocks - k, out);
}
#else
#define q8_trellis_row rbe_q8_trellis_row
#endif
/* 5- and 6-bit codes: the low nibble through 16-entry tables, the bit planes (masks) pick one. */
static inline void q8_planes(const rbe_lut *m, const uint8_t *tab, const uint8_t *p, uint8_t *out) {
    const int bits = m->bits;
    const __m128i b = _mm_loadu_si128((const __m128i *)p), k = _mm_set1_epi8(15);
    const __m512i idx = _mm512_castsi256_si512(_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), k), _mm_and_si128(b, k)));
    __m512i v[4];
    for (int h = 0; h < (bits == 5 ? 2 : 4); h++)
        v[h] = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tab + 16 * h))), idx);
    uint32_t m4, m5 = 0;
    memcpy(&m4, p + 16, 4);
    __m512i r = _mm512_mask_blend_epi8((__mmask64)m4, v[0], v[1]);
    if (bits == 6) {
        memcpy(&m5, p + 20, 4);
        r = _mm512_mask_blend_epi8((__mmask64)m5, r, _mm512_mask_blend_epi8((__mmask64)m4, v[2], v[3]));
    }
    _mm256_storeu_si256((__m256i *)out, _mm512_castsi512_si256(r));
}

#ifdef RBE_AVX512_VBMI /* the canonical-layout vocabulary above, under this path's names */
#define lutreg_load_avx512vbmi lutreg_load_avx512
#define lutreg_codes_avx512vbmi lutreg_codes_avx512
#define lut_block32_avx512vbmi lut_block32_avx512
#endif
#include "kern_impl.h"
