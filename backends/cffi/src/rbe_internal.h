/* Internal interface between the C API (engine.c, with ISA selection in dispatch.c) and the
 * per-ISA kernel files (kernels_<isa>.c through kern_impl.h and lut_impl.h). */
#ifndef RBE_INTERNAL_H
#define RBE_INTERNAL_H

#include <stdint.h>

/* A weight matrix in the engine's canonical layout (see rbe_engine.h): row r, column c holds
 * levels[code[r, c]] * step[r, g] (+ offset[r, g]), g = c / gs, evaluated as a float32 multiply
 * then a float32 add (decode's exact arithmetic), or plain float32 values (kind RBE_LUT_F32).
 * cols_p and gs are multiples of 32; columns past the logical width meet a zero input. */
enum { RBE_LUT_NIBBLE = 1, RBE_LUT_BYTE = 2, RBE_LUT_F32 = 3, RBE_LUT_PLANES = 4 };
enum { RBE_STEP_F32 = 0, RBE_STEP_F16 = 1, RBE_STEP_CODE = 2 };
typedef struct {
    int64_t rows, cols_p, gs, groups;
    int kind, bits;
    int affine;        /* levels[k] == a0 + k * da exactly (RBE_LUT_BYTE uses a convert) */
    float a0, da;
    const uint8_t *codes; /* per 32-column block of block_bytes, rows row_bytes apart. NIBBLE: 16
                             bytes, byte t = code[t] | code[t + 16] << 4; BYTE: one code per
                             byte; PLANES (5, 6 bits): the low nibbles as NIBBLE, then per higher
                             bit k a 32-bit little-endian word whose bit t is bit 4 + k of code t */
    int64_t row_bytes, block_bytes;
    const float *dense; /* F32: rows x cols_p */
    /* Steps and offsets (rows x groups) in one of three forms, read through rbe_lut_step /
     * rbe_lut_offset: float32 (step, offset), float16 when every value is exact in it (step16,
     * offset16), or a float32 per row times an 8-bit code per group (row_scale, step_code). */
    int step_kind, has_offset;
    const float *step, *offset, *row_scale;
    const uint16_t *step16, *offset16;
    const uint8_t *step_code;
    float levels[256];
} rbe_lut;

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
    /* Batched product y[b * ldy + r] = dot(W[r], x_b), b < n, r in [r0, r1), from the transposed
     * input xt[c * ldt + b] (ldt a multiple of gemm_tokens; columns past n zero); scratch holds
     * gemm_rows * (cols_p + gemm_tokens) floats. */
    void (*lut_gemm)(const rbe_lut *m, const float *xt, int64_t ldt, int64_t n, int64_t r0,
                     int64_t r1, float *y, int64_t ldy, float *scratch);
    int gemm_tokens, gemm_rows;
    /* Vector helpers for attention and norms. */
    float (*dot)(const float *a, const float *b, int64_t n);
    void (*axpy)(float a, const float *x, float *y, int64_t n); /* y += a * x */
    float (*exp_sum)(float *s, int64_t n, float shift); /* s = exp(s - shift); returns the sum */
    /* out + r * ldo = softmax(scale * (q + r * ldq) K[:len]^T) V[:len] for r < rep (float16
     * when half, else float32; K blocked by 16 positions: (p, d) at (p / 16 * hd + d) * 16 +
     * p % 16; V rows of hd); scores holds rep * len floats. With ml (2 * rep floats): unnormalised output and
     * each head's (max, sum of exponentials), for merging a split over positions. */
    void (*attend_group)(const float *q, int64_t ldq, int rep, const void *K, const void *V,
                         int half, int64_t len, int64_t hd, float scale, float *out, int64_t ldo,
                         float *scores, float *ml);
    /* K/V cache rows: n floats stored as float16 (round to nearest even) when half. */
    void (*kv_store)(void *dst, const float *src, int64_t n, int half);
    /* Orthonormal block Walsh-Hadamard transform in place (blocks: powers of two summing to the
     * length), Sylvester order, scaled by float32 1/sqrt(b) per block. */
    void (*fwht)(float *v, const long long *blocks, int nblocks);
    /* In place: kind 0 g = silu(g) * u, 1 gelu (tanh), 2 gelu (erf), 3 relu (u unused). */
    void (*activate)(int kind, float *g, const float *u, int64_t n);
    int grad_batch; /* most batch rows (nb) per grad_tile call */
} rbe_kernels;

extern const rbe_kernels rbe_kernels_scalar;
/* The kernels of ISA path `isa` (RBE_ISA_*), or NULL when this CPU or build lacks it. */
const rbe_kernels *rbe_kernels_for(int isa);
#ifdef RBE_WITH_X86_SIMD
extern const rbe_kernels rbe_kernels_avx2;
extern const rbe_kernels rbe_kernels_avx512;
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

#endif
