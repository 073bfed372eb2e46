/* Public entry points: argument checks, runtime ISA dispatch, and a persistent pthread pool that
 * splits rows (linear) or columns (grad_input) into dynamically claimed chunks.
 * Called from Python through cffi (API mode), which releases the GIL around each call. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* posix_memalign, pthreads */
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rbe_internal.h"
#include "rbe_kernels.h"

#define RBE_MAX_THREADS 64
/* grad_input: decoded panels of GRAD_PANEL_ROWS x GRAD_BLOCK_COLS weights (32 KiB, in L1/L2) */
#define GRAD_PANEL_ROWS 128
#define GRAD_BLOCK_COLS 64

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
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        mask |= RBE_ISA_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("f16c"))
        mask |= RBE_ISA_AVX512;
#endif
    return mask;
}

const rbe_kernels *rbe_kernels_for(int isa) {
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
    int op, is_int4, is_had;
    const float *in; /* x (linear) or g (grad) */
    int64_t n, rows, cols, gs;
    const void *q;
    const float *scale8;
    const uint16_t *sh, *mh;
    const uint8_t *sc; /* hadamard: scale_code; row_scale in scale8; cols is the padded width */
    const float *levels; /* hadamard: the value of each code */
    int bits;
    float *out;
} job;

static void *aligned_floats(int64_t count) {
    void *p = NULL;
    if (posix_memalign(&p, 64, (size_t)rbe_max(count, 1) * sizeof(float)) != 0) return NULL;
    return p;
}

static void decode(const job *j, int64_t r0, int nr, int64_t c0, int64_t c1, float *w,
                   int64_t ldw) {
    if (j->is_had)
        j->k->had_decode(j->q, j->sc, j->scale8, j->levels, j->cols, j->gs, j->bits, r0, nr, c0, c1,
                         w, ldw);
    else if (j->is_int4)
        j->k->int4_decode(j->q, j->sh, j->mh, j->cols, j->gs, r0, nr, c0, c1, w, ldw);
    else
        j->k->int8_decode(j->q, j->scale8, j->cols, r0, nr, c0, c1, w, ldw);
}

