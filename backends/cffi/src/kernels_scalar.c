/* Portable path: plain C on 8-float blocks (always built; compilers may auto-vectorise it with
 * the target's baseline instructions, but it needs no particular ISA). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "rbe_internal.h"

#define ISA_SUFFIX scalar
#define VLEN 8
#define GEMV_ROWS 2
#define GRAD_BATCH 4

typedef struct {
    float v[VLEN];
} VF;

static inline VF vzero(void) {
    VF r;
    for (int i = 0; i < VLEN; i++) r.v[i] = 0.0f;
    return r;
}
static inline VF vload(const float *p) {
    VF r;
    for (int i = 0; i < VLEN; i++) r.v[i] = p[i];
    return r;
}
static inline void vstore(float *p, VF a) {
    for (int i = 0; i < VLEN; i++) p[i] = a.v[i];
}
static inline VF vset1(float f) {
    VF r;
    for (int i = 0; i < VLEN; i++) r.v[i] = f;
    return r;
}
static inline VF vadd(VF a, VF b) {
    for (int i = 0; i < VLEN; i++) a.v[i] += b.v[i];
    return a;
}
static inline VF vmul(VF a, VF b) {
    for (int i = 0; i < VLEN; i++) a.v[i] *= b.v[i];
    return a;
}
static inline VF vfma(VF a, VF b, VF c) {
    for (int i = 0; i < VLEN; i++) c.v[i] += a.v[i] * b.v[i];
    return c;
}
static inline VF vsub(VF a, VF b) {
    for (int i = 0; i < VLEN; i++) a.v[i] -= b.v[i];
    return a;
}
static inline VF vmax(VF a, VF b) {
    for (int i = 0; i < VLEN; i++) a.v[i] = b.v[i] > a.v[i] ? b.v[i] : a.v[i];
    return a;
}
static inline VF vdiv(VF a, VF b) {
    for (int i = 0; i < VLEN; i++) a.v[i] /= b.v[i];
    return a;
}
static inline VF vload_h(const uint16_t *p) {
    VF r;
    for (int i = 0; i < VLEN; i++) r.v[i] = rbe_half_to_float(p[i]);
    return r;
}
static inline VF vload_i8(const int8_t *p) {
    VF r;
    for (int i = 0; i < VLEN; i++) r.v[i] = (float)p[i];
    return r;
}
static inline void vstore_h(uint16_t *p, VF a) {
    for (int i = 0; i < VLEN; i++) p[i] = rbe_float_to_half(a.v[i]);
}
static inline VF vexp(VF a) {
    for (int i = 0; i < VLEN; i++) a.v[i] = expf(a.v[i]);
    return a;
}
static inline float vhsum(VF a) {
    /* pairwise, like the SIMD paths */
    const float s01 = a.v[0] + a.v[4], s23 = a.v[1] + a.v[5];
    const float s45 = a.v[2] + a.v[6], s67 = a.v[3] + a.v[7];
    return (s01 + s45) + (s23 + s67);
}
/* Canonical layout: the level table stays in memory. */
typedef struct {
    const float *levels;
} lutreg;
static inline lutreg lutreg_load_scalar(const rbe_lut *m) {
    lutreg t = {m->levels};
    return t;
}
static float code_values[256]; /* k -> (float)k, filled on first use (idempotent) */
static inline lutreg lutreg_codes_scalar(lutreg t) {
    if (code_values[255] == 0.0f)
        for (int k = 0; k < 256; k++) code_values[k] = (float)k;
    t.levels = code_values;
    return t;
}
static inline void lut_block32_scalar(const rbe_lut *m, const lutreg *t, const uint8_t *p,
                                      VF *out) {
    if (m->kind == RBE_LUT_NIBBLE) {
        for (int j = 0; j < 16; j++) {
            out[j / VLEN].v[j % VLEN] = t->levels[p[j] & 15];
            out[(j + 16) / VLEN].v[(j + 16) % VLEN] = t->levels[p[j] >> 4];
        }
    } else if (m->kind == RBE_LUT_PLANES || m->kind == RBE_LUT_TRELLIS) {
        uint8_t codes[32];
        rbe_block_codes(m, p, codes);
        for (int j = 0; j < 32; j++) out[j / VLEN].v[j % VLEN] = t->levels[codes[j]];
    } else {
        for (int j = 0; j < 32; j++) out[j / VLEN].v[j % VLEN] = t->levels[p[j]];
    }
}

#define half_to_float(h) rbe_half_to_float(h)

/* Int8 product (lut_impl.h): the reference arithmetic, signed weight bytes (lv8). */
#define Q8_ZP 0
typedef struct {
    int32_t v[VLEN];
} VI;
static inline VI vi_load(const void *p) {
    VI r;
    memcpy(r.v, p, sizeof(r.v));
    return r;
}
static inline VF vi_cvt(VI a) {
    VF r;
    for (int l = 0; l < VLEN; l++) r.v[l] = (float)a.v[l];
    return r;
}
static inline VI vi_dot4(VI acc, const uint8_t *w, VI x) {
    for (int l = 0; l < VLEN; l++)
        for (int j = 0; j < 4; j++) acc.v[l] += (int8_t)w[j] * (int8_t)(uint8_t)((uint32_t)x.v[l] >> (8 * j));
    return acc;
}
static inline VI vi_dot(VI acc, VI w, VI x) {
    for (int l = 0; l < VLEN; l++)
        for (int j = 0; j < 4; j++)
            acc.v[l] += (int8_t)(uint8_t)((uint32_t)w.v[l] >> (8 * j)) * (int8_t)(uint8_t)((uint32_t)x.v[l] >> (8 * j));
    return acc;
}
#define q8_nibble_row rbe_q8_nibble_row
#define q8_planes rbe_q8_planes
#define q8_trellis_row rbe_q8_trellis_row
#define q8_rotate rbe_q8_rotate
#define q8_block rbe_q8_block

#include "kern_impl.h"
