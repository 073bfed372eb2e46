/* AVX2 + FMA + F16C path. Compiled on its own with -mavx2 -mfma -mf16c; only reached through
 * rbe_kernels_for (dispatch.c), which checks the CPU with __builtin_cpu_supports. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "rbe_internal.h"

#define ISA_SUFFIX avx2
#define VLEN 8
#define GEMV_ROWS 2
#define GRAD_BATCH 6
#define VF __m256

#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps((p), (v))
#define vset1(f) _mm256_set1_ps(f)
#define vadd(a, b) _mm256_add_ps((a), (b))
#define vmul(a, b) _mm256_mul_ps((a), (b))
#define vfma(a, b, c) _mm256_fmadd_ps((a), (b), (c))

#define vdiv(a, b) _mm256_div_ps((a), (b))
#define vload_h(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define vload_i8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define vstore_h(p, v) _mm_storeu_si128((__m128i *)(p), _mm256_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT))
#define vsub(a, b) _mm256_sub_ps((a), (b))
#define vmax(a, b) _mm256_max_ps((a), (b))
/* expf by Cephes' polynomial on [-ln2/2, ln2/2] and an exponent shift; inputs below -87 give 0. */
static inline __m256 vexp(__m256 x) {
    const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}
static inline float vhsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
/* 16-entry table: vpermps picks from 8 entries (low 3 index bits); bit 3 selects the half. */
typedef struct {
    __m256 lo, hi;
} lut16;
static inline lut16 lut16_load(const float *levels) {
    lut16 t = {_mm256_loadu_ps(levels), _mm256_loadu_ps(levels + 8)};
    return t;
}
static inline __m256 lookup8(__m128i bytes, lut16 t) {
    const __m256i idx = _mm256_cvtepu8_epi32(bytes);
    const __m256 high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx), high);
}
/* Trellis windows 8 at a time (8 codes' bytes in one 64-bit load, in both lanes): code j of
 * the 8 is (16 bits from byte (j * tbits) / 8) >> ((j * tbits) % 8), low 8 bits; cut and shift
 * come from trellis_cut. */
typedef struct {
    __m256i cut, shift;
} trellis_cut;
static inline trellis_cut trellis_cut_for(int tbits) {
    int8_t c[32];
    int32_t sh[8];
    for (int j = 0; j < 8; j++) { /* lane j: 32-bit element j % 4 of 128-bit half j / 4 */
        const int r = (j * tbits) >> 3;
        int8_t *lane = c + 16 * (j / 4) + 4 * (j % 4);
        lane[0] = (int8_t)r, lane[1] = (int8_t)(r + 1), lane[2] = lane[3] = (int8_t)0x80;
        sh[j] = (j * tbits) & 7;
    }
    trellis_cut t = {_mm256_loadu_si256((const __m256i *)c), _mm256_loadu_si256((const __m256i *)sh)};
    return t;
}
static inline __m256i trellis_codes8(const trellis_cut *t, const uint8_t *p) {
    const __m256i b = _mm256_broadcastq_epi64(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(b, t->cut), t->shift), _mm256_set1_epi32(255));
}
/* lut_gemv_q8's nibble blocks unpacked in registers (Q8_NIBBLE_BLOCK): one block's 32 weight
 * bytes through the 16-entry table t (in both 128-bit lanes), low nibbles (codes 0-15) first.
 * Narrow levels (all 16 within [-32, 31]: uniform 4-bit grids, int4) go in as lv8 +
 * Q8_NARROW_BIAS, unsigned, straight into vpmaddubsw: no sign trick, and two vpmaddubsw results
 * add in int16 before one vpmaddwd (each pair sums at most 2 * 63 * 127, two 32004 < 2^15); the
 * Q8_NARROW_BIAS * sum(x) they add per block is taken off with the input sums (beta). */
