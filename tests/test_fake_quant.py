"""CPU tests of the fake-quant op family (fake_quant_affine, LSQ, LSQ+, PACT).

What is checked, and against what:
  * forward: bit-exact against q2ext.reference for fp32/fp16/bf16 (bit patterns are
    compared; NaN only where the reference has NaN);
  * grad_x: bit-exact against the reference;
  * scale / zero-point / offset / alpha gradients: within a rounding-error bound of the
    reference's float64 sums (see `assert_grad_close`), and *exactly* equal on inputs
    whose per-element terms and sums are exact in fp32 (dyadic data, `TestExactSums`);
  * every CPU ISA path the machine supports (scalar/avx2/avx512) gives bit-identical
    results, run to run and for any thread count;
  * anchors against PyTorch's own fake-quant ops, adversarial inputs, documented
    parameter edge cases, LSQ specifics, opcheck, torch.compile and autograd plumbing.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import zlib

import pytest
import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_dense
from torch.utils._python_dispatch import TorchDispatchMode

import q2ext
from q2ext import ops
from q2ext import reference as R
from q2ext._ops import MODE_AFFINE, MODE_PACT

U32 = 2.0 ** -24  # unit roundoff of fp32
FLT_EPS = R.SCALE_MIN
FLT_MAX = R.SCALE_MAX
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


@pytest.fixture(autouse=True)
def _restore_isa_and_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if q2ext.has_compiled():
        q2ext.set_cpu_isa("auto")


def test_isa_paths_selectable():
    """Every path up to the best one can be forced, 'auto' restores the best."""
    if not q2ext.has_compiled():
        pytest.skip("q2ext._C not built")
    best = q2ext._ext._C.best_cpu_isa()
    for isa in ISAS:
        with cpu_isa(isa):
            assert q2ext.cpu_isa() == isa
    assert q2ext.cpu_isa() == best
    with pytest.raises(RuntimeError, match="unknown CPU ISA"):
        q2ext.set_cpu_isa("sse9")
    assert q2ext.cpu_isa() == best


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
    nan_payload: then the NaN bits must match too, as between two ISA paths)."""
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
    q_n, q_p = R.lsq_levels(bits, signed)
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
        return MODE_PACT if self.kind == "pact" else MODE_AFFINE

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


def check_against_reference(case, x, p, dy, results=None):
    """Runs every ISA path (or uses `results`), checks they agree bit for bit, and
    checks the first against the reference."""
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
    for name, t in (("y", y), ("dx", dx)):
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


# ----------------------------------------------------------------------------- parity

def _full_grid():
    for kind in KINDS:
        for bits in range(2, 9):
            for signed in ([False] if kind == "pact" else [True, False]):
                for axis in (None, 0, 1, -1):
                    for dtype in DTYPES:
                        yield pytest.param(kind, bits, signed, axis, dtype,
                                           id=f"{kind}-b{bits}-{'s' if signed else 'u'}-ax{axis}-{str(dtype)[6:]}")


@pytest.mark.parametrize("kind,bits,signed,axis,dtype", list(_full_grid()))
def test_parity_full_grid(kind, bits, signed, axis, dtype):
    """Full product op x bits x signedness x granularity x dtype on a small 3-D tensor."""
    gf = 0.37 if (kind == "affine" and bits % 2) else 1.0
    gs = 0.61 if (kind in ("lsq", "lsqp") and bits % 3 == 0) else None
    case = Case(kind, bits, signed, axis, grad_factor=gf, grad_scale=gs)
    run_case(case, (4, 5, 6), dtype, seed=bits * 7 + (axis or 0))


SHAPES = [(1,), (59,), (97,), (1025,), (64, 64, 3, 3), (32, 16, 3, 3), (2, 16, 13, 13),
          (70, 300), (2, 16400)]


def _sampled_grid():
    """Every shape x layout x dtype x axis, with op and bits rotating so that every op
    and every bit width meet every shape; the big shapes take fewer combinations."""
    i = 0
    for shape in SHAPES:
        big = math.prod(shape) > 20000
        for layout in layouts_for(shape):
            for axis in axes_for(shape):
                for dtype in DTYPES:
                    i += 1
                    if big and (i % 3):  # sample a third of the big-shape combinations
                        continue
                    kind = KINDS[i % 4]
                    bits = 2 + (i * 5) % 7
                    signed = kind != "pact" and (i // 4) % 2 == 0
                    yield pytest.param(kind, bits, signed, axis, dtype, shape, layout,
                                       id=f"{'x'.join(map(str, shape))}-{layout}-ax{axis}-{str(dtype)[6:]}-{kind}-b{bits}")


@pytest.mark.parametrize("kind,bits,signed,axis,dtype,shape,layout", list(_sampled_grid()))
def test_parity_shapes_layouts(kind, bits, signed, axis, dtype, shape, layout):
    case = Case(kind, bits, signed, axis, grad_factor=0.75 if kind == "affine" else 1.0)
    run_case(case, shape, dtype, layout, seed=zlib.crc32(repr((shape, layout, axis)).encode()) % 1000)


def _degenerate_grid():
    i = 0
    for shape in [(1, 16, 1, 1), (16, 1, 1, 1), (1, 1, 1, 7), (2, 1, 5, 1), (3, 1, 5)]:
        for layout in ["contiguous", "transposed", "sliced"] + (["channels_last"] if len(shape) == 4 else []):
            for axis in [None, *range(len(shape))]:
                i += 1
                yield pytest.param(KINDS[i % 4], shape, layout, axis,
                                   id=f"{'x'.join(map(str, shape))}-{layout}-ax{axis}-{KINDS[i % 4]}")


@pytest.mark.parametrize("kind,shape,layout,axis", list(_degenerate_grid()))
def test_parity_size_one_dims(kind, shape, layout, axis):
    """Size-1 dimensions (whose strides are arbitrary in dense layouts) around or on the
    channel axis."""
    case = Case(kind, 3, kind != "pact", axis)
    run_case(case, shape, torch.float32, layout, seed=len(shape))


def test_zero_dim_x():
    gen = torch.Generator().manual_seed(9)
    for kind in KINDS:
        for dtype in DTYPES:
            case = Case(kind, 4, kind != "pact")
            p = make_params(case, (), gen)
            for v in (0.3, -7.0, 1e9, float("nan")):
                x = torch.tensor(v, dtype=dtype)
                y, dx, ds, dt = check_against_reference(case, x, p, torch.tensor(0.5, dtype=dtype))
                assert y.shape == () and dx.shape == () and ds.shape == (1,)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "expanded"])