/* y rows [r0, r1) of every batch row. */
static int linear_rows(const job *j, int64_t r0, int64_t r1) {
    const rbe_kernels *k = j->k;
    if (j->n == 1 && j->is_had && j->bits == 4 && j->gs % 32 == 0) {
        float *scratch = aligned_floats(j->cols);
        if (!scratch) return RBE_E_NOMEM;
        k->had4_gemv(j->in, j->q, j->sc, j->scale8, j->levels, j->cols, j->gs, r0, r1, j->out,
                     scratch);
        free(scratch);
        return 0;
    }
    if (j->n == 1 && !j->is_had) {
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

/* out columns [c0, c1) of every batch row: for each block of columns, panels of decoded rows are
 * multiplied by tiles of batch rows (the first panel writes, later ones add). */
static int grad_cols(const job *j, int64_t c0, int64_t c1) {
    const rbe_kernels *k = j->k;
    float *w = aligned_floats(GRAD_PANEL_ROWS * GRAD_BLOCK_COLS);
    if (!w) return RBE_E_NOMEM;
    for (int64_t cb = c0; cb < c1; cb += GRAD_BLOCK_COLS) {
        const int64_t ce = rbe_min(cb + GRAD_BLOCK_COLS, c1);
        for (int64_t r = 0; r < j->rows; r += GRAD_PANEL_ROWS) {
            const int nr = (int)rbe_min(GRAD_PANEL_ROWS, j->rows - r);
            decode(j, r, nr, cb, ce, w, GRAD_BLOCK_COLS);
            for (int64_t b = 0; b < j->n; b += k->grad_batch) {
                const int nb = (int)rbe_min(k->grad_batch, j->n - b);
                k->grad_tile(w, GRAD_BLOCK_COLS, nr, j->in + b * j->rows + r, j->rows, nb, ce - cb,
                             j->out + b * j->cols + cb, j->cols, r > 0);
            }
        }
    }
    free(w);
    return 0;
}

/* ---- persistent worker pool with dynamic chunk claiming ----
 * Workers are started once (lazily, grown on demand) and sleep on a condition variable between
 * calls. A call cuts its range into chunks; the caller and every worker that wakes in time claim
 * chunks from an atomic counter. The caller never waits for a worker that has not started
 * (on a loaded machine that could take a whole scheduler time slice): it only waits for chunks
 * already claimed. A second concurrent caller, or a child after fork(), runs alone. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    pthread_mutex_t submit; /* one call uses the pool at a time */
    int nworkers, active, open;
    int slots; /* workers that may still join the current call (nthreads - 1 at most) */
    uint64_t generation;
    const job *j;
    int64_t total, chunk;
    int64_t next; /* next chunk start, claimed with __atomic_fetch_add */
    int err;
    pthread_t tids[RBE_MAX_THREADS];
} pool_t;

static pool_t pool = {.mu = PTHREAD_MUTEX_INITIALIZER,
                      .wake = PTHREAD_COND_INITIALIZER,
                      .done = PTHREAD_COND_INITIALIZER,
                      .submit = PTHREAD_MUTEX_INITIALIZER};
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static int run_range(const job *j, int64_t start, int64_t stop) {
    return j->op == OP_LINEAR ? linear_rows(j, start, stop) : grad_cols(j, start, stop);
}

/* Claim and run chunks of the current call until none is left; returns the first error. */
static int drain(const job *j) {
    int err = 0;
    for (;;) {
        const int64_t s = __atomic_fetch_add(&pool.next, pool.chunk, __ATOMIC_RELAXED);
        if (s >= pool.total) return err;
        const int e = run_range(j, s, rbe_min(pool.total, s + pool.chunk));
        if (!err) err = e;
    }
}

/* arg: the generation current when the worker was created (the call that starts it is the next). */
static void *worker(void *arg) {
    uint64_t seen = (uint64_t)(uintptr_t)arg;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (!pool.open || pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.mu);
        seen = pool.generation;
        if (pool.slots == 0) continue; /* this call asked for fewer threads than the pool has */
        pool.slots--;
        const job *j = pool.j;
        pool.active++;
        pthread_mutex_unlock(&pool.mu);
        const int err = drain(j);
        pthread_mutex_lock(&pool.mu);
        if (err && !pool.err) pool.err = err;
        if (--pool.active == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

static void reset_after_fork(void) {
    /* the child has only the forking thread: forget the workers, start afresh if needed */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_mutex_init(&pool.submit, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.nworkers = pool.active = pool.open = pool.slots = 0;
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, reset_after_fork); }

/* Grow the pool to `want` workers (as many as can be started); returns how many exist. */
static int ensure_workers(int want) {
    pthread_once(&atfork_once, register_atfork);
    while (pool.nworkers < want) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&pool.tids[pool.nworkers], &attr, worker,
                                      (void *)(uintptr_t)pool.generation);
        pthread_attr_destroy(&attr);
        if (rc) break;
        pool.nworkers++;
    }
    return pool.nworkers;
}

/* Run [0, total) (multiples of align) on the caller plus up to nthreads - 1 pool workers. */
static int run(const job *j, int nthreads) {
    const int64_t total = j->op == OP_LINEAR ? j->rows : j->cols;
    const int64_t align = j->op == OP_LINEAR ? 4 : 64;
    const int64_t units = (total + align - 1) / align;
    int nt = nthreads < 1 ? 1 : (nthreads > RBE_MAX_THREADS ? RBE_MAX_THREADS : nthreads);
    if (nt > units) nt = (int)units;
    if (nt == 1 || pthread_mutex_trylock(&pool.submit) != 0) return run_range(j, 0, total);
    /* about 4 chunks per thread: enough to balance uneven progress, few enough to stay cheap */
    const int64_t per = (units + 4 * nt - 1) / (4 * nt);
    pthread_mutex_lock(&pool.mu);
    const int workers = ensure_workers(nt - 1);
    pool.j = j, pool.total = total, pool.chunk = per * align;
    pool.next = 0, pool.err = 0, pool.open = workers > 0;
    pool.slots = workers < nt - 1 ? workers : nt - 1;
    pool.generation++;
    if (workers) pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    int err = drain(j);
    pthread_mutex_lock(&pool.mu);
    pool.open = 0; /* late wakers sleep again */
    while (pool.active) pthread_cond_wait(&pool.done, &pool.mu);
    if (!err) err = pool.err;
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.submit);
    return err;
}