#define Q8_NIBBLE_BLOCK 1
#define Q8_NARROW_BIAS 32
/* A third form (lut_gemv_q8's `narrow` = Q8_RAW_NIBBLES): levels affine in the code in int8,
 * lv8 = l0 + dl * code (uniform grids: hadamard's 2 code - 15, int4's code - 8), take the codes
 * themselves as unsigned weight bytes (no table lookup: two byte shuffles fewer a block pair);
 * dl and l0 go to the factors and the input sums. */
#define Q8_RAW_NIBBLES 2
static inline int q8_raw_levels(const rbe_lut *m, int *l0, int *dl) {
    *l0 = m->lv8[0], *dl = m->lv8[1] - m->lv8[0];
    for (int k = 0; k < 1 << m->bits; k++)
        if (m->lv8[k] != *l0 + k * *dl) return 0;
    return *dl != 0;
}
static inline int q8_narrow_levels(const rbe_lut *m) {
    for (int k = 0; k < 16; k++)
        if (m->lv8[k] < -Q8_NARROW_BIAS || m->lv8[k] >= Q8_NARROW_BIAS) return 0;
    return 1;
}
static inline __m256i q8_nibble_table(const uint8_t *tab, int narrow) {
    return _mm256_add_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tab)),
                           _mm256_set1_epi8(narrow ? Q8_NARROW_BIAS : 0));
}
/* x's four-byte dot products with unsigned weight bytes w (each below 128), per lane. */
static inline __m256i q8_dot_unsigned(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
/* A block's 32 codes' low nibbles as bytes in code order: 16 bytes at p, low nibbles (codes
 * 0-15) in the first 128-bit half, high nibbles (codes 16-31) in the second. */
static inline __m256i nibble_codes32(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), k = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), k), _mm_and_si128(v, k));
}
/* 32 bytes of a 16-entry table (16 bytes at tab) picked by idx's bytes (each below 16). */
static inline __m256i table16(const uint8_t *tab, __m256i idx) {
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tab)), idx);
}
static inline __m256i q8_nibble_block(__m256i t, const uint8_t *p) {
    return _mm256_shuffle_epi8(t, nibble_codes32(p));
}
/* Byte masks of a 32-bit little-endian word's bits: byte j is 0xff where bit j is set. */
static inline __m256i bit_bytes(const uint8_t *word) {
    uint32_t w;
    memcpy(&w, word, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w),
                                               _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2,
                                                                2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}
/* Canonical layout: nibble codes through the two-register table above; byte codes (and 5- and
 * 6-bit codes with affine levels, their high bits from the bit planes by compares) through a
 * convert when the levels are affine in the code, else a gather; other 5- and 6-bit codes (code
 * bytes from nibbles and plane masks) through byte tables, one per byte of the float32 levels,
 * interleaved back into floats; trellis windows cut from their bytes by a byte shuffle and
 * shifts, then their levels gathered. */
