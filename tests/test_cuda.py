"""CUDA kernels of the fake-quant ops (csrc/cuda/fake_quant.cu) against q2ext.reference.

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
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_dense

import q2ext
from q2ext import ops
from q2ext import reference as R
from q2ext._ops import MODE_AFFINE, MODE_PACT

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not q2ext._ext.compiled_with_cuda(), reason="q2ext._C was built without CUDA"),
]

U32 = 2.0 ** -24  # unit roundoff of fp32
# Longest chain of fp32 additions in the CUDA kernels before a sum goes to double: one
# 16-byte vector (<= 8 terms, "runs") or kMaxRowsPerThread = 64 rows ("columns").
FP32_CHAIN = 64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["affine", "lsq", "lsqp", "pact"]
DEV = "cuda"


# ----------------------------------------------------------------------------- helpers

def int_view(t):
    t = t.contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def assert_bits_equal(got, ref, what="", nan_payload=False):
    """Bit-identical; NaN only has to be NaN where ref is (unless nan_payload)."""
    got, ref = got.cpu(), ref.cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    gi, ri = int_view(got), int_view(ref)
    if nan_payload:
        bad = gi != ri
    else:
        gn, rn = got.isnan(), ref.isnan()
        bad = (gn != rn) | (~rn & (gi != ri))
    if bad.any():
        idx = [tuple(i) for i in bad.nonzero()[:6].tolist()]
        detail = ", ".join(f"{i}: got {got[i].item()!r} ref {ref[i].item()!r}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ ({detail})")


def assert_grad_close(got, ref, abs_sum, factor, what=""):
    """|got - ref| <= (L+1) u |factor| sum|t| + 2u|ref|: both sides compute identical fp32
    terms; the kernel adds at most L = FP32_CHAIN of them in fp32 before going to
    double, the reference sums in float64; each result is rounded to fp32 once."""
    got, ref = got.cpu(), ref.cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype == torch.float32, what
    g, r = got.double().reshape(-1), ref.double().reshape(-1)
    fin = torch.isfinite(r)
    assert_bits_equal(got.reshape(-1)[~fin], ref.reshape(-1)[~fin], what + " (non-finite)")
    tol = (FP32_CHAIN + 1) * U32 * abs(factor) * abs_sum.reshape(-1) + 2 * U32 * r.abs() + 1e-45
    err = (g - r).abs()
    bad = fin & ~(err <= tol)
    assert not bad.any(), (f"{what}: off by more than the fp32 summation bound: got {g[bad][:6].tolist()} "
                           f"ref {r[bad][:6].tolist()} tol {tol[bad][:6].tolist()}")


class Case:
    """One op configuration; `axis` is already normalised (or None)."""

    def __init__(self, kind, bits=4, axis=None, grad_factor=1.0):
        self.kind, self.bits, self.axis, self.grad_factor = kind, bits, axis, grad_factor
        if kind == "pact":
            self.qmin, self.qmax = 0, 2 ** bits - 1
        elif kind == "lsqp":  # unsigned grid
            self.qmin, self.qmax = 0, 2 ** bits - 1
        else:
            self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.mode = MODE_PACT if kind == "pact" else MODE_AFFINE
        self.third = {"affine": "zero_point", "lsqp": "offset"}.get(kind)

    def __repr__(self):
        return f"Case({self.kind}, bits={self.bits}, axis={self.axis})"

    def args(self, p):
        return (p["scale"], p.get("zero_point"), p.get("offset"), self.qmin, self.qmax, self.axis,
                self.mode, float(self.grad_factor))

    def kernel(self, x, p, dy, mask=(True, True, True)):
        y = torch.ops.q2ext.fake_quant(x, *self.args(p))
        dx, ds, dt = torch.ops.q2ext.fake_quant_backward(dy, x, *self.args(p), list(mask))
        return y, dx, ds, dt

    def reference(self, x, p, dy):
        x, dy = x.cpu(), dy.cpu()
        p = {k: v.cpu() for k, v in p.items()}
        ax, g = self.axis, float(self.grad_factor)
        squeeze = ax is not None and x.dim() == 1
        if squeeze:  # reference.py's sum(dim=[]) reduces everything for a 1-D per-channel x
            x, dy, ax = x[:, None], dy[:, None], 0
        zp, off = p.get("zero_point"), p.get("offset")
        y = R.fake_quant(x, p["scale"], zp, off, self.qmin, self.qmax, ax, self.mode)
        dx, ds, dt = R.fake_quant_backward(dy, x, p["scale"], zp, off, self.qmin, self.qmax, ax, self.mode, g)
        if squeeze:
            y, dx = y[:, 0], dx[:, 0]
        return y, dx, ds, dt

    def abs_term_sums(self, x, p, dy):
        """Per-channel float64 sums of |scale term| and |clip term|, and s_eff."""
        x, dy = x.cpu().float(), dy.cpu().float()
        p = {k: v.cpu() for k, v in p.items()}
        s, inv, zp, off, clip = R._params(x, p["scale"], p.get("zero_point"), p.get("offset"),
                                          self.qmin, self.qmax, self.axis, self.mode)
        zero = torch.zeros(())
        if self.mode == MODE_PACT:
            t_scale = zero.expand_as(x)
            t_clip = torch.where(x >= clip, dy.abs(), zero)
        else:
            q = torch.round((x - off) * inv) + zp
            below, above = q < self.qmin, q > self.qmax
            inside = (q >= self.qmin) & (q <= self.qmax)
            t_in = ((dy * ((q - zp) * s - (x - off))) * inv).abs()
            edge = (dy * torch.where(below, self.qmin - zp, self.qmax - zp)).abs()
            t_scale = torch.where(inside, t_in, torch.where(below | above, edge, zero))
            t_clip = torch.where(below | above, dy.abs(), zero)
        dims = [i for i in range(x.dim()) if i != self.axis]

        def total(t):
            t = t.double()
            if self.axis is None:
                return t.sum().reshape(1)
            return t.sum(dim=dims) if dims else t

        return total(t_scale), total(t_clip), s.double().reshape(-1)

    def check(self, x, p, dy, exact_sums=False):
        """Kernel vs reference; returns the kernel's (y, dx, dscale, dthird)."""
        y, dx, ds, dt = res = self.kernel(x, p, dy)
        for t in (y, dx, ds, dt):
            assert t.device.type == "cuda"
        ry, rdx, rds, rdt = self.reference(x, p, dy)
        assert_bits_equal(y, ry, f"{self} forward")
        assert_bits_equal(dx, rdx, f"{self} grad_x")
        if exact_sums:
            assert torch.equal(ds.cpu(), rds), f"{self}: scale grad {ds[:4]} != exact {rds[:4]}"
            if self.third:
                assert torch.equal(dt.cpu(), rdt), f"{self}: {self.third} grad {dt[:4]} != exact {rdt[:4]}"
        else:
            s_abs, c_abs, s_eff = self.abs_term_sums(x, p, dy)
            f = self.grad_factor
            assert_grad_close(ds, rds, c_abs if self.kind == "pact" else s_abs, f, f"{self} grad_scale")
            if self.kind == "affine":
                assert_grad_close(dt, rdt, c_abs * s_eff, f, f"{self} grad_zero_point")
            elif self.kind == "lsqp":
                assert_grad_close(dt, rdt, c_abs, f, f"{self} grad_offset")
        if not self.third:
            assert dt.numel() == 0
        for name, t in (("y", y), ("dx", dx)):  # x's own strides when dense, else contiguous
            if is_dense(x):
                assert t.stride() == x.stride(), f"{self} {name} strides {t.stride()} != {x.stride()}"
            else:
                assert t.is_contiguous(), f"{self} {name} of a non-dense x must be contiguous"
        return res


