"""q2ext.prepare on unmodified torchvision / timm / segmentation-models-pytorch models,
QConfig resolution (first/last bits, skip, overrides) and bad input."""
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision
from torch import nn

import q2ext
from q2ext.nn import LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, QuantConv2d, QuantLinear, Quantizer

tv = torchvision.models


def _images(n, size):
    return [torch.rand(3, size, size) for _ in range(n)]


def _det_targets(n, size):
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]])
    return [{"boxes": boxes[: 1 + i % 2].clamp(max=size - 1), "labels": torch.tensor([1, 2])[: 1 + i % 2]}
            for i in range(n)]


def _cls_loss(model):
    x = torch.randn(2, 3, 32, 32)
    return nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))


def _det_loss(model):
    losses = model(_images(2, 64), _det_targets(2, 64))
    return sum(losses.values())


def _seg_loss(model, size=64):
    out = model(torch.randn(2, 3, size, size))
    out = out["out"] if isinstance(out, dict) else out
    return nn.functional.cross_entropy(out, torch.randint(0, out.shape[1], (2, size, size)))


MODELS = {
    "resnet18": (lambda: tv.resnet18(num_classes=10), _cls_loss),
    "mobilenet_v3_large": (lambda: tv.mobilenet_v3_large(num_classes=10), _cls_loss),
    "retinanet_resnet50_fpn": (lambda: tv.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64), _det_loss),
    "fcos_resnet50_fpn": (lambda: tv.detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64), _det_loss),
    "deeplabv3_mobilenet_v3_large": (lambda: tv.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4), _seg_loss),
    "lraspp_mobilenet_v3_large": (lambda: tv.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4), _seg_loss),
    "smp_unet": (lambda: smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=3), _seg_loss),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=10),
                             _cls_loss),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_prepared_model_trains(name):
    torch.manual_seed(0)
    build, loss_fn = MODELS[name]
    float_model = build().train()
    n_layers = sum(type(m) in (nn.Conv2d, nn.Linear, nn.ConvTranspose2d) for m in float_model.modules())
    model = q2ext.prepare(float_model, inplace=True)
    quant_layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(quant_layers) == n_layers > 0
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    before = {id(p): p.detach().clone() for p in params}

    loss = loss_fn(model)
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    frozen = []
    for qname, q in q2ext.nn.quantizers(model):
        assert q.is_initialized, qname
        learned = q.alpha if isinstance(q, PACTQuantizer) else q.scale
        if not learned.requires_grad:
            frozen.append(q)
            continue
        assert learned.grad is not None and torch.isfinite(learned.grad).all(), qname
    # Only the network input's step is frozen (QConfig.freeze_network_input).
    assert frozen == [quant_layers[0].input_quantizer] and frozen[0].scale.grad is None
    # The step size of most layers actually receives signal (not all-zero gradients).
    nonzero = [q.scale.grad.abs().sum() > 0 for _, q in q2ext.nn.quantizers(model) if q not in frozen]
    assert sum(nonzero) >= 0.9 * len(nonzero)
    opt.step()
    # Inactive LSQ+ offsets (non-negative inputs) get exact zero gradients and stay at 0.
    signal = [p for p in params if p.grad is not None and p.grad.abs().sum() > 0]
    changed = sum(not torch.equal(p.detach(), before[id(p)]) for p in signal)
    assert len(signal) >= 0.7 * len(params) and changed == len(signal)
    first, last = quant_layers[0], quant_layers[-1]
    assert first.weight_quantizer.bits == 8 and first.input_quantizer.bits == 8
    assert last.weight_quantizer.bits == 8 and all(m.weight_quantizer.bits == 4 for m in quant_layers[1:-1])


