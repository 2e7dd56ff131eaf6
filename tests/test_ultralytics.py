"""Q² on a real Ultralytics YOLO (python/recipes/ultralytics_yolo.py): Q-GBFusion at the PAN
concats, W4A4, a training step with YOLO's own loss, q2ext.convert and q2ext.export_onnx.
Skipped when ultralytics is not installed (a test dependency, pinned in .ci/requirements.txt)."""
import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
pytest.importorskip("ultralytics")

import q2ext  # noqa: E402
from q2ext.nn import GBFusion  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "python" / "recipes" / "ultralytics_yolo.py"
_spec = importlib.util.spec_from_file_location("ultralytics_yolo_recipe", RECIPE)
yolo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(yolo)

IMGSZ = 64


@pytest.fixture(scope="module")
def trained():
    """yolov8n from its yaml, GBFusion at the 4 PAN concats, W4A4, two training steps."""
    model, report = yolo.prepare_qat("yolov8n.yaml", nc=3, imgsz=IMGSZ)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    items = [yolo.train_step(model, yolo.synthetic_batch(imgsz=IMGSZ, seed=s), opt) for s in range(2)]
    return model.eval(), report, items


def test_gbfusion_at_the_pan_concats_and_a_training_step(trained):
    model, report, items = trained
    assert len(report) == 4
    nodes = [m for m in model.modules() if isinstance(m, GBFusion)]
    assert len(nodes) == 4 and all(float(n.lam.abs().max()) > 0 for n in nodes)  # the controller moved
    assert all(torch.isfinite(v).all() for it in items for v in it.values())
    qs = q2ext.nn.quantizers(model)
    assert len(qs) > 100 and all(q.is_initialized for _, q in qs)
    assert "model.22.dfl.conv" not in q2ext.summary(model)  # the fixed DFL conv stays float
    # every conv of the backbone, neck and head is quantized
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    quant = [n for n, m in model.named_modules() if isinstance(m, q2ext.nn.QuantConv2d)]
    assert set(convs) - set(quant) == {"model.22.dfl.conv"}


def test_export_onnx_runs_in_onnxruntime(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = copy.deepcopy(trained[0])
    calib = [yolo.synthetic_batch(imgsz=IMGSZ, seed=100 + i)["img"] for i in range(2)]
    q2ext.calibrate_gbfusion(model, calib)
    x = calib[0][:1]
    path = tmp_path / "yolo.onnx"
    q2ext.export_onnx(model, x, path)
    sess = ort.InferenceSession(str(path))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x)[0]
    # Boxes in pixels and class scores: one 4-bit step moved by float reassociation in
    # onnxruntime shifts a few outputs a little; a wrong graph moves everything.
    diff = (torch.from_numpy(got) - want).abs()
    assert got.shape == tuple(want.shape)
    assert float(diff.mean()) < 1e-2 * float(want.abs().mean()), float(diff.max())


def _convert_and_check(model):
    """The default convert (Q-GBFusion nodes kept) implements the fake-quant model."""
    x = yolo.synthetic_batch(imgsz=IMGSZ, seed=100)["img"]
    int_model = q2ext.convert(model)
    assert sum(isinstance(m, q2ext.nn.Int8Conv2d) for m in int_model.modules()) > 50
    with torch.no_grad():
        got, want = int_model(x)[0], model(x)[0]
    assert float((got - want).abs().mean()) < 1e-2 * float(want.abs().mean())


def test_convert_default_config(trained):
    """The default a_quantizer="auto" gives LSQ+ (a learned offset) where YOLO's SiLU goes
    negative: the asymmetric int8 path."""
    _convert_and_check(copy.deepcopy(trained[0]))


def test_convert_symmetric_activations():
    cfg = q2ext.QConfig(w_bits=4, a_bits=4, a_quantizer="lsq", skip=("model.*.dfl",))
    model, _ = yolo.prepare_qat("yolov8n.yaml", nc=3, imgsz=IMGSZ, qconfig=cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    yolo.train_step(model, yolo.synthetic_batch(imgsz=IMGSZ), opt)
    _convert_and_check(model.eval())
