// The scalar instantiation of the fake-quant element loops.
// Only this translation unit is compiled for this ISA; it includes no torch or std
// headers, so no shared inline function can leak scalar code into other paths.
// Baseline x86-64 (SSE2 only): the reference-speed fallback and a third test path.

#include "fake_quant_loops.h"

Q2EXT_DEFINE_ISA_ENTRY_POINTS(scalar)