def make_params(case, shape, gen, dyadic=False):
    """fp32 CPU parameters: power-of-two and generic scales, zero points with halves and
    values beyond the grid, offsets that are (near-)multiples of the scale."""
    c = 1 if case.axis is None else shape[case.axis]
    s = torch.pow(2.0, -torch.randint(2, 7, (c,), generator=gen).float())
    if not dyadic:
        s = torch.where(torch.rand(c, generator=gen) < 0.5, s * (0.6 + 0.8 * torch.rand(c, generator=gen)), s)
    p = {"scale": s}
    if case.kind == "affine":
        lo, hi = case.qmin - 1.5, case.qmax + 1.5
        zp = torch.round((lo + (hi - lo) * torch.rand(c, generator=gen)) * 2) / 2
        if not dyadic:
            zp = torch.where(torch.rand(c, generator=gen) < 0.3, zp + 0.23, zp)
        p["zero_point"] = zp
    elif case.kind == "lsqp":
        off = torch.round((torch.rand(c, generator=gen) - 0.5) * 64) / 16 * s
        if not dyadic:
            off = off * (1 + 0.1 * torch.rand(c, generator=gen))
        p["offset"] = off
    elif case.kind == "pact":
        p["scale"] = s * case.qmax
    return {k: v.float() for k, v in p.items()}


