/* Native decoder engine: embeddings, norms, projections from codes, RoPE, causal attention
 * with a KV cache, activations, mixtures of experts, residuals and the head, for the described
 * decoder families (rbe_engine.h) and GPT-2, in
 * one call per prefill or decode step (rbe_engine.h). Weight products run through the per-ISA
 * canonical-layout kernels (lut_impl.h); work is split over a pool of threads that spin between
 * the parallel regions of a step (a token has ~200 of them) and sleep when idle. */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE /* madvise(MADV_HUGEPAGE) besides POSIX */
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "rbe_internal.h"
#include "rbe_kernels.h"

#define G_SLOTS 3 /* global matrices; per layer: e->m_slots (RBE_M_EXPERT + 3 per expert) */
#define V_SLOTS 8 /* per-layer vectors */
#define CHUNK 128 /* tokens per prefill pass (bounds the scratch) */
#define POOL_MAX 64
/* How long idle workers spin before sleeping: a decode step of the engine runs its regions back to
 * back; one matrix product on its own is usually called between other libraries' multi-threaded
 * work (torch's OpenMP pool), where a spinning worker takes a core from them (SmolLM2 through
 * transformers, 2 + 2 threads: 10.7 tok/s spinning 2 ms, 17.6 not spinning). The caller of a
 * single product chooses its thread count knowing that a sleeping worker is slow to wake. */
#define ENGINE_SPIN 0.002
#define MATRIX_SPIN 0.0
#define ATT_PARTS 16 /* most parts a decode token's attention is split into */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Weight storage: an arena of chunks of at least `min_chunk` bytes; those of a huge page or more
 * are 2 MiB-aligned and asked for transparent huge pages (where the kernel grants them: a token
 * streams every code, and 4 KiB pages cost a TLB miss each). A whole model's engine takes 32 MiB
 * chunks; one matrix on its own takes exactly what it needs (a 2 MiB page per small matrix made
 * SmolLM2's 211 separate matrices hold 1.2 GB). Arena memory is released with its context only. */
#define ARENA_CHUNK ((size_t)32 << 20)
#define HUGE_PAGE ((size_t)2 << 20)
typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t used, size;
    unsigned char *base;
} arena_chunk;

static void *arena_alloc(arena_chunk **head, size_t bytes, size_t min_chunk) {
    bytes = (bytes + 63) / 64 * 64;
    arena_chunk *c = *head;
    if (!c || c->size - c->used < bytes) {
        const size_t size = bytes > min_chunk ? bytes : min_chunk;
        const int huge = size >= HUGE_PAGE;
        const size_t alloc = huge ? (size + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE : size;
        void *base = NULL;
        arena_chunk *n = malloc(sizeof(*n));
        if (!n || posix_memalign(&base, huge ? HUGE_PAGE : 64, alloc)) {
            free(n);
            return NULL;
        }
#ifdef MADV_HUGEPAGE
        if (huge) madvise(base, alloc, MADV_HUGEPAGE);
#endif
        n->next = c, n->used = 0, n->size = alloc, n->base = base;
        *head = c = n;
    }
    void *p = c->base + c->used;
    c->used += bytes;
    return p;
}

static void arena_free(arena_chunk *c) {
    while (c) {
        arena_chunk *next = c->next;
        free(c->base);
        free(c);
        c = next;
    }
}

static void *alloc_floats(int64_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, (size_t)(n > 0 ? n : 1) * sizeof(float))) return NULL;
    return p;
}

/* ---- thread pool: workers spin for a while after each region, then sleep ----
 * One region at a time (others run on their caller alone). The claim counter packs the region's
 * generation (high 32 bits) with the next chunk index, so a worker that wakes late can never
 * run a chunk of another region; the caller waits only for chunks that were claimed. */
typedef void (*range_fn)(void *ctx, int64_t start, int64_t stop, int tid);
#define POOL_CHUNKS 64 /* chunks a region at most */

static struct {
    pthread_mutex_t mu, submit;
    pthread_cond_t wake;
    int nworkers, sleepers, want;
    uint64_t ctr;
    range_fn fn;
    void *ctx;
    int64_t nchunks, done;
    int64_t bounds[POOL_CHUNKS + 1]; /* chunk k is [bounds[k], bounds[k + 1]) */
    int64_t spin_ns; /* how long the workers spin after this region before sleeping */
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER,
          .submit = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t matrix_mu = PTHREAD_MUTEX_INITIALIZER; /* see shared_scratch */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

#define CLOSED 0xffffffffu /* claim index of a generation whose fields are being written */

static void drain(uint32_t gen, int tid) {
    /* every access is sequentially consistent: a field read here that belongs to a newer region
     * implies the claim below sees that region's (closed) counter and gives up */
    uint64_t open;
    while ((uint32_t)((open = __atomic_load_n(&pool.ctr, __ATOMIC_SEQ_CST)) >> 32) == gen &&
           (uint32_t)open == CLOSED)
        cpu_relax(); /* woken between the close and the open: the fields are being written */
    if ((uint32_t)(open >> 32) != gen) return;
    const range_fn fn = __atomic_load_n(&pool.fn, __ATOMIC_SEQ_CST);
    void *ctx = __atomic_load_n(&pool.ctx, __ATOMIC_SEQ_CST);
    const int64_t nchunks = __atomic_load_n(&pool.nchunks, __ATOMIC_SEQ_CST);
    /* read after the open: a worker that woke on the close must not act on the last region's width */
    if (tid >= __atomic_load_n(&pool.want, __ATOMIC_SEQ_CST)) return;
    for (;;) {
        uint64_t v = __atomic_load_n(&pool.ctr, __ATOMIC_SEQ_CST);
        if ((uint32_t)(v >> 32) != gen || (int64_t)(v & 0xffffffffu) >= nchunks) return;
        if (!__atomic_compare_exchange_n(&pool.ctr, &v, v + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            continue;
        const int64_t k = (int64_t)(v & 0xffffffffu);
        fn(ctx, __atomic_load_n(&pool.bounds[k], __ATOMIC_SEQ_CST), __atomic_load_n(&pool.bounds[k + 1], __ATOMIC_SEQ_CST),
           tid);
        __atomic_add_fetch(&pool.done, 1, __ATOMIC_SEQ_CST);
    }
}

static void *worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    uint32_t seen = (uint32_t)(__atomic_load_n(&pool.ctr, __ATOMIC_ACQUIRE) >> 32);
    for (;;) {
        uint32_t gen = seen;
        const double until = now() + 1e-9 * (double)__atomic_load_n(&pool.spin_ns, __ATOMIC_SEQ_CST);
        for (int i = 0; gen == seen; i++) {
            gen = (uint32_t)(__atomic_load_n(&pool.ctr, __ATOMIC_ACQUIRE) >> 32);
            if (gen != seen) break;
            cpu_relax();
            if ((i & 255) == 255 && now() > until) {
                pthread_mutex_lock(&pool.mu);
                __atomic_add_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
                while ((gen = (uint32_t)(__atomic_load_n(&pool.ctr, __ATOMIC_SEQ_CST) >> 32)) == seen)
                    pthread_cond_wait(&pool.wake, &pool.mu);
                __atomic_sub_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
                pthread_mutex_unlock(&pool.mu);
            }
        }
        seen = gen;
        drain(gen, tid);
    }
    return NULL;
}

static void pool_after_fork(void) { /* the child has no workers: start afresh if needed */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_mutex_init(&pool.submit, NULL);
    pthread_mutex_init(&matrix_mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.nworkers = pool.sleepers = 0;
}
static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* Run fn over [0, total) in chunks of `align` multiples on up to nthreads threads; the workers
 * then spin `spin` seconds for the next region before they sleep. */
static void parallel(int nthreads, double spin, int64_t total, int64_t align, range_fn fn, void *ctx) {
    if (total <= 0) return;
    const int64_t units = (total + align - 1) / align;
    int nt = nthreads < 1 ? 1 : (nthreads > POOL_MAX ? POOL_MAX : nthreads);
    if (nt > units) nt = (int)units;
    if (nt == 1 || pthread_mutex_trylock(&pool.submit) != 0) {
        fn(ctx, 0, total, 0);
        return;
    }
    pthread_once(&pool_once, pool_init);
    while (pool.nworkers < nt - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&t, &attr, worker, (void *)(intptr_t)(pool.nworkers + 1));
        pthread_attr_destroy(&attr);
        if (rc) break;
        pool.nworkers++;
    }
    if (pool.nworkers < nt - 1) nt = pool.nworkers + 1;
    /* close the new generation first (no claims), then write its fields, then open it */
    const uint32_t gen = (uint32_t)(__atomic_load_n(&pool.ctr, __ATOMIC_SEQ_CST) >> 32) + 1;
    __atomic_store_n(&pool.ctr, ((uint64_t)gen << 32) | CLOSED, __ATOMIC_SEQ_CST);
    /* guided chunks: each 1 / nt of the units left, down to one; the first ones are large, the
     * last ones small, so the threads end together. A decode step of 8 SmolLM2 sequences (AMD
     * EPYC Zen 4, 2 threads, best of 40 steps, 5 interleaved rounds): 10.13-10.71 ms against
     * 11.00-11.38 with 3 equal chunks a thread; one sequence's unchanged (3.86-4.63 against
     * 3.84-4.30). */
    int64_t nchunks = 0, at = 0;
    while (at < total) {
        const int64_t left = (total - at + align - 1) / align;
        const int64_t take = nchunks == POOL_CHUNKS - 1 ? left : (left + nt - 1) / nt;
        __atomic_store_n(&pool.bounds[nchunks++], at, __ATOMIC_SEQ_CST);
        at = at + take * align < total ? at + take * align : total;
    }
    __atomic_store_n(&pool.bounds[nchunks], total, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.fn, fn, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.ctx, ctx, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.nchunks, nchunks, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.want, nt, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.spin_ns, (int64_t)(spin * 1e9), __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.done, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool.ctr, (uint64_t)gen << 32, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mu);
    }
    drain(gen, 0);
    while (__atomic_load_n(&pool.done, __ATOMIC_SEQ_CST) < nchunks) cpu_relax();
    pthread_mutex_unlock(&pool.submit);
}

/* ---- the model ---- */
/* Bytes of one KV cache element of kind (RBE_KV_*). */
static inline int64_t kv_size(int kind) { return kind == RBE_KV_F32 ? 4 : kind == RBE_KV_F16 ? 2 : 1; }

typedef struct {
    rbe_lut lut;
    int64_t rows, cols, cols_p; /* stored shape; the transform's width */
    int transposed, tf, set;
    float *bias;
} emat;

typedef struct {
    float *signs;
    long long *blocks;
    int nblocks;
    int64_t cols_p;
} etf;

struct rbe_engine {
    rbe_engine_config c;
    emat *mats;  /* n_layers * m_slots, then G_SLOTS globals */
    int64_t m_slots;
    int64_t qk_norm_len[2];  /* q and k norm widths: head_dim (per head) or the projection's */
    float **vecs; /* n_layers * V_SLOTS, then 2 globals */
    etf *tfs;
    void *kc, *vc;           /* [layer][kv head]: K blocked by 16 positions, V rows (see kv_at) */
    int kv;                  /* their elements (RBE_KV_*) */
    int64_t kv_scales;       /* int8: bytes into a cache where its scales begin, [layer][kv head][position] */
    /* KV cache slots (independent sequences sharing the weights): slot s's caches and length;
     * kc, vc and length are those of the selected slot */
    void *slot_kc[RBE_MAX_SLOTS], *slot_vc[RBE_MAX_SLOTS];
    int64_t slot_len[RBE_MAX_SLOTS], cache_bytes;
    int slot;
    int64_t ctx16;           /* positions per (layer, kv head), max_ctx rounded up to 16 */
    float *rope_inv, *rope_factor; /* [kind][rotary_dim / 2] inverse frequencies; [kind] */
    float *rope_cos, *rope_sin;     /* a chunk's: [kind][token][rotary_dim / 2] */
    int *layer_rope;                /* [layer] kind or -1 */
    int64_t *layer_window;          /* [layer] 0: all positions */
    float *route;                   /* a chunk's router outputs, CHUNK x n_experts */
    int64_t row_pos[CHUNK];         /* a chunk's rows: each one's position ... */
    void *row_kc[CHUNK], *row_vc[CHUNK]; /* ... and its sequence's caches */
    int64_t *moe_rows;              /* per expert, the chunk's rows routed to it ... */
    float *moe_w;                   /* ... and their weights (n_experts x CHUNK) */
    int64_t length, width;   /* cached positions; widest activation row (multiple of 32) */
    /* per-chunk activations */
    float *x, *xn, *q, *k, *v, *att, *f1, *f2, *xr, *xt, *yr, *row;
    float *attp; /* split decode attention: n_heads * ATT_PARTS * (head_dim + 2) */
    uint8_t *pack; /* a chunk's input quantized for the int8 product (RBE_Q8_REC) */
    float *scratch[POOL_MAX];
    int64_t scratch_floats, io_floats; /* per-thread scratch; width of xr, yr and row */
    int64_t pack_bytes;
    int scratch_count;                 /* per-thread scratch buffers allocated */
    int64_t bytes;
    double prof[3];
    const rbe_kernels *kern;
    int nthreads;
    double spin; /* seconds the pool's workers wait busily for this context's next region */
    arena_chunk *arena; /* codes and dense weights */
    size_t arena_chunk;  /* the arena's smallest chunk */
};

static emat *mat(rbe_engine *e, int layer, int slot) {
    return layer < 0 ? &e->mats[(int64_t)e->c.n_layers * e->m_slots + slot]
                     : &e->mats[(int64_t)layer * e->m_slots + slot];
}
static float *vec(rbe_engine *e, int layer, int slot) {
    return layer < 0 ? e->vecs[(int64_t)e->c.n_layers * V_SLOTS + slot]
                     : e->vecs[(int64_t)layer * V_SLOTS + slot];
}

static void free_mat(emat *m) { /* codes and dense rows live in the engine's arena */
    free((void *)m->lut.step);
    free((void *)m->lut.offset);
    free((void *)m->lut.step16);
    free((void *)m->lut.offset16);
    free((void *)m->lut.row_scale);
    free((void *)m->lut.step_code);
    free(m->bias);
    memset(m, 0, sizeof(*m));
}

void rbe_engine_free(rbe_engine *e) {
    if (!e) return;
    const int64_t nm = (int64_t)e->c.n_layers * e->m_slots + G_SLOTS;
    const int64_t nv = (int64_t)e->c.n_layers * V_SLOTS + 2;
    for (int64_t i = 0; e->mats && i < nm; i++) free_mat(&e->mats[i]);
    for (int64_t i = 0; e->vecs && i < nv; i++) free(e->vecs[i]);
    for (int i = 0; e->tfs && i < e->c.n_transforms; i++) {
        free(e->tfs[i].signs);
        free(e->tfs[i].blocks);
    }
    for (int i = 0; i < RBE_MAX_SLOTS; i++) free(e->slot_kc[i]), free(e->slot_vc[i]);
    float *bufs[] = {e->rope_inv, e->rope_factor, e->rope_cos, e->rope_sin, e->x, e->xn, e->q, e->k, e->v,
                     e->att, e->f1, e->f2, e->xr, e->xt, e->yr, e->row, e->attp, e->route, e->moe_w};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]);
    free(e->layer_rope), free(e->layer_window), free(e->moe_rows);
    for (int i = 0; i < POOL_MAX; i++) free(e->scratch[i]);
    free(e->pack);
    free(e->mats);
    free(e->vecs);
    free(e->tfs);
    arena_free(e->arena);
    free(e);
}

