"""Bad arguments to the fake-quant ops: a clear Python exception whose message names
the offending argument, never a crash, both through the public API (q2ext.ops) and
through direct torch.ops.q2ext.* calls (C++ kernel on CPU, fake kernel on 'meta')."""
from __future__ import annotations

import pytest
import torch

import q2ext  # noqa: F401  (registers the ops)
from q2ext import ops
from q2ext._ops.fake_quant import MODE_AFFINE, MODE_PACT

X = torch.randn(2, 3, 4)
S1 = torch.tensor([0.1])
S3 = torch.tensor([0.1, 0.2, 0.3])
Z1 = torch.tensor([1.0])
META = torch.device("meta")


def _affine(**kw):
    return ops.fake_quant_affine, {**dict(x=X, scale=S1, zero_point=Z1, quant_min=-8, quant_max=7), **kw}


def _lsq(**kw):
    return ops.lsq, {**dict(x=X, scale=S1, bits=4), **kw}


def _pact(**kw):
    return ops.pact, {**dict(x=X, alpha=torch.tensor([2.0]), bits=4), **kw}


# (id, call, exception type, message pattern)
API_CASES = []


def case(name, call, exc, match):
    func, args = call
    API_CASES.append(pytest.param(func, args, exc, match, id=name))


# bits: outside 2..8, not an int, bool
for fn_name, make in (("lsq", _lsq), ("pact", _pact)):
    for bits in (1, 9, 0, -4, 16):
        case(f"{fn_name}-bits={bits}", make(bits=bits), ValueError, r"bits must be an int in 2\.\.8")
    for bits in (4.0, "4", True, False, None, torch.tensor(4)):
        case(f"{fn_name}-bits={bits!r}", make(bits=bits), ValueError, "bits")

# quant_min / quant_max
case("qmin==qmax", _affine(quant_min=5, quant_max=5), ValueError, r"quant_min \(5\) must be < quant_max \(5\)")
case("qmin>qmax", _affine(quant_min=7, quant_max=-8), ValueError, "quant_min")
case("qmin-float", _affine(quant_min=-8.0), TypeError, "quant_min must be an int")
case("qmax-float", _affine(quant_max=7.5), TypeError, "quant_max must be an int")
case("qmax-bool", _affine(quant_max=True), TypeError, "quant_max")
case("qmin-tensor", _affine(quant_min=torch.tensor(-8)), TypeError, "quant_min")
case("qmin-too-small", _affine(quant_min=-65537, quant_max=0), ValueError, "quant_min/quant_max")
case("qmax-too-big", _affine(quant_min=0, quant_max=65536), ValueError, "quant_min/quant_max")

# parameter shapes
case("affine-scale-shape", _affine(scale=torch.tensor([0.1, 0.2])), ValueError, r"scale must have shape \[1\]")
case("affine-scale-2d", _affine(scale=torch.tensor([[0.1]])), ValueError, "scale must have shape")
case("affine-scale-empty", _affine(scale=torch.tensor([])), ValueError, "scale must have shape")
case("affine-zp-shape", _affine(zero_point=torch.zeros(3)), ValueError, "zero_point must have shape")
case("affine-per-channel-scale-shape", _affine(scale=S1, zero_point=torch.zeros(3), axis=1), ValueError,
     r"scale must have shape \[3\] for per-channel along axis 1")
case("affine-per-channel-zp-shape", _affine(scale=S3, zero_point=Z1, axis=1), ValueError, "zero_point must have shape")
case("affine-per-channel-wrong-axis", _affine(scale=S3, zero_point=torch.zeros(3), axis=2), ValueError, "scale")
case("lsq-scale-shape", _lsq(scale=torch.full((4,), 0.1)), ValueError, "scale must have shape")
case("lsq-per-channel-scale-shape", _lsq(scale=S1, axis=1), ValueError, "scale must have shape")
case("lsq-offset-shape", _lsq(offset=torch.zeros(2)), ValueError, "offset must have shape")
case("lsq-per-channel-offset-shape", _lsq(scale=S3, offset=Z1, axis=1), ValueError, "offset must have shape")
case("pact-alpha-shape", _pact(alpha=torch.tensor([1.0, 2.0])), ValueError, "alpha must have shape")
case("pact-alpha-2d", _pact(alpha=torch.ones(1, 3), axis=1), ValueError, "alpha must have shape")

# parameter dtypes
for dt in (torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool):
    n = str(dt)[6:]
    case(f"affine-scale-{n}", _affine(scale=S1.to(dt)), TypeError, "scale must be float32")
    case(f"affine-zp-{n}", _affine(zero_point=Z1.to(dt)), TypeError, "zero_point must be float32")
    case(f"lsq-scale-{n}", _lsq(scale=S1.to(dt)), TypeError, "scale must be float32")
    case(f"lsq-offset-{n}", _lsq(offset=Z1.to(dt)), TypeError, "offset must be float32")
    case(f"pact-alpha-{n}", _pact(alpha=S1.to(dt)), TypeError, "alpha must be float32")

