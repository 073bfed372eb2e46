/* Public entry points: argument checks, runtime ISA dispatch, and the pthread row/column split.
 * Called from Python through cffi (API mode), which releases the GIL around each call. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* posix_memalign, pthreads */
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rbe_internal.h"
#include "rbe_kernels.h"

#define RBE_MAX_THREADS 64
#define GRAD_PANEL_ROWS 16
#define GRAD_BLOCK_COLS 512

int rbe_isa_compiled(void) {
#ifdef RBE_WITH_X86_SIMD
    return RBE_ISA_SCALAR | RBE_ISA_AVX2 | RBE_ISA_AVX512;
#else
    return RBE_ISA_SCALAR;
#endif
}

int rbe_isa_supported(void) {
    int mask = RBE_ISA_SCALAR;
#ifdef RBE_WITH_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) mask |= RBE_ISA_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        mask |= RBE_ISA_AVX512;
#endif
    return mask;
}

static const rbe_kernels *pick(int isa) {
    if (!(rbe_isa_supported() & isa)) return NULL;
    switch (isa) {
        case RBE_ISA_SCALAR: return &rbe_kernels_scalar;
#ifdef RBE_WITH_X86_SIMD
        case RBE_ISA_AVX2: return &rbe_kernels_avx2;
        case RBE_ISA_AVX512: return &rbe_kernels_avx512;
#endif
        default: return NULL;
    }
}

enum { OP_LINEAR, OP_GRAD };

typedef struct {
    const rbe_kernels *k;
    int op, is_int4;
    const float *in; /* x (linear) or g (grad) */
    int64_t n, rows, cols, gs;
    const void *q;
    const float *scale8;
    const uint16_t *sh, *mh;
    float *out;
} job;

typedef struct {
    const job *j;
    int64_t start, stop;
    int err;
    pthread_t tid;
} part;

static void *aligned_floats(int64_t count) {
    void *p = NULL;
    if (posix_memalign(&p, 64, (size_t)rbe_max(count, 1) * sizeof(float)) != 0) return NULL;
    return p;
}

static void decode(const job *j, int64_t r0, int nr, int64_t c0, int64_t c1, float *w,
                   int64_t ldw) {
    if (j->is_int4)
        j->k->int4_decode(j->q, j->sh, j->mh, j->cols, j->gs, r0, nr, c0, c1, w, ldw);
    else
        j->k->int8_decode(j->q, j->scale8, j->cols, r0, nr, c0, c1, w, ldw);
}

/* y rows [r0, r1) of every batch row. */
static int linear_rows(const job *j, int64_t r0, int64_t r1) {
    const rbe_kernels *k = j->k;
    if (j->n == 1) {
        if (!j->is_int4) {
            k->int8_gemv(j->in, j->q, j->scale8, j->cols, r0, r1, j->out);
            return 0;
        }
        const int64_t cols_p = rbe_round_up(j->cols, j->gs), groups = cols_p / j->gs;
        float *scratch = aligned_floats(2 * k->gemv_rows * groups + cols_p);
        if (!scratch) return RBE_E_NOMEM;
        k->int4_gemv(j->in, j->q, j->sh, j->mh, j->cols, j->gs, r0, r1, j->out, scratch);
        free(scratch);
        return 0;
    }
    const int64_t ldw = rbe_round_up(j->cols, 16);
    float *w = aligned_floats(k->tile_rows * ldw);
    if (!w) return RBE_E_NOMEM;
    for (int64_t r = r0; r < r1; r += k->tile_rows) {
        const int nr = (int)rbe_min(k->tile_rows, r1 - r);
        decode(j, r, nr, 0, j->cols, w, ldw);
        for (int64_t b = 0; b < j->n; b += k->tile_batch) {
            const int nb = (int)rbe_min(k->tile_batch, j->n - b);
            k->dot_tile(w, ldw, nr, j->in + b * j->cols, j->cols, nb, j->cols,
                        j->out + b * j->rows + r, j->rows);
        }
    }
    free(w);
    return 0;
}

/* out columns [c0, c1) of every batch row: panels of rows are summed, then added. */
static int grad_cols(const job *j, int64_t c0, int64_t c1) {
    const rbe_kernels *k = j->k;
    for (int64_t b = 0; b < j->n; b++) memset(j->out + b * j->cols + c0, 0, (size_t)(c1 - c0) * 4);
    float *w = aligned_floats(GRAD_PANEL_ROWS * GRAD_BLOCK_COLS);
    if (!w) return RBE_E_NOMEM;
    for (int64_t cb = c0; cb < c1; cb += GRAD_BLOCK_COLS) {
        const int64_t ce = rbe_min(cb + GRAD_BLOCK_COLS, c1);
        for (int64_t r = 0; r < j->rows; r += GRAD_PANEL_ROWS) {
            const int nr = (int)rbe_min(GRAD_PANEL_ROWS, j->rows - r);
            decode(j, r, nr, cb, ce, w, GRAD_BLOCK_COLS);
            for (int64_t b = 0; b < j->n; b++)
                k->panel_axpy(w, GRAD_BLOCK_COLS, nr, j->in + b * j->rows + r, ce - cb,
                              j->out + b * j->cols + cb);
        }
    }
    free(w);
    return 0;
}