static int64_t round32(int64_t n) { return (n + 31) / 32 * 32; }

rbe_engine *rbe_engine_new(const rbe_engine_config *cfg) {
    rbe_engine_config c = *cfg;
    if (c.rotary_dim == 0) c.rotary_dim = c.head_dim;
    if (c.n_ropes == 0) c.n_ropes = 1;
    if (c.embed_scale == 0.0f) c.embed_scale = 1.0f;
    if (c.attn_scale == 0.0f) c.attn_scale = 1.0f / sqrtf((float)c.head_dim);
    if ((c.arch != RBE_ARCH_DECODER && c.arch != RBE_ARCH_GPT2) || c.n_layers < 1 || c.hidden < 1 ||
        c.intermediate < 0 || c.n_heads < 1 || c.n_kv_heads < 1 || c.n_heads % c.n_kv_heads ||
        c.head_dim < 2 || c.vocab < 1 || c.max_ctx < 1 || c.n_transforms < 0 ||
        c.rope_style < 0 || c.rope_style > 2 || c.activation < 0 || c.activation > 4 || c.kv_type < RBE_KV_F32 ||
        c.kv_type > RBE_KV_I8 || c.act_int8 < 0 || c.act_int8 > 1 || c.rotary_dim < 2 || c.rotary_dim % 2 ||
        c.rotary_dim > c.head_dim || c.n_ropes < 1 || c.n_ropes > 16 || c.n_experts < 0 || c.experts_used < 0 ||
        c.experts_used > c.n_experts || (c.n_experts && (c.experts_used < 1 || c.expert_intermediate < 1)) ||
        !(c.attn_softcap >= 0.0f) || !(c.final_softcap >= 0.0f) || !isfinite(c.embed_scale) ||
        !isfinite(c.attn_scale) || !isfinite(c.norm_offset))
        return NULL;
    rbe_engine *e = calloc(1, sizeof(*e));
    if (!e) return NULL;
    e->c = c;
    e->spin = ENGINE_SPIN;
    e->arena_chunk = ARENA_CHUNK;
    e->m_slots = RBE_M_EXPERT + 3 * (int64_t)c.n_experts;
    e->mats = calloc((size_t)(c.n_layers * e->m_slots + G_SLOTS), sizeof(emat));
    e->vecs = calloc((size_t)c.n_layers * V_SLOTS + 2, sizeof(float *));
    e->tfs = calloc((size_t)(c.n_transforms > 0 ? c.n_transforms : 1), sizeof(etf));
    const int64_t hd = c.head_dim, qd = (int64_t)c.n_heads * hd, kvd = (int64_t)c.n_kv_heads * hd;
    e->ctx16 = (c.max_ctx + 15) / 16 * 16; /* K is stored in blocks of 16 positions */
    const int64_t cache = (int64_t)c.n_layers * kvd * e->ctx16;
    /* calloc: the cache's pages become resident only as positions are written */
    e->kv = c.kv_type;
    e->kv_scales = cache * kv_size(e->kv);
    e->cache_bytes = e->kv_scales + (e->kv == RBE_KV_I8 ? cache / hd * (int64_t)sizeof(float) : 0);
    e->kc = e->slot_kc[0] = calloc((size_t)e->cache_bytes, 1);
    e->vc = e->slot_vc[0] = calloc((size_t)e->cache_bytes, 1);
    const int64_t half_rot = c.rotary_dim / 2;
    e->rope_inv = alloc_floats(c.n_ropes * half_rot);
    e->rope_factor = alloc_floats(c.n_ropes);
    e->rope_cos = alloc_floats(c.n_ropes * CHUNK * half_rot);
    e->rope_sin = alloc_floats(c.n_ropes * CHUNK * half_rot);
    e->layer_rope = calloc((size_t)c.n_layers, sizeof(int));
    e->layer_window = calloc((size_t)c.n_layers, sizeof(int64_t));
    const int64_t experts = c.n_experts > 0 ? c.n_experts : 1;
    e->route = alloc_floats(CHUNK * experts);
    e->moe_w = alloc_floats(CHUNK * experts);
    e->moe_rows = calloc((size_t)(CHUNK * experts), sizeof(int64_t));
    int64_t w = c.hidden > 2 * (int64_t)c.intermediate ? c.hidden : 2 * (int64_t)c.intermediate;
    if (qd + 2 * kvd > w) w = qd + 2 * kvd;
    if (2 * (int64_t)c.expert_intermediate > w) w = 2 * (int64_t)c.expert_intermediate;
    if (c.n_experts > w) w = c.n_experts;
    e->width = round32(w);
    e->x = alloc_floats(CHUNK * e->width);
    e->xn = alloc_floats(CHUNK * e->width);
    e->q = alloc_floats(CHUNK * e->width);
    e->k = alloc_floats(CHUNK * e->width);
    e->v = alloc_floats(CHUNK * e->width);
    e->att = alloc_floats(CHUNK * e->width);
    e->f1 = alloc_floats(CHUNK * e->width);
    e->f2 = alloc_floats(CHUNK * e->width);
    e->attp = alloc_floats((int64_t)c.n_heads * ATT_PARTS * (hd + 2));
    if (!e->mats || !e->vecs || !e->tfs || !e->kc || !e->vc || !e->rope_inv || !e->rope_factor ||
        !e->rope_cos || !e->rope_sin || !e->layer_rope || !e->layer_window || !e->route || !e->moe_w ||
        !e->moe_rows || !e->x || !e->xn || !e->q || !e->k || !e->v || !e->att || !e->f1 || !e->f2 || !e->attp) {
        rbe_engine_free(e);
        return NULL;
    }
    /* every kind starts as torch's default: inv = 1 / theta^(2i/d) in float32 */
    for (int k = 0; k < c.n_ropes; k++) {
        for (int64_t i = 0; i < half_rot; i++)
            e->rope_inv[k * half_rot + i] = 1.0f / powf(c.rope_theta, (float)(2 * i) / (float)c.rotary_dim);
        e->rope_factor[k] = 1.0f;
    }
    e->bytes = (int64_t)sizeof(*e) + 4 * (8 * CHUNK * e->width + 2 * c.n_ropes * CHUNK * half_rot);
    return e;
}

int rbe_engine_set_transform(rbe_engine *e, int id, long long cols_p, const float *signs,
                             const long long *blocks, int nblocks) {
    if (!e || id < 0 || id >= e->c.n_transforms || cols_p < 1 || nblocks < 1) return RBE_E_ARGS;
    long long total = 0;
    for (int i = 0; i < nblocks; i++) {
        if (blocks[i] < 1 || (blocks[i] & (blocks[i] - 1))) return RBE_E_ARGS;
        total += blocks[i];
    }
    if (total != cols_p) return RBE_E_ARGS;
    etf *t = &e->tfs[id];
    free(t->signs);
    free(t->blocks);
    t->signs = alloc_floats(cols_p);
    t->blocks = malloc((size_t)nblocks * sizeof(long long));
    if (!t->signs || !t->blocks) return RBE_E_NOMEM;
    memcpy(t->signs, signs, (size_t)cols_p * sizeof(float));
    memcpy(t->blocks, blocks, (size_t)nblocks * sizeof(long long));
    t->nblocks = nblocks, t->cols_p = cols_p;
    e->bytes += cols_p * 4 + nblocks * 8;
    return 0;
}

/* The shape a slot must have: (out, in) of the product it computes. */
static int slot_shape(const rbe_engine *e, int layer, int slot, int64_t *out, int64_t *in) {
    const rbe_engine_config *c = &e->c;
    const int64_t h = c->hidden, qd = (int64_t)c->n_heads * c->head_dim;
    const int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim;
    if (layer < 0) {
        switch (slot) {
            case RBE_G_EMBED: case RBE_G_HEAD: *out = c->vocab, *in = h; return 0;
            case RBE_G_POS: *out = c->max_ctx, *in = h; return c->arch == RBE_ARCH_GPT2 ? 0 : RBE_E_ARGS;
            default: return RBE_E_ARGS;
        }
    }
    switch (slot) {
        case RBE_M_Q: *out = qd, *in = h; break;
        case RBE_M_K: case RBE_M_V: *out = kvd, *in = h; break;
        case RBE_M_O: *out = h, *in = qd; break;
        case RBE_M_GATE: case RBE_M_UP: *out = c->intermediate, *in = h; break;
        case RBE_M_DOWN: *out = h, *in = c->intermediate; break;
        case RBE_M_QKV: *out = qd + 2 * kvd, *in = h; break;
        case RBE_M_GATE_UP: *out = 2 * (int64_t)c->intermediate, *in = h; break;
        case RBE_M_ROUTER: *out = c->n_experts, *in = h; return c->n_experts ? 0 : RBE_E_ARGS;
        default:
            if (slot < RBE_M_EXPERT || slot >= e->m_slots) return RBE_E_ARGS;
            if ((slot - RBE_M_EXPERT) % 3 == 2) *out = h, *in = c->expert_intermediate;
            else *out = c->expert_intermediate, *in = h;
    }
    return 0;
}