typedef struct {
    lut16 t;
    __m256 a0, da;
    trellis_cut cut;             /* TRELLIS: how 8 windows are cut from their bytes */
    uint8_t lvb[4][64];          /* PLANES, levels not affine: byte q of level k at lvb[q][k] */
    const float *levels;
    int affine, codes;
} lutreg;
static inline lutreg lutreg_load_avx2(const rbe_lut *m) {
    lutreg t;
    t.t = lut16_load(m->levels);
    t.a0 = _mm256_set1_ps(m->a0), t.da = _mm256_set1_ps(m->da);
    t.levels = m->levels, t.affine = m->affine, t.codes = 0;
    for (int k = 0; m->kind == RBE_LUT_PLANES && k < 64; k++) {
        uint32_t v = 0;
        if (k < 1 << m->bits) memcpy(&v, m->levels + k, 4);
        for (int q = 0; q < 4; q++) t.lvb[q][k] = (uint8_t)(v >> (8 * q));
    }
    if (m->kind == RBE_LUT_TRELLIS) t.cut = trellis_cut_for(m->tbits);
    return t;
}
static inline lutreg lutreg_codes_avx2(lutreg t) {
    t.codes = 1;
    return t;
}
/* The levels of 8 codes (int32 lanes). */
static inline __m256 lut_levels8(const lutreg *t, __m256i idx) {
    if (t->codes) return _mm256_cvtepi32_ps(idx);
    if (t->affine) return _mm256_fmadd_ps(_mm256_cvtepi32_ps(idx), t->da, t->a0);
    return _mm256_i32gather_ps(t->levels, idx, 4);
}
static inline __m256 lut_bytes8(const lutreg *t, const uint8_t *p) {
    return lut_levels8(t, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
/* The bytes of a 32- or 64-entry table (tab) for a 5- or 6-bit block's 32 codes: the low nibble
 * through 16-entry tables, the bit planes (byte masks) pick one. */
static inline __m256i planes_bytes(const rbe_lut *m, const uint8_t *tab, const uint8_t *p) {
    const __m256i idx = nibble_codes32(p), m4 = bit_bytes(p + 16);
    const __m256i r = _mm256_blendv_epi8(table16(tab, idx), table16(tab + 16, idx), m4);
    if (m->bits == 5) return r;
    return _mm256_blendv_epi8(r, _mm256_blendv_epi8(table16(tab + 32, idx), table16(tab + 48, idx), m4), bit_bytes(p + 20));
}
/* The float32 levels of a 5- or 6-bit block's 32 codes (non-affine levels): each byte of the
 * levels looked up per code (low nibble by vpshufb, the plane bits pick among the 16-entry
 * tables), the four bytes interleaved into floats (codes 0-3 and 16-19 in the first vector),
 * then the 128-bit halves put back in code order. */
static inline void planes_levels32(const rbe_lut *m, const lutreg *t, const uint8_t *p, __m256 *out) {
    __m256i lv[4];
    for (int q = 0; q < 4; q++) lv[q] = planes_bytes(m, t->lvb[q], p);
    const __m256i u0 = _mm256_unpacklo_epi8(lv[0], lv[1]), u1 = _mm256_unpackhi_epi8(lv[0], lv[1]);
    const __m256i v0 = _mm256_unpacklo_epi8(lv[2], lv[3]), v1 = _mm256_unpackhi_epi8(lv[2], lv[3]);
    const __m256i f0 = _mm256_unpacklo_epi16(u0, v0), f1 = _mm256_unpackhi_epi16(u0, v0);
    const __m256i f2 = _mm256_unpacklo_epi16(u1, v1), f3 = _mm256_unpackhi_epi16(u1, v1);
    out[0] = _mm256_castsi256_ps(_mm256_permute2x128_si256(f0, f1, 0x20));
    out[1] = _mm256_castsi256_ps(_mm256_permute2x128_si256(f2, f3, 0x20));
    out[2] = _mm256_castsi256_ps(_mm256_permute2x128_si256(f0, f1, 0x31));
    out[3] = _mm256_castsi256_ps(_mm256_permute2x128_si256(f2, f3, 0x31));
}
static inline void lut_block32_avx2(const rbe_lut *m, const lutreg *t, const uint8_t *p,
                                    __m256 *out) {
    if (m->kind == RBE_LUT_NIBBLE) {
        const __m128i b = _mm_loadu_si128((const __m128i *)p), k = _mm_set1_epi8(15);
        const __m128i lo = _mm_and_si128(b, k), hi = _mm_and_si128(_mm_srli_epi16(b, 4), k);
        out[0] = lookup8(lo, t->t);
        out[1] = lookup8(_mm_srli_si128(lo, 8), t->t);
        out[2] = lookup8(hi, t->t);
        out[3] = lookup8(_mm_srli_si128(hi, 8), t->t);
    } else if (m->kind == RBE_LUT_TRELLIS) {
        for (int k = 0; k < 4; k++) {
            out[k] = _mm256_i32gather_ps(t->levels, trellis_codes8(&t->cut, p + k * m->tbits), 4);
        }
    } else if (m->kind == RBE_LUT_PLANES && !m->affine) {
        planes_levels32(m, t, p, out);
    } else if (m->kind == RBE_LUT_PLANES) { /* low nibbles as NIBBLE's, each higher bit from its plane */
        const __m128i b = _mm_loadu_si128((const __m128i *)p), k15 = _mm_set1_epi8(15);
        const __m128i nib[2] = {_mm_and_si128(b, k15), _mm_and_si128(_mm_srli_epi16(b, 4), k15)};
        const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (int q = 0; q < 4; q++) { /* codes 8q .. 8q + 7 */
            __m256i idx = _mm256_cvtepu8_epi32(q % 2 ? _mm_srli_si128(nib[q / 2], 8) : nib[q / 2]);
            for (int k = 0; k < m->bits - 4; k++) {
                uint32_t w;
                memcpy(&w, p + 16 + 4 * k, 4);
                const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)(w >> (8 * q))), lane), lane);
                idx = _mm256_or_si256(idx, _mm256_and_si256(set, _mm256_set1_epi32(16 << k)));
            }
            out[q] = lut_levels8(t, idx);
        }
    } else {
        for (int k = 0; k < 4; k++) out[k] = lut_bytes8(t, p + 8 * k);
    }
}

