"""Shared by the CPU and CUDA int GEMM tests: random 8-bit operands and the opcheck cases."""
import torch

from q2ext import gemm

ops = torch.ops.q2ext


def _ints(shape, dtype, gen):
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    return torch.randint(lo, hi, shape, dtype=dtype, generator=gen)


def opcheck_cases(device):
    """(op, args) for torch.library.opcheck: every GEMM op, each epilogue / dtype path."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    a, b = _ints((5, 64), torch.int8, g), _ints((7, 64), torch.int8, g)
    au = _ints((20, 64), torch.uint8, g)
    wp8 = gemm.pack_int8_weight(b)
    wp4 = gemm.pack_int4(torch.randint(0, 16, (7, 64), generator=g))
    s, z = torch.rand(2, 7, generator=g), torch.rand(2, 7, generator=g)
    cases = [
        (ops.quantize_activation, (x, None, -128, 127)),
        (ops.quantize_activation, (x.bfloat16(), torch.tensor([0.1]), 0, 255)),
        (ops.w8a8_mm, (a, b, torch.rand(5), torch.rand(7), torch.randn(7), torch.bfloat16, True)),
        (ops.w8a8_mm, (a, b, torch.rand(1), torch.rand(7), None, torch.int32, False)),
        (ops.w8a8_mm, (au, b, torch.rand(20), torch.rand(7), None, None, False)),
        (ops.w8a8_mm, (a, wp8, torch.rand(5), torch.rand(7), torch.randn(7), None, True)),  # packed b
        (ops.w8a8_linear, (x, wp8, torch.rand(7), None, torch.randn(7), -128, 127, False)),
        (ops.w4a16_mm, (x, wp4, s, z, 32)),
        (ops.w4a16_mm, (x.bfloat16(), wp4, s, z, 32)),
    ]
    return [(op, tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in args)) for op, args in cases]