static int exact_half(float v) { return rbe_half_to_float(rbe_float_to_half(v)) == v; }

/* The steps and offsets of d in their most compact exact form (see rbe_lut). */
static int load_steps(rbe_engine *e, rbe_lut *L, const rbe_matrix_desc *d, int64_t rows, int64_t groups) {
    const int64_t n = rows * groups;
    L->has_offset = d->offset != NULL;
    if (d->step_row && d->step_code && !d->offset) {
        float *rs = alloc_floats(rows);
        uint8_t *sc = malloc((size_t)n);
        if (!rs || !sc) return free(rs), free(sc), RBE_E_NOMEM;
        memcpy(rs, d->step_row, (size_t)rows * sizeof(float));
        memcpy(sc, d->step_code, (size_t)n);
        L->step_kind = RBE_STEP_CODE, L->row_scale = rs, L->step_code = sc;
        e->bytes += rows * 4 + n;
        return 0;
    }
    int half = 1;
    for (int64_t i = 0; half && i < n; i++)
        half = exact_half(d->step[i]) && (!d->offset || exact_half(d->offset[i]));
    if (half) {
        uint16_t *st = malloc((size_t)n * 2), *off = d->offset ? malloc((size_t)n * 2) : NULL;
        if (!st || (d->offset && !off)) return free(st), free(off), RBE_E_NOMEM;
        for (int64_t i = 0; i < n; i++) {
            st[i] = rbe_float_to_half(d->step[i]);
            if (off) off[i] = rbe_float_to_half(d->offset[i]);
        }
        L->step_kind = RBE_STEP_F16, L->step16 = st, L->offset16 = off;
        e->bytes += n * 2 * (off ? 2 : 1);
        return 0;
    }
    float *st = alloc_floats(n), *off = d->offset ? alloc_floats(n) : NULL;
    if (!st || (d->offset && !off)) return free(st), free(off), RBE_E_NOMEM;
    memcpy(st, d->step, (size_t)n * sizeof(float));
    if (off) memcpy(off, d->offset, (size_t)n * sizeof(float));
    L->step_kind = RBE_STEP_F32, L->step = st, L->offset = off;
    e->bytes += n * 4 * (off ? 2 : 1);
    return 0;
}

/* Fits lv8 = round((level - beta) / alpha) in [-128, 127] to L's first n levels; 1 when
 * alpha * lv8 + beta equals every level exactly. */
static int q8_fit(rbe_lut *L, int n, float alpha, float beta) {
    int exact = 1;
    for (int k = 0; k < n; k++) {
        const double v = nearbyint(((double)L->levels[k] - beta) / alpha);
        const int q = v < -128.0 ? -128 : v > 127.0 ? 127 : (int)v;
        L->lv8[k] = (int8_t)q;
        exact &= (double)alpha * q + beta == (double)L->levels[k];
    }
    L->q8_alpha = alpha, L->q8_beta = beta, L->q8_exact = exact;
    return exact;
}

/* The int8 form of L's n levels (rbe_lut's lv8): with offsets (whose input sums q8_beta shares)
 * levels affine in the code as lv8 = k - n / 2 (centred: the widest rotation); else integer
 * multiples of max |level| / m for the least m <= 128 that is exact (mid-rise grids such as
 * k - 7.5: m = 15; int8's k - 128: m = 128), else affine (8-bit mid-rise grids), else
 * max |level| / 127 rounded (non-uniform grids). */
static void q8_levels(rbe_lut *L, int n) {
    float amax = 0.0f;
    for (int k = 0; k < n; k++) amax = fabsf(L->levels[k]) > amax ? fabsf(L->levels[k]) : amax;
    memset(L->lv8, 0, sizeof(L->lv8));
    const float beta = L->a0 + L->da * (float)(n / 2);
    if (amax == 0.0f) {
        q8_fit(L, n, 1.0f, 0.0f);
        return;
    }
    if (L->affine && L->has_offset && q8_fit(L, n, L->da, beta)) return;
    for (int m = 1; m <= 128; m++)
        if (q8_fit(L, n, amax / (float)m, 0.0f)) return;
    if (L->affine && q8_fit(L, n, L->da, beta)) return;
    q8_fit(L, n, amax / 127.0f, 0.0f);
}

/* L's 16-bit levels (rbe_lut's lv16) when its codes are 5- or 6-bit (PLANES). */
static void q16_levels(rbe_lut *L, int n) {
    memset(L->lv16, 0, sizeof(L->lv16));
    L->q16_alpha = 0.0f;
    if (L->kind != RBE_LUT_PLANES) return;
    float amax = 0.0f;
    for (int k = 0; k < n; k++) amax = fabsf(L->levels[k]) > amax ? fabsf(L->levels[k]) : amax;
    L->q16_alpha = amax / 16383.0f;
    for (int k = 0; k < n && amax > 0.0f; k++) L->lv16[k] = (int16_t)nearbyintf(L->levels[k] / L->q16_alpha);
}

/* The widest rotation R <= 16 whose rotated levels fit int8 (rbe_lut's q8_rot): a group's first
 * value sums R levels, the others R / 2 minus R / 2. */
static int q8_rotation(const rbe_lut *L, int n) {
    int lo = 0, hi = 0;
    for (int k = 0; k < n; k++) lo = L->lv8[k] < lo ? L->lv8[k] : lo, hi = L->lv8[k] > hi ? L->lv8[k] : hi;
    int r = 16;
    while (r > 1 && (r * hi > 127 || r * lo < -128 || r / 2 * (hi - lo) > 127)) r /= 2;
    return r;
}

/* d's trellis codes (rbe_matrix_desc's trellis_bits tb) as rbe_lut's TRELLIS rows of rb bytes
 * into q: the first code's 8 bits, then each later code's high tb bits (padding columns continue
 * the path with zero bits). RBE_E_ARGS when a code does not follow the previous one. */
static int pack_trellis(const rbe_matrix_desc *d, int64_t cp, int tb, int64_t rb, uint8_t *q) {
    const unsigned keep = (1u << (8 - tb)) - 1u;
    for (int64_t r = 0; r < d->rows; r++) {
        const unsigned char *src = d->codes + r * d->cols_p;
        uint8_t *dst = q + r * rb;
        memset(dst, 0, (size_t)rb);
        unsigned prev = src[0];
        uint64_t acc = prev; /* bits not yet written, lowest first */
        int held = 8;
        for (int64_t c = 1; c < cp; c++) {
            const unsigned code = c < d->cols_p ? src[c] : prev >> tb;
            if ((code & keep) != prev >> tb) return RBE_E_ARGS;
            acc |= (uint64_t)(code >> (8 - tb)) << held, held += tb;
            for (; held >= 32; held -= 32, acc >>= 32, dst += 4)
                for (int k = 0; k < 4; k++) dst[k] = (uint8_t)(acc >> (8 * k));
            prev = code;
        }
        for (int k = 0; k * 8 < held; k++) dst[k] = (uint8_t)(acc >> (8 * k));
    }
    return 0;
}

/* Copy d into m, repacking codes (nibbles for <= 4 bits, else bytes) to 32-column blocks. */
static int load_mat(rbe_engine *e, emat *m, const rbe_matrix_desc *d) {
    const int64_t rows = d->rows, cols_p = d->cols_p;
    const int dense = d->bits == 32;
    if (rows < 1 || d->cols < 1 || cols_p < d->cols || d->group_size < 1) return RBE_E_ARGS;
    if (!dense && (d->bits < 2 || d->bits > 8 || !(d->codes || d->nibbles) || !d->levels || !d->step)) return RBE_E_ARGS;
    if (!dense && d->nibbles && (d->bits > 4 || d->trellis_bits || cols_p % 32)) return RBE_E_ARGS;
    if (dense && !d->dense) return RBE_E_ARGS;
    if (d->transform >= e->c.n_transforms || d->transform < -1) return RBE_E_ARGS;
    if (d->transform >= 0 && e->tfs[d->transform].cols_p != cols_p) return RBE_E_ARGS;
    const int64_t cp = round32(cols_p);
    int64_t gs = d->group_size, groups = (cols_p + gs - 1) / gs;
    if (groups == 1) gs = cp;
    else if (gs % 32 || cols_p % gs) return RBE_E_ARGS;
    rbe_lut *L = &m->lut;
    L->rows = rows, L->cols_p = cp, L->gs = gs, L->groups = groups, L->bits = d->bits;
    if (dense) {
        float *w = arena_alloc(&e->arena, (size_t)(rows * cp) * sizeof(float), e->arena_chunk);
        if (!w) return RBE_E_NOMEM;
        for (int64_t r = 0; r < rows; r++) {
            memcpy(w + r * cp, d->dense + r * cols_p, (size_t)cols_p * sizeof(float));
            memset(w + r * cp + cols_p, 0, (size_t)(cp - cols_p) * sizeof(float));
        }
        L->kind = RBE_LUT_F32, L->dense = w;
        e->bytes += rows * cp * 4;
    } else {
        const int tb = d->trellis_bits, nib = d->bits <= 4, planes = d->bits == 5 || d->bits == 6 ? d->bits - 4 : 0;
        if (tb < 0 || tb > 7 || (tb && d->bits != 8)) return RBE_E_ARGS;
        const int64_t bb = tb ? 4 * tb : nib ? 16 : planes ? 16 + 4 * planes : 32;
        const int64_t rb = cp / 32 * bb + (tb ? 8 : 0); /* block reads run up to 7 bytes past */
        const int borrowed = d->nibbles && d->borrow;
        uint8_t *q = borrowed ? NULL : arena_alloc(&e->arena, (size_t)(rows * rb), e->arena_chunk);
        if (!borrowed && !q) return RBE_E_NOMEM;
        L->codes = borrowed ? d->nibbles : q;
        int err = load_steps(e, L, d, rows, groups);
        if (!err && tb) err = pack_trellis(d, cp, tb, rb, q);
        if (err) return err;
        if (d->nibbles && !borrowed) memcpy(q, d->nibbles, (size_t)(rows * rb));
        const unsigned mask = (1u << d->bits) - 1u;
        for (int64_t r = 0; r < rows && !tb && !d->nibbles; r++) { /* trellis rows and nibbles are packed already */
            const unsigned char *src = d->codes + r * cols_p;
            uint8_t *dst = q + r * rb;
            memset(dst, 0, (size_t)rb); /* padding columns: code 0, meeting a zero input */
            for (int64_t c = 0; c < cols_p; c++) {
                const unsigned code = src[c] & mask;
                uint8_t *blk = dst + (c / 32) * bb;
                const int t = (int)(c % 32);
                if (nib || planes) blk[t % 16] |= (uint8_t)((code & 15u) << (t >= 16 ? 4 : 0));
                else blk[t] = (uint8_t)code;
                for (int k = 0; k < planes; k++)
                    blk[16 + 4 * k + t / 8] |= (uint8_t)(((code >> (4 + k)) & 1u) << (t % 8));
            }
        }
        const int n = 1 << d->bits;
        memset(L->levels, 0, sizeof(L->levels));
        memcpy(L->levels, d->levels, (size_t)n * sizeof(float));
        L->a0 = L->levels[0], L->da = L->levels[1] - L->levels[0], L->affine = 1;
        for (int i = 0; i < n; i++)
            if (fmaf((float)i, L->da, L->a0) != L->levels[i]) L->affine = 0;
        L->kind = tb ? RBE_LUT_TRELLIS : nib ? RBE_LUT_NIBBLE : planes ? RBE_LUT_PLANES : RBE_LUT_BYTE;
        L->row_bytes = rb, L->block_bytes = bb, L->tbits = tb;
        q8_levels(L, n);
        q16_levels(L, n);
        /* rotated inputs have no outliers to spread: a transform already mixed them */
        L->q8_rot = d->transform < 0 ? q8_rotation(L, n) : 1;
        e->bytes += borrowed ? 0 : rows * rb;
    }
    m->rows = rows, m->cols = d->cols, m->cols_p = cols_p;
    m->transposed = d->transposed, m->tf = d->transform;
    if (d->bias) {
        const int64_t out = d->transposed ? d->cols : rows;
        m->bias = alloc_floats(out);
        if (!m->bias) return RBE_E_NOMEM;
        memcpy(m->bias, d->bias, (size_t)out * sizeof(float));
        e->bytes += out * 4;
    }
    m->set = 1;
    return 0;
}

