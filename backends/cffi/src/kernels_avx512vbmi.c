/* The AVX-512 path again, with VBMI byte permutes (and VL, VNNI): trellis rows whose levels are
 * integers are cut into their 8-bit windows by vpermb + vpmultishiftqb and looked up as signed
 * bytes by vpermt2b, where kernels_avx512.c gathers them. Compiled with -mavx512vl -mavx512vbmi
 * -mavx512vnni besides that file's flags; dispatch.c hands it out only to CPUs with all three. */
#define RBE_AVX512_VBMI 1
#include "kernels_avx512.c"