@pytest.mark.parametrize("axis", [None, 1, -1])
def test_grad_in_other_layout(kind, layout, axis):
    """dy in a layout different from x's (autograd hands the kernel whatever it has)."""
    case = Case(kind, 4, kind != "pact", axis)
    shape = (2, 6, 5, 7)
    gen = torch.Generator().manual_seed(3)
    p = make_params(case, shape, gen)
    x = with_layout(make_x(case, shape, p, gen, torch.float32), "contiguous")
    dy = with_layout(make_dy(shape, gen, torch.float32), layout)
    check_against_reference(case, x, p, dy)
    x2 = with_layout(x, "channels_last")
    check_against_reference(case, x2, p, dy.contiguous())


def test_zero_dim_parameters():
    """Per-tensor parameters may be 0-dim; gradients come back in the parameter's shape."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, generator=gen)
    dy = torch.randn(3, 7, generator=gen)
    for kind in KINDS:
        case = Case(kind, 4, kind != "pact")
        p = {k: v.reshape(()) for k, v in make_params(case, x.shape, gen).items()}
        y, dx, ds, dt = check_against_reference(case, x, p, dy)
        assert ds.shape == ()
        if dt is not None:
            assert dt.shape == ()


@pytest.mark.parametrize("scale_shape,third_shape", [((), (1,)), ((1,), ())])
@pytest.mark.parametrize("kind", ["affine", "lsqp"])
def test_mixed_rank_parameters(kind, scale_shape, third_shape):
    """scale [1] with a 0-dim zero_point/offset (and vice versa) is accepted by the API;
    each gradient must have its own parameter's shape (the op contract, see the fake
    kernel in q2ext/_ops.py and the reference)."""
    case = Case(kind, 4, True)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 9, generator=gen)
    dy = torch.randn(4, 9, generator=gen)
    p = make_params(case, x.shape, gen)
    p["scale"] = p["scale"].reshape(scale_shape)
    p[case.third_name] = p[case.third_name].reshape(third_shape)
    # The op itself: outputs shaped like the reference's (and like the fake kernel's).
    args = (x, p["scale"], p.get("zero_point"), p.get("offset"), case.qmin, case.qmax, None, MODE_AFFINE, 1.0)
    got = torch.ops.q2ext.fake_quant_backward(dy, *args, [True, True, True])
    ref = R.fake_quant_backward_op(dy, *args, [True, True, True])
    assert [t.shape for t in got] == [t.shape for t in ref], "backward output shapes differ from the reference"
    # And through autograd.
    y, dx, ds, dt = check_against_reference(case, x, p, dy)
    assert ds.shape == scale_shape and dt.shape == third_shape


def test_reference_per_channel_1d():
    """reference.fake_quant_backward on a 1-D x with axis=0 (one element per channel).
    It reduces with sum(dim=[]), which torch reads as a *full* reduction, so dscale
    comes back with one value instead of one per channel (this is also the
    Q2EXT_NO_EXTENSION fallback kernel).  The other tests sidestep it by evaluating
    the reference on x[:, None] (Case.reference)."""
    x, dy = torch.randn(5), torch.randn(5)
    scale = torch.full((5,), 0.1)
    _, ds, _ = R.fake_quant_backward(dy, x, scale, None, None, -8, 7, 0, MODE_AFFINE)
    _, ds2, _ = R.fake_quant_backward(dy[:, None], x[:, None], scale, None, None, -8, 7, 0, MODE_AFFINE)
    assert ds.shape == (5,)
    torch.testing.assert_close(ds, ds2)


# ----------------------------------------------------------------------------- exact sums

class TestExactSums:
    """Dyadic data (power-of-two scales, x on a 2^-k lattice, dy in {-1/2..1/2} step
    1/8): every per-element gradient term and every partial sum is exact in fp32, so
    the kernel's parameter gradients must equal the reference's float64 sums exactly.
    This catches a dropped or doubled element even in tensors large enough that the
    rounding-error bound of `assert_grad_close` would hide it."""

    CASES = [
        ((64, 64, 3, 3), "contiguous", None),
        ((64, 64, 3, 3), "contiguous", 0),
        ((64, 64, 3, 3), "transposed", 0),
        ((32, 16, 3, 3), "channels_last", 1),
        ((2, 16, 13, 13), "channels_last", 1),  # channel axis innermost: row-block path
        ((2, 16, 13, 13), "contiguous", -1),
        ((70, 300), "contiguous", -1),  # innermost, > 256 channels, > 64 rows
        ((2, 16400), "contiguous", 0),  # a channel run longer than one work item
        ((40000,), "contiguous", None),  # several work items
        ((33, 40), "sliced", 1),
    ]

    @pytest.mark.parametrize("shape,layout,axis", CASES, ids=lambda v: str(v))
    @pytest.mark.parametrize("kind", KINDS)
    def test_exact(self, kind, shape, layout, axis):
        for dtype, bits in ((torch.float32, 3), (torch.bfloat16, 4), (torch.float16, 2)):
            case = Case(kind, bits, kind != "pact", axis, grad_factor=0.5)
            gen = torch.Generator().manual_seed(11)
            p = make_params(case, shape, gen, dyadic=True)
            x = with_layout(make_x(case, shape, p, gen, dtype, dyadic=True), layout)
            dy = make_dy(shape, gen, dtype, dyadic=True)
            results = {}
            for isa in ISAS:
                with cpu_isa(isa):
                    results[isa] = case.run(x, p, dy)
            y, dx, ds, dt = check_against_reference(case, x, p, dy, results)
            _, _, rds, rdt = case.reference(x, p, dy)
            assert torch.equal(ds, rds), f"{case} {dtype}: scale grad {ds[:4]} != exact {rds[:4]}"
            if dt is not None:
                assert torch.equal(dt, rdt), f"{case} {dtype}: {case.third_name} grad {dt[:4]} != exact {rdt[:4]}"


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_across_runs_and_threads(kind):
    case = Case(kind, 5, kind != "pact", axis=1)
    shape = (8, 12, 40, 41)  # > 8 work items of 16384 elements
    gen = torch.Generator().manual_seed(21)
    p = make_params(case, shape, gen)
    x = make_x(case, shape, p, gen, torch.float32)
    dy = make_dy(shape, gen, torch.float32)
    for xl in (x, with_layout(x, "channels_last")):
        torch.set_num_threads(2)
        first = case.run(xl, p, dy)
        again = [case.run(xl, p, dy)]
        for n in (1, 3):
            torch.set_num_threads(n)
            again.append(case.run(xl, p, dy))
        for res in again:
            for a, b in zip(res, first):
                if a is not None:
                    assert_bits_equal(a, b, what=f"{case} rerun", nan_payload=True)


# ----------------------------------------------------------------------------- ATen anchors

def _aten_data(shape, scale, zp, qmin, qmax, axis, seed, dyadic, ties=True):
    """x over the grid and 30% beyond, with exact grid points and (if `ties`) exact
    ties k + 1/2 in units of the scale; dy dyadic or normal."""
    gen = torch.Generator().manual_seed(seed)
    span = qmax - qmin
    v = (qmin - 0.3 * span) + 1.6 * span * torch.rand(shape, generator=gen)
    s = scale if axis is None else bcast(scale, torch.empty(shape), axis)
    z = zp if axis is None else bcast(zp, torch.empty(shape), axis)
    k = torch.randint(qmin - 3, qmax + 3, shape, generator=gen).float()
    u = torch.rand(shape, generator=gen)
    if dyadic:
        v = torch.round(v * 8) / 8
    if ties:
        v = torch.where(u < 0.2, k + 0.5, v)
    else:
        v = torch.where(torch.frac(v).abs() == 0.5, v + 0.125, v)
    v = torch.where((u >= 0.2) & (u < 0.3), k, v)  # exact grid points
    x = ((v - z) * s).float()
    dy = make_dy(shape, gen, torch.float32, dyadic)
    return x, dy


ATEN_GRIDS = [(-8, 7), (0, 15), (-128, 127), (0, 255), (-2, 1), (0, 3)]


@pytest.mark.parametrize("qmin,qmax", ATEN_GRIDS)
def test_aten_forward_per_tensor(qmin, qmax):
    for scale, zp in ((0.0625, 0), (0.1, 1), (0.037, qmax), (0.25, qmin), (3.3, (qmin + qmax) // 2)):
        x, _ = _aten_data((500,), torch.tensor(scale), torch.tensor(float(zp)), qmin, qmax, None, zp + 5, False)
        want = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        for isa in ISAS:
            with cpu_isa(isa):
                got = ops.fake_quant_affine(x, torch.tensor([scale]), torch.tensor([float(zp)]), qmin, qmax)
            assert torch.equal(got, want), f"scale={scale} zp={zp} {isa}: " + _describe(got, want, got != want, x)


@pytest.mark.parametrize("qmin,qmax", ATEN_GRIDS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_aten_forward_per_channel(qmin, qmax, axis):
    shape = (6, 5, 7)
    c = shape[axis]
    gen = torch.Generator().manual_seed(axis)
    scale = (0.01 + torch.rand(c, generator=gen) * 0.2).float()
    scale[0] = 0.125
    zp = torch.randint(qmin, qmax + 1, (c,), generator=gen, dtype=torch.int32)
    x, _ = _aten_data(shape, scale, zp.float(), qmin, qmax, axis, 3, False)
    want = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    for isa in ISAS:
        with cpu_isa(isa):
            got = ops.fake_quant_affine(x, scale, zp.float(), qmin, qmax, axis=axis)
        assert torch.equal(got, want), f"{isa}: " + _describe(got, want, got != want, x)


def _aten_learnable(x, scale, zp, qmin, qmax, axis, gf, dy):
    xl, sl, zl = (t.clone().requires_grad_() for t in (x, scale, zp))
    if axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(xl, sl, zl, qmin, qmax, gf)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(xl, sl, zl, axis, qmin, qmax, gf)
    return (y.detach(), *torch.autograd.grad(y, [xl, sl, zl], dy))


def _q2_affine(x, scale, zp, qmin, qmax, axis, gf, dy):
    case = Case("affine", axis=axis, grad_factor=gf)
    case.qmin, case.qmax = qmin, qmax
    return case.run(x, {"scale": scale, "zero_point": zp}, dy)


def _aten_zero_points(qmin, qmax, c, gen, per_tensor, even):
    """Integer zero points on which ATen's learnable backward is exact (see the two
    documenting tests below): per-tensor ones >= 0, and even ones where x has ties."""
    lo = max(qmin, 0) if per_tensor else qmin
    zp = torch.randint(lo, qmax + 1, (c,), generator=gen).float()
    if even:
        zp = torch.where(zp.remainder(2) == 1, zp - 1, zp).clamp(min=lo)
    return zp


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("qmin,qmax", ATEN_GRIDS)
@pytest.mark.parametrize("gf", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("ties", [False, True])
def test_aten_learnable_exact(axis, qmin, qmax, gf, ties):
    """Dyadic data: ATen's learnable fake quant and q2ext agree exactly, forward and all
    three gradients (integer zero points; grad_factor a power of two)."""
    shape = (12, 9)
    c = 1 if axis is None else shape[axis]
    gen = torch.Generator().manual_seed(qmax)
    scale = torch.pow(2.0, -torch.randint(1, 6, (c,), generator=gen).float())
    zp = _aten_zero_points(qmin, qmax, c, gen, axis is None, even=ties)
    x, dy = _aten_data(shape, scale, zp, qmin, qmax, axis, 7, True, ties)
    want = _aten_learnable(x, scale, zp, qmin, qmax, axis, gf, dy)
    for isa in ISAS:
        with cpu_isa(isa):
            got = _q2_affine(x, scale, zp, qmin, qmax, axis, gf, dy)
        for name, a, b in zip(("y", "dx", "dscale", "dzero_point"), got, want):
            assert torch.equal(a, b), f"{name} {isa}: " + _describe(a, b, a != b, x)


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("qmin,qmax", [(-8, 7), (0, 255), (-128, 127)])
def test_aten_learnable_generic(axis, qmin, qmax):
    """Generic data, grad_factor 0.37: forward and grad_x exact; scale/zero-point grads
    within the summation bound of both implementations (ATen sums fp32 per-element
    terms that differ from ours by a few roundings each)."""
    shape = (40, 30)
    c = 1 if axis is None else shape[axis]
    gen = torch.Generator().manual_seed(1)
    scale = (0.01 + 0.3 * torch.rand(c, generator=gen)).float()
    zp = _aten_zero_points(qmin, qmax, c, gen, axis is None, even=False)
    x, dy = _aten_data(shape, scale, zp, qmin, qmax, axis, 9, False, ties=False)
    gf = 0.37
    wy, wdx, wds, wdz = _aten_learnable(x, scale, zp, qmin, qmax, axis, gf, dy)
    y, dx, ds, dz = _q2_affine(x, scale, zp, qmin, qmax, axis, gf, dy)
    assert torch.equal(y, wy)
    assert torch.equal(dx, wdx)
    case = Case("affine", axis=axis, grad_factor=gf)
    case.qmin, case.qmax = qmin, qmax
    s_abs, c_abs, s_eff = case.abs_term_sums(x, {"scale": scale, "zero_point": zp}, dy)
    n = x.numel() // c
    # chain bound of both sums plus a few roundings of difference per term
    for got, want, a in ((ds, wds, s_abs), (dz, wdz, c_abs * s_eff)):
        tol = (min(n, 1056) + n + 8) * U32 * gf * a + 2 * U32 * want.double().abs()
        assert ((got.double() - want.double()).abs() <= tol).all(), (got, want, tol)


@pytest.mark.parametrize("zp_value,half_even,aten_trunc", [(2.5, 2.0, 3.0), (-1.5, -2.0, -1.0), (0.5, 0.0, 1.0)])
def test_zero_point_rounding_in_backward_differs_from_aten_per_tensor(zp_value, half_even, aten_trunc):
    """q2ext rounds a learnable zero point half-to-even in forward *and* backward.
    ATen's per-tensor learnable backward uses trunc(zp + 0.5) instead (its forward and
    its per-channel op round half-to-even), so at .5 zero points ATen's per-tensor
    gradients are those of a different zero point.  Documented in ops.fake_quant_affine."""
    qmin, qmax = -8, 7
    scale = torch.tensor([0.25])
    x, dy = _aten_data((300,), scale, torch.tensor([half_even]), qmin, qmax, None, 4, True, ties=False)
    zp = torch.tensor([zp_value])
    got = _q2_affine(x, scale, zp, qmin, qmax, None, 1.0, dy)
    aten = _aten_learnable(x, scale, zp, qmin, qmax, None, 1.0, dy)
    # The forwards agree (both round half to even).
    assert torch.equal(got[0], aten[0])
    # q2ext's gradients are those of the half-to-even integer zero point, in both ops ...
    for a, b in zip(got, _q2_affine(x, scale, torch.tensor([half_even]), qmin, qmax, None, 1.0, dy)):
        assert torch.equal(a, b)
    aten_c = _aten_learnable(x[None], scale, zp, qmin, qmax, 0, 1.0, dy[None])  # per-channel: half-even
    for a, b in zip(got, aten_c):
        assert torch.equal(a, b.reshape(a.shape))
    # ... while ATen's per-tensor backward uses trunc(zp + 0.5), i.e. another zero point:
    trunc_c = _aten_learnable(x[None], scale, torch.tensor([aten_trunc]), qmin, qmax, 0, 1.0, dy[None])
    for a, b in zip(aten[1:], trunc_c[1:]):
        assert torch.equal(a, b.reshape(a.shape))
    assert not (torch.equal(got[2], aten[2]) and torch.equal(got[3], aten[3]))


def test_aten_per_tensor_backward_negative_integer_zero_point():
    """Documents an ATen quirk the exact anchors avoid: for a *negative integer* zero
    point ATen's per-tensor learnable backward uses trunc(zp + 0.5) = zp + 1 (its
    per-channel op and q2ext use zp itself)."""
    qmin, qmax = -8, 7
    scale, zp = torch.tensor([0.25]), torch.tensor([-4.0])
    x, dy = _aten_data((300,), scale, zp, qmin, qmax, None, 5, True, ties=False)
    got = _q2_affine(x, scale, zp, qmin, qmax, None, 1.0, dy)
    per_channel = _aten_learnable(x[None], scale, zp, qmin, qmax, 0, 1.0, dy[None])
    for a, b in zip(got, per_channel):
        assert torch.equal(a, b.reshape(a.shape))
    per_tensor = _aten_learnable(x, scale, zp, qmin, qmax, None, 1.0, dy)
    shifted = _aten_learnable(x[None], scale, zp + 1, qmin, qmax, 0, 1.0, dy[None])
    for a, b in zip(per_tensor[1:], shifted[1:]):
        assert torch.equal(a, b.reshape(a.shape))
    assert not torch.equal(got[2], per_tensor[2])


@pytest.mark.parametrize("axis", [None, 0])
def test_aten_backward_mask_at_ties_with_odd_zero_point(axis):
    """Documents where ATen's learnable backward is inconsistent with its own forward:
    it masks on round(x/s + zp) while the forward uses round(x/s) + zp, which differ at
    exact ties when zp is odd.  q2ext masks on the forward's value (gradient flows to x
    exactly where the forward did not saturate) and so differs from ATen there."""
    qmin, qmax, zp = -8, 7, 1.0
    v = torch.tensor([-9.5, -8.5, 5.5, 6.5, -3.5, 2.5, 0.25])  # x / s
    scale = torch.tensor([0.25])
    x, dy = v * 0.25, torch.ones(7)
    if axis is not None:
        x, dy = x[None], dy[None]
    got = _q2_affine(x, scale, torch.tensor([zp]), qmin, qmax, axis, 1.0, dy)
    aten = _aten_learnable(x, scale, torch.tensor([zp]), qmin, qmax, axis, 1.0, dy)
    assert torch.equal(got[0], aten[0])  # forwards agree
    q_fwd = torch.round(v) + zp
    q_aten = torch.round(v + zp)
    want_q2 = ((q_fwd >= qmin) & (q_fwd <= qmax)).float()
    want_aten = ((q_aten >= qmin) & (q_aten <= qmax)).float()
    assert torch.equal(got[1].reshape(-1), want_q2)
    assert torch.equal(aten[1].reshape(-1), want_aten)
    assert torch.equal(want_q2 != want_aten, torch.tensor([1, 0, 0, 1, 0, 0, 0], dtype=torch.bool))


# ----------------------------------------------------------------------------- adversarial

def _neighbours(t):
    """t and its two fp neighbours (by bit pattern +-1; t must be finite and nonzero)."""
    i = int_view(t)
    return torch.cat([t, (i + 1).view(t.dtype), (i - 1).view(t.dtype)])


def adversarial_x(case, p, dtype):
    """Ties, grid ends and rounding boundaries (+-1 ulp in x's dtype), specials."""
    s, inv, zp, off, clip = R._params(torch.empty(1), p["scale"], p.get("zero_point"), p.get("offset"),
                                      case.qmin, case.qmax, None, case.mode)
    ks = torch.arange(case.qmin - 2, case.qmax + 3).float()
    if case.mode == MODE_PACT:
        grid = lambda v: v * s  # noqa: E731
        ends = torch.cat([grid(torch.tensor([0.0, -0.5, 0.5, case.qmax, case.qmax - 0.5, case.qmax + 0.5])),
                          clip.reshape(1)])
    else:
        grid = lambda v: (v - zp) * s + off  # noqa: E731
        ends = grid(torch.tensor([case.qmin, case.qmax, case.qmin - 0.5, case.qmax + 0.5,
                                  case.qmin + 0.5, case.qmax - 0.5]))
    ends = ends.to(dtype)
    ends = ends[ends != 0]
    fi = torch.finfo(dtype)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1e30, -1e30,
                             1e-40, -1e-40, 2.0 ** -24, -(2.0 ** -24), 2.0 ** -20, fi.max, -fi.max,
                             fi.tiny, -fi.tiny, fi.smallest_normal / 4]).to(dtype)
    ties = grid(ks + 0.5).to(dtype)
    exact = grid(ks).to(dtype)
    return torch.cat([ties, exact, _neighbours(ends), specials])


