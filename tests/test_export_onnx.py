"""q2ext.export_onnx: QDQ ONNX graph of a prepared model vs q2ext's fake-quant model.

Tolerances.  The oracle is the prepared model itself in eval mode (q2ext's fake quant,
whose kernels are tested against q2ext/reference.py elsewhere).  With power-of-two steps
(see _learned) QuantizeLinear's x / s equals q2ext's x * (1/s) bit for bit, so the only
difference left is onnxruntime's fp32 summation order: relative L2 error <= 1e-5
(measured ~1e-7; a wrong grid, clip, offset, sign or weight code costs >= 1e-2).
Whole networks are compared this way only: a quantized network is discontinuous, and a
single one-step flip in its first layer moves a random ResNet-18's logits by ~10 %, so an
end-to-end tolerance loose enough for flips would not catch much.  With arbitrary steps
(test_arbitrary_steps) the two divisions differ by an ulp now and then, which flips an
element by one step at an exact rounding tie; a single 8-bit layer allows a few of those.
"""
from collections import Counter

import copy

import pytest
import torch
import torch.nn as nn

import q2ext
from q2ext import nn as qnn
from q2ext import export_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx.numpy_helper")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-5


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=4, bias=False)
        self.up = nn.ConvTranspose2d(24, 8, 2, stride=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.silu(self.conv2(x))  # negative inputs for up: LSQ+ with an active offset
        return self.head(self.up(x).mean(dim=(2, 3)))


def _learned(model, x, seed=0, pow2=True):
    """Initialise the quantizers (and BN statistics) on x, then move every step off its init
    value as training would (quantizers that saw the same data no longer share a step).

    pow2: round every step to a power of two.  Then ONNX's QuantizeLinear (x / s) and
    q2ext's fake quant (x * (1/s)) round bit-identically, and what is left of the
    difference is the runtime's summation order (~1e-7 relative): the comparison isolates
    grid, clip, offset, sign and weights.  With arbitrary steps the two divisions differ
    by an ulp now and then, which flips an element by one step at an exact rounding tie.
    """
    for m in model.modules():  # BN running stats = this batch's (a calibrated, well-conditioned net)
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, qnn.Quantizer):
                continue
            qmax = 2 ** m.bits - 1 if isinstance(m, qnn.PACTQuantizer) else 1
            p = m.alpha if isinstance(m, qnn.PACTQuantizer) else m.scale
            p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            if pow2:
                p.copy_(torch.exp2(torch.round(torch.log2(p / qmax))) * qmax)
    return model.eval()


