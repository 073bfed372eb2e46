/* rbe native decoder engine (engine.c): a whole decoder (rbe_core.models.families.decoder's
 * description: Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM3, OLMo 2, MoE) or GPT-2 forward step in C, over weights
 * in one canonical layout, with its own KV cache and a spinning thread pool. Also part of the
 * cffi cdef, so plain C declarations only.
 *
 * Canonical layout of a matrix (rbe_matrix_desc), stored shape (rows, cols):
 *   bits 2..8: W_c[r, c] = levels[codes[r, c]] * step[r, g] (+ offset[r, g]), g = c / group_size,
 *              a float32 multiply then a float32 add, for c < cols_p (cols_p >= cols);
 *   bits 32:   W_c = dense (rows x cols_p float32).
 *   With an input transform T (block Walsh-Hadamard with signs, rbe_engine_set_transform) the
 *   matrix is W = (W_c @ T)[:, :cols]; without one, W = W_c[:, :cols].
 *   Not transposed: y = x @ W^T (W is (out, in)); transposed (GPT-2 Conv1D): y = x @ W.
 *   group_size must be a multiple of 32 dividing cols_p, or at least cols_p (one group).
 * The engine copies (and repacks) everything it is given, so the caller's buffers may be freed,
 * except nibbles given with borrow set: those it reads in place for its whole life.
 */
#define RBE_ARCH_DECODER 1 /* the described decoder (pre/post RMSNorms, GQA, RoPE, gated MLP or MoE) */
#define RBE_ARCH_GPT2 2
#define RBE_ROPE_NONE 0
#define RBE_ROPE_HALF 1
#define RBE_ROPE_INTERLEAVED 2
#define RBE_ACT_SILU_GATED 0
#define RBE_ACT_GELU_TANH 1
#define RBE_ACT_GELU 2
#define RBE_ACT_RELU 3
#define RBE_ACT_GELU_TANH_GATED 4
/* per-layer matrix slots (decoder: q k v o or qkv o, then gate up down, or gate_up down, or
 * router and experts; gpt2: qkv o up down). Expert e's matrices: RBE_M_EXPERT + 3e + 0 (gate),
 * 1 (up), 2 (down); a layer whose router is set is a mixture of experts. */
#define RBE_M_Q 0
#define RBE_M_K 1
#define RBE_M_V 2
#define RBE_M_O 3
#define RBE_M_GATE 4
#define RBE_M_UP 5
#define RBE_M_DOWN 6
#define RBE_M_QKV 7
#define RBE_M_GATE_UP 8 /* output [gate | up] */
#define RBE_M_ROUTER 9
#define RBE_M_EXPERT 10
/* global matrix slots (layer -1); an unset head reuses the embedding (tied) */
#define RBE_G_EMBED 0
#define RBE_G_POS 1
#define RBE_G_HEAD 2
/* per-layer vectors (norm weights and biases); global (layer -1): 0 final norm, 1 its bias.
 * Decoder norms are RMSNorms (weight + norm_offset), each applied when set: NORM1 before
 * attention, ATTN_POST on its output, NORM2 before the MLP, FFN_POST on its output; Q_NORM and
 * K_NORM (before RoPE) have head_dim weights (one norm per head) or the projection's width. */
#define RBE_V_NORM1 0
#define RBE_V_NORM1_B 1
#define RBE_V_NORM2 2
#define RBE_V_NORM2_B 3
#define RBE_V_ATTN_POST 4
#define RBE_V_FFN_POST 5
#define RBE_V_Q_NORM 6
#define RBE_V_K_NORM 7
/* forward errors beyond rbe_kernels.h's */
#define RBE_E_TOKEN 5   /* a token id outside [0, vocab) */
#define RBE_E_CONTEXT 6 /* positions past the context length, or a gap after the cache */
#define RBE_E_INCOMPLETE 7 /* a required matrix or vector was never set */

#define RBE_KV_F32 0
#define RBE_KV_F16 1
#define RBE_KV_I8 2