def test_summary_lists_every_quantized_layer():
    model = q2ext.prepare(tv.resnet18(num_classes=10))
    model(torch.randn(2, 3, 32, 32))
    text = q2ext.summary(model)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "type", "w"]
    assert len(lines) == 2 + 21 + 1 and lines[-1] == "21 quantized layers"
    conv1 = next(line for line in lines if line.startswith("conv1 "))
    assert "QuantConv2d" in conv1 and " 8 " in conv1 and "per-channel(64)" in conv1 and "LSQ+" in conv1
    assert "(frozen)" in conv1 and "(frozen)" not in lines[3]
    l1 = next(line for line in lines if line.startswith("layer1.0.conv1 "))
    assert "LSQ unsigned" in l1 and "per-tensor" in l1
    s = model.layer1[0].conv1.input_quantizer.scale.item()
    assert f"{s:.3g}" in l1
    assert "uninitialised" in q2ext.summary(q2ext.prepare(tv.resnet18()))
    assert "no quantized layer" in q2ext.summary(tv.resnet18())


# ------------------------------------------------------------------------ QConfig resolution

def _bits(model):
    return {n: (m.weight_quantizer.bits, m.input_quantizer.bits if isinstance(m.input_quantizer, Quantizer)
                else None) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def test_first_last_skip_overrides_and_precedence():
    base = tv.resnet18(num_classes=10)
    qc = q2ext.QConfig(
        w_bits=3, a_bits=4, first_layer_bits=6, last_layer_bits=None,
        skip=["layer4.1.*", nn.Linear],
        overrides={"layer1.*": {"w_bits": 2, "a_quantizer": "pact"}, "layer1.1.conv2": {"w_bits": 5},
                   "conv1": {"a_quantizer": "none"}, "layer2": {"w_per_channel": False, "a_quantizer": "lsq+"}},
    )
    model = q2ext.prepare(base, qc)
    bits = _bits(model)
    assert bits["conv1"] == (6, None)  # first-layer bits, input left float by the override
    assert bits["layer1.0.conv1"] == (2, 4) and isinstance(model.layer1[0].conv1.input_quantizer, PACTQuantizer)
    assert bits["layer1.1.conv2"] == (5, 4)  # the later override wins
    assert bits["layer3.0.conv1"] == (3, 4)
    assert "layer4.1.conv1" not in bits and type(model.layer4[1].conv1) is nn.Conv2d
    assert type(model.fc) is nn.Linear
    l2 = model.layer2[0].conv1
    assert l2.weight_quantizer.axis is None and isinstance(l2.input_quantizer, LSQPlusQuantizer)
    assert l2.input_quantizer.offset_mode == "learn"
    assert type(base.conv1) is nn.Conv2d  # inplace=False left the original alone


def test_network_input_step_frozen_by_default_and_configurable():
    x = torch.randn(2, 3, 16, 16)
    for qc, learn in ((q2ext.QConfig(), False), (q2ext.QConfig(freeze_network_input=False), True),
                      (q2ext.QConfig(overrides={"conv1": {"a_learnable": True}}), True)):
        model = q2ext.prepare(tv.resnet18(num_classes=10), qc)
        q = model.conv1.input_quantizer
        assert q.scale.requires_grad == q.offset.requires_grad == learn
        assert model.layer1[0].conv1.input_quantizer.scale.requires_grad
        model(x).sum().backward()
        assert q.is_initialized and (q.scale.grad is not None) == learn


def test_type_patterns_and_ancestor_globs():
    model = tv.mobilenet_v3_large(num_classes=10)
    se = torchvision.ops.misc.SqueezeExcitation
    qm = q2ext.prepare(model, q2ext.QConfig(skip=[se], overrides={"features.1*": {"a_bits": 2},
                                                                    nn.Linear: {"w_bits": 6}}))
    for n, m in qm.named_modules():
        if isinstance(m, se):
            assert type(m.fc1) is nn.Conv2d and type(m.fc2) is nn.Conv2d, n
    assert qm.features[1].block[0][0].input_quantizer.bits == 2
    assert qm.features[10].block[0][0].input_quantizer.bits == 2  # "features.1*" also matches features.10
    assert qm.features[2].block[0][0].input_quantizer.bits == 4
    assert qm.classifier[0].weight_quantizer.bits == 6 and qm.classifier[3].weight_quantizer.bits == 6


def test_shared_module_stays_shared_and_bare_layer():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.ReLU(), shared)
    qm = q2ext.prepare(model)
    assert qm[1] is qm[3] and isinstance(qm[1], QuantConv2d)
    qm(torch.randn(1, 3, 5, 5)).sum().backward()
    layer = q2ext.prepare(nn.Linear(3, 2))
    assert isinstance(layer, QuantLinear)


