"""CPU tests of the fake-quant op family (fake_quant_affine, LSQ, LSQ+, PACT).

What is checked, and against what:
  * forward: bit-exact against q2ext.reference.fake_quant for fp32/fp16/bf16 (bit patterns are
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

import math
import zlib

import pytest
import torch

import q2ext
from q2ext.reference import fake_quant as R
from q2ext._ops.fake_quant import MODE_AFFINE

from helpers import *  # noqa: F401,F403  (shared case model and checks)
from helpers import _describe  # noqa: F401


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
    # 630K elements: above the kernels' 256K serial threshold, ~38 work items of 16384.
    shape = (8, 12, 80, 82)
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


@pytest.mark.parametrize("axis", [None, 1])
def test_parity_large_output_huge_page_path(axis):
    """Outputs of >= 32 MB take the huge-page allocation advice (csrc/cpu/huge_pages.cpp):
    the values must not care.  9M fp32 elements = 36 MB for y and for grad_x."""
    run_case(Case("lsq", 4, True, axis), (3, 48, 256, 256), torch.float32, seed=11)