int rbe_engine_set_matrix(rbe_engine *e, int layer, int slot, const rbe_matrix_desc *d) {
    if (!e || !d || layer < -1 || layer >= e->c.n_layers) return RBE_E_ARGS;
    int64_t out, in;
    if (slot_shape(e, layer, slot, &out, &in)) return RBE_E_ARGS;
    const int64_t d_out = d->transposed ? d->cols : d->rows, d_in = d->transposed ? d->rows : d->cols;
    if (d_out != out || d_in != in) return RBE_E_ARGS;
    if (layer < 0 && d->transposed) return RBE_E_ARGS; /* row lookups and the head: (out, in) */
    emat *m = mat(e, layer, slot);
    free_mat(m);
    const int err = load_mat(e, m, d);
    if (err) free_mat(m);
    return err;
}

/* The lengths vector slot `slot` may have (a q/k norm: per head or whole); 0: no such slot. */
static int vector_fits(const rbe_engine *e, int layer, int slot, int64_t n) {
    const rbe_engine_config *c = &e->c;
    if (slot < 0 || slot >= (layer < 0 ? 2 : V_SLOTS)) return 0;
    if (layer >= 0 && slot == RBE_V_Q_NORM) return n == c->head_dim || n == (int64_t)c->n_heads * c->head_dim;
    if (layer >= 0 && slot == RBE_V_K_NORM) return n == c->head_dim || n == (int64_t)c->n_kv_heads * c->head_dim;
    return n == c->hidden;
}

int rbe_engine_set_vector(rbe_engine *e, int layer, int slot, const float *v, long long n) {
    if (!e || !v || layer < -1 || layer >= e->c.n_layers || !vector_fits(e, layer, slot, n)) return RBE_E_ARGS;
    if (e->c.arch == RBE_ARCH_GPT2 && slot >= 4) return RBE_E_ARGS;
    float *copy = alloc_floats(n);
    if (!copy) return RBE_E_NOMEM;
    memcpy(copy, v, (size_t)n * sizeof(float));
    if (e->c.arch == RBE_ARCH_DECODER) /* every vector is an RMSNorm weight: float32 (offset + w), as Gemma */
        for (int64_t i = 0; i < n; i++) copy[i] += e->c.norm_offset;
    if (layer >= 0 && slot == RBE_V_Q_NORM) e->qk_norm_len[0] = n;
    if (layer >= 0 && slot == RBE_V_K_NORM) e->qk_norm_len[1] = n;
    float **dst = layer < 0 ? &e->vecs[(int64_t)e->c.n_layers * V_SLOTS + slot]
                            : &e->vecs[(int64_t)layer * V_SLOTS + slot];
    free(*dst);
    *dst = copy;
    e->bytes += n * 4;
    return 0;
}

int rbe_engine_set_rope(rbe_engine *e, int kind, const float *inv_freq, long long n, float factor) {
    if (!e || !inv_freq || kind < 0 || kind >= e->c.n_ropes || n != e->c.rotary_dim / 2 || !isfinite(factor))
        return RBE_E_ARGS;
    memcpy(e->rope_inv + kind * n, inv_freq, (size_t)n * sizeof(float));
    e->rope_factor[kind] = factor;
    return 0;
}

int rbe_engine_set_layer(rbe_engine *e, int layer, int rope_kind, long long window) {
    if (!e || layer < 0 || layer >= e->c.n_layers || rope_kind < -1 || rope_kind >= e->c.n_ropes || window < 0)
        return RBE_E_ARGS;
    e->layer_rope[layer] = rope_kind, e->layer_window[layer] = window;
    return 0;
}

long long rbe_engine_length(const rbe_engine *e) { return e ? e->length : 0; }

/* The cache entry at element offset `at`. */
static inline void *kv_row(const rbe_engine *e, void *cache, int64_t at) {
    return (char *)cache + at * kv_size(e->kv);
}

/* Int8 caches: the scale of the position whose row begins at element offset `at` (K rows by the
 * same count: (layer, kv head, position) * head_dim), or of the first position at a region's
 * element `at`; NULL for float caches. */
static inline float *kv_scales(const rbe_engine *e, void *cache, int64_t at) {
    return e->kv == RBE_KV_I8 ? (float *)((char *)cache + e->kv_scales) + at / e->c.head_dim : NULL;
}

/* A slot's caches, made on first use (resident only as positions are written). */
static int ensure_slot(rbe_engine *e, int slot) {
    if (e->slot_kc[slot]) return 0;
    e->slot_kc[slot] = calloc((size_t)e->cache_bytes, 1);
    e->slot_vc[slot] = calloc((size_t)e->cache_bytes, 1);
    if (!e->slot_kc[slot] || !e->slot_vc[slot]) {
        free(e->slot_kc[slot]), free(e->slot_vc[slot]);
        e->slot_kc[slot] = e->slot_vc[slot] = NULL;
        return RBE_E_NOMEM;
    }
    e->slot_len[slot] = 0;
    return 0;
}

int rbe_engine_use_slot(rbe_engine *e, int slot) {
    if (!e || slot < 0 || slot >= RBE_MAX_SLOTS) return RBE_E_ARGS;
    if (slot == e->slot) return 0;
    const int err = ensure_slot(e, slot);
    if (err) return err;
    e->slot_len[e->slot] = e->length;
    e->slot = slot, e->kc = e->slot_kc[slot], e->vc = e->slot_vc[slot], e->length = e->slot_len[slot];
    return 0;
}
int rbe_engine_copy_prefix(rbe_engine *e, int src, int dst, long long n) {
    if (!e || src < 0 || src >= RBE_MAX_SLOTS || dst < 0 || dst >= RBE_MAX_SLOTS || src == dst || n < 0)
        return RBE_E_ARGS;
    e->slot_len[e->slot] = e->length;
    if (!e->slot_kc[src] || e->slot_len[src] < n) return RBE_E_ARGS;
    const int err = ensure_slot(e, dst);
    if (err) return err;
    /* per (layer, kv head): K in blocks of 16 positions (the blocks that hold [0, n)), V rows */
    const int64_t hd = e->c.head_dim, el = kv_size(e->kv), region = e->ctx16 * hd * el, k_len = (n + 15) / 16 * 16;
    for (int64_t r = 0; r < (int64_t)e->c.n_layers * e->c.n_kv_heads; r++) {
        memcpy((char *)e->slot_kc[dst] + r * region, (const char *)e->slot_kc[src] + r * region, (size_t)(k_len * hd * el));
        memcpy((char *)e->slot_vc[dst] + r * region, (const char *)e->slot_vc[src] + r * region, (size_t)(n * hd * el));
        if (e->kv != RBE_KV_I8) continue;
        const int64_t at = r * e->ctx16 * hd; /* the region's first element */
        memcpy(kv_scales(e, e->slot_kc[dst], at), kv_scales(e, e->slot_kc[src], at), (size_t)k_len * sizeof(float));
        memcpy(kv_scales(e, e->slot_vc[dst], at), kv_scales(e, e->slot_vc[src], at), (size_t)n * sizeof(float));
    }
    e->slot_len[dst] = n;
    e->kc = e->slot_kc[e->slot], e->vc = e->slot_vc[e->slot], e->length = e->slot_len[e->slot];
    return 0;
}
long long rbe_engine_bytes(const rbe_engine *e) { return e ? e->bytes : 0; }

void rbe_engine_profile(rbe_engine *e, double *s) {
    for (int i = 0; i < 3; i++) s[i] = e->prof[i], e->prof[i] = 0.0;
}

/* ---- products ---- */