def make_x(case, shape, p, gen, dtype, dyadic=False):
    """x over the grid and 25% beyond each end, with exact ties and grid points."""
    s, inv, zp, off, clip = R._params(torch.empty(shape), p["scale"], p.get("zero_point"), p.get("offset"),
                                      case.qmin, case.qmax, case.axis, case.mode)
    span = case.qmax - case.qmin
    lo, hi = case.qmin - 0.25 * span - 1, case.qmax + 0.25 * span + 1
    v = lo + (hi - lo) * torch.rand(shape, generator=gen)
    u = torch.rand(shape, generator=gen)
    k = torch.randint(int(lo), int(hi) + 1, shape, generator=gen).float()
    if dyadic:
        v = torch.round(v * 8) / 8
    v = torch.where(u < 0.15, k + 0.5, torch.where(u < 0.22, k, v))
    if case.mode == MODE_PACT:
        x = torch.where(u > 0.97, clip.expand(shape), v * s)
    else:
        x = (v - zp) * s + off
    return x.to(dtype)


def make_dy(shape, gen, dtype, dyadic=False):
    if dyadic:
        return (torch.randint(-4, 5, shape, generator=gen).float() / 8).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def with_layout(t, layout):
    """The values of CPU tensor `t` on the GPU in the requested memory layout."""
    t = t.to(DEV)
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # dense, not contiguous
        perm = list(reversed(range(t.dim())))
        return t.permute(perm).contiguous().permute(perm)
    if layout == "sliced":  # not dense
        big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "offset":  # dense, data not 16-byte aligned: scalar path
        buf = t.new_zeros(t.numel() + 1)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)
    if layout == "expanded":  # overlapping (stride 0)
        return t[:1].expand(t.shape)
    raise ValueError(layout)


def run_case(case, shape, dtype, layout="contiguous", seed=0, dyadic=False, dy_layout=None):
    gen = torch.Generator().manual_seed(seed)
    p = make_params(case, shape, gen, dyadic)
    x = with_layout(make_x(case, shape, p, gen, dtype, dyadic), layout)
    dy = with_layout(make_dy(shape, gen, dtype, dyadic), dy_layout or "contiguous")
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
        x = with_layout(make_x(case, shape, {k: v.cpu() for k, v in p.items()}, gen, dtype), layout)
        dy = with_layout(make_dy(shape, gen, dtype), layout)
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
                    assert_bits_equal(a, b, f"{case} {dtype} rerun", nan_payload=True)