def test_quantizers_follow_model_dtype_conventions():
    qm = q2ext.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    qs = q2ext.nn.quantizers(qm)
    assert [type(q) for _, q in qs] == [LSQQuantizer, LSQPlusQuantizer, LSQQuantizer, LSQPlusQuantizer]
    assert all(q.scale.dtype == torch.float32 for _, q in qs)
    qm = qm.to(torch.bfloat16)  # .to() converts the scales; the quantizers cast them back
    y = qm(torch.randn(1, 3, 6, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# ------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(w_bits=1), r"QConfig.w_bits must be an int in 2..8, got 1"),
    (dict(a_bits=16), r"QConfig.a_bits"),
    (dict(first_layer_bits=0), r"QConfig.first_layer_bits"),
    (dict(a_quantizer="minmax"), r"QConfig.a_quantizer must be one of"),
    (dict(overrides={"layer1.*": {"bits": 4}}), r"overrides\['layer1.\*'\]: unknown field\(s\) \['bits'\]"),
    (dict(overrides={"layer1.*": {"w_bits": 12}}), r"overrides\['layer1.\*'\].w_bits"),
    (dict(skip=[3]), r"QConfig.skip: a pattern must be"),
])
def test_bad_qconfig(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        q2ext.QConfig(**kwargs)


def test_unknown_patterns_are_listed():
    with pytest.raises(ValueError) as err:
        q2ext.prepare(tv.resnet18(), q2ext.QConfig(skip=["layer9.*"], overrides={"layer1.*": {"w_bits": 2},
                                                                                "lyer2*": {"a_bits": 2},
                                                                                nn.ConvTranspose2d: {}}))
    msg = str(err.value)
    assert "skip: ['layer9.*']" in msg and "'lyer2*'" in msg and "torch.nn.modules.conv.ConvTranspose2d" in msg
    assert "'layer1.*'" not in msg and "Quantizable layers: conv1, layer1.0.conv1" in msg


def test_nothing_to_quantize_warns_and_returns_model_unchanged():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no layer q2ext can quantize"):
        out = q2ext.prepare(model)
    assert out is model and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.warns(UserWarning, match="every quantizable layer is in QConfig.skip"):
        assert q2ext.prepare(nn.Sequential(nn.Linear(2, 2)), q2ext.QConfig(skip=["*"])) is not None


def test_already_prepared_is_an_error():
    qm = q2ext.prepare(tv.resnet18())
    with pytest.raises(ValueError, match="already prepared \\(QuantConv2d at 'conv1'\\)"):
        q2ext.prepare(qm)


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3).double())
    with pytest.raises(TypeError, match=r"layer '1' \(Conv2d\): weight dtype torch.float64 is not supported"):
        q2ext.prepare(model)
    with pytest.raises(ValueError, match=r"layer '0' \(LazyConv2d\): weight is not materialised"):
        q2ext.prepare(nn.Sequential(nn.LazyConv2d(4, 3)))
    normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match=r"layer '0' \(ParametrizedLinear\): weight is computed"):
        q2ext.prepare(normed)

    class SameConv(nn.Conv2d):  # custom forward: swapping would change what it computes
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    model = nn.Sequential(SameConv(3, 4, 3), nn.Flatten(2), nn.Unflatten(2, (1, -1)))
    with pytest.warns(UserWarning, match=r"left in float \(not supported\): 0.0: SameConv overrides forward"):
        q2ext.prepare(nn.Sequential(model, nn.Conv2d(4, 4, 1)))
    with pytest.warns(UserWarning, match="self_attn.out_proj: an nn.MultiheadAttention projection"):
        qenc = q2ext.prepare(enc)
    assert isinstance(qenc.linear1, QuantLinear) and type(qenc.self_attn.out_proj) is not QuantLinear
    qenc(torch.randn(2, 3, 8)).sum().backward()
