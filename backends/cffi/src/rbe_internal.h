/* Internal interface between the C API (engine.c, with ISA selection in dispatch.c) and the
 * per-ISA kernel files (kernels_<isa>.c through kern_impl.h and lut_impl.h). */
#ifndef RBE_INTERNAL_H
#define RBE_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "rbe_engine.h"

/* A weight matrix in the engine's canonical layout (see rbe_engine.h): row r, column c holds
 * levels[code[r, c]] * step[r, g] (+ offset[r, g]), g = c / gs, evaluated as a float32 multiply
 * then a float32 add (decode's exact arithmetic), or plain float32 values (kind RBE_LUT_F32).
 * cols_p and gs are multiples of 32; columns past the logical width meet a zero input. */
enum { RBE_LUT_NIBBLE = 1, RBE_LUT_BYTE = 2, RBE_LUT_F32 = 3, RBE_LUT_PLANES = 4, RBE_LUT_TRELLIS = 5 };
enum { RBE_STEP_F32 = 0, RBE_STEP_F16 = 1, RBE_STEP_CODE = 2 };
typedef struct {
    int64_t rows, cols_p, gs, groups;
    int kind, bits;
    int affine;        /* levels[k] == a0 + k * da exactly (RBE_LUT_BYTE uses a convert) */
    float a0, da;
    const uint8_t *codes; /* per 32-column block of block_bytes, rows row_bytes apart. NIBBLE: 16
                             bytes, byte t = code[t] | code[t + 16] << 4; BYTE: one code per
                             byte; PLANES (5, 6 bits): the low nibbles as NIBBLE, then per higher
                             bit k a 32-bit little-endian word whose bit t is bit 4 + k of code t;
                             TRELLIS (8-bit codes, each sharing its low 8 - tbits bits with the
                             previous code's high ones): per row a little-endian bit stream whose
                             code c is the 8 bits from bit c * tbits, block b from byte
                             4 * tbits * b (eight bytes of padding after a row's stream) */
    int64_t row_bytes, block_bytes;
    int tbits;
    const float *dense; /* F32: rows x cols_p */
    /* Steps and offsets (rows x groups) in one of three forms, read through rbe_lut_step /
     * rbe_lut_offset: float32 (step, offset), float16 when every value is exact in it (step16,
     * offset16), or a float32 per row times an 8-bit code per group (row_scale, step_code). */
    int step_kind, has_offset;
    const float *step, *offset, *row_scale;
    const uint16_t *step16, *offset16;
    const uint8_t *step_code;
    float levels[256];
    /* The level table in integers, for products with int8-quantized inputs (lut_gemm_q8):
     * levels[k] ~ q8_alpha * lv8[k] + q8_beta, equal in real arithmetic when q8_exact (levels
     * that are integer multiples of one unit, or affine in the code), else lv8[k] =
     * round(levels[k] / q8_alpha) with q8_alpha = max |level| / 127 and q8_beta = 0. */
    int8_t lv8[256];
    float q8_alpha, q8_beta;
    int q8_exact;
    /* The widest in-block rotation (RBE_Q8_REC) that keeps this matrix's rotated levels in int8:
     * 16, 8, 4 or 2 for matrices without an input transform whose levels allow it, else 1. */
    int q8_rot;
    /* 5- and 6-bit (PLANES) levels in 16 bits, for the one-token product of the kernels listing
     * PLANES in q8_one_kinds: levels[k] ~ q16_alpha * lv16[k], lv16[k] = round(levels[k] /
     * q16_alpha), q16_alpha = max |level| / 16383 (zero for other kinds): times RBE_Q8_X16's
     * inputs four products a lane stay within int32. */
    int16_t lv16[64];
    float q16_alpha;
} rbe_lut;

