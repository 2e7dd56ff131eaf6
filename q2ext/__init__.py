"""q2ext: fast low-bit quantization-aware training for detection and segmentation.

Fused fake-quant kernels (LSQ, LSQ+, PACT, ATen-style affine) on CPU, CUDA and Triton,
and the Q² method (Q-GBFusion, Q-ADA).  Importing q2ext never queries a device.
"""
# Op schemas first (each family registers its reference fallback with _ops), then the
# loader, which either loads q2ext._C or switches every family to its reference kernels.
from . import _ops_ada, _ops_gbfusion, _ops_gemm  # noqa: F401
from . import _ext
from . import backend, nn, ops, reference
from ._ext import cpu_isa, has_compiled, set_cpu_isa
from .convert import convert
from .distill import Q2Distiller
from .export import export_onnx
from .fusion import calibrate_gbfusion, fold_gbfusion, gradient_energy_report, insert_gbfusion
from .nn.calibration import calibrate
from .prepare import prepare, summary
from .qconfig import LayerQConfig, QConfig

if _ext.has_triton():
    from .triton import fake_quant as _triton_fake_quant  # noqa: F401  (registers the Triton ops)
    from .triton import gemm as _triton_gemm  # noqa: F401

__version__ = "0.1.0"

__all__ = ["ops", "reference", "backend", "nn", "cpu_isa", "set_cpu_isa", "has_compiled", "__version__",
           "QConfig", "LayerQConfig", "prepare", "summary", "calibrate", "convert", "export_onnx",
           "insert_gbfusion", "fold_gbfusion", "calibrate_gbfusion", "gradient_energy_report", "Q2Distiller"]