#define half_to_float(h) _cvtsh_ss(h)

/* Int8 product (lut_impl.h) without VNNI: signed weight bytes (lv8) and llama.cpp's pairing,
 * vpmaddubsw(|w|, sign(x, w)) then vpmaddwd by ones: a pair sums at most 2 * 128 * 127 < 2^15,
 * so nothing saturates. */
#define Q8_MR 4
/* one token: 4 rows a pass share the inputs' loads and the groups' bookkeeping (1B hadamard
 * 4-bit 31-33 -> 37 tok/s against 2 rows, AMD EPYC; 6 rows no faster, 8 slower) */
#define Q8_ONE_ROWS 4
/* out[i] = the sum of a[i]'s lanes, the pass's four rows at once. */
_Static_assert(Q8_ONE_ROWS == 4, "vhsum_rows reduces four rows");
static inline void vhsum_rows(const __m256 *a, float *out) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}
/* decode steps of up to 4 sequences run each token through lut_gemv_q8 (the pass's codes in L1
 * after the first) rather than a tile of lut_gemm_q8 (AMD EPYC, 2 threads, step ms one by one /
 * tiled): 1B hadamard 4-bit k = 2: 38.5 / 354 (float32: 2 tokens were below lut_gemm_q8's 3),
 * 4: 73 / 123, 6: 105 / 127, 8: 145 / 131; 1B int4 k = 4: 106 / 144, 6: 144 / 155; SmolLM2
 * int4 k = 2: 10.1 / 46 (float32), 4: 18.4 / 21.0, 6: 26.1 / 20.4. Up to 6 made rbe serve's 8
 * streams (SmolLM2 int4) slower than up to 4: 169 / 157 against 177 / 173 tok/s. */
#define Q8_ONE_TOKENS 4
/* two tiles share each broadcast weight dword, and a slice's pack of every token may fill 96 KB
 * (L2: longer passes, fewer group ends); 128 tokens, AMD EPYC, before / after (with the band's
 * sums stored token by token), 3 alternations: 2 threads, SmolLM2 int4 prefill 233-248 /
 * 177-201 ms, flagship 4.25 218-224 / 196-221; 1 thread, 1B attn_q hadamard 9.8-10.0 / 7.8-8.0
 * ms, int4 15.0-15.4 / 11.5-11.7 */
#define Q8_NV 2
#define Q8_L1 (96 << 10)
/* one token on int8 (2048 x 2048, 2 threads, AMD EPYC): trellis 4-bit 1.19 ms against 1.33 in
 * float32 (both cut windows by trellis_codes8; float32 then gathers float levels) */
