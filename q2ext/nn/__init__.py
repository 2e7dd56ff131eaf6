"""Drop-in QAT modules: quantizers (LSQ, LSQ+, PACT) and quantized Conv2d/ConvTranspose2d/Linear.

Use :func:`q2ext.prepare` to swap every supported layer of a model at once, or build the
layers directly (``QuantConv2d.from_float(conv)``).
"""
from .gbfusion import GBFusion
from .ada import ADALoss, ada_loss  # Q-ADA (issue #4)
from .calibration import calibrate, freeze, quantizers, set_enabled, unfreeze
from .layers import (
    FLOAT_TO_QUANT,
    QUANT_LAYERS,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
    make_input_quantizer,
    make_weight_quantizer,
)
from .quantizers import LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, Quantizer

__all__ = [
    "Quantizer", "LSQQuantizer", "LSQPlusQuantizer", "PACTQuantizer",
    "QuantConv2d", "QuantConvTranspose2d", "QuantLinear", "QUANT_LAYERS", "FLOAT_TO_QUANT",
    "make_weight_quantizer", "make_input_quantizer",
    "calibrate", "set_enabled", "freeze", "unfreeze", "quantizers",
]
from .int_layers import Int4Linear, Int8Conv2d, Int8Linear  # noqa: F401  (issue #6)