def _ort(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _float_out(model, x):
    with torch.no_grad():
        q2ext.nn.set_enabled(model, False)
        out = model(x)
        q2ext.nn.set_enabled(model, True)
    return out


def _distinct_activation_quants(model, x):
    """Activation fake quants that differ in input tensor or parameters (the exporter's
    common-subexpression pass merges two quantizers with equal steps reading one tensor)."""
    keys, alive, hooks = set(), [], []  # alive: no tensor is freed and its memory reused

    def hook(q, args):
        alive.append(args[0])
        keys.add((args[0].data_ptr(), type(q), q.bits, tuple(q.step_size().tolist())))

    for m in model.modules():
        if isinstance(m, qnn.Quantizer) and m.kind == "activation":
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return len(keys)


def _check(model, x, path, n_weight_dq, **export_kw):
    with torch.no_grad():
        want = model(x)
    proto = export_onnx(model, x, path, **export_kw)
    onnx.checker.check_model(str(path), full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    n_act = _distinct_activation_quants(model, x)
    n_other_w = sum(1 for m in model.modules() if isinstance(m, qnn.Quantizer) and m.kind == "weight") - n_weight_dq
    # one Q/DQ pair per activation quantization (and per float-stored weight), one DQ per int8 weight
    assert ops["QuantizeLinear"] == n_act + n_other_w
    assert ops["DequantizeLinear"] == n_act + n_other_w + n_weight_dq
    int8_inits = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(int8_inits) == n_weight_dq
    got = _ort(path, x)
    err = _rel(got, want)
    assert err <= TOL, err
    assert _rel(_float_out(model, x), want) > 20 * max(err, 1e-5)  # the graph really quantizes
    assert (got.argmax(1) == want.argmax(1)).all()
    return ops


LAYER_CASES = [  # (layer, QConfig fields): every grid and quantizer kind the export maps
    ("conv", dict(w_bits=8, a_bits=8, a_quantizer="lsq", a_signed=True)),
    ("conv", dict(w_bits=4, a_bits=4)),                              # LSQ+ with an active offset
    ("conv", dict(w_bits=2, a_bits=2, a_quantizer="lsq", a_signed=True)),
    ("conv", dict(w_bits=3, a_bits=5, a_quantizer="pact")),
    ("conv", dict(w_bits=4, a_bits=4, a_quantizer="lsq", a_per_channel=True, a_signed=True)),
    ("convT", dict(w_bits=4, a_bits=6, a_quantizer="lsq+")),         # weight via the generic Q/DQ path
    ("linear", dict(w_bits=4, a_bits=7, w_per_channel=False)),
]


def _layer(kind):
    layer = {"conv": nn.Conv2d(8, 16, 3, padding=1, groups=2), "convT": nn.ConvTranspose2d(8, 16, 2, stride=2),
             "linear": nn.Linear(32, 16)}[kind]
    x = torch.randn(4, 5, 32) if kind == "linear" else torch.randn(4, 8, 12, 12)
    return layer, x


@pytest.mark.parametrize("kind,fields", LAYER_CASES)
def test_single_layer(tmp_path, kind, fields):
    torch.manual_seed(0)
    layer, x = _layer(kind)
    qc = q2ext.QConfig(first_layer_bits=None, last_layer_bits=None, **fields)
    model = _learned(q2ext.prepare(layer, qc), x)
    with torch.no_grad():
        want = model(x)
    export_onnx(model, x, tmp_path / "layer.onnx")
    onnx.checker.check_model(str(tmp_path / "layer.onnx"), full_check=True)
    assert _rel(_ort(tmp_path / "layer.onnx", x), want) <= TOL


class _AffineFQ(nn.Module):
    """ATen-style affine fake quant (integer zero point) on a 4-bit unsigned grid."""

    def __init__(self, channels):
        super().__init__()
        self.axis = None if channels == 1 else 1
        self.scale = nn.Parameter(torch.exp2(torch.randint(-5, -2, (channels,)).float()))
        self.zero_point = nn.Parameter(torch.randint(0, 8, (channels,)).float() + 0.3)  # rounded to an int

    def forward(self, x):
        return q2ext.ops.fake_quant_affine(x, self.scale, self.zero_point, 0, 15, axis=self.axis)


@pytest.mark.parametrize("channels", [1, 16])
def test_affine_zero_point(tmp_path, channels):
    torch.manual_seed(3)
    layer, x = _layer("conv")
    model = _learned(q2ext.prepare(layer, q2ext.QConfig(w_bits=8, a_bits=8)), x)
    model = nn.Sequential(model, _AffineFQ(channels)).eval()
    with torch.no_grad():
        want = model(x)
    proto = export_onnx(model, x, tmp_path / "affine.onnx")
    assert Counter(n.op_type for n in proto.graph.node)["QuantizeLinear"] == 2
    assert _rel(_ort(tmp_path / "affine.onnx", x), want) <= TOL


def test_arbitrary_steps(tmp_path):
    """Steps that are not powers of two: only isolated one-step flips at rounding ties.  One
    flip among the 4608 inputs of this 8-bit layer moves the output by ~5e-4 relative."""
    torch.manual_seed(2)
    layer, x = _layer("conv")
    qc = q2ext.QConfig(w_bits=8, a_bits=8, a_quantizer="lsq", first_layer_bits=None, last_layer_bits=None)
    model = _learned(q2ext.prepare(layer, qc), x, pow2=False)
    assert float(torch.log2(model.input_quantizer.scale).frac().abs().min()) > 0
    with torch.no_grad():
        want = model(x)
    export_onnx(model, x, tmp_path / "layer.onnx")
    assert _rel(_ort(tmp_path / "layer.onnx", x), want) <= 2e-3


@pytest.mark.parametrize("bits", [8, 4])
def test_small_net(tmp_path, bits):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    qc = q2ext.QConfig(w_bits=bits, a_bits=bits, first_layer_bits=None, last_layer_bits=None,
                       overrides={"conv2": {"a_quantizer": "pact"}})
    model = _learned(q2ext.prepare(SmallNet(), qc), x)
    assert model.up.input_quantizer.offset_active  # silu output goes negative
    ops = _check(model, x, tmp_path / "small.onnx", n_weight_dq=3)  # conv1, conv2, head; up stays float + Q/DQ
    assert ops["Sub"] >= 1  # the LSQ+ offset
    assert ops["Clip"] + ops["Max"] == (0 if bits == 8 else 4)  # narrowed ranges only


def test_dynamic_batch(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16)
    model = _learned(q2ext.prepare(SmallNet(), q2ext.QConfig(w_bits=8, a_bits=8)), x)
    export_onnx(model, x[:1], tmp_path / "dyn.onnx", dynamic_batch=True)
    with torch.no_grad():
        want = model(x)
    assert _rel(_ort(tmp_path / "dyn.onnx", x), want) <= TOL


@pytest.mark.parametrize("bits", [8, 4])
def test_resnet18(tmp_path, bits):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    model = _learned(q2ext.prepare(tv.models.resnet18(weights=None), q2ext.QConfig(w_bits=bits, a_bits=bits)), x)
    _check(model, x[:2], tmp_path / f"r18_w{bits}.onnx", n_weight_dq=21)
    proto = onnx.load(str(tmp_path / f"r18_w{bits}.onnx"))
    n_float = sum(onnx.numpy_helper.to_array(i).size for i in proto.graph.initializer
                  if i.data_type == onnx.TensorProto.FLOAT)
    assert n_float < 100_000  # the 11.7 M weights are stored as int8 codes only, not also in float


def test_calibrated_gbfusion(tmp_path):
    """A Q-GBFusion node with calibrated constants exports as float ops between Q/DQ pairs."""
    import warnings

    from helpers import TinyUNet

    torch.manual_seed(5)
    x = torch.randn(4, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the root module itself is rewritten
        net = q2ext.insert_gbfusion(TinyUNet(), example_inputs=(x,)).model
    model = _learned(q2ext.prepare(net, q2ext.QConfig(w_bits=4, a_bits=4)), x)
    with pytest.raises(ValueError, match="calibrate_gbfusion"):
        export_onnx(model, x, tmp_path / "gbf.onnx", gbfusion="fold")
    live = copy.deepcopy(model)
    q2ext.calibrate_gbfusion(model, [x])
    _check(model, x, tmp_path / "gbf.onnx", n_weight_dq=4, gbfusion="fold")
    # gbfusion="keep" (the default): the node as trained (per-pixel LayerNorm) in ONNX ops
    ops = _check(live, x, tmp_path / "gbf_keep.onnx", n_weight_dq=4)
    assert ops["ReduceMean"] >= 2 and ops["Sqrt"] + ops.get("Rsqrt", 0) + ops["Reciprocal"] >= 1
    with pytest.raises(ValueError, match="gbfusion must be 'fold' or 'keep'"):
        export_onnx(live, x, tmp_path / "bad.onnx", gbfusion="none")


def test_bad_inputs(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="q2ext.prepare"):
        export_onnx(SmallNet(), x, tmp_path / "float.onnx")
    model = q2ext.prepare(SmallNet(), q2ext.QConfig(w_bits=8, a_bits=8))
    with pytest.raises(ValueError, match="not initialised"):
        export_onnx(model, x, tmp_path / "uninit.onnx")
    model = _learned(model, torch.randn(2, 3, 16, 16))
    with pytest.raises(OSError, match="path"):
        export_onnx(model, x, tmp_path / "missing_dir" / "m.onnx")
    with pytest.raises(OSError, match="path"):
        export_onnx(model, x, tmp_path)  # a directory
    assert not (tmp_path / "float.onnx").exists() and not (tmp_path / "uninit.onnx").exists()
