// q2ext._C: loading it registers the CPU/CUDA kernels (TORCH_LIBRARY_IMPL blocks in
// csrc/cpu and csrc/cuda); the pybind11 functions below only report build facts and
// switch the CPU code path.
#include <torch/extension.h>

#include "q2ext/cpu_isa.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "q2ext compiled kernels";
#ifdef Q2EXT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_isa", [] { return q2ext::cpu_isa_name(q2ext::active_cpu_isa()); },
        "The CPU code path the kernels use now.");
  m.def("best_cpu_isa", [] { return q2ext::cpu_isa_name(q2ext::best_cpu_isa()); },
        "The best CPU code path this machine supports.");
  m.def("set_cpu_isa", &q2ext::set_cpu_isa,
        "Force the CPU code path: 'auto', 'avx512', 'avx2' or 'scalar'.");
}
