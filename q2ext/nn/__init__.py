"""Drop-in modules, one file per op family: quantizers (LSQ, LSQ+, PACT) and whole-model
quantizer control (:mod:`.fake_quant`), QAT layers (:mod:`.fake_quant_layers`), Q-GBFusion
(:mod:`.gb_fusion`), Q-ADA (:mod:`.ada_loss`) and int8/int4 inference layers (:mod:`.gemm_layers`).

Use :func:`q2ext.prepare` to swap every supported layer of a model at once, or build the
layers directly (``QuantConv2d.from_float(conv)``).
"""
from .ada_loss import ADALoss, Q2Distiller
from .fake_quant import (
    LSQPlusQuantizer,
    LSQQuantizer,
    PACTQuantizer,
    Quantizer,
    calibrate,
    freeze,
    quantizers,
    set_enabled,
    unfreeze,
)
from .fake_quant_layers import (
    FLOAT_TO_QUANT,
    QUANT_LAYERS,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
    make_input_quantizer,
    make_weight_quantizer,
)
from .gb_fusion import EnergyReport, FixedFusion, GBFusion, gradient_energy_report
from .gemm_layers import Int4Linear, Int8Conv2d, Int8Linear

__all__ = [
    "Quantizer", "LSQQuantizer", "LSQPlusQuantizer", "PACTQuantizer",
    "QuantConv2d", "QuantConvTranspose2d", "QuantLinear", "QUANT_LAYERS", "FLOAT_TO_QUANT",
    "make_weight_quantizer", "make_input_quantizer",
    "calibrate", "set_enabled", "freeze", "unfreeze", "quantizers",
    "GBFusion", "FixedFusion", "EnergyReport", "gradient_energy_report", "ADALoss", "Q2Distiller",
    "Int8Linear", "Int8Conv2d", "Int4Linear",
]