#define Q8_ONE_KINDS ((1 << RBE_LUT_NIBBLE) | (1 << RBE_LUT_BYTE) | (1 << RBE_LUT_TRELLIS) | (1 << RBE_LUT_PLANES))
#define Q8_ZP 0
#define VI __m256i
#define vi_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vi_cvt(v) _mm256_cvtepi32_ps(v)
static inline __m256i vi_dot4(__m256i acc, const uint8_t *w, __m256i x) {
    int32_t w4;
    memcpy(&w4, w, 4);
    const __m256i wv = _mm256_set1_epi32(w4);
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(x, wv));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
static inline __m256i vi_dot(__m256i acc, __m256i w, __m256i x) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
/* Two consecutive nibble blocks at once: their 32 code bytes split into low nibbles (block k's
 * codes 0-15, then block k + 1's) and high nibbles (codes 16-31 of each), each through the table
 * and met by the inputs in that order (q8_pair_inputs: x[0] and x[1], their absolute values x[2]
 * and x[3], and the blocks' d four lanes each), so each lane sums one block: one convert and one
 * multiply-add for both. Signed levels meet |x| as sign(w, x) (llama.cpp's pairing turned
 * round: |x| is shared by the pass's rows), which needs every level above -128
 * (q8_signed_pair_levels). The zero-point corrections are 0 here (Q8_ZP). */
static inline void q8_pair_inputs(const int8_t *x8, const float *d8, __m256i *x, __m256 *d) {
    const __m256i a = _mm256_loadu_si256((const __m256i *)x8), b = _mm256_loadu_si256((const __m256i *)(x8 + 32));
    x[0] = _mm256_permute2x128_si256(a, b, 0x20), x[1] = _mm256_permute2x128_si256(a, b, 0x31);
    x[2] = _mm256_abs_epi8(x[0]), x[3] = _mm256_abs_epi8(x[1]);
    *d = _mm256_blend_ps(_mm256_loadu_ps(d8), _mm256_loadu_ps(d8 + 8), 0xF0);
}
static inline int q8_signed_pair_levels(const rbe_lut *m) {
    for (int k = 0; k < 16; k++)
        if (m->lv8[k] == -128) return 0;
    return 1;
}
static inline __m256i q8_nibble_pair_dot(__m256i t, const uint8_t *p, const __m256i *x, int narrow) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p), k = _mm256_set1_epi8(15), one = _mm256_set1_epi16(1);
    __m256i lo = _mm256_and_si256(v, k), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), k);
    if (narrow != Q8_RAW_NIBBLES) lo = _mm256_shuffle_epi8(t, lo), hi = _mm256_shuffle_epi8(t, hi);
    if (narrow)
        return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, x[0]), _mm256_maddubs_epi16(hi, x[1])), one);
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(x[2], _mm256_sign_epi8(lo, x[0])), one),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(x[3], _mm256_sign_epi8(hi, x[1])), one));
}
#define Q8_NARROW 1
static inline __m256i vi_dot4_narrow(__m256i acc, const uint8_t *w, __m256i x) {
    int32_t w4;
    memcpy(&w4, w, 4);
    return _mm256_add_epi32(acc, q8_dot_unsigned(_mm256_set1_epi32(w4), x));
}
static inline __m256i q8_nibble_block_dot(__m256i z, __m256i t, const uint8_t *p, __m256i x, int narrow) {
    const __m256i w = narrow == Q8_RAW_NIBBLES ? nibble_codes32(p) : q8_nibble_block(t, p);
    return narrow ? _mm256_add_epi32(z, q8_dot_unsigned(w, x)) : vi_dot(z, w, x);
}
/* lut_gemm_q8's weight forms (Q8_WEIGHT_FORMS, lut_impl.h's Q8_WEIGHTS_*): narrow bytes two
 * dwords at a time, their vpmaddubsw results added in int16 before one vpmaddwd (two of 2 * 63 *
 * 127 fit, as in q8_nibble_pair_dot); signed bytes as vpmaddubsw(|x|, sign(w, x)), |x| made once
 * for a pass's rows (every byte above -128: sign cannot negate -128). */
