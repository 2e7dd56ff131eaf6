"""Pure-PyTorch semantics of every q2ext op, one module per op family: the test oracle and,
when ``q2ext._C`` is not built, the kernels (registered by q2ext/_ext.py through
``q2ext._ops.register_reference``).  Written for clarity, not speed; never on a production
path (packing and the other weight layouts live in ``q2ext._ops``).
"""
from . import ada_loss, fake_quant, gb_fusion, gemm

# op name -> reference kernel, for every op with a C++ kernel
KERNELS = {**fake_quant.KERNELS, **gb_fusion.KERNELS, **ada_loss.KERNELS, **gemm.KERNELS}

__all__ = ["fake_quant", "gb_fusion", "ada_loss", "gemm", "KERNELS"]