static int check(int64_t n, int64_t rows, int64_t cols, const rbe_kernels **k, int isa) {
    if (n < 0 || rows < 1 || cols < 1) return RBE_E_ARGS;
    *k = rbe_kernels_for(isa);
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

/* ---- hadamard: rotate the input once, then the products in the rotated basis ---- */

/* Blocks must be powers of two summing to cols_p; the group size must divide cols_p. */
static int had_args(long long cols, long long cols_p, long long gs, int bits, const float *levels,
                    const long long *blocks, int nblocks) {
    if (bits < 2 || bits > 8 || gs < 1 || cols_p < cols || cols_p % gs || nblocks < 1 || !levels)
        return RBE_E_ARGS;
    long long total = 0;
    for (int i = 0; i < nblocks; i++) {
        if (blocks[i] < 1 || (blocks[i] & (blocks[i] - 1))) return RBE_E_ARGS;
        total += blocks[i];
    }
    return total == cols_p ? 0 : RBE_E_ARGS;
}

/* Orthonormal block-diagonal Walsh-Hadamard transform of v in place, in the codec's order
 * (Sylvester butterflies, then the float32 1/sqrt(block) scale). */
static void fwht_blocks(float *v, const long long *blocks, int nblocks) {
    for (int bi = 0; bi < nblocks; bi++) {
        const int64_t b = blocks[bi];
        for (int64_t h = 1; h < b; h *= 2)
            for (int64_t i = 0; i < b; i += 2 * h)
                for (int64_t t = i; t < i + h; t++) {
                    const float a = v[t], c = v[t + h];
                    v[t] = a + c;
                    v[t + h] = a - c;
                }
        const float s = (float)(1.0 / sqrt((double)b));
        for (int64_t t = 0; t < b; t++) v[t] *= s;
        v += b;
    }
}

int rbe_hadamard_linear(const float *x, long long n, long long cols, const unsigned char *codes,
                        const unsigned char *scale_code, const float *row_scale, long long rows,
                        long long cols_p, long long group_size, int bits, const float *levels,
                        const float *signs, const long long *blocks, int nblocks, float *y, int isa,
                        int nthreads) {
    job j = {0};
    int err = check(n, rows, cols, &j.k, isa);
    if (!err) err = had_args(cols, cols_p, group_size, bits, levels, blocks, nblocks);
    if (err || n == 0) return err;
    float *xr = aligned_floats(n * cols_p);
    if (!xr) return RBE_E_NOMEM;
    for (int64_t b = 0; b < n; b++) { /* xr = pad(x) @ R^T: signs, then the transform */
        float *v = xr + b * cols_p;
        for (int64_t c = 0; c < cols; c++) v[c] = x[b * cols + c] * signs[c];
        memset(v + cols, 0, (size_t)(cols_p - cols) * sizeof(float));
        fwht_blocks(v, blocks, nblocks);
    }
    j.op = OP_LINEAR, j.is_had = 1, j.in = xr, j.n = n, j.rows = rows, j.cols = cols_p;
    j.gs = group_size, j.bits = bits, j.q = codes, j.sc = scale_code, j.scale8 = row_scale;
    j.levels = levels;
    j.out = y;
    err = run(&j, nthreads);
    free(xr);
    return err;
}

int rbe_hadamard_grad_input(const float *g, long long n, long long cols, const unsigned char *codes,
                            const unsigned char *scale_code, const float *row_scale,
                            long long rows, long long cols_p, long long group_size, int bits,
                            const float *levels, const float *signs, const long long *blocks,
                            int nblocks, float *out, int isa, int nthreads) {
    job j = {0};
    int err = check(n, rows, cols, &j.k, isa);
    if (!err) err = had_args(cols, cols_p, group_size, bits, levels, blocks, nblocks);
    if (err || n == 0) return err;
    float *acc = aligned_floats(n * cols_p);
    if (!acc) return RBE_E_NOMEM;
    j.op = OP_GRAD, j.is_had = 1, j.in = g, j.n = n, j.rows = rows, j.cols = cols_p;
    j.gs = group_size, j.bits = bits, j.q = codes, j.sc = scale_code, j.scale8 = row_scale;
    j.levels = levels;
    j.out = acc;
    err = run(&j, nthreads);
    for (int64_t b = 0; !err && b < n; b++) { /* out = (g @ W_rot) @ R, first cols columns */
        float *v = acc + b * cols_p;
        fwht_blocks(v, blocks, nblocks);
        for (int64_t c = 0; c < cols; c++) out[b * cols + c] = v[c] * signs[c];
    }
    free(acc);
    return err;
}
