/* Runtime ISA selection: which kernel paths this module was built with, which of them this CPU
 * (and OS) can run, and the kernel table of a path (rbe_kernels_for). The products themselves,
 * and their thread pool, are in engine.c (rbe_engine.h); called from Python through cffi. */
#include <stddef.h>

#include "rbe_internal.h"
#include "rbe_kernels.h"

int rbe_isa_compiled(void) {
#ifdef RBE_WITH_X86_SIMD
    return RBE_ISA_SCALAR | RBE_ISA_AVX2 | RBE_ISA_AVX512 | RBE_ISA_AVX512VBMI;
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
    if ((mask & RBE_ISA_AVX512) && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni"))
        mask |= RBE_ISA_AVX512VBMI;
#endif
    return mask;
}

const rbe_kernels *rbe_kernels_for(int isa) {
    if (!(rbe_isa_supported() & isa)) return NULL;
    switch (isa) {
        case RBE_ISA_SCALAR: return &rbe_kernels_scalar;
#ifdef RBE_WITH_X86_SIMD
        case RBE_ISA_AVX2: return &rbe_kernels_avx2;
        case RBE_ISA_AVX512: /* the int8 product needs VNNI too; without it, the float product */
            return __builtin_cpu_supports("avx512vnni") ? &rbe_kernels_avx512 : &rbe_kernels_avx512_noq8;
        case RBE_ISA_AVX512VBMI: return &rbe_kernels_avx512vbmi;
#endif
        default: return NULL;
    }
}

int rbe_isa_int8(int isa) {
    const rbe_kernels *k = rbe_kernels_for(isa);
    return k && k->lut_gemm_q8;
}