typedef struct {
    int arch, n_layers, hidden, intermediate, n_heads, n_kv_heads, head_dim, vocab, max_ctx;
    float eps, rope_theta;
    int rope_style, activation, n_transforms;
    /* the KV cache's elements: RBE_KV_F32, RBE_KV_F16 (half the memory and traffic) or RBE_KV_I8
     * (int8 with a float32 scale per position and kv head: about a quarter) */
    int kv_type;
    /* 1: products of more than 16 tokens (prefill) with coded matrices quantize their input to
     * int8 per token and 32-column block and multiply integer levels on integer units (see
     * rbe_matrix_linear_int8); 0: float32 throughout. Up to 16 tokens (decode steps of one or a
     * few sequences) are float32 always. */
    int act_int8;
    /* decoder only (zero: off / the default) */
    float norm_offset;  /* added to every RMSNorm weight as it is set (Gemma's HF weights: 1) */
    float embed_scale;  /* embedding rows multiplied by it (0: 1) */
    float attn_scale;   /* query scale (0: 1 / sqrt(head_dim)) */
    float attn_softcap, final_softcap; /* c * tanh(s / c) on attention scores / logits (0: none) */
    int rotary_dim;     /* leading dims of each head that RoPE rotates (0: head_dim) */
    int n_ropes;        /* RoPE kinds (rbe_engine_set_rope); kind 0 defaults to rope_theta */
    int n_experts, experts_used, expert_intermediate, norm_topk; /* mixture-of-experts layers */
} rbe_engine_config;

typedef struct {
    long long rows, cols, cols_p, group_size;
    int bits;
    int transposed;
    const unsigned char *codes; /* rows x cols_p, one code per byte */
    const float *levels;        /* 2^bits */
    const float *step;          /* rows x ceil(cols_p / group_size) */
    const float *offset;        /* same shape, or NULL */
    const float *step_row;      /* optional, with step_code and no offset: step is exactly */
    const unsigned char *step_code; /* step_row[r] * step_code[r, g] (float32 product); stored so */
    const float *dense;         /* bits 32: rows x cols_p */
    int transform;              /* id, or -1 */
    const float *bias;          /* output-sized, or NULL */
    int trellis_bits;           /* bits 8 only, 1..7 (0: none): each code's low 8 - t bits are the
                                   previous code's (in the row) high ones, so the engine stores
                                   the row as a stream of t new bits a code (codes that are not
                                   such a path are refused) */
    const unsigned char *nibbles; /* instead of codes (bits <= 4, cols_p a multiple of 32): the
                                     codes packed as the engine keeps them, rows x cols_p / 2
                                     bytes, per 32 columns 16 bytes, byte t = code t | code t + 16
                                     << 4 */
    int borrow;                   /* with nibbles: 1, the engine reads them in place (the caller
                                     keeps them alive and unchanged until rbe_engine_free or
                                     rbe_matrix_free: a read-only file mapping), 0, copies them */
} rbe_matrix_desc;

typedef struct rbe_engine rbe_engine;

/* NULL when the config is invalid or memory is short. */
rbe_engine *rbe_engine_new(const rbe_engine_config *cfg);
void rbe_engine_free(rbe_engine *e);
/* signs: cols_p floats (+-1); blocks: powers of two summing to cols_p. */
int rbe_engine_set_transform(rbe_engine *e, int id, long long cols_p, const float *signs,
                             const long long *blocks, int nblocks);
int rbe_engine_set_matrix(rbe_engine *e, int layer, int slot, const rbe_matrix_desc *d);
int rbe_engine_set_vector(rbe_engine *e, int layer, int slot, const float *v, long long n);
/* RoPE kind `kind` (< n_ropes): rotary_dim / 2 inverse frequencies (angle = position * inv[i] in
 * float32) and the factor on cos and sin. */
int rbe_engine_set_rope(rbe_engine *e, int kind, const float *inv_freq, long long n, float factor);
/* Layer `layer`'s RoPE kind (-1: none; kind 0 unless set) and sliding window (a query sees the
 * last `window` positions, itself included; 0: all). */
int rbe_engine_set_layer(rbe_engine *e, int layer, int rope_kind, long long window);
/* Run tokens[0..n) at positions pos.. (pos <= the cached length; later cache entries are
 * dropped). logits: vocab floats for the last token, or n x vocab when all_logits. */
int rbe_engine_forward(rbe_engine *e, const long long *tokens, long long n, long long pos,
                       float *logits, int all_logits, int isa, int nthreads);
