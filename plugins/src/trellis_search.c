/* The Viterbi search of the trellis codec: the same paths, bit for bit, as the numpy reference
 * in plugins/_trellis.py (`_search`), which documents the trellis. Eight sequences run side by
 * side, one per vector lane; every step is a lane-wise multiply, add, compare or select in
 * float32, so any vector width gives the same result (built with -ffp-contract=off). Eight lanes
 * of float32 are one AVX2 register: with sixteen, GCC's AVX2 clone compared and selected the
 * 512-bit generic vectors lane by lane in scalar code (5-8x slower). */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "trellis_search.h"

#define STATES 256
#define LANES 8

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint8_t vb __attribute__((vector_size(LANES)));

/* Sequences n0 .. n0 + nl - 1 (nl <= LANES) of the (steps, n) arrays; back: steps * preds * LANES. */
CLONES static void search_lanes(const float *x, const float *w, int64_t steps, int64_t n, int64_t n0,
                                int nl, int bits, const uint8_t *start, const float *table,
                                uint8_t *out, uint8_t *back) {
    const int fan = 1 << bits, preds = STATES >> bits;
    vf cost[STATES], best[STATES / 2], c0, c1;
    vi arg[STATES / 2];
    float sq[STATES];
    for (int s = 0; s < STATES; s++) sq[s] = table[s] * table[s];
    for (int64_t t = 0; t < steps; t++) {
        for (int l = 0; l < LANES; l++) { /* lanes past the last sequence code zeros */
            const float xv = l < nl ? x[t * n + n0 + l] : 0.0f, wv = l < nl ? w[t * n + n0 + l] : 0.0f;
            c0[l] = xv * wv * -2.0f;
            c1[l] = wv;
        }
        if (t == 0) {
            for (int s = 0; s < STATES; s++) cost[s] = table[s] * c0 + sq[s] * c1;
            if (start)
                for (int s = 0; s < STATES; s++)
                    for (int l = 0; l < nl; l++)
                        if ((s & (preds - 1)) != start[n0 + l] >> bits) cost[s][l] = (float)INFINITY;
            continue;
        }
        /* state p = q * fan + j is followed by states b * preds + q: the best j for each q */
        for (int q = 0; q < preds; q++) {
            best[q] = cost[q * fan];
            arg[q] = (vi){0};
            for (int j = 1; j < fan; j++) {
                const vf v = cost[q * fan + j];
                const vi less = v < best[q];
                best[q] = (vf)(((vi)v & less) | ((vi)best[q] & ~less));
                arg[q] = (arg[q] & ~less) | (j & less);
            }
        }
        uint8_t *row = back + t * preds * LANES;
        for (int q = 0; q < preds; q++) {
            const vb narrow = __builtin_convertvector(arg[q], vb);
            memcpy(row + q * LANES, &narrow, LANES);
        }
        for (int b = 0; b < fan; b++)
            for (int q = 0; q < preds; q++) {
                const int s = b * preds + q;
                cost[s] = (table[s] * c0 + sq[s] * c1) + best[q];
            }
    }
    for (int l = 0; l < nl; l++) {
        int state = 0;
        for (int s = 1; s < STATES; s++)
            if (cost[s][l] < cost[state][l]) state = s;
        out[(steps - 1) * n + n0 + l] = (uint8_t)state;
        for (int64_t t = steps - 1; t > 0; t--) {
            const int q = state & (preds - 1);
            state = (q << bits) | back[(t * preds + q) * LANES + l];
            out[(t - 1) * n + n0 + l] = (uint8_t)state;
        }
    }
}

int rbe_trellis_search(const float *x, const float *w, int64_t steps, int64_t n, int bits,
                       const uint8_t *start, const float *table, uint8_t *out) {
    if (bits < 1 || bits > 7 || steps < 1 || n < 0) return 1;
    uint8_t *back = malloc((size_t)steps * (STATES >> bits) * LANES);
    if (!back) return 2;
    for (int64_t n0 = 0; n0 < n; n0 += LANES)
        search_lanes(x, w, steps, n, n0, (int)(n - n0 < LANES ? n - n0 : LANES), bits, start, table, out, back);
    free(back);
    return 0;
}

void rbe_trellis_windows(const uint8_t *streams, int64_t rows, int64_t nbytes, int64_t length, int bits,
                         uint8_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *s = streams + r * nbytes;
        uint8_t *o = out + r * length;
        for (int64_t t = 0; t < length; t++) {
            const int64_t bit = t * bits, at = bit >> 3;
            uint64_t v = 0; /* the (up to) 8 bytes from the window's first, within the stream */
            if (at + 8 <= nbytes) memcpy(&v, s + at, 8);
            else if (at < nbytes) memcpy(&v, s + at, (size_t)(nbytes - at));
            o[t] = (uint8_t)(v >> (bit & 7));
        }
    }
}
