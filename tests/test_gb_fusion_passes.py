"""insert_gbfusion on real models, fold_gbfusion algebra, and the explicit-name fallback."""
import copy
import os
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

import q2ext
from q2ext.nn import FixedFusion
from q2ext.nn import GBFusion

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from yolo_pan_neck import YoloPAN  # noqa: E402


def _gbf(model):
    return [n for n, m in model.named_modules() if isinstance(m, GBFusion)]


def _train_steps(model, x, steps=3):
    model.train()
    for i in range(steps):
        out = model(x * (1 + i))
        outs = out if isinstance(out, (list, tuple)) else [out]
        sum((o * torch.linspace(-1, 3, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in outs).backward()


def test_pan_neck_insertion_skips_backbone_blocks():
    torch.manual_seed(0)
    model = YoloPAN(w=8)
    x = torch.randn(2, 3, 64, 64)
    ref = [o.detach() for o in model.eval()(x)]
    report = q2ext.insert_gbfusion(model, example_inputs=(x,))
    assert report.model is model and len(report) == 4
    assert sorted(r["name"] for r in report.inserted) == [f"neck.gbfusion_{i}" for i in range(4)]
    assert all(r["mode"] == "concat" and r["branches"] == 2 for r in report.inserted)
    # C3 concats of the neck blocks are not fusion nodes; the backbone was never rewritten
    assert any("residual/backbone" in s["reason"] for s in report.skipped)
    assert type(model.backbone).__name__ == "Backbone" and type(model.backbone.s5[2]).__name__ == "SPPF"
    out = model.eval()(x)
    assert [o.shape for o in out] == [o.shape for o in ref]
    # without example inputs the heuristics (strides, upsample modules) find the same nodes
    assert len(q2ext.insert_gbfusion(YoloPAN(w=8))) == 4


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
def test_torchvision_fpn_detectors(name):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, min_size=96,
                                                        max_size=96).eval()
    x = [torch.rand(3, 96, 96)]
    report = q2ext.insert_gbfusion(model, example_inputs=(x,))
    # C3..C5 -> two top-down adds; the ResNet residual adds stay untouched
    assert len(report) == 2 and all(r["mode"] == "add" for r in report.inserted)
    assert _gbf(model) == ["backbone.fpn.gbfusion_0", "backbone.fpn.gbfusion_1"]
    assert type(model.backbone.body).__name__ == "IntermediateLayerGetter"
    with torch.no_grad():
        det = model(x)
    assert len(det) == 1 and "boxes" in det[0]


def test_smp_unet_decoder():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2)
    x = torch.randn(1, 3, 64, 64)
    report = q2ext.insert_gbfusion(model, example_inputs=(x,))
    assert len(report) == 4 and all(r["name"].startswith("decoder.") for r in report.inserted)
    assert type(model).__name__ == "Unet" and type(model.encoder).__name__ == "ResNetEncoder"
    model.train()
    model(x).sin().mean().backward()
    assert all(m.g_ema.min() > 0 for m in model.modules() if isinstance(m, GBFusion))


class _Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, 2, 1)
        self.fuse, self.head = _Concat(), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if x.mean() > 100:  # data-dependent control flow: fx cannot trace this module
            x = x / 2
        up = nn.functional.interpolate(self.b(x), size=x.shape[-2:])
        return self.head(self.fuse([self.a(x), up]))


def test_explicit_names_fallback():
    m = _Untraceable()
    report = q2ext.insert_gbfusion(m)
    assert len(report) == 0 and report.failed[0]["module"] == "<root>"
    x = torch.randn(1, 3, 8, 8)
    report = q2ext.insert_gbfusion(m, example_inputs=(x,), names=["fuse"])
    assert len(report) == 1 and _gbf(m) == ["fuse.gbfusion_0"]
    assert m(x).shape == (1, 2, 8, 8)
    # "path:node" picks single nodes, also ones the heuristic rejects (a C3 concat here)
    pan = YoloPAN(w=8)
    report = q2ext.insert_gbfusion(pan, names=["neck:cat_1"])
    assert [r["node"] for r in report.inserted] == ["cat_1"]
    with pytest.raises(ValueError, match="no concat/add node"):
        q2ext.insert_gbfusion(YoloPAN(w=8), names=["neck:nonexistent"])
    with pytest.raises(RuntimeError, match="cannot trace module ''"):
        q2ext.insert_gbfusion(_Untraceable(), names=[""])


