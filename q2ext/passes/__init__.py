"""Whole-model passes, one module each: ``prepare`` (float -> QAT layers, and ``summary``),
``gb_fusion_insert`` (Q-GBFusion at the fusion nodes), ``gb_fusion_fold`` (its deployment
form), ``convert`` (QAT -> int8/int4 inference layers) and ``export`` (QAT -> ONNX Q/DQ).
The functions are re-exported by the ``q2ext`` package, not here, so that no function name
shadows its module (``q2ext.passes.prepare`` is the module, ``q2ext.prepare`` the function).
"""
