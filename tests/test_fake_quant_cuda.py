"""CUDA kernels of the fake-quant ops (csrc/cuda/fake_quant.cu) against q2ext.reference.fake_quant.

Skipped unless a CUDA device is present *and* q2ext._C was built with CUDA (without the
extension the reference itself is the CUDA kernel, so there would be nothing to test).

What is checked, and against what (the reference runs on CPU copies of the inputs):
  * forward and grad_x: bit-exact for fp32/fp16/bf16 (NaN only where the reference has
    NaN; GPU and CPU NaN payloads may differ);
  * scale / zero-point / offset / alpha gradients: within the rounding-error bound of the
    kernel's fp32 partial sums (`assert_grad_close`), and exactly equal on dyadic data
    whose sums are exact in fp32;
  * both traversals of the kernels: "runs" (per-tensor, NCHW axis 1, conv weights axis
    0, non-innermost last-axis) and "columns" (channels_last axis 1, last axis of a
    contiguous tensor), each vectorised (aligned) and scalar (storage offset, odd runs),
    for sliced / expanded / transposed inputs and grads in another layout;
  * run-to-run determinism (bit-identical outputs), no host synchronisation (sync debug
    mode "error", CUDA graph capture), opcheck, empty tensors, output_mask.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from helpers import DTYPES, KINDS, assert_bits_equal, assert_grad_close, fake_quant_opcheck_cases, is_dense, \
    make_dy, make_params, make_x, opcheck_fake_quant, opcheck_fake_quant_backward, requires_cuda, with_layout
from helpers import Case as CpuCase
from q2ext import ops
from q2ext._ops.fake_quant import MODE_AFFINE

pytestmark = requires_cuda

# Longest chain of fp32 additions in the CUDA kernels before a sum goes to double: one
# 16-byte vector (<= 8 terms, "runs") or kMaxRowsPerThread = 64 rows ("columns").
FP32_CHAIN = 64
DEV = "cuda"


class Case(CpuCase):
    """A direct ``torch.ops.q2ext.fake_quant`` call on the GPU (every kind takes ``grad_factor``
    as the op's g; "lsqp" is the unsigned LSQ+ grid), checked against the reference run on
    CPU copies of the inputs.  ``axis`` is already normalised (or None)."""

    def __init__(self, kind, bits=4, axis=None, grad_factor=1.0):
        super().__init__(kind, bits, signed=kind != "lsqp", axis=axis, grad_factor=grad_factor)
        self.third = self.third_name

    def factor(self, x, scale):
        return self.grad_factor

    def args(self, p):
        return (p["scale"], p.get("zero_point"), p.get("offset"), self.qmin, self.qmax, self.axis,
                self.mode, float(self.grad_factor))

    def kernel(self, x, p, dy, mask=(True, True, True)):
        y = torch.ops.q2ext.fake_quant(x, *self.args(p))
        dx, ds, dt = torch.ops.q2ext.fake_quant_backward(dy, x, *self.args(p), list(mask))
        return y, dx, ds, dt

    def reference(self, x, p, dy):
        return super().reference(x.cpu(), {k: v.cpu() for k, v in p.items()}, dy.cpu())

    def abs_term_sums(self, x, p, dy):
        return super().abs_term_sums(x.cpu(), {k: v.cpu() for k, v in p.items()}, dy.cpu())

    def check(self, x, p, dy, exact_sums=False):
        """Kernel vs reference; returns the kernel's (y, dx, dscale, dthird)."""
        y, dx, ds, dt = res = self.kernel(x, p, dy)
        for t in (y, dx, ds, dt):
            assert t.device.type == "cuda"
        ry, rdx, rds, rdt = self.reference(x, p, dy)
        assert_bits_equal(y, ry, what=f"{self} forward")
        assert_bits_equal(dx, rdx, what=f"{self} grad_x")
        if exact_sums:
            assert torch.equal(ds.cpu(), rds), f"{self}: scale grad {ds[:4]} != exact {rds[:4]}"
            if self.third:
                assert torch.equal(dt.cpu(), rdt), f"{self}: {self.third} grad {dt[:4]} != exact {rdt[:4]}"
        else:
            s_abs, c_abs, s_eff = self.abs_term_sums(x, p, dy)
            f = self.grad_factor
            assert_grad_close(ds, rds, c_abs if self.kind == "pact" else s_abs, FP32_CHAIN, f, f"{self} grad_scale")
            if self.kind == "affine":
                assert_grad_close(dt, rdt, c_abs * s_eff, FP32_CHAIN, f, f"{self} grad_zero_point")
            elif self.kind == "lsqp":
                assert_grad_close(dt, rdt, c_abs, FP32_CHAIN, f, f"{self} grad_offset")
        if not self.third:
            assert dt.numel() == 0
        for name, t in (("y", y), ("dx", dx)):  # x's own strides when dense, else contiguous
            if is_dense(x):
                assert t.stride() == x.stride(), f"{self} {name} strides {t.stride()} != {x.stride()}"
            else:
                assert t.is_contiguous(), f"{self} {name} of a non-dense x must be contiguous"
        return res


def on_device(t, layout):
    """The values of CPU tensor `t` on the GPU in the requested memory layout."""
    return with_layout(t.to(DEV), layout)


def run_case(case, shape, dtype, layout="contiguous", seed=0, dyadic=False, dy_layout=None):
    gen = torch.Generator().manual_seed(seed)
    p = make_params(case, shape, gen, dyadic)
    x = on_device(make_x(case, shape, p, gen, dtype, dyadic), layout)
    dy = on_device(make_dy(shape, gen, dtype, dyadic), dy_layout or "contiguous")
    return case.check(x, {k: v.to(DEV) for k, v in p.items()}, dy, exact_sums=dyadic)


def _norm(axis, shape):
    return None if axis is None else axis % len(shape)


# ----------------------------------------------------------------------------- parity

# (shape, axis, layout): which traversal each one takes is noted where it matters.
GEOMETRIES = [
    ((1,), None, "contiguous"),
    ((5,), 0, "contiguous"),                 # 1-D per-channel: columns, C=5
    ((59,), None, "contiguous"),             # per-tensor tail of 3 (fp32) / 3 (16-bit)
    ((1025,), None, "offset"),               # scalar per-tensor
    ((4, 5, 6), 1, "contiguous"),            # runs, inner 6: scalar
    ((4, 5, 6), 2, "contiguous"),            # columns, C=6
    ((4, 5, 6), 0, "transposed"),            # transposed: axis 0 innermost -> columns
    ((64, 64, 3, 3), 0, "contiguous"),       # conv weight: runs, inner 576
    ((64, 64, 3, 3), 0, "channels_last"),    # weight in channels_last: still runs, inner 576
    ((32, 16, 3, 3), 1, "channels_last"),    # columns, C=16
    ((2, 16, 13, 13), 1, "contiguous"),      # runs, inner 169 (odd): scalar
    ((2, 16, 13, 13), 1, "channels_last"),   # columns
    ((4, 32, 16, 16), 1, "contiguous"),      # runs, inner 256: vectorised
    ((4, 32, 16, 16), 1, "offset"),          # runs, misaligned: scalar
    ((4, 3, 40, 40), 1, "channels_last"),    # columns, C=3: rows packed lcm(3, V) wide
    ((2, 1100, 3, 3), 1, "channels_last"),   # columns, > 256 vectors per row: several tiles
    ((70, 300), 1, "contiguous"),            # last axis: columns, C=300
    ((70, 300), 0, "contiguous"),            # runs, inner 300 (fp32 vector, 16-bit scalar)
    ((2, 16400), 1, "contiguous"),           # columns, very wide rows
    ((2, 16400), 0, "contiguous"),           # runs, long runs split into pieces
    ((33, 40), 1, "sliced"),                 # non-dense -> contiguous copy
    ((6, 7, 5), 2, "expanded"),              # overlapping -> contiguous copy
    ((3, 1, 5), 1, "contiguous"),            # size-1 channel axis: per-tensor
    ((1, 16, 1, 1), 1, "channels_last"),     # size-1 dims with arbitrary strides
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,axis,layout", GEOMETRIES,
                         ids=[f"{'x'.join(map(str, s))}-ax{a}-{lay}" for s, a, lay in GEOMETRIES])
def test_parity(shape, axis, layout, kind, dtype):
    bits = 2 + (len(shape) * 3 + (axis or 0) + KINDS.index(kind)) % 7
    case = Case(kind, bits, _norm(axis, shape), grad_factor=0.75 if kind in ("affine", "lsqp") else 1.0)
    run_case(case, shape, dtype, layout, seed=zlib.crc32(repr((shape, axis, layout)).encode()) % 1000)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("axis", [None, 0, 1, 2])
def test_parity_bits(kind, bits, axis):
    for dtype in DTYPES:
        run_case(Case(kind, bits, axis, grad_factor=0.37), (6, 10, 12), dtype, seed=bits + 10 * (axis or 0))


LARGE = [
    ((16, 64, 32, 32), None, "contiguous"),   # ~1M elements: many units, block-wide finalize
    ((16, 64, 32, 32), 1, "contiguous"),
    ((16, 64, 32, 32), 1, "channels_last"),
    ((3, 1_000_003), None, "offset"),         # large scalar path with a tail
    ((4096, 257), 1, "contiguous"),           # many rows, odd channel count
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis,layout", LARGE, ids=[f"{'x'.join(map(str, s))}-ax{a}-{lay}"
                                                          for s, a, lay in LARGE])