@pytest.mark.parametrize("axis,layout", [(None, "contiguous"), (1, "contiguous"), (1, "channels_last")])
def test_no_host_sync(axis, layout):
    """The kernels never read parameters on the host: no synchronising CUDA call, and
    forward + backward can be captured in a CUDA graph and replayed."""
    shape = (4, 16, 12, 12)
    for kind in KINDS:
        case = Case(kind, 4, axis, grad_factor=0.5)
        gen = torch.Generator().manual_seed(2)
        p = {k: v.to(DEV) for k, v in make_params(case, shape, gen).items()}
        x = with_layout(make_x(case, shape, {k: v.cpu() for k, v in p.items()}, gen, torch.float32), layout)
        dy = with_layout(make_dy(shape, gen, torch.float32), layout)
        want = case.kernel(x, p, dy)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = case.kernel(x, p, dy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for a, b in zip(got, want):
            assert_bits_equal(a, b, f"{case} under sync debug mode", nan_payload=True)

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
            assert_bits_equal(a, b, f"{case} CUDA graph replay", nan_payload=True)


# ----------------------------------------------------------------------------- op contract

@pytest.mark.parametrize("kind", KINDS)
def test_output_mask(kind):
    """Unrequested or non-existent gradients come back as distinct empty tensors; the
    requested ones equal those of a full request bit for bit."""
    for axis, shape, layout in ((None, (3, 4, 5), "contiguous"), (1, (3, 4, 5, 6), "channels_last")):
        case = Case(kind, 4, axis, grad_factor=0.5)
        gen = torch.Generator().manual_seed(0)
        p = make_params(case, shape, gen)
        x = with_layout(make_x(case, shape, p, gen, torch.float32), layout)
        dy = with_layout(make_dy(shape, gen, torch.float32), layout)
        p = {k: v.to(DEV) for k, v in p.items()}
        full = case.kernel(x, p, dy)[1:]
        for mask in itertools.product([True, False], repeat=3):
            outs = torch.ops.q2ext.fake_quant_backward(dy, x, *case.args(p), list(mask))
            for i, (got, want) in enumerate(zip(outs, full)):
                present = mask[i] and (i < 2 or case.third is not None)
                if present:
                    assert_bits_equal(got, want, f"{case} mask={mask} output {i}", nan_payload=True)
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


def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    x4 = torch.randn(2, 3, 4, 5, generator=gen).to(DEV)
    s1, s3 = torch.tensor([0.1], device=DEV), (torch.rand(3, generator=gen) + 0.05).to(DEV)
    zp1, zp3 = torch.tensor([2.0], device=DEV), torch.tensor([-1.0, 0.0, 3.0], device=DEV)
    off3 = torch.tensor([0.01, -0.02, 0.0], device=DEV)
    return {
        "zp-per-tensor-fp32": (x4, s1, zp1, None, -8, 7, None, MODE_AFFINE, 0.5),
        "zp-per-channel-fp32": (x4, s3, zp3, None, -8, 7, 1, MODE_AFFINE, 1.0),
        "offset-per-channel-bf16": (x4.bfloat16(), s3, None, off3, 0, 15, 1, MODE_AFFINE, 0.3),
        "lsq-per-tensor-fp16-channels_last": (x4.half().contiguous(memory_format=torch.channels_last), s1,
                                              None, None, -2, 1, None, MODE_AFFINE, 1.0),
        "zp-channels_last-axis1-fp16": (x4.half().contiguous(memory_format=torch.channels_last), s3, zp3,
                                        None, -8, 7, 1, MODE_AFFINE, 1.0),
        "pact-per-tensor-bf16": (x4.bfloat16(), torch.tensor([2.0], device=DEV), None, None, 0, 255, None,
                                 MODE_PACT, 1.0),
        "pact-per-channel-fp32": (x4, s3 * 10, None, None, 0, 15, 1, MODE_PACT, 1.0),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()) if torch.cuda.is_available() else [])
def test_opcheck_fake_quant(name):
    x, scale, zp, off, *rest = _opcheck_cases()[name]
    args = (x.requires_grad_(x.dtype == torch.float32), scale.clone().requires_grad_(),
            None if zp is None else zp.clone().requires_grad_(),
            None if off is None else off.clone().requires_grad_(), *rest)
    torch.library.opcheck(torch.ops.q2ext.fake_quant.default, args)


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
@pytest.mark.parametrize("name", list(_opcheck_cases()) if torch.cuda.is_available() else [])
def test_opcheck_fake_quant_backward(name, mask):
    x, *rest = _opcheck_cases()[name]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(DEV)
    torch.library.opcheck(torch.ops.q2ext.fake_quant_backward.default, (grad, x, *rest, mask))


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
    assert_bits_equal(y_gpu, y_cpu, "forward, CUDA vs CPU")
    assert_bits_equal(g_gpu[0], g_cpu[0], "grad_x, CUDA vs CPU")
    for gc, gg in zip(g_cpu[1:], g_gpu[1:]):
        torch.testing.assert_close(gg, gc, rtol=1e-5, atol=1e-5)
