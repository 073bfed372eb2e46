/* rbe cffi backend: ISA detection and the error codes shared by the C API (also the cffi cdef,
 * so keep it plain C declarations). The matrix and engine API is in rbe_engine.h.
 * isa: RBE_ISA_SCALAR / RBE_ISA_AVX2 / RBE_ISA_AVX512 / RBE_ISA_AVX512VBMI (a bitmask in the functions
 * below; AVX512VBMI: the AVX-512 path with byte permutes, on CPUs with VBMI and VNNI).
 * Errors: RBE_E_ISA (the path is not available here), RBE_E_ARGS (bad arguments), RBE_E_NOMEM
 * (memory cannot be allocated).
 */
#define RBE_ISA_SCALAR 1
#define RBE_ISA_AVX2 2
#define RBE_ISA_AVX512 4
#define RBE_ISA_AVX512VBMI 8
#define RBE_E_ISA 1
#define RBE_E_ARGS 2
#define RBE_E_NOMEM 3

int rbe_isa_compiled(void);  /* bitmask of the paths built into this module */
int rbe_isa_supported(void); /* compiled paths this CPU (and OS) can run */
int rbe_isa_int8(int isa);   /* whether the path has the int8 product on this CPU */