# parameter devices (meta stands in for "another device")
case("affine-scale-device", _affine(scale=S1.to(META)), ValueError, "scale is on meta but x is on cpu")
case("affine-zp-device", _affine(zero_point=Z1.to(META)), ValueError, "zero_point is on meta")
case("lsq-scale-device", _lsq(scale=S1.to(META)), ValueError, "scale is on meta")
case("lsq-offset-device", _lsq(offset=Z1.to(META)), ValueError, "offset is on meta")
case("pact-alpha-device", _pact(alpha=S1.to(META)), ValueError, "alpha is on meta")
case("x-device", _lsq(x=X.to(META)), ValueError, "scale is on cpu but x is on meta")

# x: integer, bool, float64, complex
for dt in (torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool, torch.float64, torch.complex64):
    n = str(dt)[6:]
    case(f"affine-x-{n}", _affine(x=X.to(dt)), TypeError, "x must be float32, float16 or bfloat16")
    case(f"lsq-x-{n}", _lsq(x=X.to(dt)), TypeError, "x must be float32, float16 or bfloat16")
    case(f"pact-x-{n}", _pact(x=X.to(dt)), TypeError, "x must be float32, float16 or bfloat16")

# axis
for axis in (3, -4, 10):
    case(f"affine-axis={axis}", _affine(axis=axis), ValueError, f"axis {axis} out of range")
    case(f"lsq-axis={axis}", _lsq(axis=axis), ValueError, f"axis {axis} out of range")
    case(f"pact-axis={axis}", _pact(axis=axis), ValueError, f"axis {axis} out of range")
for axis in (1.0, True, "1", torch.tensor(1)):
    case(f"lsq-axis={axis!r}", _lsq(scale=S3, axis=axis), TypeError, "axis must be an int or None")
    case(f"pact-axis={axis!r}", _pact(alpha=S3, axis=axis), TypeError, "axis must be an int or None")
    case(f"affine-axis={axis!r}", _affine(scale=S3, zero_point=torch.zeros(3), axis=axis), TypeError, "axis")
case("axis-on-0d-x", _lsq(x=torch.tensor(1.0), axis=0), ValueError, "axis 0 out of range")

# non-tensor inputs
for bad in (0.1, [0.1], None, "0.1"):
    case(f"affine-scale={bad!r}", _affine(scale=bad), TypeError, "scale must be a float32 tensor")
    case(f"lsq-scale={bad!r}", _lsq(scale=bad), TypeError, "scale must be a float32 tensor")
    case(f"pact-alpha={bad!r}", _pact(alpha=bad), TypeError, "alpha must be a float32 tensor")
for bad in (1.0, [1.0], "1"):
    case(f"affine-zp={bad!r}", _affine(zero_point=bad), TypeError, "zero_point must be a float32 tensor")
    case(f"lsq-offset={bad!r}", _lsq(offset=bad), TypeError, "offset must be a float32 tensor")
case("affine-zp=None", _affine(zero_point=None), TypeError, "zero_point must be a float32 tensor")
for bad in (1.0, [1.0, 2.0], None, X.numpy()):
    name = type(bad).__name__
    case(f"affine-x-{name}", _affine(x=bad), TypeError, "x must be a torch.Tensor")
    case(f"lsq-x-{name}", _lsq(x=bad), TypeError, "x must be a torch.Tensor")
    case(f"pact-x-{name}", _pact(x=bad), TypeError, "x must be a torch.Tensor")


@pytest.mark.parametrize("func,args,exc,match", API_CASES)
def test_public_api_rejects(func, args, exc, match):
    with pytest.raises(exc, match=match):
        func(**args)


