"""What the tests share: the CPU code paths (ISAS) and device parameters, the fake-quant case
model, data generators, bit-exact comparison and the rounding-error bound for gradients,
and the int GEMM operands and opcheck cases."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn


import q2ext
from q2ext import ops
from q2ext._ops import SCALE_MAX, SCALE_MIN
from q2ext._ops.fake_quant import MODE_AFFINE, MODE_LSQ, MODE_PACT, lsq_levels
from q2ext._ops.fake_quant import is_non_overlapping_and_dense as is_dense
from q2ext.reference import fake_quant as R

U32 = 2.0 ** -24  # unit roundoff of fp32
FLT_EPS = SCALE_MIN
FLT_MAX = SCALE_MAX
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["affine", "lsq", "lsqp", "pact"]



# ----------------------------------------------------------------------------- ISA paths

def _supported_isas():
    if not q2ext.has_compiled():
        return [None]  # reference kernels only: nothing to switch
    order = ["scalar", "avx2", "avx512"]
    best = q2ext._ext._C.best_cpu_isa()
    return order[: order.index(best) + 1]


ISAS = _supported_isas()

# Every test that needs a GPU carries the `cuda` marker (python/tools/gpu_check.sh selects
# them with `-m cuda`); without a GPU, or without the CUDA kernels, they skip.
HAS_CUDA = torch.cuda.is_available() and q2ext.has_compiled() and q2ext._ext.compiled_with_cuda()
requires_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and q2ext's CUDA kernels")]
CUDA = pytest.param("cuda", marks=requires_cuda)
DEVICES = ["cpu", CUDA]
requires_triton_interpreter = pytest.mark.skipif(
    not q2ext._ext.has_triton() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 (tests/conftest.py sets it)",
)


@contextlib.contextmanager
def cpu_isa(name):
    if name is None:
        yield
        return
    q2ext.set_cpu_isa(name)
    try:
        assert q2ext.cpu_isa() == name
        yield
    finally:
        q2ext.set_cpu_isa("auto")



# ----------------------------------------------------------------------------- helpers

def int_view(t):
    t = t.contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _describe(got, ref, bad, x=None, limit=6):
    idx = bad.nonzero()[:limit].tolist()
    lines = []
    for i in idx:
        i = tuple(i)
        xi = f" x={x[i].item()!r}" if x is not None and x.shape == got.shape else ""
        lines.append(f"  at {i}:{xi} got={got[i].item()!r} ref={ref[i].item()!r}")
    return f"{int(bad.sum())} of {bad.numel()} differ\n" + "\n".join(lines)


def assert_bits_equal(got, ref, x=None, what="", nan_payload=False):
    """Bit-identical, except that NaNs only have to be NaN where ref is NaN (unless
    nan_payload: then the NaN bits must match too, as between two ISA paths).  Compared on the CPU."""
    got, ref = got.cpu(), ref.cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    gi, ri = int_view(got), int_view(ref)
    if nan_payload:
        bad = gi != ri
    else:
        gn, rn = got.isnan(), ref.isnan()
        bad = (gn != rn) | (~rn & (gi != ri))
    assert not bad.any(), f"{what}: not bit-identical: " + _describe(got, ref, bad, x)


def assert_grad_close(got, ref, abs_sum, n_terms, factor, what=""):
    """Parameter gradient vs the reference's float64 sum.

    Both compute the same fp32 per-element terms (identical arithmetic); only the
    summation differs: the reference sums in float64, the kernel keeps fp32 partial sums
    of at most ~1056 terms (16 lanes x 1024 per 16384-element work item, or 64 rows of
    the channels-last layout) and adds the partials in double.  A recursive fp32 sum of
    L terms is off by at most (L-1)*u*sum|t| (u = 2^-24); both results are then rounded
    to fp32 once (u*|ref| each).  So |got - ref| <= (L+1)*u*|factor|*sum|t| + 2u|ref|.
    Non-finite reference values must be matched exactly.
    """
    got, ref = got.cpu(), ref.cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype == torch.float32, what
    g, r = got.double().reshape(-1), ref.double().reshape(-1)
    fin = torch.isfinite(r)
    assert_bits_equal(got.reshape(-1)[~fin], ref.reshape(-1)[~fin], what=what + " (non-finite)")
    chain = min(n_terms, 1056) + 1
    tol = chain * U32 * abs(factor) * abs_sum.reshape(-1) + 2 * U32 * r.abs() + 1e-45
    err = (g - r).abs()
    bad = fin & ~(err <= tol)
    assert not bad.any(), (
        f"{what}: gradient off by more than the fp32 summation bound: "
        + _describe(got.reshape(-1), ref.reshape(-1), bad)
        + f"\n  tol={tol[bad][:6].tolist()} err={err[bad][:6].tolist()}"
    )


def levels(kind, bits, signed):
    if kind == "pact":
        return 0, 2 ** bits - 1
    q_n, q_p = lsq_levels(bits, signed)
    return -q_n, q_p


def bcast(t, x, axis):
    """[C] parameter -> broadcastable along `axis` of x (or a scalar for axis None)."""
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


class Case:
    """One op configuration.  `axis` is what the user passes (may be negative)."""

    def __init__(self, kind, bits=4, signed=True, axis=None, grad_factor=1.0, grad_scale=None):
        self.kind, self.bits, self.signed, self.axis = kind, bits, bool(signed), axis
        self.grad_factor, self.grad_scale = grad_factor, grad_scale
        self.qmin, self.qmax = levels(kind, bits, self.signed)

    def __repr__(self):
        return f"Case({self.kind}, bits={self.bits}, signed={self.signed}, axis={self.axis})"

    def naxis(self, x):
        return None if self.axis is None else self.axis % x.dim()

    @property
    def mode(self):
        return {"pact": MODE_PACT, "affine": MODE_AFFINE}.get(self.kind, MODE_LSQ)

    @property
    def third_name(self):
        return {"affine": "zero_point", "lsqp": "offset"}.get(self.kind)

    def factor(self, x, scale):
        """The multiplier of the scale/third gradients."""
        if self.kind == "affine":
            return self.grad_factor
        if self.kind == "pact":
            return 1.0
        if self.grad_scale is not None:
            return self.grad_scale
        return R.lsq_grad_scale(x.numel(), scale.numel(), self.qmax)

    # -- the op under test
    def call(self, x, p):
        k = self.kind
        if k == "affine":
            return ops.fake_quant_affine(x, p["scale"], p["zero_point"], self.qmin, self.qmax,
                                         axis=self.axis, grad_factor=self.grad_factor)
        if k == "lsq":
            return ops.lsq(x, p["scale"], self.bits, self.signed, axis=self.axis, grad_scale=self.grad_scale)
        if k == "lsqp":
            return ops.lsq(x, p["scale"], self.bits, self.signed, axis=self.axis, offset=p["offset"],
                           grad_scale=self.grad_scale)
        return ops.pact(x, p["scale"], self.bits, axis=self.axis)

    def run(self, x, p, dy, need=(True, True, True)):
        """q2ext: (y, dx, dscale, dthird) through autograd; unrequested grads are None."""
        xl = x.detach().requires_grad_(need[0])
        pl = {k: v.detach().requires_grad_(need[1] if k == "scale" else need[2]) for k, v in p.items()}
        y = self.call(xl, pl)
        inputs = [xl, pl["scale"]] + ([pl[self.third_name]] if self.third_name else [])
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy) if wanted else [])
        out = [next(grads) if t.requires_grad else None for t in inputs]
        if not self.third_name:
            out.append(None)
        return (y.detach(), *out)

    # -- the oracle
    def reference(self, x, p, dy):
        ax = self.naxis(x)
        if ax is not None and x.dim() == 1:
            # reference.py reduces with sum(dim=[]), which torch treats as "all dims", for
            # a 1-D per-channel x (see test_reference_per_channel_1d); the same numerics
            # on x[:, None] with axis 0 avoid that.
            y, dx, ds, dt = self._reference(x[:, None], p, dy[:, None], 0)
            return y[:, 0], dx[:, 0], ds, dt
        return self._reference(x, p, dy, ax)

    def _reference(self, x, p, dy, ax):
        zp, off = p.get("zero_point"), p.get("offset")
        g = self.factor(x, p["scale"])
        y = R.fake_quant(x, p["scale"], zp, off, self.qmin, self.qmax, ax, self.mode)
        dx, ds, dt = R.fake_quant_backward(dy, x, p["scale"], zp, off, self.qmin, self.qmax, ax, self.mode, g)
        return y, dx, ds, dt

    def abs_term_sums(self, x, p, dy):
        """Per-channel sum of |per-element gradient term| (float64), for the tolerance:
        (scale terms, clip terms); the clip terms are |dy| where clipped."""
        ax = self.naxis(x)
        s, inv, zp, off, clip = R._params(x, p["scale"], p.get("zero_point"), p.get("offset"),
                                          self.qmin, self.qmax, ax, self.mode)
        xc, d = x.float(), dy.float()
        zero = torch.zeros((), dtype=torch.float32)
        if self.mode == MODE_PACT:
            t_scale = zero.expand_as(xc)
            t_clip = torch.where(xc >= clip, d.abs(), zero)
        elif self.mode == MODE_LSQ:
            v = (xc - off) * inv
            below, above = v <= self.qmin, v >= self.qmax
            inside = (v > self.qmin) & (v < self.qmax)
            edge = (d * torch.where(below, float(self.qmin), float(self.qmax))).abs()
            t_scale = torch.where(inside, (d * (torch.round(v) - v)).abs(), torch.where(below | above, edge, zero))
            t_clip = torch.where(below | above, d.abs(), zero)
        else:
            q = torch.round((xc - off) * inv) + zp
            below, above = q < self.qmin, q > self.qmax
            inside = (q >= self.qmin) & (q <= self.qmax)
            inside_term = ((d * ((q - zp) * s - (xc - off))) * inv).abs()
            edge = (d * torch.where(below, self.qmin - zp, self.qmax - zp)).abs()
            t_scale = torch.where(inside, inside_term, torch.where(below | above, edge, zero))
            t_clip = torch.where(below | above, d.abs(), zero)
        dims = [i for i in range(x.dim()) if i != ax]

        def total(t):
            t = t.double()
            if ax is None:
                return t.sum().reshape(1)
            return t.sum(dim=dims) if dims else t  # sum(dim=[]) would reduce everything

        return total(t_scale), total(t_clip), s.double().reshape(-1)


def check_against_reference(case, x, p, dy, results=None, layout=True):
    """Runs every ISA path (or uses `results`), checks they agree bit for bit, and
    checks the first against the reference (and, with `layout`, the kernels' output
    layout rule)."""
    if results is None:
        results = {}
        for isa in ISAS:
            with cpu_isa(isa):
                results[isa] = case.run(x, p, dy)
    first_isa = next(iter(results))
    first = results[first_isa]
    names = ("y", "dx", "dscale", "dthird")
    for isa, res in results.items():
        for name, a, b in zip(names, res, first):
            if a is None or b is None:
                assert a is None and b is None
                continue
            assert_bits_equal(a, b, x, f"{case} {name}: {isa} vs {first_isa}", nan_payload=True)

    y, dx, ds, dt = first
    ry, rdx, rds, rdt = case.reference(x, p, dy)
    assert_bits_equal(y, ry, x, f"{case} forward")
    assert_bits_equal(dx, rdx, x, f"{case} grad_x")
    n_terms = max(x.numel() // max(p["scale"].numel(), 1), 1)
    f = case.factor(x, p["scale"])
    s_abs, c_abs, s_eff = case.abs_term_sums(x, p, dy)
    if case.kind == "pact":
        assert_grad_close(ds, rds, c_abs, n_terms, f, f"{case} grad_alpha")
    else:
        assert_grad_close(ds, rds, s_abs, n_terms, f, f"{case} grad_scale")
    if case.kind == "affine":
        assert_grad_close(dt, rdt, c_abs * s_eff, n_terms, f, f"{case} grad_zero_point")
    elif case.kind == "lsqp":
        assert_grad_close(dt, rdt, c_abs, n_terms, f, f"{case} grad_offset")
    else:
        assert dt is None and rdt is None

    # Output layout: x's own strides when x is dense, else contiguous.
    for name, t in (("y", y), ("dx", dx)) if layout else ():
        if is_dense(x):
            assert t.stride() == x.stride(), f"{case} {name} strides {t.stride()} != x's {x.stride()}"
        else:
            assert t.is_contiguous(), f"{case} {name} of a non-dense x must be contiguous"
    return first


# ----------------------------------------------------------------------------- data

def make_params(case, shape, gen, dyadic=False):
    """fp32 parameters for x of `shape`: scales are a mix of powers of two (so exact
    ties (k+0.5)*s exist) and generic values; zero points include half-integers and
    values outside the grid (clamped)."""
    ax = None if case.axis is None else case.axis % len(shape)
    c = 1 if ax is None else shape[ax]
    e = torch.randint(2, 7, (c,), generator=gen).float()
    s = torch.pow(2.0, -e)
    if not dyadic:
        generic = torch.rand(c, generator=gen) < 0.5
        s = torch.where(generic, s * (0.6 + 0.8 * torch.rand(c, generator=gen)), s)
    p = {"scale": s.float()}
    if case.kind == "affine":
        lo, hi = case.qmin - 1.5, case.qmax + 1.5
        zp = torch.round((lo + (hi - lo) * torch.rand(c, generator=gen)) * 2) / 2  # multiples of 0.5
        if not dyadic:
            zp = torch.where(torch.rand(c, generator=gen) < 0.3, zp + 0.23, zp)
        p["zero_point"] = zp.float()
    elif case.kind == "lsqp":
        off = torch.round((torch.rand(c, generator=gen) - 0.5) * 64) / 16 * s  # dyadic multiple of s
        if not dyadic:
            off = off * (1 + 0.1 * torch.rand(c, generator=gen))
        p["offset"] = off.float()
    elif case.kind == "pact":
        p["scale"] = (s * case.qmax).float()  # alpha; step = alpha / qmax
    return p


def make_x(case, shape, p, gen, dtype, dyadic=False):
    """x spanning the grid and ~25% beyond on each side, with exact ties and exact grid
    points mixed in, in grid units of each channel's effective parameters."""
    ref = torch.empty(shape)
    ax = None if case.axis is None else case.axis % len(shape)
    s, inv, zp, off, clip = R._params(ref, p["scale"], p.get("zero_point"), p.get("offset"),
                                      case.qmin, case.qmax, ax, case.mode)
    span = case.qmax - case.qmin
    lo, hi = case.qmin - 0.25 * span - 1, case.qmax + 0.25 * span + 1
    v = lo + (hi - lo) * torch.rand(shape, generator=gen)
    u = torch.rand(shape, generator=gen)
    k = torch.randint(int(lo), int(hi) + 1, shape, generator=gen).float()
    if dyadic:
        v = torch.round(v * 8) / 8
    v = torch.where(u < 0.15, k + 0.5, torch.where(u < 0.22, k, v))
    if case.mode == MODE_PACT:
        x = v * s
        x = torch.where(u > 0.97, clip.expand(shape), x)  # exactly alpha
    else:
        x = (v - zp) * s + off
    return x.to(dtype)