static void *run_part(void *arg) {
    part *p = arg;
    p->err = p->j->op == OP_LINEAR ? linear_rows(p->j, p->start, p->stop)
                                   : grad_cols(p->j, p->start, p->stop);
    return NULL;
}

/* Split [0, total) into nthreads ranges (multiples of align); the caller runs the first. */
static int run(const job *j, int nthreads) {
    const int64_t total = j->op == OP_LINEAR ? j->rows : j->cols;
    const int64_t align = j->op == OP_LINEAR ? 4 : 64;
    const int64_t units = (total + align - 1) / align;
    int nt = nthreads < 1 ? 1 : (nthreads > RBE_MAX_THREADS ? RBE_MAX_THREADS : nthreads);
    if (nt > units) nt = (int)units;
    part parts[RBE_MAX_THREADS];
    int started[RBE_MAX_THREADS] = {0};
    for (int t = 0; t < nt; t++) {
        parts[t].j = j;
        parts[t].err = 0;
        parts[t].start = rbe_min(total, units * t / nt * align);
        parts[t].stop = rbe_min(total, units * (t + 1) / nt * align);
    }
    for (int t = 1; t < nt; t++)
        started[t] = pthread_create(&parts[t].tid, NULL, run_part, &parts[t]) == 0;
    run_part(&parts[0]);
    int err = parts[0].err;
    for (int t = 1; t < nt; t++) {
        if (started[t])
            pthread_join(parts[t].tid, NULL);
        else
            run_part(&parts[t]); /* could not start a thread: do its share here */
        if (!err) err = parts[t].err;
    }
    return err;
}

static int check(int64_t n, int64_t rows, int64_t cols, const rbe_kernels **k, int isa) {
    if (n < 0 || rows < 1 || cols < 1) return RBE_E_ARGS;
    *k = pick(isa);
    return *k ? 0 : RBE_E_ISA;
}

int rbe_int8_linear(const float *x, long long n, const signed char *q, const float *scale,
                    long long rows, long long cols, float *y, int isa, int nthreads) {
    job j = {0};
    int err = check(n, rows, cols, &j.k, isa);
    if (err || n == 0) return err;
    j.op = OP_LINEAR, j.in = x, j.n = n, j.rows = rows, j.cols = cols;
    j.q = q, j.scale8 = scale, j.out = y;
    return run(&j, nthreads);
}

int rbe_int8_grad_input(const float *g, long long n, const signed char *q, const float *scale,
                        long long rows, long long cols, float *out, int isa, int nthreads) {
    job j = {0};
    int err = check(n, rows, cols, &j.k, isa);
    if (err || n == 0) return err;
    j.op = OP_GRAD, j.in = g, j.n = n, j.rows = rows, j.cols = cols;
    j.q = q, j.scale8 = scale, j.out = out;
    return run(&j, nthreads);
}

static int int4_args(long long cols, long long gs) {
    /* packed columns must be whole bytes, so the padded width must be even */
    return gs >= 1 && rbe_round_up(cols, gs) % 2 == 0 ? 0 : RBE_E_ARGS;
}

int rbe_int4_linear(const float *x, long long n, const unsigned char *q,
                    const unsigned short *scale, const unsigned short *minimum, long long rows,
                    long long cols, long long group_size, float *y, int isa, int nthreads) {
    job j = {0};
    int err = check(n, rows, cols, &j.k, isa);
    if (!err) err = int4_args(cols, group_size);
    if (err || n == 0) return err;
    j.op = OP_LINEAR, j.is_int4 = 1, j.in = x, j.n = n, j.rows = rows, j.cols = cols;
    j.gs = group_size, j.q = q, j.sh = scale, j.mh = minimum, j.out = y;
    return run(&j, nthreads);
}

int rbe_int4_grad_input(const float *g, long long n, const unsigned char *q,
                        const unsigned short *scale, const unsigned short *minimum,
                        long long rows, long long cols, long long group_size, float *out,
                        int isa, int nthreads) {
    job j = {0};
    int err = check(n, rows, cols, &j.k, isa);
    if (!err) err = int4_args(cols, group_size);
    if (err || n == 0) return err;
    j.op = OP_GRAD, j.is_int4 = 1, j.in = g, j.n = n, j.rows = rows, j.cols = cols;
    j.gs = group_size, j.q = q, j.sh = scale, j.mh = minimum, j.out = out;
    return run(&j, nthreads);
}
