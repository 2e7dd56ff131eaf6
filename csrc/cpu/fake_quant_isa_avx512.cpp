// The avx512 instantiation of the fake-quant element loops (Sapphire Rapids / Skylake-SP and newer).
// Only this translation unit is compiled for this ISA; it includes no torch or std
// headers, so no shared inline function can leak avx512 code into other paths.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")
#endif

#include "fake_quant_loops.h"

Q2EXT_DEFINE_ISA_ENTRY_POINTS(avx512)
