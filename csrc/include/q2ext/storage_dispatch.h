#pragma once
// Host-side dispatch from a tensor's scalar type to the storage type the kernels read and
// write: float and double as themselves, the 16-bit formats as numerics.h's
// bf16_t / f16_t (bit patterns converted by the shared math, identically on CPU and GPU).
// Callers have checked the dtype already: anything else is treated as float16.
#include <c10/core/ScalarType.h>

#include "q2ext/numerics.h"

namespace q2ext {

template <typename Fn>
void dispatch_storage(c10::ScalarType t, Fn&& fn) {
  switch (t) {
    case c10::kFloat: fn(float{}); break;
    case c10::kDouble: fn(double{}); break;
    case c10::kBFloat16: fn(bf16_t{}); break;
    default: fn(f16_t{}); break;
  }
}

}  // namespace q2ext