#define Q8_WEIGHT_FORMS 1
static inline __m256i vi_dot8_narrow(__m256i acc, const uint8_t *w, __m256i x0, __m256i x1) {
    int32_t w0, w1;
    memcpy(&w0, w, 4), memcpy(&w1, w + 4, 4);
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_set1_epi32(w0), x0), _mm256_maddubs_epi16(_mm256_set1_epi32(w1), x1));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#define vi_abs(x) _mm256_abs_epi8(x)
static inline __m256i vi_dot4_abs(__m256i acc, const uint8_t *w, __m256i x, __m256i ax) {
    int32_t w4;
    memcpy(&w4, w, 4);
    const __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(_mm256_set1_epi32(w4), x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
/* 5- and 6-bit codes' weight bytes (planes_bytes). */
static inline void q8_planes(const rbe_lut *m, const uint8_t *tab, const uint8_t *p, uint8_t *out) {
    _mm256_storeu_si256((__m256i *)out, planes_bytes(m, tab, p));
}
/* One token of 5- and 6-bit codes on 16-bit levels (Q8_PLANES16, rbe_lut's lv16): a block's 32
 * codes' lv16 through two byte tables (planes_bytes of their low and high bytes), interleaved
 * into int16 (codes 0-7 and 16-23, then 8-15 and 24-31), met by vpmaddwd with the block's 16-bit
 * inputs (RBE_Q8_X16, stored in that order). */
#define Q8_PLANES16 1
typedef struct {
    uint8_t lo[64], hi[64];
} planes16_tables;
static inline planes16_tables planes16_tables_for(const rbe_lut *m) {
    planes16_tables t;
    for (int k = 0; k < 64; k++) t.lo[k] = (uint8_t)m->lv16[k], t.hi[k] = (uint8_t)((uint16_t)m->lv16[k] >> 8);
    return t;
}
/* max |v| of a block's 32 values. */
static inline float block_amax(const float *v) {
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(v + 8 * k), abs));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}
/* A block's 16-bit input (RBE_Q8_X16) from its 32 values v, rounded as q8_block rounds. */
static inline void q8_x16(const float *v, int16_t *x16) {
    const float amax = block_amax(v);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f), k254 = _mm256_set1_ps(254.0f);
    __m256i r[4]; /* columns 8k .. 8k + 7 */
    for (int k = 0; k < 4; k++) {
        const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(v + 8 * k), inv);
        const __m256i q = _mm256_cvtps_epi32(t);
        const __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(t, _mm256_cvtepi32_ps(q)), k254));
        r[k] = _mm256_add_epi32(_mm256_mullo_epi32(q, _mm256_set1_epi32(254)), e);
    }
    /* packs interleaves 128-bit lanes: columns 0-3, 16-19, 4-7, 20-23; the permute restores 0-7, 16-23 */
    _mm256_storeu_si256((__m256i *)x16, _mm256_permute4x64_epi64(_mm256_packs_epi32(r[0], r[2]), 0xD8));
    _mm256_storeu_si256((__m256i *)(x16 + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(r[1], r[3]), 0xD8));
}
static inline __m256i q8_planes16_dot(const rbe_lut *m, const planes16_tables *t, const uint8_t *p, const int16_t *x) {
    const __m256i lo = planes_bytes(m, t->lo, p), hi = planes_bytes(m, t->hi, p);
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi8(lo, hi), _mm256_loadu_si256((const __m256i *)x)),
                            _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, hi), _mm256_loadu_si256((const __m256i *)(x + 16))));
}
/* rbe_q8_trellis_row: windows cut as above, their weight bytes gathered from lv8 (tab is lv8
 * here: Q8_ZP is 0, and rows are rotated after this), packed to bytes in code order. lv8 is
 * followed by other fields of rbe_lut, so the 32-bit gathers at lv8 + 255 stay inside it. */