long long rbe_engine_length(const rbe_engine *e); /* cached positions of the selected slot */
/* Several sequences in one pass over the weights (continuous batching): row i is token
 * tokens[i] of the sequence in KV cache slot slots[i] at position positions[i]. A slot's rows
 * are at consecutive positions in row order, the first at most its cached length (later cache
 * entries are dropped); a new slot starts empty. logits: vocab floats for each row whose want[i]
 * is set, in row order. The selected slot (rbe_engine_use_slot) stays selected. */
int rbe_engine_forward_batch(rbe_engine *e, const long long *tokens, const int *slots,
                             const long long *positions, const unsigned char *want, long long n,
                             float *logits, int isa, int nthreads);
/* KV cache slots: up to RBE_MAX_SLOTS independent sequences share the weights. Selects the slot
 * that forward and length use from now on (slot 0 at first; a new slot starts empty). */
#define RBE_MAX_SLOTS 64
int rbe_engine_use_slot(rbe_engine *e, int slot);
/* Copies the first n cached positions of slot src into slot dst (made if new), which then holds
 * exactly those n: sequences that share a prompt prefix compute it once. RBE_E_ARGS unless src
 * holds at least n positions and src != dst. */
int rbe_engine_copy_prefix(rbe_engine *e, int src, int dst, long long n);
long long rbe_engine_bytes(const rbe_engine *e); /* weights, tables and scratch held */
/* Seconds spent since the last call in: [0] weight kernels, [1] attention, [2] the rest. */
void rbe_engine_profile(rbe_engine *e, double *seconds3);

/* One matrix on its own: y[n x out] = x[n x in] @ W^T (x @ W when transposed) + bias. signs and
 * blocks give the input transform (NULL: none); desc.transform is ignored. */
typedef struct rbe_matrix rbe_matrix;
rbe_matrix *rbe_matrix_new(const rbe_matrix_desc *d, const float *signs, const long long *blocks,
                           int nblocks);
void rbe_matrix_free(rbe_matrix *h);
long long rbe_matrix_bytes(const rbe_matrix *h); /* the stored matrix: codes, steps, bias */
int rbe_matrix_linear(rbe_matrix *h, const float *x, long long n, float *y, int isa, int nthreads);
/* The same product as an engine with act_int8 runs it for n > 16 (for tests and measurements; n
 * <= 16, dense and transposed matrices run float32): the levels are read as alpha * lv8 + beta
 * and rot is the in-block rotation (rbe_matrix_int8_levels). Each token's prepared (padded,
 * rotated) input has each group of rot columns multiplied by the unnormalised Hadamard matrix
 * H_rot (Sylvester order; in float32, each output the sum of +-x[j] by ascending j), then
 * is quantized per 32-column block to d * x8 (d = max |x| / 127, x8 = round(x * 127 / max |x|),
 * ties to even, int8); the weights' rows meet H_rot in integers. y = sum over groups of step *
 * (alpha / rot * sum_blocks d * (H_rot lv8) . x8 + beta * S) + offset * S, S = sum_blocks d *
 * (sum of x8 over each rotation group's first column) (the sum of the dequantized input), the
 * integer dot products exact. RBE_E_ISA where this CPU has no int8 product on path isa. */
int rbe_matrix_linear_int8(rbe_matrix *h, const float *x, long long n, float *y, int isa,
                           int nthreads);
/* The matrix's int8 level table: lv8 (2^bits values), alpha_beta[0..1], and its in-block input
 * rotation rot (1, 2, 4, 8 or 16: matrices without an input transform whose rotated levels fit
 * int8); returns 1 when alpha * lv8 + beta equals the levels exactly, 0 when rounded, -1 for a
 * dense matrix. */
int rbe_matrix_int8_levels(const rbe_matrix *h, signed char *lv8, float *alpha_beta, int *rot);
/* The matrix's 16-bit levels (5- and 6-bit codes): lv16 (2^bits values) and alpha; returns 1
 * when it has them (one token then runs as rbe_matrix_linear_int8's sum with lv16, alpha, beta
 * 0 and no rotation where the kernels list PLANES in their one-token kinds: AVX2), else 0. */
int rbe_matrix_int16_levels(const rbe_matrix *h, short *lv16, float *alpha);
