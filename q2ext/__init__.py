"""q2ext: fast low-bit quantization-aware training for detection and segmentation.

Fused fake-quant kernels (LSQ, LSQ+, PACT, ATen-style affine) on CPU, CUDA and Triton,
and the Q² method (Q-GBFusion, Q-ADA).  Importing q2ext never queries a device.
"""
from . import _ext  # loads q2ext._C or registers the reference kernels
from . import backend, ops, reference
from ._ext import cpu_isa, has_compiled, set_cpu_isa

if _ext.has_triton():
    from .triton import fake_quant as _triton_fake_quant  # noqa: F401  (registers the Triton ops)

__version__ = "0.1.0"

__all__ = ["ops", "reference", "backend", "cpu_isa", "set_cpu_isa", "has_compiled", "__version__"]
