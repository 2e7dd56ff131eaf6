"""q2ext: fast low-bit quantization-aware training for detection and segmentation.

Fused fake-quant kernels (LSQ, LSQ+, PACT, ATen-style affine) on CPU, CUDA and Triton,
and the Q² method (Q-GBFusion, Q-ADA).  Importing q2ext never queries a device.

Layers, each importing only the ones listed before it: ``_ops`` (schemas, checks, fake
kernels, autograd) -> ``reference`` (the oracle) -> ``_ext`` (loads the kernels) ->
``backend`` (picks one) -> ``ops`` (public functions) -> ``nn`` (modules) -> ``passes``
(prepare, insert/fold, convert, export) -> ``demo``, ``benchmarks``, ``cli``.
"""
from . import _ext, backend, nn, ops, passes, reference  # noqa: F401 (_ext registers the ops on import)
from ._ext import cpu_isa, has_compiled, set_cpu_isa
from .nn import Q2Distiller, calibrate, gradient_energy_report
from .passes.checkpoint import load_checkpoint, save_checkpoint
from .passes.convert import convert
from .passes.export import export_onnx
from .passes.gb_fusion_fold import FinetuneSpec, calibrate_gbfusion, finetune, fold_gbfusion
from .passes.gb_fusion_insert import insert_gbfusion
from .passes.prepare import prepare, summary
from .qconfig import LayerQConfig, QConfig

__version__ = "0.1.0"

__all__ = ["ops", "reference", "backend", "nn", "passes", "cpu_isa", "set_cpu_isa", "has_compiled", "__version__",
           "QConfig", "LayerQConfig", "prepare", "summary", "calibrate", "convert", "export_onnx",
           "insert_gbfusion", "fold_gbfusion", "calibrate_gbfusion", "FinetuneSpec", "finetune",
           "gradient_energy_report", "Q2Distiller", "save_checkpoint", "load_checkpoint"]
