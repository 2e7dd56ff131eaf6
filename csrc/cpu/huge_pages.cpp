#include "huge_pages.h"

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace q2ext {

namespace {
constexpr std::uintptr_t kHugePage = std::uintptr_t{1} << 21;  // 2 MB on x86-64
// Below this the buffer may come from glibc's heap, already faulted in and reused:
// advice there would only split the heap mapping.
constexpr std::size_t kMinBytes = std::size_t{32} << 20;
}  // namespace

void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!fresh.defined() || !fresh.device().is_cpu()) return;
  const std::size_t bytes = fresh.storage().nbytes();
  if (bytes < kMinBytes) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(fresh.storage().data());
  // Only whole huge pages inside the buffer: the advice must not touch neighbours.
  const std::uintptr_t lo = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t hi = (begin + bytes) & ~(kHugePage - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice: errors ignored
#else
  (void)fresh;
#endif
}

}  // namespace q2ext