def make_dy(shape, gen, dtype, dyadic=False):
    if dyadic:
        return (torch.randint(-4, 5, shape, generator=gen).float() / 8).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def with_layout(t, layout):
    """The values of `t` in the requested memory layout."""
    if layout == "contiguous":
        return t.contiguous().clone()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # dense, not contiguous
        perm = list(reversed(range(t.dim())))
        return t.permute(perm).contiguous().permute(perm)
    if layout == "sliced":  # not dense: every other element of a wider tensor
        big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "offset":  # dense with a storage offset
        buf = t.new_zeros(t.numel() + 7)
        buf[7:] = t.reshape(-1)
        return buf[7:].view(t.shape)
    if layout == "expanded":  # overlapping (stride 0): first row broadcast
        return t[:1].expand(t.shape)
    raise ValueError(layout)


def layouts_for(shape):
    out = ["contiguous", "sliced", "offset"]
    if len(shape) >= 2:
        out += ["transposed", "expanded"]
    if len(shape) == 4:
        out.append("channels_last")
    return out


def axes_for(shape):
    axes = [None, 0, -1]
    if len(shape) >= 2:
        axes.append(1)
    return axes


def run_case(case, shape, dtype, layout="contiguous", seed=0, dyadic=False):
    gen = torch.Generator().manual_seed(seed)
    p = make_params(case, shape, gen, dyadic)
    x = with_layout(make_x(case, shape, p, gen, dtype, dyadic), layout)
    dy = make_dy(shape, gen, dtype, dyadic)
    return check_against_reference(case, x, p, dy)