/* Inputs quantized for lut_gemm_q8, per token and per 32-column block (llama.cpp's Q8_0), after
 * an optional rotation of R (1, 2, 4, 8 or 16) columns: each group of R consecutive columns is
 * multiplied by the unnormalised Sylvester Hadamard matrix H_R (in float32, each output the sum
 * of +-x[j] in order of ascending j), which spreads a block's outliers (the weights meet H_R too:
 * (H_R w) . (H_R x) = R w . x, in integers). Then d = max |x| / 127 (float32 division), x8 = x *
 * (127 / max |x|) (float32) rounded to the nearest integer, ties to even; an all-zero block has
 * d = 0 and x8 = 0. Stored in tiles of T tokens (the kernels' q8_tokens), a record of
 * RBE_Q8_REC(T) bytes per (tile, block), tile-major: 32 * T bytes x8, column 4 * q + j of tile
 * token t at byte (q * T + t) * 4 + j (each token's four consecutive columns form one 32-bit
 * lane); then per token d (float32), d * (sum of x8 over each group's first column) (float32:
 * the block's sum of the dequantized, unrotated input) and -zp * sum(x8) (int32; zp the kernels'
 * weight zero point). Tokens past the input's count are zero. */
#define RBE_Q8_REC(T) (44 * (int64_t)(T))

/* One token quantized as RBE_Q8_REC's, laid out for element-wise products (lut_gemv_q8): x8 (cp
 * bytes, column order), then per block eight float32 d (one a column dword), eight int32
 * (-zp * sum(x8), then zeros) and, after all blocks', one float32 d * lead sum; then the same
 * input in 16 bits (RBE_Q8_X16: 2 * cp bytes). */
#define RBE_Q8_ONE(cp) (5 * (int64_t)(cp) + (int64_t)(cp) / 8)
/* A one-token record's 16-bit input at byte RBE_Q8_X16(cp) (written by the kernels listing PLANES
 * in q8_one_kinds): per block x16 = 254 * x8 + e8, e8 =
 * round((x * 127 / max |x| - x8) * 254) (float32, ties to even; |x16| <= 32385), so x ~ d / 254
 * * x16; the 32 columns in the order 0-7, 16-23, 8-15, 24-31 (AVX2's byte unpacks). Unrotated
 * (one token's products of 5- and 6-bit codes never rotate). */
#define RBE_Q8_X16(cp) (3 * (int64_t)(cp) + (int64_t)(cp) / 8)

/* Whether m's levels are the integers lv8 (levels[k] == lv8[k]). */
static inline int rbe_lut_integer_levels(const rbe_lut *m) {
    return m->q8_exact && m->q8_alpha == 1.0f && m->q8_beta == 0.0f;
}

/* The 32 codes of m's block at p, codes of kind RBE_LUT_NIBBLE, RBE_LUT_PLANES or
 * RBE_LUT_TRELLIS (see rbe_lut's codes). */
static inline void rbe_block_codes(const rbe_lut *m, const uint8_t *p, uint8_t *codes) {
    if (m->kind == RBE_LUT_TRELLIS) { /* eight windows from each 64-bit word (7 * tbits + 8 <= 64) */
        for (int j = 0; j < 32; j += 8) {
            uint64_t v;
            memcpy(&v, p + j * m->tbits / 8, 8);
            for (int i = 0; i < 8; i++) codes[j + i] = (uint8_t)(v >> (i * m->tbits));
        }
        return;
    }
    for (int j = 0; j < 32; j++) {
        unsigned code = (p[j % 16] >> (j >= 16 ? 4 : 0)) & 15u;
        if (m->kind == RBE_LUT_PLANES)
            for (int k = 0; k < m->bits - 4; k++) code |= ((p[16 + 4 * k + j / 8] >> (j % 8)) & 1u) << (4 + k);
        codes[j] = (uint8_t)code;
    }
}

/* One block of 32 inputs quantized (RBE_Q8_REC): x8 and d (returned), the sum of x8 and that of
 * each rotation group's first x8 (rot a power of two). Portable. */
static inline float rbe_q8_block(const float *v, int rot, int8_t *x8, int32_t *sum, int32_t *lead) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    *sum = *lead = 0;
    for (int j = 0; j < 32; j++) {
        x8[j] = (int8_t)lrintf(v[j] * inv); /* the default rounding: ties to even */
        *sum += x8[j];
        *lead += j & (rot - 1) ? 0 : x8[j];
    }
    return amax / 127.0f;
}

/* bytes signed bytes (a multiple of 32) in place: each group of rot multiplied by H_rot (see
 * RBE_Q8_REC; the results must fit int8), then zp added (mod 256). Portable. */