_Static_assert(Q8_ZP == 0, "q8_trellis_row reads lv8 for tab");
static inline void q8_trellis_row(const rbe_lut *m, const uint8_t *tab, const uint8_t *p, int64_t blocks, uint8_t *out) {
    (void)tab;
    const trellis_cut t = trellis_cut_for(m->tbits);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), low = _mm256_set1_epi32(255);
    for (int64_t b = 0; b < blocks; b++, p += m->block_bytes, out += 32) {
        __m256i w[4];
        for (int k = 0; k < 4; k++)
            w[k] = _mm256_and_si256(_mm256_i32gather_epi32((const int *)m->lv8, trellis_codes8(&t, p + k * m->tbits), 1), low);
        const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(w[0], w[1]), _mm256_packus_epi32(w[2], w[3]));
        _mm256_storeu_si256((__m256i *)out, _mm256_permutevar8x32_epi32(bytes, order));
    }
}
/* rbe_q8_block on four vectors: vcvtps2dq rounds as lrintf (the current mode, ties to even). */
static inline float q8_block(const float *v, int rot, int8_t *x8, int32_t *sum, int32_t *lead) {
    const float amax = block_amax(v);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    int32_t q[32];
    for (int k = 0; k < 4; k++) _mm256_storeu_si256((__m256i *)(q + 8 * k), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * k), inv)));
    *sum = *lead = 0;
    for (int j = 0; j < 32; j++) {
        x8[j] = (int8_t)q[j];
        *sum += q[j];
        *lead += j & (rot - 1) ? 0 : q[j];
    }
    return amax / 127.0f;
}
/* 32 signed bytes times H_rot per group (rbe_q8_rotate's butterflies, no zero point): each
 * byte's partner (index ^ h, within 16-byte lanes) by vpshufb, plus self or, where bit h of the
 * index is set, minus self. */
static inline __m256i q8_rotate32(__m256i v, int rot) {
    static const int8_t sign[4][16] = {{1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1},
                                       {1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1},
                                       {1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1},
                                       {1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1}};
    const __m256i lane = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4,
                                          5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int h = 1, s = 0; h < rot; h *= 2, s++) {
        const __m256i partner = _mm256_shuffle_epi8(v, _mm256_xor_si256(lane, _mm256_set1_epi8((char)h)));
        v = _mm256_add_epi8(partner, _mm256_sign_epi8(v, _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)sign[s]))));
    }
    return v;
}
static inline void q8_rotate(uint8_t *p, int64_t bytes, int rot, int zp) {
    for (int64_t c = 0; c < bytes; c += 32) {
        const __m256i v = q8_rotate32(_mm256_loadu_si256((const __m256i *)(p + c)), rot);
        _mm256_storeu_si256((__m256i *)(p + c), _mm256_add_epi8(v, _mm256_set1_epi8((char)zp)));
    }
}
/* rbe_q8_nibble_row, two blocks per 32-byte vector. */
static inline void q8_nibble_row(const uint8_t *tab, const uint8_t *p, int64_t blocks, int rot, int zp,
                                 uint8_t *out) {
    const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tab)), k = _mm256_set1_epi8(15);
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2, p += 32, out += 64) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)p); /* block b in the low lane */
        const __m256i lo = _mm256_shuffle_epi8(t, _mm256_and_si256(v, k));
        const __m256i hi = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(v, 4), k));
        __m256i o[2] = {_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31)};
        for (int i = 0; i < 2; i++) {
            if (rot > 1) o[i] = _mm256_add_epi8(q8_rotate32(o[i], rot), _mm256_set1_epi8((char)zp));
            _mm256_storeu_si256((__m256i *)(out + 32 * i), o[i]);
        }
    }
    rbe_q8_nibble_row(tab, p, blocks - b, rot, zp, out);
}

#include "kern_impl.h"