def _adversarial_params(kind, bits, signed, c=1):
    case = Case(kind, bits, signed, axis=None if c == 1 else 0, grad_factor=0.75)
    p = {"scale": torch.full((c,), 0.0625)}  # power of two: the ties above are exact
    if kind == "affine":
        p["zero_point"] = torch.full((c,), float(case.qmin + 1 if signed else 3))
    if kind == "lsqp":
        p["offset"] = torch.full((c,), -0.09375)
    if kind == "pact":
        p["scale"] = torch.full((c,), 0.0625 * case.qmax)
    return case, p


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bits,signed", [(k, b, sg) for k in KINDS for b, sg in
                                              ((2, True), (4, False), (8, True), (8, False))
                                              if not (k == "pact" and sg)])  # PACT: unsigned grid only
def test_adversarial_values(kind, bits, signed, dtype):
    case, p = _adversarial_params(kind, bits, signed)
    x = adversarial_x(case, p, dtype)
    gen = torch.Generator().manual_seed(bits)
    dy = make_dy(x.shape, gen, dtype)
    y, dx, ds, dt = check_against_reference(case, x, p, dy)

    # Documented behaviour: NaN -> NaN and no gradient; +-inf saturate to the grid ends.
    nan = x.isnan()
    assert torch.equal(y.isnan() & nan, nan)
    assert (dx[nan] == 0).all()
    s, inv, zp, off, clip = R._params(x, p["scale"], p.get("zero_point"), p.get("offset"),
                                      case.qmin, case.qmax, None, case.mode)
    hi = ((case.qmax - zp) * s + off).to(dtype)
    lo = ((case.qmin - zp) * s + off).to(dtype) if case.mode == MODE_AFFINE else torch.zeros((), dtype=dtype)
    pos, neg = x == float("inf"), x == float("-inf")
    assert torch.equal(y[pos], hi.expand(int(pos.sum()))), (y[pos], hi)
    assert torch.equal(y[neg], lo.expand(int(neg.sum()))), (y[neg], lo)
    assert (dx[x.isinf()] == 0).all()
    # Finite x gives finite y unless the grid end itself overflows x's dtype.
    finite_grid = torch.isfinite(hi) and torch.isfinite(lo)
    if finite_grid:
        assert torch.isfinite(y[~nan]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_adversarial_per_channel(kind):
    """The special values in a per-channel tensor, channel axis inner and outer."""
    case, p = _adversarial_params(kind, 4, True, c=3)
    p["scale"] = p["scale"] * torch.tensor([1.0, 0.5, 4.0])
    row = adversarial_x(case, {k: v[:1] for k, v in p.items()}, torch.float32)
    x = torch.stack([row, row * 0.5, row * 4.0])
    gen = torch.Generator().manual_seed(0)
    dy = make_dy(x.shape, gen, torch.float32)
    check_against_reference(case, x, p, dy)
    case.axis = 1
    check_against_reference(case, x.t().contiguous(), p, dy.t().contiguous())
    check_against_reference(case, x.t(), p, dy.t())


@pytest.mark.parametrize("kind", KINDS)
def test_nan_contributes_no_gradient(kind):
    """Inserting NaNs changes nothing for the other elements: y, dx and the parameter
    gradients (exact dyadic data, so the sums can be compared exactly)."""
    case = Case(kind, 4, kind != "pact", grad_factor=0.5)
    gen = torch.Generator().manual_seed(2)
    p = make_params(case, (500,), gen, dyadic=True)
    x = make_x(case, (500,), p, gen, torch.float32, dyadic=True)
    dy = make_dy((500,), gen, torch.float32, dyadic=True)
    nan_at = torch.zeros(500, dtype=torch.bool)
    nan_at[::7] = True
    x_nan = torch.where(nan_at, float("nan"), x)
    for isa in ISAS:
        with cpu_isa(isa):
            y, dx, ds, dt = case.run(x_nan, p, dy)
            y0, dx0, ds0, dt0 = case.run(x[~nan_at], p, dy[~nan_at])
        assert y[nan_at].isnan().all() and (dx[nan_at] == 0).all()
        assert torch.equal(y[~nan_at], y0) and torch.equal(dx[~nan_at], dx0)
        # Case.factor depends on numel for LSQ's default g; compare at equal g.
        if case.kind in ("lsq", "lsqp"):
            g_nan, g0 = case.factor(x_nan, p["scale"]), case.factor(x[~nan_at], p["scale"])
            ds0, dt0 = ds0 / g0 * g_nan, (None if dt0 is None else dt0 / g0 * g_nan)
            torch.testing.assert_close(ds, ds0, rtol=1e-6, atol=0)
        else:
            assert torch.equal(ds, ds0)
            if dt is not None:
                assert torch.equal(dt, dt0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [2.0 ** -23, 3e-7, 1e-6, 2.0 ** -14, 515.9, 65520.0 / 127, 1000.0, 3.3e38])
def test_low_precision_rounding_edges(dtype, scale):
    """fp16/bf16 outputs in the subnormal range, at the overflow threshold (65504/65520
    for fp16) and near FLT_MAX: the kernels' own fp32->fp16/bf16 conversion must round
    exactly like PyTorch's."""
    case = Case("lsq", 8, True)
    p = {"scale": torch.tensor([scale], dtype=torch.float32)}
    n = torch.arange(-130, 131).float()
    x32 = torch.cat([n * scale, (n + 0.5) * scale, n * scale * 1.0001,
                     2.0 ** -24 * torch.arange(-40, 40).float()])  # fp16 subnormal inputs
    x = torch.cat([x32.to(dtype), _neighbours(x32[x32 != 0].to(dtype)[:50])])
    gen = torch.Generator().manual_seed(0)
    check_against_reference(case, x, p, make_dy(x.shape, gen, dtype))


def test_wide_grid_large_values():
    """quant_min/quant_max at the supported limits and |x/s| around 2^22..2^24, where the
    kernels' rounding trick is no longer exact (the value must stay clipped)."""
    gen = torch.Generator().manual_seed(0)
    mags = torch.tensor([2.0 ** 16, 2.0 ** 16 + 0.5, 2.0 ** 21 + 0.5, 2.0 ** 22 - 0.5, 2.0 ** 22, 2.0 ** 22 + 1,
                         2.0 ** 23 - 1, 2.0 ** 23 + 0.5 * 3, 2.0 ** 24 + 2, 3e9])
    v = torch.cat([mags, -mags, torch.linspace(-70000, 70000, 301)])
    for zp in (0.0, 65535.0, -65536.0, -7.5):
        p = {"scale": torch.tensor([0.5]), "zero_point": torch.tensor([zp])}
        case = Case("affine", grad_factor=1.0)
        case.qmin, case.qmax = -65536, 65535
        x = (v * 0.5).float()
        check_against_reference(case, x, p, make_dy(x.shape, gen, torch.float32))


# ----------------------------------------------------------------------------- parameter edge cases

def _effective(v):
    if math.isnan(v) or v < FLT_EPS:
        return FLT_EPS
    return min(v, FLT_MAX)


BAD_SCALES = [0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-40, 1e-45, FLT_EPS / 2,
              float(torch.nextafter(torch.tensor(FLT_EPS), torch.tensor(0.0))), FLT_EPS, FLT_MAX]


@pytest.mark.parametrize("bad", BAD_SCALES, ids=repr)
@pytest.mark.parametrize("kind", KINDS)
def test_scale_edge_cases(kind, bad):
    """A scale (or alpha) that is NaN, <= 0 or below FLT_EPSILON acts as FLT_EPSILON,
    +inf as FLT_MAX; gradients are those taken at that effective value; no crash."""
    case = Case(kind, 4, kind != "pact", grad_factor=0.75)
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(50, generator=gen) * 1e-6, torch.randn(50, generator=gen),
                   torch.tensor([0.0, 1e30, -1e30, float("inf"), -float("inf"), float("nan")])])
    dy = make_dy(x.shape, gen, torch.float32)
    p = {"scale": torch.tensor([bad])}
    if kind == "affine":
        p["zero_point"] = torch.tensor([1.0])
    if kind == "lsqp":
        p["offset"] = torch.tensor([1e-7])
    eff = {**p, "scale": torch.tensor([_effective(bad)])}
    for isa in ISAS:
        with cpu_isa(isa):
            got = case.run(x, p, dy)
            want = case.run(x, eff, dy)
        for name, a, b in zip(("y", "dx", "dscale", "dthird"), got, want):
            if a is not None:
                assert_bits_equal(a, b, x, f"{case} scale={bad!r} {name}", nan_payload=True)
    check_against_reference(case, x, p, dy)


