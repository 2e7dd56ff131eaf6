"""Public functional API of q2ext, all four op families:

- fake quant (:mod:`._fake_quant`): ``fake_quant_affine``, ``lsq`` (LSQ, LSQ+), ``pact``;
- Q-GBFusion (:mod:`._gb_fusion`): ``gb_fusion``;
- Q-ADA (:mod:`._ada_loss`): ``ada_loss``;
- int8/int4 inference GEMMs (:mod:`._gemm`): ``quantize_activation``, ``w8a8_mm``,
  ``w8a8_linear``, ``w4a16_mm`` and the weight packing helpers.

Each wrapper checks its arguments (errors name the argument), asks :func:`q2ext.backend.op_for`
which kernel runs on the input's device, and never synchronises with the host.
"""
from ._ada_loss import ada_loss
from ._fake_quant import fake_quant_affine, lsq, pact
from ._gb_fusion import gb_fusion
from ._gemm import (
    dequantize_int4,
    pack_int4,
    pack_int8_weight,
    quantize_activation,
    unpack_int4,
    unpack_int8_weight,
    w4a16_mm,
    w8a8_linear,
    w8a8_mm,
)

__all__ = ["fake_quant_affine", "lsq", "pact", "gb_fusion", "ada_loss",
           "quantize_activation", "w8a8_mm", "w8a8_linear", "w4a16_mm",
           "pack_int4", "unpack_int4", "pack_int8_weight", "unpack_int8_weight", "dequantize_int4"]
