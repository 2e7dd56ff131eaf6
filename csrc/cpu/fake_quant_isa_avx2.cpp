// The avx2 instantiation of the fake-quant element loops (any x86-64 since Haswell: the baseline the wheel promises).
// Only this translation unit is compiled for this ISA; it includes no torch or std
// headers, so no shared inline function can leak avx2 code into other paths.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,bmi2")
#endif

#include "fake_quant_loops.h"

Q2EXT_DEFINE_ISA_ENTRY_POINTS(avx2)
