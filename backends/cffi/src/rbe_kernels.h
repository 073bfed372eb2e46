/* rbe cffi backend: public C API (also the cffi cdef, so keep it plain C declarations).
 *
 * Layouts (row-major, C-contiguous):
 *   int8: q int8[rows, cols], scale float32[rows];            w = q * scale[r]
 *   int4: q uint8[rows, cols_p/2] (low nibble = even column), scale/minimum float16 bits
 *         uint16[rows, cols_p/group_size], cols_p = cols rounded up to group_size;
 *         w = q * scale[r, c/group_size] + minimum[r, c/group_size]
 *   hadamard: codes uint8[rows, ceil(cols_p*bits/8)] (each row a little-endian stream of
 *         bits-bit codes), scale_code uint8[rows, cols_p/group_size], row_scale float32[rows];
 *         levels float32[2^bits] (the value of each code);
 *         W_rot = levels[q] * row_scale[r] * scale_code[r, c/group_size] and
 *         W = (W_rot @ R)[:, :cols], R = blockdiag(H_b / sqrt(b)) diag(signs), blocks
 *         (powers of two) summing to cols_p. The input is rotated (and padded) once per call.
 * linear:     y[n, rows]   = x[n, cols] @ W^T
 * grad_input: out[n, cols] = g[n, rows] @ W
 * isa: RBE_ISA_SCALAR / RBE_ISA_AVX2 / RBE_ISA_AVX512; nthreads >= 1.
 * Return 0 on success, RBE_E_ISA if the path is not available here, RBE_E_ARGS for bad
 * arguments, RBE_E_NOMEM when scratch memory cannot be allocated.
 */
#define RBE_ISA_SCALAR 1
#define RBE_ISA_AVX2 2
#define RBE_ISA_AVX512 4
#define RBE_E_ISA 1
#define RBE_E_ARGS 2
#define RBE_E_NOMEM 3

int rbe_isa_compiled(void);  /* bitmask of the paths built into this module */
int rbe_isa_supported(void); /* compiled paths this CPU (and OS) can run */

int rbe_int8_linear(const float *x, long long n, const signed char *q, const float *scale,
                    long long rows, long long cols, float *y, int isa, int nthreads);
int rbe_int8_grad_input(const float *g, long long n, const signed char *q, const float *scale,
                        long long rows, long long cols, float *out, int isa, int nthreads);
int rbe_int4_linear(const float *x, long long n, const unsigned char *q,
                    const unsigned short *scale, const unsigned short *minimum, long long rows,
                    long long cols, long long group_size, float *y, int isa, int nthreads);
int rbe_int4_grad_input(const float *g, long long n, const unsigned char *q,
                        const unsigned short *scale, const unsigned short *minimum,
                        long long rows, long long cols, long long group_size, float *out,
                        int isa, int nthreads);
int rbe_hadamard_linear(const float *x, long long n, long long cols, const unsigned char *codes,
                        const unsigned char *scale_code, const float *row_scale, long long rows,
                        long long cols_p, long long group_size, int bits, const float *levels,
                        const float *signs, const long long *blocks, int nblocks, float *y,
                        int isa, int nthreads);
int rbe_hadamard_grad_input(const float *g, long long n, long long cols, const unsigned char *codes,
                            const unsigned char *scale_code, const float *row_scale,
                            long long rows, long long cols_p, long long group_size, int bits,
                            const float *levels, const float *signs, const long long *blocks,
                            int nblocks, float *out, int isa, int nthreads);