def test_per_channel_scale_edge_cases():
    bad = [0.1, 0.0, float("nan"), float("inf"), -2.0, 1e-40]
    eff = [_effective(v) for v in bad]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, len(bad), 5, generator=gen)
    dy = torch.randn(3, len(bad), 5, generator=gen)
    for kind in KINDS:
        case, p = _adversarial_params(kind, 4, kind != "pact", c=len(bad))
        case.axis = 1
        p["scale"] = torch.tensor(bad)
        got = case.run(x, p, dy)
        want = case.run(x, {**p, "scale": torch.tensor(eff)}, dy)
        for a, b in zip(got, want):
            if a is not None:
                assert_bits_equal(a, b, nan_payload=True)
        check_against_reference(case, x, p, dy)


@pytest.mark.parametrize("zp,acts_as", [(float("nan"), 0.0), (float("inf"), 7.0), (float("-inf"), -8.0),
                                        (1e10, 7.0), (-0.0, 0.0), (0.5, 0.0), (1.5, 2.0), (-2.5, -2.0)],
                         ids=repr)
def test_zero_point_edge_cases(zp, acts_as):
    """NaN zero point acts as 0; others are rounded half-to-even and clamped."""
    case = Case("affine", 4, True, grad_factor=0.75)
    gen = torch.Generator().manual_seed(8)
    x = torch.cat([torch.randn(200, generator=gen), torch.tensor([float("inf"), float("-inf"), float("nan")])])
    dy = make_dy(x.shape, gen, torch.float32)
    p = {"scale": torch.tensor([0.125]), "zero_point": torch.tensor([zp])}
    for isa in ISAS:
        with cpu_isa(isa):
            got = case.run(x, p, dy)
            want = case.run(x, {**p, "zero_point": torch.tensor([acts_as])}, dy)
        for name, a, b in zip(("y", "dx", "dscale", "dzp"), got, want):
            assert_bits_equal(a, b, x, f"zp={zp!r} {name}", nan_payload=True)
    check_against_reference(case, x, p, dy)