def test_parity_large(shape, axis, layout, dtype):
    for kind in ("affine", "pact"):
        run_case(Case(kind, 4, axis, grad_factor=0.5), shape, dtype, layout, seed=1)


EXACT = [
    ((64, 64, 3, 3), None, "contiguous"),
    ((64, 64, 3, 3), 0, "contiguous"),
    ((64, 64, 3, 3), 0, "transposed"),
    ((32, 16, 3, 3), 1, "channels_last"),
    ((2, 16, 13, 13), 1, "channels_last"),
    ((2, 16, 13, 13), 3, "contiguous"),
    ((70, 300), 1, "contiguous"),
    ((2, 16400), 0, "contiguous"),
    ((40000,), None, "contiguous"),
    ((40001,), None, "offset"),
    ((33, 40), 1, "sliced"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,axis,layout", EXACT, ids=[f"{'x'.join(map(str, s))}-ax{a}-{lay}"
                                                          for s, a, lay in EXACT])
def test_exact_sums(shape, axis, layout, kind):
    """Dyadic data: every term and partial sum is exact in fp32, so the gradients must
    equal the reference's float64 sums exactly (a dropped or doubled element shows)."""
    for dtype, bits in ((torch.float32, 3), (torch.bfloat16, 4), (torch.float16, 2)):
        run_case(Case(kind, bits, axis, grad_factor=0.5), shape, dtype, layout, seed=11, dyadic=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dy_layout", ["channels_last", "transposed", "sliced", "expanded", "offset"])
@pytest.mark.parametrize("axis", [None, 1, 3])
def test_grad_in_other_layout(kind, dy_layout, axis):
    run_case(Case(kind, 4, axis), (2, 8, 5, 7), torch.float32, "contiguous", seed=3, dy_layout=dy_layout)
    run_case(Case(kind, 4, axis), (2, 8, 5, 7), torch.bfloat16, "channels_last", seed=4, dy_layout=dy_layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_special_values(kind, dtype):
    """NaN, +-inf, huge and tiny x, per-tensor and per-channel (both traversals)."""
    gen = torch.Generator().manual_seed(5)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 1e-30,
                            3e38, -3e38, 1e-40, 65504.0, 65520.0, -70000.0])
    for axis, shape in ((None, (3, 64)), (0, (3, 64)), (1, (64, 3))):
        case = Case(kind, 4, axis, grad_factor=0.5)
        p = make_params(case, shape, gen)
        x = make_x(case, shape, p, gen, torch.float32)
        flat = x.reshape(-1)
        flat[::5] = special.repeat(flat[::5].numel() // special.numel() + 1)[: flat[::5].numel()]
        x = x.to(dtype).to(DEV)
        dy = make_dy(shape, gen, dtype).to(DEV)
        y, dx, _, _ = case.check(x, {k: v.to(DEV) for k, v in p.items()}, dy)
        nan = x.isnan()
        assert y[nan].isnan().all() and (dx[nan] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_edge_cases(kind):
    """Scales/alphas NaN, <= 0, tiny, +inf and zero points NaN/inf, per channel."""
    bad = [0.1, 0.0, -0.0, -2.0, float("nan"), float("inf"), float("-inf"), 1e-40, 1e-45, 3.4e38]
    gen = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(4, len(bad), 9, generator=gen),
                   torch.full((1, len(bad), 9), float("inf")), torch.full((1, len(bad), 9), float("nan"))])
    dy = torch.randn(x.shape, generator=gen)
    case = Case(kind, 4, 1, grad_factor=0.75)
    p = {"scale": torch.tensor(bad)}
    if kind == "affine":
        p["zero_point"] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e10, 0.5, 1.5, -2.5, 3.0,
                                        -0.0, 2.0])
    if kind == "lsqp":
        p["offset"] = torch.linspace(-1, 1, len(bad))
    p = {k: v.to(DEV) for k, v in p.items()}
    inner = lambda t: t.to(DEV).movedim(1, -1).contiguous().movedim(-1, 1)  # noqa: E731
    case.check(x.to(DEV), p, dy.to(DEV))  # runs (inner 9, scalar)
    case.check(inner(x), p, inner(dy))  # columns (channel axis innermost)