# ----------------------------------------------------------------------------- opcheck

def fake_quant_opcheck_cases(device="cpu"):
    """{name: fake_quant arguments} covering every mode, granularity, dtype and layout, on `device`."""
    gen = torch.Generator().manual_seed(0)
    x4 = torch.randn(2, 3, 4, 5, generator=gen)
    s1, s3 = torch.tensor([0.1]), torch.rand(3, generator=gen) + 0.05
    zp1, zp3 = torch.tensor([2.0]), torch.tensor([-1.0, 0.0, 3.0])
    off3 = torch.tensor([0.01, -0.02, 0.0])
    cases = {
        "zp-per-tensor-fp32": (x4, s1, zp1, None, -8, 7, None, MODE_AFFINE, 0.5),
        "zp-per-channel-fp32": (x4, s3, zp3, None, -8, 7, 1, MODE_AFFINE, 1.0),
        "offset-per-channel-bf16": (x4.bfloat16(), s3, None, off3, 0, 15, 1, MODE_AFFINE, 0.3),
        "lsq-per-tensor-fp16-channels_last": (x4.half().contiguous(memory_format=torch.channels_last), s1,
                                              None, None, -2, 1, None, MODE_AFFINE, 1.0),
        "pact-per-tensor-bf16": (x4.bfloat16(), torch.tensor([2.0]), None, None, 0, 255, None, MODE_PACT, 1.0),
        "pact-per-channel-fp32": (x4, s3 * 10, None, None, 0, 15, 1, MODE_PACT, 1.0),
    }
    return {name: tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
            for name, args in cases.items()}