# ----------------------------------------------------------------------------- LSQ specifics

@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape,axis", [((7, 13), None), ((7, 13), 0), ((7, 13), 1), ((4, 3, 5, 5), 1)])
def test_lsq_default_grad_scale(shape, axis, signed):
    """grad_scale=None means g = 1/sqrt(N * Q_P), N = numel / scale.numel()."""
    bits = 3
    q_p = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    case = Case("lsqp", bits, signed, axis)
    gen = torch.Generator().manual_seed(0)
    p = make_params(case, shape, gen)
    x = make_x(case, shape, p, gen, torch.float32)
    dy = make_dy(shape, gen, torch.float32)
    n = math.prod(shape) // p["scale"].numel()
    g = 1.0 / math.sqrt(n * q_p)
    assert R.lsq_grad_scale(math.prod(shape), p["scale"].numel(), q_p) == g
    assert case.factor(x, p["scale"]) == g
    default = case.run(x, p, dy)
    explicit = Case("lsqp", bits, signed, axis, grad_scale=g).run(x, p, dy)
    unit = Case("lsqp", bits, signed, axis, grad_scale=1.0).run(x, p, dy)
    for a, b in zip(default, explicit):
        assert torch.equal(a, b)
    # g multiplies the scale and offset gradients (in double, before rounding to fp32).
    assert torch.equal(default[1], unit[1])
    torch.testing.assert_close(default[2], (unit[2].double() * g).float(), rtol=4 * U32, atol=0)
    torch.testing.assert_close(default[3], (unit[3].double() * g).float(), rtol=4 * U32, atol=0)
    check_against_reference(case, x, p, dy)