@pytest.mark.parametrize("func,args,exc,match", [p for p in API_CASES if "device" not in p.id])
def test_public_api_rejects_on_meta(func, args, exc, match):
    """The same checks with every tensor on 'meta': they run before any kernel."""
    args = {k: (v.to(META) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(exc, match=match):
        func(**args)


def test_valid_calls_work():
    """Sanity: the baseline arguments of the cases above are accepted (CPU and meta)."""
    for dev in ("cpu", "meta"):
        x = X.to(dev)
        assert ops.fake_quant_affine(x, S1.to(dev), Z1.to(dev), -8, 7).shape == X.shape
        assert ops.lsq(x, S1.to(dev), 4).shape == X.shape
        assert ops.lsq(x, S3.to(dev), 4, axis=1, offset=torch.zeros(3, device=dev)).shape == X.shape
        assert ops.lsq(x, S3.to(dev), 4, axis=-2).shape == X.shape
        assert ops.pact(x, torch.tensor([2.0], device=dev), 4).shape == X.shape
        assert ops.lsq(x, torch.tensor(0.1, device=dev), 2).shape == X.shape  # 0-dim per-tensor scale
        assert ops.fake_quant_affine(x, S1.to(dev), Z1.to(dev), -65536, 65535).shape == X.shape


# ----------------------------------------------------------------------------- direct op calls

def _fq_args(**kw):
    args = dict(x=X, scale=S1, zero_point=None, offset=None, quant_min=-8, quant_max=7, axis=None,
                mode=MODE_AFFINE, grad_factor=1.0)
    args.update(kw)
    return args


OP_CASES = [
    ("x-int", _fq_args(x=X.int()), "x must be float32"),
    ("x-bool", _fq_args(x=X > 0), "x must be float32"),
    ("x-float64", _fq_args(x=X.double()), "x must be float32"),
    ("mode", _fq_args(mode=3), "mode"),
    ("mode-negative", _fq_args(mode=-1), "mode"),
    ("qmin==qmax", _fq_args(quant_min=3, quant_max=3), "quant_min"),
    ("qmin>qmax", _fq_args(quant_min=8, quant_max=-8), "quant_min"),
    ("range", _fq_args(quant_min=-70000, quant_max=7), "quant_min/quant_max"),
    ("range-max", _fq_args(quant_min=0, quant_max=1 << 20), "quant_min/quant_max"),
    ("axis-too-big", _fq_args(axis=3), "axis"),
    ("axis-negative", _fq_args(axis=-1), "axis"),  # the op takes a normalised axis
    ("scale-None", _fq_args(scale=None), "scale"),
    ("scale-float64", _fq_args(scale=S1.double()), "scale"),
    ("scale-int", _fq_args(scale=S1.int()), "scale"),
    ("scale-shape", _fq_args(scale=S3), "scale"),
    ("scale-2d", _fq_args(scale=S1[None]), "scale"),
    ("scale-per-channel-shape", _fq_args(scale=S1, axis=2), "scale"),
    ("zp-shape", _fq_args(zero_point=torch.zeros(2)), "zero_point"),
    ("zp-dtype", _fq_args(zero_point=Z1.half()), "zero_point"),
    ("offset-shape", _fq_args(offset=torch.zeros(2)), "offset"),
    ("offset-dtype", _fq_args(offset=Z1.long()), "offset"),
    ("zp-and-offset", _fq_args(zero_point=Z1, offset=Z1), "zero_point or offset"),
    ("pact-qmin", _fq_args(mode=MODE_PACT, quant_min=-1), "PACT"),
    ("pact-zp", _fq_args(mode=MODE_PACT, quant_min=0, zero_point=Z1), "PACT"),
    ("pact-offset", _fq_args(mode=MODE_PACT, quant_min=0, offset=Z1), "PACT"),
]


def _on(args, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name,args,match", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_direct_op_rejects(name, args, match, device):
    args = _on(args, device)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.q2ext.fake_quant(*args.values())
    grad = torch.ones(args["x"].shape, dtype=args["x"].dtype, device=device)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.q2ext.fake_quant_backward(grad, *args.values(), [True, True, True])


@pytest.mark.parametrize("param", ["scale", "zero_point", "offset"])
def test_direct_op_device_mismatch(param):
    value = {"scale": S1, "zero_point": Z1, "offset": Z1}[param].to(META)
    args = _fq_args(**{param: value})
    if param == "offset":
        args["zero_point"] = None
    with pytest.raises(RuntimeError, match=param):
        torch.ops.q2ext.fake_quant(*args.values())
    with pytest.raises(RuntimeError, match=param):
        torch.ops.q2ext.fake_quant_backward(torch.ones_like(X), *args.values(), [True, True, True])


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_direct_backward_rejects_bad_grad(device):
    args = _on(_fq_args(), device)
    for grad in (torch.ones(2, 3, device=device), torch.ones(2, 3, 4, dtype=torch.float16, device=device),
                 torch.ones(4, 3, 2, device=device)):
        with pytest.raises(RuntimeError, match="grad"):
            torch.ops.q2ext.fake_quant_backward(grad, *args.values(), [True, True, True])


@pytest.mark.parametrize("position,bad", [(0, 1.0), (1, 0.1), (1, None), (2, 1.0), (4, 1.5), (6, 1.5), (7, "a")])
def test_direct_op_wrong_argument_types(position, bad):
    """The dispatcher rejects values of the wrong type, naming the argument."""
    args = list(_fq_args().values())
    names = list(_fq_args())
    args[position] = bad
    with pytest.raises((RuntimeError, TypeError), match=names[position]):
        torch.ops.q2ext.fake_quant(*args)


def test_bad_cpu_isa_name():
    if not q2ext.has_compiled():
        with pytest.raises(RuntimeError, match="not built"):
            q2ext.set_cpu_isa("avx2")
        return
    before = q2ext.cpu_isa()
    for bad in ("sse2", "AVX2", "avx1024"):
        with pytest.raises(RuntimeError, match="unknown CPU ISA"):
            q2ext.set_cpu_isa(bad)
    assert q2ext.cpu_isa() == before