static inline void rbe_q8_rotate(uint8_t *p, int64_t bytes, int rot, int zp) {
    for (int64_t c = 0; c < bytes; c += rot) {
        int v[16];
        for (int j = 0; j < rot; j++) v[j] = (int8_t)p[c + j];
        for (int h = 1; h < rot; h *= 2)
            for (int j = 0; j < rot; j++)
                if (!(j & h)) {
                    const int a = v[j], b = v[j + h];
                    v[j] = a + b, v[j + h] = a - b;
                }
        for (int j = 0; j < rot; j++) p[c + j] = (uint8_t)(v[j] + zp);
    }
}

/* The weight bytes of `blocks` consecutive nibble blocks (16 bytes each: byte t = code t | code
 * t + 16 << 4) for lut_gemm_q8, 32 per block in column order: through the 16-entry table tab,
 * then, when rot > 1, rotated with zp added (rbe_q8_rotate). Portable. */
static inline void rbe_q8_nibble_row(const uint8_t *tab, const uint8_t *p, int64_t blocks, int rot,
                                     int zp, uint8_t *out) {
    for (int64_t b = 0; b < blocks; b++)
        for (int t = 0; t < 16; t++) out[32 * b + t] = tab[p[16 * b + t] & 15], out[32 * b + t + 16] = tab[p[16 * b + t] >> 4];
    if (rot > 1) rbe_q8_rotate(out, 32 * blocks, rot, zp);
}

/* A PLANES or TRELLIS block's 32 weight bytes for lut_gemm_q8 through the table tab (portable). */
static inline void rbe_q8_planes(const rbe_lut *m, const uint8_t *tab, const uint8_t *p, uint8_t *out) {
    uint8_t codes[32];
    rbe_block_codes(m, p, codes);
    for (int j = 0; j < 32; j++) out[j] = tab[codes[j]];
}

/* The weight bytes of `blocks` consecutive TRELLIS blocks at p for lut_gemm_q8, 32 per block in
 * column order, through the table tab (portable). */
static inline void rbe_q8_trellis_row(const rbe_lut *m, const uint8_t *tab, const uint8_t *p, int64_t blocks,
                                      uint8_t *out) {
    for (int64_t b = 0; b < blocks; b++) rbe_q8_planes(m, tab, p + b * m->block_bytes, out + 32 * b);
}