def _per_element_scale_grad(fn, x, s):
    """d(sum y)/d s_i for a scale that is a separate leaf per element."""
    se = s.expand(x.shape).clone().requires_grad_()
    xl = x.clone().requires_grad_()
    y = fn(xl, se)
    dx, ds = torch.autograd.grad(y.sum(), [xl, se])
    return dx, ds


def test_classic_ste_formulations_vs_lsq_gradient():
    """Why the reference does not use an autograd STE formulation of LSQ.

    The reference takes the clip mask on the *rounded* grid index r = round(x/s)
    (ATen's learnable fake quant; LSQ with zero_point = 0):
        Q_N <= r <= Q_P: dx = dy, ds = r - x/s;   else: dx = 0, ds = -Q_N or Q_P.
    torch.clamp with scalar bounds passes no gradient *at* a bound, so:
    * the classic `v = (v.round() - v).detach() + v` then `clamp(v, -Q_N, Q_P)` treats
      every element that rounds onto a grid end (|r| at the bound) as clipped: dx = 0 and
      ds = Q_P / -Q_N instead of dx = dy and ds = r - v;
    * the LSQ paper's code (clamp x/s first, then round with the STE) does the same for
      elements on the outer side of a grid end that still round onto it, x/s in
      [Q_P, Q_P + 1/2) and (-Q_N - 1/2, -Q_N] (ties per half-to-even).
    Elsewhere both agree with the reference (up to rounding: autograd forms ds as
    r + s * d(x/s)/ds, a cancellation, where the reference computes r - x/s directly).
    """
    bits, q_n, q_p = 4, 8, 7
    s = torch.tensor(0.25)  # power of two: x/s is exact
    v = torch.tensor([q_p + 0.25, q_p + 0.5, q_p + 0.75, -q_n - 0.25, -q_n - 0.5, -q_n - 0.75,
                      q_p - 0.25, -q_n + 0.25, 0.3, q_p + 3.0, -q_n - 3.0, q_p, -q_n, q_p - 0.5, -q_n + 0.5])
    x = v * s
    r = torch.round(v)
    at_end = (r == q_p) | (r == -q_n)
    outer = (v >= q_p) | (v <= -q_n)
    end_value = torch.where(v > 0, float(q_p), float(-q_n))

    # The kernel's per-element gradients: each element its own channel; = reference.
    case = Case("lsq", bits, True, axis=0, grad_scale=1.0)
    _, dx_ref, ds_ref, _ = case.run(x, {"scale": s.expand(x.shape).clone()}, torch.ones_like(x))
    assert torch.equal(ds_ref, R.fake_quant_backward(torch.ones_like(x)[:, None], x[:, None], s.expand(x.shape),
                                                     None, None, -q_n, q_p, 0, MODE_AFFINE)[1])
    assert torch.equal(dx_ref, ((r >= -q_n) & (r <= q_p)).float())
    assert torch.equal(ds_ref[at_end], r[at_end] - v[at_end])

    def round_then_clamp(xl, se):
        vv = xl / se
        vv = (vv.round() - vv).detach() + vv
        return torch.clamp(vv, -q_n, q_p) * se

    def clamp_then_round(xl, se):  # the LSQ paper's code
        vv = torch.clamp(xl / se, -q_n, q_p)
        return ((vv.round() - vv).detach() + vv) * se

    y_ref = ops.lsq(x, s.reshape(1), bits)
    for fn, differs in ((round_then_clamp, at_end), (clamp_then_round, at_end & outer)):
        assert torch.equal(fn(x, s), y_ref)  # the forwards are identical
        dx, ds = _per_element_scale_grad(fn, x, s)
        assert torch.equal((ds != ds_ref) | (dx != dx_ref), differs), (fn.__name__, v, ds, ds_ref, dx, dx_ref)
        assert torch.equal(ds[differs], end_value[differs]) and (dx[differs] == 0).all()
        assert (dx_ref[differs] == 1).all()

    # With a generic scale, away from the grid ends, round-then-clamp agrees up to rounding.
    s2 = torch.tensor(0.1234567)
    x2 = torch.linspace(-3, 3, 4001)
    _, ds_b2 = _per_element_scale_grad(round_then_clamp, x2, s2)
    _, _, ds_ref2, _ = case.run(x2, {"scale": s2.expand(x2.shape).clone()}, torch.ones_like(x2))
    r_div, r_mul = torch.round(x2 / s2), torch.round(x2 * (1 / s2))
    keep = (r_div == r_mul) & (r_div != q_p) & (r_div != -q_n)  # division vs reciprocal at near-ties
    assert keep.float().mean() > 0.95
    torch.testing.assert_close(ds_b2[keep], ds_ref2[keep], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- autograd plumbing

class _RecordBackwardMasks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.q2ext.fake_quant_backward.default:
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", KINDS)
def test_only_requested_gradients(kind):
    """Every learnable input gets a gradient; the backward is asked only for those that
    require one (output_mask), and requires_grad=False inputs work."""
    case = Case(kind, 4, kind != "pact", grad_factor=0.5)
    gen = torch.Generator().manual_seed(0)
    shape = (3, 4, 5)
    p = make_params(case, shape, gen)
    x = make_x(case, shape, p, gen, torch.float32)
    dy = make_dy(shape, gen, torch.float32)
    full = case.run(x, p, dy)
    n_in = 3 if case.third_name else 2
    for need in itertools.product([True, False], repeat=n_in):
        need3 = tuple(need) + ((False,) if n_in == 2 else ())
        with _RecordBackwardMasks() as rec:
            got = case.run(x, p, dy, need=need3)
        if any(need):
            assert rec.masks == [list(need3)], rec.masks
        else:
            assert rec.masks == []
        for want, g, n in zip(full[1:], got[1:], need3):
            if n:
                assert torch.equal(g, want)
            else:
                assert g is None
    # No input requires grad: a plain tensor comes out.
    y = case.call(x, p)
    assert not y.requires_grad


def test_every_learnable_input_receives_grad():
    x = torch.randn(2, 3, 4, requires_grad=True)
    s = torch.tensor([0.1], requires_grad=True)
    zp = torch.tensor([1.0], requires_grad=True)
    off = torch.tensor([0.05], requires_grad=True)
    a = torch.tensor([1.5], requires_grad=True)
    sc = torch.rand(3).add(0.05).requires_grad_()
    y = (ops.fake_quant_affine(x, s, zp, -8, 7) + ops.lsq(x, s, 3, offset=off) + ops.pact(x, a, 4)
         + ops.lsq(x, sc, 4, axis=1))
    y.square().sum().backward()
    for t in (x, s, zp, off, a, sc):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", [((0,), None), ((0, 4), 1), ((4, 0), 0), ((3, 0), 1), ((2, 0, 3), None)])
def test_empty_tensors(kind, dtype, shape, axis):
    case = Case(kind, 4, kind != "pact", axis, grad_factor=0.5)
    c = 1 if axis is None else shape[axis]
    p = {"scale": torch.full((c,), 0.1)}
    if kind == "affine":
        p["zero_point"] = torch.full((c,), 1.0)
    if kind == "lsqp":
        p["offset"] = torch.full((c,), 0.01)
    if kind == "pact":
        p["scale"] = torch.full((c,), 2.0)
    x = torch.empty(shape, dtype=dtype)
    for isa in ISAS:
        with cpu_isa(isa):
            y, dx, ds, dt = case.run(x, p, torch.empty(shape, dtype=dtype))
        assert y.shape == shape and y.dtype == dtype
        assert dx.shape == shape and dx.dtype == dtype
        assert torch.equal(ds, torch.zeros(c))
        if dt is not None:
            assert torch.equal(dt, torch.zeros(c))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("mask", [[False, True, False], [True, False, False], [False, False, True]])
def test_backward_outputs_never_alias(impl, mask):
    """The schema returns three distinct tensors: unrequested or non-existent gradients
    come back as empty tensors, which must not be one shared tensor (aliasing outputs
    break functionalization / torch.compile; opcheck's test_schema checks the same)."""
    op = torch.ops.q2ext.fake_quant_backward if impl == "kernel" else R.fake_quant_backward_op
    x = torch.randn(3, 4)
    for zp, off in ((torch.tensor([1.0]), None), (None, torch.tensor([0.1])), (None, None)):
        outs = op(torch.ones_like(x), x, torch.tensor([0.1]), zp, off, -8, 7, None, MODE_AFFINE, 1.0, mask)
        for i, j in itertools.combinations(range(3), 2):
            a, b = outs[i], outs[j]
            assert a is not b and (a.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()), \
                f"outputs {i} and {j} alias (mask={mask}, zp={zp is not None}, offset={off is not None})"


# ----------------------------------------------------------------------------- opcheck / compile

def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    x4 = torch.randn(2, 3, 4, 5, generator=gen)
    s1, s3 = torch.tensor([0.1]), torch.rand(3, generator=gen) + 0.05
    zp1, zp3 = torch.tensor([2.0]), torch.tensor([-1.0, 0.0, 3.0])
    off3 = torch.tensor([0.01, -0.02, 0.0])
    return {
        "zp-per-tensor-fp32": (x4, s1, zp1, None, -8, 7, None, MODE_AFFINE, 0.5),
        "zp-per-channel-fp32": (x4, s3, zp3, None, -8, 7, 1, MODE_AFFINE, 1.0),
        "offset-per-channel-bf16": (x4.bfloat16(), s3, None, off3, 0, 15, 1, MODE_AFFINE, 0.3),
        "lsq-per-tensor-fp16-channels_last": (x4.half().contiguous(memory_format=torch.channels_last), s1,
                                              None, None, -2, 1, None, MODE_AFFINE, 1.0),
        "pact-per-tensor-bf16": (x4.bfloat16(), torch.tensor([2.0]), None, None, 0, 255, None, MODE_PACT, 1.0),
        "pact-per-channel-fp32": (x4, s3 * 10, None, None, 0, 15, 1, MODE_PACT, 1.0),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck_fake_quant(name):
    x, scale, zp, off, *rest = _opcheck_cases()[name]
    args = (x.requires_grad_(x.dtype == torch.float32), scale.clone().requires_grad_(),
            None if zp is None else zp.clone().requires_grad_(),
            None if off is None else off.clone().requires_grad_(), *rest)
    torch.library.opcheck(torch.ops.q2ext.fake_quant.default, args)


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck_fake_quant_backward(name, mask):
    x, *rest = _opcheck_cases()[name]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    torch.library.opcheck(torch.ops.q2ext.fake_quant_backward.default, (grad, x, *rest, mask))


def _compile_fn(x, s, a, sc, zp, off):
    return (ops.lsq(x, s, 4) + ops.pact(x, a, 3) * 0.5
            + ops.fake_quant_affine(x, sc, zp, -8, 7, axis=1, grad_factor=0.5)
            + ops.lsq(x, s, 3, signed=False, offset=off))


def _compile_inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 5, 4, generator=gen), torch.tensor([0.1]), torch.tensor([1.5]),
            torch.tensor([0.1, 0.2, 0.05]), torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.05]))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(backend):
    torch._dynamo.reset()
    inputs = _compile_inputs()
    eager_in = [t.clone().requires_grad_() for t in inputs]
    comp_in = [t.clone().requires_grad_() for t in inputs]
    dy = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    y_e = _compile_fn(*eager_in)
    g_e = torch.autograd.grad(y_e, eager_in, dy)
    compiled = torch.compile(_compile_fn, fullgraph=True, backend=backend)
    y_c = compiled(*comp_in)
    g_c = torch.autograd.grad(y_c, comp_in, dy)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