def test_zero_dim_x_and_parameters():
    gen = torch.Generator().manual_seed(9)
    for kind in KINDS:
        case = Case(kind, 4)
        p = {k: v.reshape(()).to(DEV) for k, v in make_params(case, (), gen).items()}
        for dtype in DTYPES:
            for v in (0.3, -7.0, 1e9, float("nan")):
                x = torch.tensor(v, dtype=dtype, device=DEV)
                y, dx, ds, dt = case.check(x, p, torch.tensor(0.5, dtype=dtype, device=DEV))
                assert y.shape == () and dx.shape == () and ds.shape == ()


# ----------------------------------------------------------------------------- determinism, no host sync

DETERMINISM = [((16, 64, 32, 32), None, "contiguous"), ((16, 64, 32, 32), 1, "contiguous"),
               ((16, 64, 32, 32), 1, "channels_last"), ((512, 1000), 1, "contiguous"),
               ((3, 333_333), None, "offset")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,axis,layout", DETERMINISM, ids=[f"{'x'.join(map(str, s))}-ax{a}-{lay}"
                                                                for s, a, lay in DETERMINISM])
def test_deterministic(shape, axis, layout, kind):
    """Same inputs, same bits: no atomics, fixed reduction order (also on another stream)."""
    case = Case(kind, 5, axis, grad_factor=0.3)
    gen = torch.Generator().manual_seed(21)
    p = {k: v.to(DEV) for k, v in make_params(case, shape, gen).items()}
    for dtype in (torch.float32, torch.bfloat16):
        x = on_device(make_x(case, shape, {k: v.cpu() for k, v in p.items()}, gen, dtype), layout)
        dy = on_device(make_dy(shape, gen, dtype), layout)
        first = case.kernel(x, p, dy)
        runs = [case.kernel(x, p, dy) for _ in range(3)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            runs.append(case.kernel(x, p, dy))
        torch.cuda.current_stream().wait_stream(side)
        for res in runs:
            for a, b in zip(res, first):
                if a.numel():
                    assert_bits_equal(a, b, what=f"{case} {dtype} rerun", nan_payload=True)


@pytest.mark.parametrize("axis,layout", [(None, "contiguous"), (1, "contiguous"), (1, "channels_last")])
def test_no_host_sync(axis, layout):
    """The kernels never read parameters on the host: no synchronising CUDA call, and
    forward + backward can be captured in a CUDA graph and replayed."""
    shape = (4, 16, 12, 12)
    for kind in KINDS:
        case = Case(kind, 4, axis, grad_factor=0.5)
        gen = torch.Generator().manual_seed(2)
        p = {k: v.to(DEV) for k, v in make_params(case, shape, gen).items()}
        x = on_device(make_x(case, shape, {k: v.cpu() for k, v in p.items()}, gen, torch.float32), layout)
        dy = on_device(make_dy(shape, gen, torch.float32), layout)
        want = case.kernel(x, p, dy)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = case.kernel(x, p, dy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for a, b in zip(got, want):
            assert_bits_equal(a, b, what=f"{case} under sync debug mode", nan_payload=True)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside the capture
            case.kernel(x, p, dy)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = case.kernel(x, p, dy)
        x2 = x * 1.5  # new values, same buffers: the replay must read them on the device
        x.copy_(x2)
        for t in p.values():
            t.mul_(1.25)
        graph.replay()
        torch.cuda.synchronize()
        expect = case.kernel(x, p, dy)
        for a, b in zip(captured, expect):
            assert_bits_equal(a, b, what=f"{case} CUDA graph replay", nan_payload=True)


# ----------------------------------------------------------------------------- op contract

@pytest.mark.parametrize("kind", KINDS)
def test_output_mask(kind):
    """Unrequested or non-existent gradients come back as distinct empty tensors; the
    requested ones equal those of a full request bit for bit."""
    for axis, shape, layout in ((None, (3, 4, 5), "contiguous"), (1, (3, 4, 5, 6), "channels_last")):
        case = Case(kind, 4, axis, grad_factor=0.5)
        gen = torch.Generator().manual_seed(0)
        p = make_params(case, shape, gen)
        x = on_device(make_x(case, shape, p, gen, torch.float32), layout)
        dy = on_device(make_dy(shape, gen, torch.float32), layout)
        p = {k: v.to(DEV) for k, v in p.items()}
        full = case.kernel(x, p, dy)[1:]
        for mask in itertools.product([True, False], repeat=3):
            outs = torch.ops.q2ext.fake_quant_backward(dy, x, *case.args(p), list(mask))
            for i, (got, want) in enumerate(zip(outs, full)):
                present = mask[i] and (i < 2 or case.third is not None)
                if present:
                    assert_bits_equal(got, want, what=f"{case} mask={mask} output {i}", nan_payload=True)
                else:
                    assert got.numel() == 0 and got.device.type == "cuda"
            for a, b in itertools.combinations(outs, 2):
                assert a is not b and (a.numel() == 0 or a.untyped_storage().data_ptr()
                                       != b.untyped_storage().data_ptr())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", [((0,), None), ((0, 4), 1), ((4, 0), 0), ((3, 0), 1), ((2, 0, 3), None)])
def test_empty_tensors(kind, dtype, shape, axis):
    case = Case(kind, 4, axis, grad_factor=0.5)
    c = 1 if axis is None else shape[axis]
    p = {"scale": torch.full((c,), 2.0 if kind == "pact" else 0.1, device=DEV)}
    if kind == "affine":
        p["zero_point"] = torch.full((c,), 1.0, device=DEV)
    if kind == "lsqp":
        p["offset"] = torch.full((c,), 0.01, device=DEV)
    x = torch.empty(shape, dtype=dtype, device=DEV)
    y, dx, ds, dt = case.kernel(x, p, torch.empty_like(x))
    assert y.shape == shape and y.dtype == dtype and y.device.type == "cuda"
    assert dx.shape == shape and dx.dtype == dtype
    assert torch.equal(ds, torch.zeros(c, device=DEV))
    if case.third:
        assert torch.equal(dt, torch.zeros(c, device=DEV))


def test_bad_inputs_raise():
    x = torch.randn(3, 4, device=DEV)
    s = torch.tensor([0.1], device=DEV)
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.q2ext.fake_quant(x, s.cpu(), None, None, -8, 7, None, MODE_AFFINE, 1.0)
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.q2ext.fake_quant_backward(torch.randn(3, 5, device=DEV), x, s, None, None, -8, 7, None,
                                            MODE_AFFINE, 1.0, [True, True, True])
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.q2ext.fake_quant(x, torch.ones(3, device=DEV), None, None, -8, 7, 1, MODE_AFFINE, 1.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Tensors on a device other than the current one (the op sets its own guard)."""
    case = Case("affine", 4, 1, grad_factor=0.5)
    gen = torch.Generator().manual_seed(0)
    shape = (2, 6, 5, 5)
    p = make_params(case, shape, gen)
    x = make_x(case, shape, p, gen, torch.float32).to("cuda:1")
    dy = make_dy(shape, gen, torch.float32).to("cuda:1")
    with torch.cuda.device(0):
        res = case.check(x, {k: v.to("cuda:1") for k, v in p.items()}, dy)
    assert all(t.device == torch.device("cuda:1") for t in res)


@pytest.mark.parametrize("name", list(fake_quant_opcheck_cases()))
def test_opcheck_fake_quant(name):
    opcheck_fake_quant(fake_quant_opcheck_cases(DEV)[name])


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
@pytest.mark.parametrize("name", list(fake_quant_opcheck_cases()))
def test_opcheck_fake_quant_backward(name, mask):
    opcheck_fake_quant_backward(fake_quant_opcheck_cases(DEV)[name], mask)


def test_autograd_public_api_matches_cpu():
    """ops.* on CUDA through autograd: forward bit-identical to the CPU kernel, gradients
    within the summation bound of each other (both bounded against the reference)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 9, 9, generator=gen)
    s, a = torch.tensor([0.1]), torch.tensor([1.5])
    sc, zp, off = torch.rand(6, generator=gen) + 0.05, torch.tensor([0.0, 1.0, -2.0, 3.0, 0.0, 1.0]), torch.tensor([0.05])

    def fn(x, s, a, sc, zp, off):
        return (ops.lsq(x, s, 4) + ops.pact(x, a, 3) * 0.5
                + ops.fake_quant_affine(x, sc, zp, -8, 7, axis=1, grad_factor=0.5)
                + ops.lsq(x, s, 3, signed=False, offset=off))

    results = []
    for dev in ("cpu", DEV):
        inputs = [t.clone().to(dev).requires_grad_() for t in (x, s, a, sc, zp, off)]
        y = fn(*inputs)
        y.backward(torch.ones_like(y))
        results.append((y.detach().cpu(), [t.grad.cpu() for t in inputs]))
    (y_cpu, g_cpu), (y_gpu, g_gpu) = results
    assert_bits_equal(y_gpu, y_cpu, what="forward, CUDA vs CPU")
    assert_bits_equal(g_gpu[0], g_cpu[0], what="grad_x, CUDA vs CPU")
    for gc, gg in zip(g_cpu[1:], g_gpu[1:]):
        torch.testing.assert_close(gg, gc, rtol=1e-5, atol=1e-5)