typedef struct {
    /* out[b * ldo + j] (+)= sum_{i < nr} g[b * ldg + i] * w[i * ldw + j] for b < nb <= grad_batch,
     * j < k; written when accumulate is 0, else added. */
    void (*grad_tile)(const float *w, int64_t ldw, int64_t nr, const float *g, int64_t ldg, int nb,
                      int64_t k, float *out, int64_t ldo, int accumulate);
    /* Canonical layout (rbe_lut). lut_decode: row r, columns [c0, c1) (multiples of 32) into w.
     * lut_gemv: y[r] = dot(W[r], x) for r in [r0, r1); x is cols_p wide; scratch holds
     * 17 * m->groups floats. lut_gemv_t: y[c] = sum_r x[r] W[r, c] for c in [c0, c1) (multiples of
     * 32), r < m->rows; scratch holds c1 - c0 floats. */
    void (*lut_decode)(const rbe_lut *m, int64_t r, int64_t c0, int64_t c1, float *w);
    void (*lut_gemv)(const rbe_lut *m, const float *x, int64_t r0, int64_t r1, float *y,
                     float *scratch);
    void (*lut_gemv_t)(const rbe_lut *m, const float *x, int64_t c0, int64_t c1, float *y,
                       float *scratch);
    /* lut_gemv of n inputs (rows of x, ldx apart) into y[b * ldy + r], each block of weights
     * decoded once per few inputs: a handful of sequences' decode steps. Same scratch. */
    void (*lut_gemv_few)(const rbe_lut *m, const float *x, int64_t ldx, int64_t n, int64_t r0, int64_t r1,
                         float *y, int64_t ldy, float *scratch);
    /* Batched product y[b * ldy + r] = dot(W[r], x_b), b < n, r in [r0, r1), from the transposed
     * input xt[c * ldt + b] (ldt a multiple of gemm_tokens; columns past n zero); scratch holds
     * gemm_rows * (cols_p + gemm_tokens) floats. */
    void (*lut_gemm)(const rbe_lut *m, const float *xt, int64_t ldt, int64_t n, int64_t r0,
                     int64_t r1, float *y, int64_t ldy, float *scratch);
    int gemm_tokens, gemm_rows;
    /* Int8 batched product. q8_quantize: x[b * ldx + c] (b < n, c < cp, cp a multiple of 32)
     * rotated by rot into pack (RBE_Q8_REC(q8_tokens) bytes per tile and block). lut_gemm_q8
     * (coded kinds only; NULL where this CPU lacks the instructions), the pack's rot at most
     * m->q8_rot: y[b * ldy + r] for b < n, r in [r0, r1) = sum_g (q8_alpha / rot * step[r, g] *
     * sum_{c in g} d[b, c / 32] * (H_rot lv8[code[r]])[c] * x8[b, c] + (q8_beta * step[r, g] +
     * offset[r, g]) * sum_{c in g, c % rot == 0} d[b, c / 32] * x8[b, c]), the integer dot
     * products exact, then float32; scratch holds q8_scratch(m, n) bytes. q8_tokens: tokens
     * per pack tile; q8_rows: rows per band (a multiple of it splits evenly over threads). */
    void (*q8_quantize)(const float *x, int64_t ldx, int64_t n, int64_t cp, int rot, uint8_t *pack);
    void (*lut_gemm_q8)(const rbe_lut *m, const uint8_t *pack, int rot, int64_t n, int64_t r0,
                        int64_t r1, float *y, int64_t ldy, void *scratch);
    int64_t (*q8_scratch)(const rbe_lut *m, int64_t tokens);
    int q8_tokens, q8_rows;
    /* The int8 product of a few tokens, each on its own (decode steps; NULL where lut_gemm_q8 is).
     * q8_quantize1: x (cp values) rotated by rot and quantized as q8_quantize does into out
     * (RBE_Q8_ONE(cp) bytes). lut_gemv_q8: for n <= q8_one_tokens tokens (q8_one_nibble_tokens for
     * nibble codes) whose q8_quantize1
     * records lie RBE_Q8_ONE(cp) bytes apart at xq, y[b * ldy + r] for b < n, r in [r0, r1),
     * lut_gemm_q8's sum for that input (rot at most m->q8_rot), when m->gs / 32 is a multiple of
     * q8_tokens / 8; the weights are read once for all n; scratch holds q8_scratch(m, n) bytes.
     * q8_one_kinds: the code kinds (bit 1 << kind) it is measured faster for than lut_gemv;
     * PLANES listed: their rows run as lv16 * q16_alpha against the 16-bit input (RBE_Q8_X16):
     * the sum above with lv16, q16_alpha / 254, x16 for x8 and no q8_beta. q8_one_tokens: the
     * most tokens it takes, those up to which the engine runs it rather than lut_gemm_q8 (as
     * measured per ISA); q8_one_nibble_tokens (at least q8_one_tokens): the same for nibble codes. */
    void (*q8_quantize1)(const float *x, int64_t cp, int rot, uint8_t *out);
    void (*lut_gemv_q8)(const rbe_lut *m, const uint8_t *xq, int rot, int64_t n, int64_t r0, int64_t r1, float *y,
                        int64_t ldy, void *scratch);
    int q8_one_kinds, q8_one_tokens, q8_one_nibble_tokens;
    /* Vector helpers for attention and norms. */
    float (*dot)(const float *a, const float *b, int64_t n);
    void (*axpy)(float a, const float *x, float *y, int64_t n); /* y += a * x */
    float (*exp_sum)(float *s, int64_t n, float shift); /* s = exp(s - shift); returns the sum */
    /* out + r * ldo = softmax(s) V[:len] for r < rep, s = scale * (q + r * ldq) K[:len]^T, then
     * softcap * tanh(s / softcap) when softcap > 0, the first `skip` positions masked (K and V of
     * kind, RBE_KV_*: int8 ones times the scales ks[p] and vs[p], ks for whole blocks; K blocked
     * by 16 positions: (p, d) at (p / 16 * hd + d) * 16 + p % 16; V rows of hd); scores holds
     * rep * len floats. With ml (2 * rep floats): unnormalised output and each head's (max, sum
     * of exponentials), for merging a split over positions. */
    void (*attend_group)(const float *q, int64_t ldq, int rep, const void *K, const void *V,
                         int kind, const float *ks, const float *vs, int64_t len, int64_t skip, int64_t hd,
                         float scale, float softcap, float *out, int64_t ldo, float *scores, float *ml);
    /* K/V cache rows: n floats stored `stride` elements apart as elements of kind (RBE_KV_*;
     * int8: their scale at *scale). */
    void (*kv_store)(void *dst, const float *src, int64_t n, int64_t stride, int kind, float *scale);
    /* Orthonormal block Walsh-Hadamard transform in place (blocks: powers of two summing to the
     * length), Sylvester order, scaled by float32 1/sqrt(b) per block. */
    void (*fwht)(float *v, const long long *blocks, int nblocks);
    /* In place: kind 0 g = silu(g) * u, 1 gelu (tanh), 2 gelu (erf), 3 relu (u unused), 4 gelu (tanh) * u. */
    void (*activate)(int kind, float *g, const float *u, int64_t n);
    int grad_batch; /* most batch rows (nb) per grad_tile call */
} rbe_kernels;