static void add_into(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

/* out (cp wide) = pad(x) @ T^T (rotate) or pad(x) when m has no transform. */
static void prepare_input(const rbe_engine *e, const emat *m, const float *x, float *out) {
    const int64_t cp = m->lut.cols_p;
    if (m->tf >= 0) {
        const etf *t = &e->tfs[m->tf];
        for (int64_t c = 0; c < m->cols; c++) out[c] = x[c] * t->signs[c];
        memset(out + m->cols, 0, (size_t)(cp - m->cols) * sizeof(float));
        e->kern->fwht(out, t->blocks, t->nblocks);
    } else {
        memcpy(out, x, (size_t)m->cols * sizeof(float));
        memset(out + m->cols, 0, (size_t)(cp - m->cols) * sizeof(float));
    }
}

typedef struct {
    rbe_engine *e;
    const emat *m;
    const float *x; /* n x ldx */
    int64_t ldx, n;
    int q8, rot;
} prep_job;

/* Whether an int8 product of n tokens with L runs them one by one through lut_gemv_q8
 * (q8_quantize1's records) rather than in tiles through lut_gemm_q8. */
static int one_by_one(const rbe_engine *e, const rbe_lut *L, int64_t n) {
    return n <= (L->kind == RBE_LUT_NIBBLE ? e->kern->q8_one_nibble_tokens : e->kern->q8_one_tokens);
}

/* Tokens [s, t) of a product's input prepared (prepare_input) into xr and, with q8, quantized
 * into the pack (s a multiple of the kernels' q8_tokens, t too unless it is n). */
static void prepare_rows(void *ctx, int64_t s, int64_t t, int tid) {
    (void)tid;
    const prep_job *j = ctx;
    const rbe_engine *e = j->e;
    const int64_t cp = j->m->lut.cols_p;
    for (int64_t b = s; b < t; b++) prepare_input(e, j->m, j->x + b * j->ldx, e->xr + b * cp);
    if (j->q8 && one_by_one(e, &j->m->lut, j->n))
        for (int64_t b = s; b < t; b++) e->kern->q8_quantize1(e->xr + b * cp, cp, j->rot, e->pack + b * RBE_Q8_ONE(cp));
    else if (j->q8)
        e->kern->q8_quantize(e->xr + s * cp, cp, t - s, cp, j->rot,
                             e->pack + s / e->kern->q8_tokens * (cp / 32) * RBE_Q8_REC(e->kern->q8_tokens));
}

/* Products of at most FEW_ROWS_MAX tokens (the decode steps of a few sequences) run one pass of
 * lut_gemv_few per FEW_TOKENS tokens, in float32 as a single token's, unless they run on int8
 * inputs: one by one up to the kernels' q8_one_tokens or q8_one_nibble_tokens (one_by_one), else from Q8_MIN_TOKENS in
 * tiles; more run the batched kernels. Int8 products of at
 * most FEW_ROWS_MAX tokens never rotate, as one token's (below): a rotated product rotates the
 * weights every step (SmolLM2 int4, AMD EPYC AVX2, kernel ms a step: 8 sequences 29.5 rotated,
 * 23.4 unrotated; 4 sequences 44.6 in float32, where rotation made int8 wait for 8, 21.9 int8). lut_gemm_q8 costs about the same from 2 to 16 tokens (its tiles hold 16),
 * lut_gemv_few grows with every pair. Kernel ms per decode step of k sequences in forward_batch
 * (2 threads, Intel AVX-512 VBMI, int8 / float32): SmolLM2 flagship 4.25 (hadamard: unrotated)
 * k = 2: 15.2 / 11.7, 3: ~15 / 20.4, 8: 14.8 / 34.7; SmolLM2 int4 (rotated) k = 4, 6, 8: 30.6,
 * 30.4, 30.5 / 18.0, 26.9, 33.6; 1B hadamard 4-bit k = 2: 90 / 68, 3: 90 / 125, 8: 90 / 227; 1B
 * int4 k = 4: 113 / 146. One token's int8 product (lut_gemv_q8) never rotates (inputs nor
 * weights): rotating the weights every token made the 1B int4 step 73 ms against float32's 48;
 * unrotated, SmolLM2 int4 decodes at 97 tok/s against float32's 49 (AMD EPYC AVX2). Codes of 5 bits or
 * more whose levels int8 only approximates (non-uniform grids: each level rounded to 1/254 of the
 * largest, a third of a 6-bit spacing) stay float32 in batches: on SmolLM2's flagship 4.25 their
 * int8 products made KL(float32 prefill || int8 prefill) 0.0061 (0.0024 without them, GPL-3, 256
 * tokens) and prefill slower on AVX-512 (256 tokens: 836-958 tok/s against 1120-1349; AVX2 equal
 * within noise). One token of 5- and 6-bit codes on AVX2 meets 16-bit levels and 16-bit inputs
 * (rbe_lut's lv16, RBE_Q8_X16): flagship 4.25 decode KL(float32 || int8) over 256 GPL-3 tokens
 * 0.0027 -> 0.0024 (with int8 inputs it was 0.0042), decode best of 4 131 -> 153 tok/s (AMD EPYC). */
#define FEW_ROWS_MAX 16
#define Q8_MIN_TOKENS 3

/* Whether the product of n tokens with m runs on int8 inputs (codes of up to 4 bits, or levels
 * int8 holds exactly; one by one also 5- and 6-bit codes, on their 16-bit levels): lut_gemv_q8
 * for tokens one by one (codes of the kinds it is faster for, groups of whole vectors of
 * blocks), lut_gemm_q8 for enough tokens. */
static int use_q8(const rbe_engine *e, const emat *m, int64_t n) {
    const rbe_lut *L = &m->lut;
    if (!e->c.act_int8 || !e->kern->lut_gemm_q8 || L->kind == RBE_LUT_F32) return 0;
    const int lv8_close = L->bits <= 4 || L->q8_exact;
    if (one_by_one(e, L, n))
        return (lv8_close || L->kind == RBE_LUT_PLANES) && (e->kern->q8_one_kinds >> L->kind & 1) &&
               (L->gs / 32) % (e->kern->q8_tokens / 8) == 0;
    return n >= Q8_MIN_TOKENS && lv8_close;
}

typedef struct {
    rbe_engine *e;
    const emat *m[3];
    int64_t start[4]; /* row offsets of each matrix in the joint task space */
    int count;
    const float *x; /* n x ldx, prepared (padded / rotated) input */
    int64_t n, ldx;
    const float *xt; /* n > 1, float products: the same transposed, cols_p x ldt */
    int64_t ldt;
    const uint8_t *pack; /* n > 1, int8 products: the same quantized (RBE_Q8_REC) */
    int rot;             /* the pack's rotation */
    float *y[3];
    int64_t ldy;
} lin_job;

/* Rows [s, t) of the joint task space of up to 3 matrices that read the same input. */
static void lin_rows(void *ctx, int64_t s, int64_t t, int tid) {
    lin_job *j = ctx;
    const rbe_kernels *k = j->e->kern;
    float *scratch = j->e->scratch[tid];
    for (int mi = 0; mi < j->count; mi++) {
        const int64_t a = s > j->start[mi] ? s : j->start[mi];
        const int64_t b = t < j->start[mi + 1] ? t : j->start[mi + 1];
        if (a >= b) continue;
        const rbe_lut *L = &j->m[mi]->lut;
        const int64_t r0 = a - j->start[mi], r1 = b - j->start[mi];
        float *y = j->y[mi];
        const int q8 = use_q8(j->e, j->m[mi], j->n);
        if (q8 && one_by_one(j->e, L, j->n)) k->lut_gemv_q8(L, j->pack, j->rot, j->n, r0, r1, y, j->ldy, scratch);
        else if (j->n == 1) k->lut_gemv(L, j->x, r0, r1, y, scratch);
        else if (q8) k->lut_gemm_q8(L, j->pack, j->rot, j->n, r0, r1, y, j->ldy, scratch);
        else if (j->n <= FEW_ROWS_MAX) k->lut_gemv_few(L, j->x, j->ldx, j->n, r0, r1, y, j->ldy, scratch);
        else k->lut_gemm(L, j->xt, j->ldt, j->n, r0, r1, y, j->ldy, scratch);
    }
}

typedef struct {
    rbe_engine *e;
    const emat *m;
    const float *x; /* n x ldx */
    int64_t n, ldx;
    float *y; /* n x cp (rotated output) */
} lint_job;

/* Columns [s, t) (multiples of 32) of a transposed product. */
static void lin_cols(void *ctx, int64_t s, int64_t t, int tid) {
    lint_job *j = ctx;
    const rbe_kernels *k = j->e->kern;
    const rbe_lut *L = &j->m->lut;
    float *scratch = j->e->scratch[tid];
    const int64_t cp = L->cols_p, width = t - s, panel = 64;
    if (j->n == 1) {
        k->lut_gemv_t(L, j->x, s, t, j->y, scratch);
        return;
    }
    for (int64_t r = 0; r < L->rows; r += panel) {
        const int64_t nr = rbe_min(panel, L->rows - r);
        for (int64_t i = 0; i < nr; i++) k->lut_decode(L, r + i, s, t, scratch + i * width);
        for (int64_t b0 = 0; b0 < j->n; b0 += k->grad_batch) {
            const int nb = (int)rbe_min(k->grad_batch, j->n - b0);
            k->grad_tile(scratch, width, nr, j->x + b0 * j->ldx + r, j->ldx, nb, width,
                         j->y + b0 * cp + s, cp, r > 0);
        }
    }
}

/* ys[i][n x out_i] = x[n x in] @ W_i^T (+ bias) for up to 3 untransposed matrices that share
 * an input; the input is padded (and rotated) once when their transforms agree. */
static void linear_multi(rbe_engine *e, const emat **ms, int count, const float *x, int64_t n,
                         int64_t ldx, float **ys, int64_t ldy) {
    const double t0 = now();
    lin_job j = {.e = e, .count = 0, .n = n, .ldy = ldy};
    int done = 0;
    while (done < count) {
        const emat *first = ms[done];
        const int64_t cp = first->lut.cols_p;
        int q8 = 0, f32 = 0, rot = n <= FEW_ROWS_MAX ? 1 : 16; /* the widest rotation all int8 products allow */
        j.count = 0, j.start[0] = 0, j.x = e->xr, j.ldx = cp;
        while (done < count && ms[done]->tf == first->tf && ms[done]->lut.cols_p == cp && /* one input form */
               one_by_one(e, &ms[done]->lut, n) == one_by_one(e, &first->lut, n)) {
            j.m[j.count] = ms[done], j.y[j.count] = ys[done];
            j.start[j.count + 1] = j.start[j.count] + ms[done]->rows;
            if (use_q8(e, ms[done], n)) q8 = 1, rot = ms[done]->lut.q8_rot < rot ? ms[done]->lut.q8_rot : rot;
            else f32 = 1;
            j.count++, done++;
        }
        j.rot = rot;
        prep_job pj = {.e = e, .m = first, .x = x, .ldx = ldx, .n = n, .q8 = q8, .rot = rot};
        parallel(e->nthreads, e->spin, n, q8 ? e->kern->q8_tokens : n, prepare_rows, &pj);
        if (n > FEW_ROWS_MAX && f32) { /* transposed for the batched kernel: tokens contiguous per column */
            const int64_t nt = e->kern->gemm_tokens, ldt = (n + nt - 1) / nt * nt;
            for (int64_t c = 0; c < cp; c++) {
                float *col = e->xt + c * ldt;
                for (int64_t b = 0; b < n; b++) col[b] = e->xr[b * cp + c];
                memset(col + n, 0, (size_t)(ldt - n) * sizeof(float));
            }
            j.xt = e->xt, j.ldt = ldt;
        }
        j.pack = e->pack;
        const int64_t align = q8 && n > 1 ? e->kern->q8_rows : n <= FEW_ROWS_MAX ? 16 : 2 * e->kern->gemm_rows;
        parallel(e->nthreads, e->spin, j.start[j.count], align, lin_rows, &j);
    }
    for (int i = 0; i < count; i++)
        if (ms[i]->bias)
            for (int64_t b = 0; b < n; b++) add_into(ys[i] + b * ldy, ms[i]->bias, ms[i]->rows);
    e->prof[0] += now() - t0;
}

/* y[n x out] = x[n x in] @ W^T, or x @ W for a transposed matrix (+ bias). */
static void linear(rbe_engine *e, const emat *m, const float *x, int64_t n, int64_t ldx, float *y,
                   int64_t ldy) {
    if (!m->transposed) {
        linear_multi(e, &m, 1, x, n, ldx, &y, ldy);
        return;
    }
    const double t0 = now();
    const int64_t cp = m->lut.cols_p;
    lint_job j = {.e = e, .m = m, .x = x, .n = n, .ldx = ldx, .y = e->yr};
    parallel(e->nthreads, e->spin, cp, 32, lin_cols, &j);
    for (int64_t b = 0; b < n; b++) {
        float *v = e->yr + b * cp;
        if (m->tf >= 0) { /* y = (x @ W_c) @ T */
            const etf *t = &e->tfs[m->tf];
            e->kern->fwht(v, t->blocks, t->nblocks);
            for (int64_t c = 0; c < m->cols; c++) v[c] *= t->signs[c];
        }
        memcpy(y + b * ldy, v, (size_t)m->cols * sizeof(float));
        if (m->bias) add_into(y + b * ldy, m->bias, m->cols);
    }
    e->prof[0] += now() - t0;
}

/* Row r of an untransposed matrix as stored (the embedding lookup): out[cols]. */
static void matrix_row(rbe_engine *e, const emat *m, int64_t r, float *out) {
    float *v = e->row;
    e->kern->lut_decode(&m->lut, r, 0, m->lut.cols_p, v);
    if (m->tf >= 0) {
        const etf *t = &e->tfs[m->tf];
        e->kern->fwht(v, t->blocks, t->nblocks);
        for (int64_t c = 0; c < m->cols; c++) v[c] *= t->signs[c];
    }
    memcpy(out, v, (size_t)m->cols * sizeof(float));
}

/* ---- norms, activations, RoPE, attention ---- */

static void rms_norm(const rbe_kernels *k, const float *x, const float *w, float eps, int64_t n, float *out) {
    const float ss = k->dot(x, x, n);
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

static void layer_norm(const float *x, const float *w, const float *b, float eps, int64_t n,
                       float *out) {
    float mean = 0.0f, var = 0.0f;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / sqrtf(var / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

/* The chunk's cos and sin of every RoPE kind, for its n rows' positions (float32 angle
 * position * inv, times the kind's factor, as transformers). */
static void rope_angles(rbe_engine *e, int64_t n) {
    const int64_t half = e->c.rotary_dim / 2;
    for (int k = 0; k < e->c.n_ropes; k++)
        for (int64_t i = 0; i < n; i++) {
            float *cs = e->rope_cos + (k * CHUNK + i) * half, *sn = e->rope_sin + (k * CHUNK + i) * half;
            for (int64_t d = 0; d < half; d++) {
                const float a = (float)e->row_pos[i] * e->rope_inv[k * half + d];
                cs[d] = cosf(a) * e->rope_factor[k], sn[d] = sinf(a) * e->rope_factor[k];
            }
        }
}

/* Rotate the leading rotary_dim dims of each head of v (heads x hd): chunk token i, RoPE kind. */
static void rope(const rbe_engine *e, float *v, int heads, int kind, int64_t i) {
    const int64_t hd = e->c.head_dim, half = e->c.rotary_dim / 2;
    const float *cs = e->rope_cos + (kind * CHUNK + i) * half, *sn = e->rope_sin + (kind * CHUNK + i) * half;
    for (int h = 0; h < heads; h++) {
        float *u = v + h * hd;
        for (int64_t i = 0; i < half; i++) {
            const int64_t a = e->c.rope_style == RBE_ROPE_HALF ? i : 2 * i;
            const int64_t b = e->c.rope_style == RBE_ROPE_HALF ? i + half : 2 * i + 1;
            const float x1 = u[a], x2 = u[b];
            u[a] = x1 * cs[i] - x2 * sn[i];
            u[b] = x2 * cs[i] + x1 * sn[i];
        }
    }
}

/* Row i's k and v of kv head h (kk, vv: rows ldkv apart) into its sequence's caches of layer
 * `layer` at the row's position: K blocked by 16 positions (stride 16 a dimension), V a row. */
static void store_kv(const rbe_engine *e, int layer, int64_t i, int h, const float *kk, const float *vv,
                     int64_t ldkv) {
    const int64_t hd = e->c.head_dim, p = e->row_pos[i];
    const int64_t base = ((int64_t)layer * e->c.n_kv_heads + h) * e->ctx16 * hd;
    const int64_t kat = base + (p / 16) * hd * 16 + p % 16;
    e->kern->kv_store(kv_row(e, e->row_kc[i], kat), kk + i * ldkv + h * hd, hd, 16, e->kv,
                      kv_scales(e, e->row_kc[i], base + p * hd));
    e->kern->kv_store(kv_row(e, e->row_vc[i], base + p * hd), vv + i * ldkv + h * hd, hd, 1, e->kv,
                      kv_scales(e, e->row_vc[i], base + p * hd));
}

typedef struct {
    rbe_engine *e;
    int layer;
    int64_t ldq;
    const float *q; /* n x ldq, heads of head_dim */
    float *out;     /* n x ldq, heads of head_dim */
    const float *k, *v; /* with store: the rows' k and v (ldkv apart), stored by their own task */
    int64_t ldkv;
    int store;
    int64_t span;   /* split decode: positions per part, ... */
    int64_t first, skip; /* ... from position first (a multiple of 16), the first skip masked */
    int parts;
} att_job;

/* Where attention task idx (token i, kv head g) reads its kv head's K and V: from the first
 * whole K block b0 of its window (positions lo on; element offset base), len positions in all. */
typedef struct {
    int64_t i, g, len, lo, b0, base;
} att_task;
static att_task task_at(const rbe_engine *e, int layer, int64_t idx) {
    const int64_t kvh_n = e->c.n_kv_heads, window = e->layer_window[layer];
    att_task a = {.i = idx / kvh_n, .g = idx % kvh_n};
    a.len = e->row_pos[a.i] + 1, a.lo = window && a.len > window ? a.len - window : 0, a.b0 = a.lo / 16 * 16;
    a.base = (((int64_t)layer * kvh_n + a.g) * e->ctx16 + a.b0) * e->c.head_dim;
    return a;
}

/* Bytes of K and V a task requests into L2 for the next one while it runs: a task reads its K
 * and V once, and a decode batch's caches come from memory (SmolLM2 int4, 8 sequences at
 * positions 60-160, AMD EPYC Zen 4, 2 threads, best attention time a step in three interleaved
 * rounds: 1.04-1.08 ms without, 0.79-0.90 with 4 KB). */
#define ATT_AHEAD 4096

/* (token, kv head) pairs [s, t): causal softmax attention of the kv head's query heads (each
 * storing its row's k and v first where the job says so). */
static void attend(void *ctx, int64_t s, int64_t t, int tid) {
    att_job *j = ctx;
    const rbe_engine *e = j->e;
    const int64_t hd = e->c.head_dim;
    const int rep = e->c.n_heads / e->c.n_kv_heads;
    for (int64_t idx = s; idx < t; idx++) {
        const att_task a = task_at(e, j->layer, idx);
        if (j->store) store_kv(e, j->layer, a.i, (int)a.g, j->k, j->v, j->ldkv);
        if (idx + 1 < t) { /* written here: gcc drops a call of a function that only prefetches */
            const att_task n = task_at(e, j->layer, idx + 1);
            const int64_t bytes = rbe_min((n.len - n.b0) * hd * kv_size(e->kv), ATT_AHEAD);
            const char *k = kv_row(e, e->row_kc[n.i], n.base), *v = kv_row(e, e->row_vc[n.i], n.base);
            for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(k + o, 0, 1), __builtin_prefetch(v + o, 0, 1);
        }
        e->kern->attend_group(j->q + a.i * j->ldq + a.g * rep * hd, hd, rep, kv_row(e, e->row_kc[a.i], a.base),
                              kv_row(e, e->row_vc[a.i], a.base), e->kv, kv_scales(e, e->row_kc[a.i], a.base),
                              kv_scales(e, e->row_vc[a.i], a.base), a.len - a.b0, a.lo - a.b0, hd, e->c.attn_scale,
                              e->c.attn_softcap, j->out + a.i * j->ldq + a.g * rep * hd, hd, e->scratch[tid], NULL);
    }
}

/* One decode token, (kv head, part of the positions) pairs [s, t): unnormalised partial outputs
 * and their (max, sum) into attp, merged afterwards (the work of 3 kv heads splits evenly). */
static void attend_part(void *ctx, int64_t s, int64_t t, int tid) {
    att_job *j = ctx;
    const rbe_engine *e = j->e;
    const int64_t hd = e->c.head_dim, len = e->row_pos[0] + 1;
    const int rep = e->c.n_heads / e->c.n_kv_heads;
    for (int64_t idx = s; idx < t; idx++) {
        const int64_t g = idx / j->parts, part = idx % j->parts, p0 = j->first + part * j->span;
        const int64_t cnt = rbe_min(j->span, len - p0);
        float *slot = e->attp + idx * rep * (hd + 2);
        if (cnt <= 0) {
            for (int r = 0; r < rep; r++) slot[rep * hd + 2 * r] = -INFINITY, slot[rep * hd + 2 * r + 1] = 0.0f;
            continue;
        }
        const int64_t base = (((int64_t)j->layer * e->c.n_kv_heads + g) * e->ctx16 + p0) * hd; /* p0 % 16 == 0 */
        e->kern->attend_group(j->q + g * rep * hd, hd, rep, kv_row(e, e->row_kc[0], base),
                              kv_row(e, e->row_vc[0], base), e->kv, kv_scales(e, e->row_kc[0], base),
                              kv_scales(e, e->row_vc[0], base), cnt, part ? 0 : j->skip, hd, e->c.attn_scale,
                              e->c.attn_softcap, slot, hd, e->scratch[tid], slot + rep * hd);
    }
}

/* Whether each of the chunk's n rows has a sequence (cache) of its own: a decode step's batch. */
static int own_caches(const rbe_engine *e, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t o = 0; o < i; o++)
            if (e->row_kc[o] == e->row_kc[i]) return 0;
    return 1;
}

/* Store k and v of the chunk's n rows at their positions of their sequences' caches (layer
 * `layer`), then attend. */
static void attention(rbe_engine *e, int layer, int64_t n, const float *q, int64_t ldq, const float *kk,
                      const float *vv, int64_t ldkv, float *out) {
    const double t0 = now();
    const int64_t hd = e->c.head_dim;
    att_job j = {.e = e, .layer = layer, .ldq = ldq, .q = q, .out = out, .k = kk, .v = vv, .ldkv = ldkv};
    const int64_t len = e->row_pos[0] + 1;
    if (n > 1 || e->nthreads < 2 || len < 256) {
        j.store = own_caches(e, n); /* else a row may attend to another row's k and v */
        for (int64_t i = 0; !j.store && i < n; i++)
            for (int h = 0; h < e->c.n_kv_heads; h++) store_kv(e, layer, i, h, kk, vv, ldkv);
        parallel(e->nthreads, e->spin, n * e->c.n_kv_heads, 1, attend, &j);
        e->prof[1] += now() - t0;
        return;
    }
    for (int h = 0; h < e->c.n_kv_heads; h++) store_kv(e, layer, 0, h, kk, vv, ldkv);
    const int rep = e->c.n_heads / e->c.n_kv_heads;
    const int64_t window = e->layer_window[layer], lo = window && len > window ? len - window : 0;
    j.first = lo / 16 * 16, j.skip = lo - j.first;
    j.parts = e->nthreads * 2 > ATT_PARTS ? ATT_PARTS : e->nthreads * 2;
    j.span = ((len - j.first + j.parts - 1) / j.parts + 15) / 16 * 16; /* whole K blocks per part */
    parallel(e->nthreads, e->spin, (int64_t)e->c.n_kv_heads * j.parts, 1, attend_part, &j);
    for (int g = 0; g < e->c.n_kv_heads; g++)
        for (int r = 0; r < rep; r++) {
            float mx = -INFINITY, total = 0.0f;
            for (int pt = 0; pt < j.parts; pt++) {
                const float m = e->attp[((int64_t)g * j.parts + pt) * rep * (hd + 2) + rep * hd + 2 * r];
                mx = m > mx ? m : mx;
            }
            float *o = out + ((int64_t)g * rep + r) * hd;
            memset(o, 0, (size_t)hd * sizeof(float));
            for (int pt = 0; pt < j.parts; pt++) {
                const float *slot = e->attp + ((int64_t)g * j.parts + pt) * rep * (hd + 2);
                if (slot[rep * hd + 2 * r] == -INFINITY) continue; /* an empty part: its output is unwritten */
                const float w = expf(slot[rep * hd + 2 * r] - mx);
                total += w * slot[rep * hd + 2 * r + 1];
                for (int64_t d = 0; d < hd; d++) o[d] += w * slot[r * hd + d];
            }
            for (int64_t d = 0; d < hd; d++) o[d] /= total;
        }
    e->prof[1] += now() - t0;
}

/* ---- layers ---- */

/* RMSNorm of n rows of x into out (rows width apart), or a copy when the layer has no such norm. */
static void norm_rows(rbe_engine *e, const float *x, const float *w, int64_t n, float *out) {
    const int64_t W = e->width, h = e->c.hidden;
    for (int64_t i = 0; i < n; i++) {
        if (w) rms_norm(e->kern, x + i * W, w, e->c.eps, h, out + i * W);
        else memcpy(out + i * W, x + i * W, (size_t)h * sizeof(float));
    }
}

/* q or k of one token (heads x head_dim) through its norm: per head or over the whole row. */
static void qk_norm(rbe_engine *e, float *v, const float *w, int heads, int64_t len) {
    if (!w) return;
    const int64_t hd = e->c.head_dim;
    if (len != hd) rms_norm(e->kern, v, w, e->c.eps, len, v);
    else
        for (int h = 0; h < heads; h++) rms_norm(e->kern, v + h * hd, w, e->c.eps, hd, v + h * hd);
}

/* The gated MLP of n rows of xn (gate and up, or one gate_up matrix; then down) into f2. */
static void mlp(rbe_engine *e, int l, int64_t n) {
    const int64_t W = e->width, inter = e->c.intermediate;
    const emat *fused = mat(e, l, RBE_M_GATE_UP);
    float *up = e->f2;
    if (fused->set) {
        linear(e, fused, e->xn, n, W, e->f1, W);
        up = e->f1 + inter;
    } else {
        const emat *gu[2] = {mat(e, l, RBE_M_GATE), mat(e, l, RBE_M_UP)};
        float *gu_out[2] = {e->f1, e->f2};
        linear_multi(e, gu, 2, e->xn, n, W, gu_out, W);
    }
    const double t0 = now();
    for (int64_t i = 0; i < n; i++) e->kern->activate(e->c.activation, e->f1 + i * W, up + i * W, inter);
    e->prof[2] += now() - t0;
    linear(e, mat(e, l, RBE_M_DOWN), e->f1, n, W, e->f2, W);
}

/* Row i's experts: softmax over the router's outputs, the experts_used largest (renormalised
 * when norm_topk), appended to each chosen expert's rows and weights. */
static void route_row(rbe_engine *e, int64_t i, int64_t *count) {
    const int64_t ne = e->c.n_experts;
    float *p = e->route + i * ne, mx = -INFINITY, sum = 0.0f, kept = 0.0f;
    for (int64_t x = 0; x < ne; x++) mx = p[x] > mx ? p[x] : mx;
    for (int64_t x = 0; x < ne; x++) sum += p[x] = expf(p[x] - mx);
    int64_t chosen[64];
    float w[64];
    const int used = e->c.experts_used < 64 ? e->c.experts_used : 64;
    for (int k = 0; k < used; k++) {
        int64_t best = -1;
        for (int64_t x = 0; x < ne; x++)
            if (p[x] >= 0.0f && (best < 0 || p[x] > p[best])) best = x;
        chosen[k] = best, w[k] = p[best] / sum, kept += w[k];
        p[best] = -1.0f; /* taken */
    }
    for (int k = 0; k < used; k++) {
        const int64_t x = chosen[k], at = x * CHUNK + count[x]++;
        e->moe_rows[at] = i, e->moe_w[at] = e->c.norm_topk ? w[k] / kept : w[k];
    }
}

/* A mixture-of-experts MLP over n rows of xn into f2: each expert runs on the rows routed to it
 * (gathered), its outputs weighted and added back. Uses q, v and k (free after attention). */
static void moe(rbe_engine *e, int l, int64_t n) {
    const int64_t W = e->width, h = e->c.hidden, ne = e->c.n_experts, inter = e->c.expert_intermediate;
    linear(e, mat(e, l, RBE_M_ROUTER), e->xn, n, W, e->route, ne);
    double t0 = now();
    int64_t count[ne];
    memset(count, 0, sizeof(count));
    for (int64_t i = 0; i < n; i++) route_row(e, i, count);
    for (int64_t i = 0; i < n; i++) memset(e->k + i * W, 0, (size_t)h * sizeof(float));
    e->prof[2] += now() - t0;
    for (int64_t x = 0; x < ne; x++) {
        const int64_t cnt = count[x], *rows = e->moe_rows + x * CHUNK;
        if (!cnt) continue;
        for (int64_t r = 0; r < cnt; r++) memcpy(e->q + r * W, e->xn + rows[r] * W, (size_t)h * sizeof(float));
        const emat *gu[2] = {mat(e, l, RBE_M_EXPERT + 3 * x), mat(e, l, RBE_M_EXPERT + 3 * x + 1)};
        float *gu_out[2] = {e->f1, e->f2};
        linear_multi(e, gu, 2, e->q, cnt, W, gu_out, W);
        t0 = now();
        for (int64_t r = 0; r < cnt; r++) e->kern->activate(e->c.activation, e->f1 + r * W, e->f2 + r * W, inter);
        e->prof[2] += now() - t0;
        linear(e, mat(e, l, RBE_M_EXPERT + 3 * x + 2), e->f1, cnt, W, e->v, W);
        t0 = now();
        for (int64_t r = 0; r < cnt; r++) e->kern->axpy(e->moe_w[x * CHUNK + r], e->v + r * W, e->k + rows[r] * W, h);
        e->prof[2] += now() - t0;
    }
    for (int64_t i = 0; i < n; i++) memcpy(e->f2 + i * W, e->k + i * W, (size_t)h * sizeof(float));
}

/* y rows += (post-normed when post is set) f rows. */
static void residual(rbe_engine *e, const float *post, float *f, int64_t n) {
    const int64_t W = e->width, h = e->c.hidden;
    for (int64_t i = 0; i < n; i++) {
        if (post) rms_norm(e->kern, f + i * W, post, e->c.eps, h, f + i * W);
        add_into(e->x + i * W, f + i * W, h);
    }
}

/* One layer of the described decoder over the chunk's n rows (rbe_engine.h). */
static void decoder_layer(rbe_engine *e, int l, int64_t n) {
    const rbe_engine_config *c = &e->c;
    const int64_t W = e->width, qd = (int64_t)c->n_heads * c->head_dim, kvd = (int64_t)c->n_kv_heads * c->head_dim;
    double t0 = now();
    norm_rows(e, e->x, vec(e, l, RBE_V_NORM1), n, e->xn);
    e->prof[2] += now() - t0;
    float *q = e->q, *k = e->k, *v = e->v;
    if (mat(e, l, RBE_M_QKV)->set) {
        linear(e, mat(e, l, RBE_M_QKV), e->xn, n, W, e->q, W); /* [q | k | v] per token */
        k = e->q + qd, v = e->q + qd + kvd;
    } else {
        const emat *qkv[3] = {mat(e, l, RBE_M_Q), mat(e, l, RBE_M_K), mat(e, l, RBE_M_V)};
        float *outs[3] = {e->q, e->k, e->v};
        linear_multi(e, qkv, 3, e->xn, n, W, outs, W);
    }
    t0 = now();
    const int kind = c->rope_style == RBE_ROPE_NONE ? -1 : e->layer_rope[l];
    for (int64_t i = 0; i < n; i++) {
        qk_norm(e, q + i * W, vec(e, l, RBE_V_Q_NORM), c->n_heads, e->qk_norm_len[0]);
        qk_norm(e, k + i * W, vec(e, l, RBE_V_K_NORM), c->n_kv_heads, e->qk_norm_len[1]);
        if (kind >= 0) rope(e, q + i * W, c->n_heads, kind, i), rope(e, k + i * W, c->n_kv_heads, kind, i);
    }
    e->prof[2] += now() - t0;
    attention(e, l, n, q, W, k, v, W, e->att);
    linear(e, mat(e, l, RBE_M_O), e->att, n, W, e->f1, W);
    t0 = now();
    residual(e, vec(e, l, RBE_V_ATTN_POST), e->f1, n);
    norm_rows(e, e->x, vec(e, l, RBE_V_NORM2), n, e->xn);
    e->prof[2] += now() - t0;
    if (mat(e, l, RBE_M_ROUTER)->set) moe(e, l, n);
    else mlp(e, l, n);
    t0 = now();
    residual(e, vec(e, l, RBE_V_FFN_POST), e->f2, n);
    e->prof[2] += now() - t0;
}

static void gpt2_layer(rbe_engine *e, int l, int64_t n) {
    const rbe_engine_config *c = &e->c;
    const int64_t W = e->width, h = c->hidden, qd = (int64_t)c->n_heads * c->head_dim;
    const int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim;
    double t0 = now();
    for (int64_t i = 0; i < n; i++)
        layer_norm(e->x + i * W, vec(e, l, RBE_V_NORM1), vec(e, l, RBE_V_NORM1_B), c->eps, h, e->xn + i * W);
    e->prof[2] += now() - t0;
    linear(e, mat(e, l, RBE_M_QKV), e->xn, n, W, e->q, W); /* [q | k | v] per token */
    attention(e, l, n, e->q, W, e->q + qd, e->q + qd + kvd, W, e->att);
    linear(e, mat(e, l, RBE_M_O), e->att, n, W, e->f1, W);
    t0 = now();
    for (int64_t i = 0; i < n; i++) {
        add_into(e->x + i * W, e->f1 + i * W, h);
        layer_norm(e->x + i * W, vec(e, l, RBE_V_NORM2), vec(e, l, RBE_V_NORM2_B), c->eps, h, e->xn + i * W);
    }
    e->prof[2] += now() - t0;
    linear(e, mat(e, l, RBE_M_UP), e->xn, n, W, e->f1, W);
    t0 = now();
    for (int64_t i = 0; i < n; i++) e->kern->activate(c->activation, e->f1 + i * W, NULL, c->intermediate);
    e->prof[2] += now() - t0;
    linear(e, mat(e, l, RBE_M_DOWN), e->f1, n, W, e->f2, W);
    t0 = now();
    for (int64_t i = 0; i < n; i++) add_into(e->x + i * W, e->f2 + i * W, h);
    e->prof[2] += now() - t0;
}

/* Layer l of a decoder has its attention and MLP matrices (norms are optional: the description
 * says which exist). */
static int decoder_complete(rbe_engine *e, int l) {
    const int qkv = mat(e, l, RBE_M_QKV)->set ||
                    (mat(e, l, RBE_M_Q)->set && mat(e, l, RBE_M_K)->set && mat(e, l, RBE_M_V)->set);
    if (!qkv || !mat(e, l, RBE_M_O)->set) return 0;
    if (mat(e, l, RBE_M_ROUTER)->set) {
        for (int64_t s = RBE_M_EXPERT; s < e->m_slots; s++)
            if (!mat(e, l, (int)s)->set) return 0;
        return 1;
    }
    return (mat(e, l, RBE_M_GATE_UP)->set || (mat(e, l, RBE_M_GATE)->set && mat(e, l, RBE_M_UP)->set)) &&
           mat(e, l, RBE_M_DOWN)->set;
}

/* Every required matrix and vector is set; 0 or RBE_E_INCOMPLETE. */
static int complete(rbe_engine *e) {
    static const int gpt2_m[] = {RBE_M_QKV, RBE_M_O, RBE_M_UP, RBE_M_DOWN};
    for (int l = 0; l < e->c.n_layers; l++) {
        if (e->c.arch == RBE_ARCH_DECODER) {
            if (!decoder_complete(e, l)) return RBE_E_INCOMPLETE;
            continue;
        }
        for (int i = 0; i < 4; i++)
            if (!mat(e, l, gpt2_m[i])->set) return RBE_E_INCOMPLETE;
        if (!vec(e, l, RBE_V_NORM1) || !vec(e, l, RBE_V_NORM2)) return RBE_E_INCOMPLETE;
    }
    if (!mat(e, -1, RBE_G_EMBED)->set || !vec(e, -1, 0)) return RBE_E_INCOMPLETE;
    if (e->c.arch == RBE_ARCH_GPT2 && !mat(e, -1, RBE_G_POS)->set) return RBE_E_INCOMPLETE;
    return 0;
}

/* Per-thread scratch for the widest panel any product or attention needs, input/output rows as
 * wide as the widest padded matrix, and (int8 products) a chunk's quantized input. */
static int ensure_scratch(rbe_engine *e, int nthreads) {
    int64_t need = (int64_t)e->c.n_heads * e->c.max_ctx + e->width, io = e->width;
    const int q8 = e->c.act_int8 && e->kern->lut_gemm_q8; /* int8 products: the pack, their scratch */
    const int64_t nm = (int64_t)e->c.n_layers * e->m_slots + G_SLOTS;
    for (int64_t i = 0; i < nm; i++) {
        const emat *m = &e->mats[i];
        if (!m->set) continue;
        const int64_t cp = m->lut.cols_p;
        int64_t want = m->transposed ? 64 * cp : (int64_t)e->kern->gemm_rows * (cp + e->kern->gemm_tokens) + 17 * m->lut.groups;
        if (q8 && m->lut.kind != RBE_LUT_F32 && e->kern->q8_scratch(&m->lut, CHUNK) / 4 + 1 > want)
            want = e->kern->q8_scratch(&m->lut, CHUNK) / 4 + 1;
        if (want > need) need = want;
        if (cp > io) io = cp;
    }
    const int64_t tq = e->kern->q8_tokens, tiles = (CHUNK + tq - 1) / tq * (io / 32) * RBE_Q8_REC(tq);
    const int64_t ones = e->kern->q8_one_nibble_tokens * RBE_Q8_ONE(io), pack = q8 ? (tiles > ones ? tiles : ones) : 0;
    if (pack > e->pack_bytes) {
        free(e->pack);
        e->pack_bytes = 0;
        if (posix_memalign((void **)&e->pack, 64, (size_t)pack)) return e->pack = NULL, RBE_E_NOMEM;
        e->pack_bytes = pack;
    }
    if (need <= e->scratch_floats && nthreads <= e->scratch_count && io <= e->io_floats) {
        e->nthreads = nthreads;
        return 0;
    }
    for (int t = 0; t < POOL_MAX; t++) free(e->scratch[t]), e->scratch[t] = NULL;
    free(e->xr), free(e->xt), free(e->yr), free(e->row);
    e->scratch_floats = e->io_floats = 0, e->nthreads = e->scratch_count = 0;
    e->xr = alloc_floats(CHUNK * io), e->yr = alloc_floats(CHUNK * io), e->row = alloc_floats(io);
    e->xt = alloc_floats((CHUNK + 64) * io);
    if (!e->xr || !e->xt || !e->yr || !e->row) return RBE_E_NOMEM;
    for (int t = 0; t < nthreads; t++)
        if (!(e->scratch[t] = alloc_floats(need))) return RBE_E_NOMEM;
    e->scratch_floats = need, e->io_floats = io, e->nthreads = e->scratch_count = nthreads;
    return 0;
}

/* Kernels for `isa`, every required weight set, scratch for `nthreads`; 0 or an error. */
static int ready(rbe_engine *e, int isa, int nthreads) {
    e->kern = rbe_kernels_for(isa);
    if (!e->kern) return RBE_E_ISA;
    const int err = complete(e);
    return err ? err : ensure_scratch(e, nthreads < 1 ? 1 : (nthreads > POOL_MAX ? POOL_MAX : nthreads));
}

/* The chunk's m rows (tokens; row_pos and row caches set) through the model; logits of the rows
 * flagged in `want` (all when NULL), in order, into out. */
static void run_chunk(rbe_engine *e, const long long *tokens, int64_t m, const unsigned char *want, float *out) {
    const rbe_engine_config *c = &e->c;
    const int64_t W = e->width, h = c->hidden;
    double t0 = now();
    for (int64_t i = 0; i < m; i++) {
        matrix_row(e, mat(e, -1, RBE_G_EMBED), tokens[i], e->x + i * W);
        if (c->embed_scale != 1.0f)
            for (int64_t d = 0; d < h; d++) e->x[i * W + d] *= c->embed_scale;
        if (c->arch == RBE_ARCH_GPT2) {
            matrix_row(e, mat(e, -1, RBE_G_POS), e->row_pos[i], e->xn);
            add_into(e->x + i * W, e->xn, h);
        }
    }
    if (c->arch == RBE_ARCH_DECODER && c->rope_style != RBE_ROPE_NONE) rope_angles(e, m);
    e->prof[2] += now() - t0;
    for (int l = 0; l < c->n_layers; l++) {
        if (c->arch == RBE_ARCH_DECODER) decoder_layer(e, l, m);
        else gpt2_layer(e, l, m);
    }
    t0 = now();
    int64_t rows = 0; /* the wanted rows, normed, packed at the top of xn */
    for (int64_t i = 0; i < m; i++) {
        if (want && !want[i]) continue;
        if (c->arch == RBE_ARCH_DECODER) rms_norm(e->kern, e->x + i * W, vec(e, -1, 0), c->eps, h, e->xn + rows * W);
        else layer_norm(e->x + i * W, vec(e, -1, 0), vec(e, -1, 1), c->eps, h, e->xn + rows * W);
        rows++;
    }
    e->prof[2] += now() - t0;
    if (!rows) return;
    const emat *head = mat(e, -1, RBE_G_HEAD)->set ? mat(e, -1, RBE_G_HEAD) : mat(e, -1, RBE_G_EMBED);
    linear(e, head, e->xn, rows, W, out, c->vocab);
    if (c->final_softcap > 0.0f)
        for (int64_t i = 0; i < rows * (int64_t)c->vocab; i++) out[i] = c->final_softcap * tanhf(out[i] / c->final_softcap);
}

int rbe_engine_forward(rbe_engine *e, const long long *tokens, long long n, long long pos,
                       float *logits, int all_logits, int isa, int nthreads) {
    if (!e || !tokens || !logits || n < 1 || pos < 0) return RBE_E_ARGS;
    if (pos > e->length || pos + n > e->c.max_ctx) return RBE_E_CONTEXT;
    for (long long i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= e->c.vocab) return RBE_E_TOKEN;
    const int err = ready(e, isa, nthreads);
    if (err) return err;
    unsigned char last[CHUNK] = {0};
    e->length = pos; /* positions past pos are dropped */
    for (long long done = 0; done < n; done += CHUNK) {
        const int64_t m = n - done < CHUNK ? n - done : CHUNK;
        for (int64_t i = 0; i < m; i++) e->row_pos[i] = pos + done + i, e->row_kc[i] = e->kc, e->row_vc[i] = e->vc;
        const int final = done + m == n;
        if (!all_logits && !final) {
            run_chunk(e, tokens + done, m, last, NULL); /* no row wanted */
        } else {
            last[m - 1] = 1;
            run_chunk(e, tokens + done, m, all_logits ? NULL : last, logits + (all_logits ? done * (int64_t)e->c.vocab : 0));
        }
        e->length = pos + done + m;
    }
    return 0;
}

/* The rows of a batch are valid: known tokens and slots, each slot's rows at consecutive
 * positions from at most its cached length, inside the context. */
static int check_batch(rbe_engine *e, const long long *tokens, const int *slots, const long long *positions,
                       long long n) {
    int64_t next[RBE_MAX_SLOTS];
    for (int s = 0; s < RBE_MAX_SLOTS; s++) next[s] = -1;
    for (long long i = 0; i < n; i++) {
        const int s = slots[i];
        if (tokens[i] < 0 || tokens[i] >= e->c.vocab) return RBE_E_TOKEN;
        if (s < 0 || s >= RBE_MAX_SLOTS) return RBE_E_ARGS;
        const int64_t limit = next[s] >= 0 ? next[s] : (e->slot_kc[s] ? e->slot_len[s] : 0);
        if (positions[i] < 0 || (next[s] >= 0 ? positions[i] != limit : positions[i] > limit) ||
            positions[i] >= e->c.max_ctx)
            return RBE_E_CONTEXT;
        next[s] = positions[i] + 1;
    }
    return 0;
}

int rbe_engine_forward_batch(rbe_engine *e, const long long *tokens, const int *slots,
                             const long long *positions, const unsigned char *want, long long n,
                             float *logits, int isa, int nthreads) {
    if (!e || !tokens || !slots || !positions || !want || !logits || n < 1) return RBE_E_ARGS;
    e->slot_len[e->slot] = e->length;
    int err = check_batch(e, tokens, slots, positions, n);
    for (long long i = 0; !err && i < n; i++) err = ensure_slot(e, slots[i]);
    if (!err) err = ready(e, isa, nthreads);
    if (err) return err;
    for (long long done = 0; done < n; done += CHUNK) {
        const int64_t m = n - done < CHUNK ? n - done : CHUNK;
        int64_t wanted = 0;
        for (int64_t i = 0; i < m; i++) {
            const int s = slots[done + i];
            e->row_pos[i] = positions[done + i], e->row_kc[i] = e->slot_kc[s], e->row_vc[i] = e->slot_vc[s];
            e->slot_len[s] = positions[done + i] + 1; /* later positions are dropped */
        }
        run_chunk(e, tokens + done, m, want + done, logits);
        for (int64_t i = 0; i < m; i++) wanted += want[done + i] != 0;
        logits += wanted * (int64_t)e->c.vocab;
    }
    e->kc = e->slot_kc[e->slot], e->vc = e->slot_vc[e->slot], e->length = e->slot_len[e->slot];
    return 0;
}

/* ---- one matrix on its own (the cffi backend's linear for lowered codecs, and the tests) ---- */
struct rbe_matrix {
    rbe_engine e; /* a context without layers: kernels, pool, scratch, the transform */
    emat m[G_SLOTS];
};

long long rbe_matrix_bytes(const rbe_matrix *h) { return h->e.bytes; }

void rbe_matrix_free(rbe_matrix *h) {
    if (!h) return;
    free_mat(&h->m[0]);
    arena_free(h->e.arena);
    if (h->e.tfs) free(h->e.tfs[0].signs), free(h->e.tfs[0].blocks);
    free(h->e.tfs);
    free(h->e.xr), free(h->e.xt), free(h->e.yr), free(h->e.row), free(h->e.pack);
    for (int t = 0; t < POOL_MAX; t++) free(h->e.scratch[t]);
    free(h);
}

rbe_matrix *rbe_matrix_new(const rbe_matrix_desc *d, const float *signs, const long long *blocks,
                           int nblocks) {
    rbe_matrix *h = calloc(1, sizeof(*h));
    if (!h) return NULL;
    rbe_engine *e = &h->e;
    e->mats = h->m;
    e->spin = MATRIX_SPIN;
    e->c.n_transforms = 1, e->c.max_ctx = 1;
    e->width = round32(d->rows > d->cols ? d->rows : d->cols);
    e->tfs = calloc(1, sizeof(etf));
    if (!e->tfs || (signs && rbe_engine_set_transform(e, 0, d->cols_p, signs, blocks, nblocks))) {
        rbe_matrix_free(h);
        return NULL;
    }
    rbe_matrix_desc local = *d;
    local.transform = signs ? 0 : -1;
    if (load_mat(e, &h->m[0], &local)) {
        rbe_matrix_free(h);
        return NULL;
    }
    return h;
}

/* Scratch and input/output rows that every matrix on its own borrows for the length of a call,
 * one call at a time (each holding its own made SmolLM2's 211 separate matrices hold ~1 MB more
 * apiece; products are serialised by the single pool anyway). */
static rbe_engine shared_scratch; /* only the scratch fields are used; under matrix_mu */

static void swap_scratch(rbe_engine *a, rbe_engine *b) {
    rbe_engine t = *a;
    memcpy(a->scratch, b->scratch, sizeof(a->scratch)), memcpy(b->scratch, t.scratch, sizeof(t.scratch));
    a->xr = b->xr, a->xt = b->xt, a->yr = b->yr, a->row = b->row, a->pack = b->pack;
    b->xr = t.xr, b->xt = t.xt, b->yr = t.yr, b->row = t.row, b->pack = t.pack;
    a->pack_bytes = b->pack_bytes, b->pack_bytes = t.pack_bytes;
    a->scratch_floats = b->scratch_floats, a->io_floats = b->io_floats, a->scratch_count = b->scratch_count;
    b->scratch_floats = t.scratch_floats, b->io_floats = t.io_floats, b->scratch_count = t.scratch_count;
}

/* rbe_matrix_linear (int8 0) and rbe_matrix_linear_int8 (1). */
static int matrix_linear(rbe_matrix *h, const float *x, long long n, float *y, int isa,
                         int nthreads, int int8) {
    if (!h || !x || !y || n < 0) return RBE_E_ARGS;
    rbe_engine *e = &h->e;
    const rbe_kernels *kern = rbe_kernels_for(isa);
    if (!kern || (int8 && !kern->lut_gemm_q8)) return RBE_E_ISA;
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&matrix_mu); /* also guards the context's own fields (kern, nthreads) */
    e->kern = kern, e->c.act_int8 = int8;
    swap_scratch(e, &shared_scratch);
    const int err = ensure_scratch(e, nthreads < 1 ? 1 : (nthreads > POOL_MAX ? POOL_MAX : nthreads));
    const emat *m = &h->m[0];
    const int64_t in = m->transposed ? m->rows : m->cols, out = m->transposed ? m->cols : m->rows;
    for (long long s = 0; !err && s < n; s += CHUNK) {
        const int64_t c = n - s < CHUNK ? n - s : CHUNK;
        linear(e, m, x + s * in, c, in, y + s * out, out);
    }
    swap_scratch(e, &shared_scratch);
    pthread_mutex_unlock(&matrix_mu);
    return err;
}

int rbe_matrix_linear(rbe_matrix *h, const float *x, long long n, float *y, int isa, int nthreads) {
    return matrix_linear(h, x, n, y, isa, nthreads, 0);
}

int rbe_matrix_linear_int8(rbe_matrix *h, const float *x, long long n, float *y, int isa,
                           int nthreads) {
    return matrix_linear(h, x, n, y, isa, nthreads, 1);
}

int rbe_matrix_int16_levels(const rbe_matrix *h, short *lv16, float *alpha) {
    const rbe_lut *L = &h->m[0].lut;
    if (L->kind != RBE_LUT_PLANES) return 0;
    memcpy(lv16, L->lv16, ((size_t)1 << L->bits) * sizeof(short));
    *alpha = L->q16_alpha;
    return 1;
}

int rbe_matrix_int8_levels(const rbe_matrix *h, signed char *lv8, float *alpha_beta, int *rot) {
    const rbe_lut *L = &h->m[0].lut;
    if (L->kind == RBE_LUT_F32) return -1;
    memcpy(lv8, L->lv8, (size_t)1 << L->bits);
    alpha_beta[0] = L->q8_alpha, alpha_beta[1] = L->q8_beta, *rot = L->q8_rot;
    return L->q8_exact;
}
