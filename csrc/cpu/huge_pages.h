#pragma once
// Large outputs of the CPU kernels: ask Linux for transparent huge pages before the first
// write.  A fresh output of >= 32 MB is always a new anonymous mapping (above glibc's
// largest mmap threshold), and faulting it in 4 KB at a time costs more than the kernel
// that fills it (16M fp32 elements: ~60 ms of faults vs ~20 ms of work on the 2-vCPU CI
// machine).  With MADV_HUGEPAGE the same memory arrives in 2 MB pages, 512x fewer faults.
// It is advice only: where THP is off, unsupported or the call fails, nothing changes.
// PyTorch's own allocator does the same for every allocation when THP_MEM_ALLOC_ENABLE=1.
#include <ATen/core/Tensor.h>

namespace q2ext {

// Call right after allocating `fresh` and before anything writes to it.
void advise_huge_pages(const at::Tensor& fresh);

}  // namespace q2ext