extern const rbe_kernels rbe_kernels_scalar;
/* The kernels of ISA path `isa` (RBE_ISA_*), or NULL when this CPU or build lacks it. */
const rbe_kernels *rbe_kernels_for(int isa);
#ifdef RBE_WITH_X86_SIMD
extern const rbe_kernels rbe_kernels_avx2;
extern const rbe_kernels rbe_kernels_avx512;
extern const rbe_kernels rbe_kernels_avx512_noq8; /* lut_gemm_q8 NULL: AVX-512 without VNNI */
extern const rbe_kernels rbe_kernels_avx512vbmi;
#endif

/* Exact IEEE binary16 -> binary32 (normals, subnormals, inf, nan). */
static inline float rbe_half_to_float(uint16_t h) {
    union {
        uint32_t u;
        float f;
    } v;
    uint32_t em = h & 0x7fffu;
    if (em >= 0x7c00u) {
        v.u = (em << 13) | 0x7f800000u;
    } else {
        v.u = em << 13;
        v.f *= 0x1p112f; /* rebias the exponent; exact for normals and subnormals */
    }
    v.u |= (uint32_t)(h & 0x8000u) << 16;
    return v.f;
}

/* binary32 -> binary16, round to nearest even (overflow to inf, NaN kept). */
static inline uint16_t rbe_float_to_half(float f) {
    union {
        float f;
        uint32_t u;
    } v = {f};
    const uint32_t sign = (v.u >> 16) & 0x8000u, abs = v.u & 0x7fffffffu;
    if (abs >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (abs < 0x38800000u) { /* subnormal half (or zero): scale into the integer range, round */
        union {
            uint32_t u;
            float f;
        } a = {abs};
        return (uint16_t)(sign | (uint32_t)__builtin_lrintf(a.f * 0x1p24f));
    }
    const uint32_t mant = abs + 0xfffu + ((abs >> 13) & 1u); /* round to nearest even at bit 13 */
    return (uint16_t)(sign | ((mant - 0x38000000u) >> 13));
}

static inline float rbe_lut_step(const rbe_lut *m, int64_t r, int64_t g) {
    const int64_t i = r * m->groups + g;
    if (m->step_kind == RBE_STEP_F16) return rbe_half_to_float(m->step16[i]);
    if (m->step_kind == RBE_STEP_CODE) return m->row_scale[r] * (float)m->step_code[i];
    return m->step[i];
}
static inline float rbe_lut_offset(const rbe_lut *m, int64_t r, int64_t g) {
    const int64_t i = r * m->groups + g;
    return m->step_kind == RBE_STEP_F16 ? rbe_half_to_float(m->offset16[i]) : m->offset[i];
}

static inline int64_t rbe_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* n values x[i] as int8 q[i * sq] with x ~ scale * q (symmetric, round to nearest: the largest
 * magnitude at +-127); returns scale (0 for all zeros). */
static inline float rbe_kv_int8(const float *x, int64_t n, int8_t *q, int64_t sq) {
    float amax = 0.0f;
    for (int64_t i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i] * inv;
        q[i * sq] = (int8_t)__builtin_lrintf(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
    }
    return amax / 127.0f;
}

#endif