def _max_rel(a, b):
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


def test_fold_algebra_is_exact_into_1x1_convs():
    torch.manual_seed(0)
    model = YoloPAN(w=8).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    q2ext.insert_gbfusion(model, example_inputs=(x,))
    _train_steps(model, x)
    assert all(model.get_submodule(n).lam.abs().max() > 0 for n in _gbf(model))
    original = copy.deepcopy(model).eval()
    calib = [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(3)]
    q2ext.calibrate_gbfusion(model, calib)                  # unfolded, LN -> constants
    folded = copy.deepcopy(model)
    rows = q2ext.fold_gbfusion(folded, fold_shift="bias")   # Eq. 12
    assert len(rows) == 4 and all(r["exact"] and len(r["folded_into"]) == 2 for r in rows)  # C3's cv1 and cv2
    assert not _gbf(folded) and all(isinstance(folded.get_submodule(r["name"]), FixedFusion) for r in rows)
    model.eval()
    folded.eval()
    with torch.no_grad():
        want, got, orig = model(x), folded(x), original(x)
    assert _max_rel(got, want) < 1e-12
    # end-to-end: folded constants vs the per-pixel LayerNorm it replaces (random weights, no fine-tune)
    drift = _max_rel(got, orig)
    assert 0 < drift < 1.0, drift


def test_fold_padded_convs_and_constant_affine():
    smp = pytest.importorskip("segmentation_models_pytorch")
    import torchvision

    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, classes=2).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    q2ext.insert_gbfusion(unet, example_inputs=(x,))
    _train_steps(unet, x, steps=2)
    q2ext.calibrate_gbfusion(unet, [x, x.flip(-1)])
    keep, bias = copy.deepcopy(unet), copy.deepcopy(unet)
    rows_keep = q2ext.fold_gbfusion(keep, fold_shift="keep")
    rows_bias = q2ext.fold_gbfusion(bias, fold_shift="bias")
    assert all(r["exact"] for r in rows_keep) and not any(r["exact"] for r in rows_bias)  # 3x3, zero padding
    unet.eval(), keep.eval(), bias.eval()
    with torch.no_grad():
        want = unet(x)
        assert _max_rel(keep(x), want) < 1e-12
        assert _max_rel(bias(x), want) > 1e-9  # the borders see the un-shifted zero padding

    # torchvision's FPN on its own
    fpn = torchvision.ops.FeaturePyramidNetwork([8, 16, 32], 16).double()
    feats = OrderedDict((str(i), torch.randn(2, c, s, s, dtype=torch.float64))
                        for i, (c, s) in enumerate([(8, 32), (16, 16), (32, 8)]))
    with pytest.warns(UserWarning, match="root"):
        report = q2ext.insert_gbfusion(fpn, example_inputs=(feats,))
    fpn = report.model  # the root itself was the unit
    assert len(report) == 2
    q2ext.calibrate_gbfusion(fpn, [(feats,)])
    folded = copy.deepcopy(fpn)
    rows = q2ext.fold_gbfusion(folded, fold_shift="keep")
    # the coarser add also feeds the next top-down interpolate: constant affine; the finest
    # one only feeds its 3x3 layer block: folded
    assert sorted(len(r["folded_into"]) for r in rows) == [0, 1]
    with torch.no_grad():
        assert _max_rel(list(folded(feats).values()), list(fpn(feats).values())) < 1e-12


def test_fold_requires_calibration():
    model = YoloPAN(w=8)
    with pytest.raises(ValueError, match="no GBFusion"):
        q2ext.fold_gbfusion(model, [torch.randn(1, 3, 64, 64)])
    q2ext.insert_gbfusion(model)
    with pytest.raises(ValueError, match="calibrated"):
        q2ext.fold_gbfusion(model)
    with pytest.raises(ValueError, match="fold_shift"):
        q2ext.fold_gbfusion(model, fold_shift="nope")