def opcheck_fake_quant(args):
    """torch.library.opcheck of q2ext::fake_quant with every float input requiring grad."""
    x, scale, zp, off, *rest = args
    args = (x.requires_grad_(x.dtype == torch.float32), scale.clone().requires_grad_(),
            None if zp is None else zp.clone().requires_grad_(),
            None if off is None else off.clone().requires_grad_(), *rest)
    torch.library.opcheck(torch.ops.q2ext.fake_quant.default, args)


def opcheck_fake_quant_backward(args, mask):
    x, *rest = args
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(x.device)
    torch.library.opcheck(torch.ops.q2ext.fake_quant_backward.default, (grad, x, *rest, mask))


# ----------------------------------------------------------------------------- int GEMMs

def ints(shape, dtype, gen):
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    return torch.randint(lo, hi, shape, dtype=dtype, generator=gen)


def opcheck_cases(device):
    """(op, args) for torch.library.opcheck: every GEMM op, each epilogue / dtype path."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    a, b = ints((5, 64), torch.int8, g), ints((7, 64), torch.int8, g)
    au = ints((20, 64), torch.uint8, g)
    wp8 = ops.pack_int8_weight(b)
    wp4 = ops.pack_int4(torch.randint(0, 16, (7, 64), generator=g))
    s, z = torch.rand(2, 7, generator=g), torch.rand(2, 7, generator=g)
    cases = [
        (torch.ops.q2ext.quantize_activation, (x, None, -128, 127)),
        (torch.ops.q2ext.quantize_activation, (x.bfloat16(), torch.tensor([0.1]), 0, 255)),
        (torch.ops.q2ext.w8a8_mm, (a, b, torch.rand(5), torch.rand(7), torch.randn(7), torch.bfloat16, True)),
        (torch.ops.q2ext.w8a8_mm, (a, b, torch.rand(1), torch.rand(7), None, torch.int32, False)),
        (torch.ops.q2ext.w8a8_mm, (au, b, torch.rand(20), torch.rand(7), None, None, False)),
        (torch.ops.q2ext.w8a8_mm, (a, wp8, torch.rand(5), torch.rand(7), torch.randn(7), None, True)),  # packed b
        (torch.ops.q2ext.w8a8_linear, (x, wp8, torch.rand(7), None, torch.randn(7), -128, 127, False)),
        (torch.ops.q2ext.w4a16_mm, (x, wp4, s, z, 32)),
        (torch.ops.q2ext.w4a16_mm, (x.bfloat16(), wp4, s, z, 32)),
    ]
    return [(op, tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in args)) for op, args in cases]


class TinyUNet(nn.Module):
    """One encoder level, an upsampled deep path and a skip concatenated: one fusion node."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.enc, self.bn_e = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.down, self.bn_d = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fuse, self.bn_f = nn.Conv2d(24, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        skip = F.relu(self.bn_e(self.enc(x)))
        deep = F.relu(self.bn_d(self.down(skip)))
        h = torch.cat([skip, F.interpolate(deep, scale_factor=2.0)], 1)
        return self.head(F.relu(self.bn_f(self.fuse(h))))
