"""`q2ext demo` (issue #5): the quick run end to end, the data generator, CLI errors, `q2ext report`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("torchmetrics")
pytest.importorskip("tqdm")

from q2ext.cli import main  # noqa: E402
from q2ext.demo.data import NUM_CLASSES, ShapesConfig, generate, make_splits  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, env=None, timeout=120):
    """Run `python -m q2ext ...` in a subprocess (exit codes and stderr as a user sees them)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "q2ext", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    cache = tmp_path_factory.mktemp("cache")  # CI runs never share an FP32 cache
    proc = _cli("demo", "--quick", "--out", str(out), "--no-progress", env={"Q2EXT_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cache, proc


def _numbers(obj):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def test_quick_demo_writes_json_pngs_and_models(quick_run):
    out, cache, proc = quick_run
    results = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(x) for x in _numbers(results))
    summary = results["summary"]
    assert set(summary) == {"fp32", "qat", "qat+gbf", "qat+gbf+ada", "fp32+gbf"}
    for row in summary.values():
        assert 0 <= row["mdice_mean"] <= 100 and row["balance_ratio"] >= 1
    run = results["seeds"]["0"]["qat+gbf"]
    assert len(run["mdice"]) == len(run["steps"]) == run["epochs_run"] + 1
    assert len(run["energy"]) == run["epochs_run"] and all(g > 0 for node in run["energy"][0] for g in node)
    for name in ("val_curves.png", "gradient_energy.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "| variant |" in proc.stdout and "Q-GBFusion" in proc.stdout
    assert sorted(p.name for p in (out / "models").iterdir()) == [
        "fp32_gbf_seed0.pt", "qat_gbf_ada_seed0.pt", "qat_gbf_seed0.pt", "qat_seed0.pt"]
    assert len(list((cache / "demo").glob("fp32_seed0_*.pt"))) == 1  # the FP32 checkpoint is cached


def test_quick_demo_deployment_check(quick_run):
    """#6: the W8A8 model converted to int8 predicts what the fake-quant model it implements
    (frozen fusion constants) predicts, pixel for pixel (>= 99 %), and the report says so."""
    out, _, proc = quick_run
    dep = json.loads((out / "results.json").read_text())["deploy"]
    assert dep["bits"] == 8 and dep["seed"] == 0 and dep["int8_layers"] > 0
    assert dep["agreement"] >= 99.0, dep
    assert dep["agreement_keep"] >= 99.0, dep
    assert abs(dep["mdice_int8"] - dep["mdice_fake_quant"]) <= 1.0, dep
    assert abs(dep["mdice_int8_keep"] - dep["mdice_qat"]) <= 1.0, dep
    for k in ("mdice_qat", "mdice_fake_quant", "mdice_int8", "agreement_vs_qat", "mdice_int8_keep"):
        assert 0.0 <= dep[k] <= 100.0
    assert "Deployment check (W8A8" in proc.stdout and 'gbfusion="keep"' in proc.stdout


def test_report_on_a_demo_checkpoint(quick_run, capsys):
    out, _, _ = quick_run
    assert main(["report", str(out / "models" / "qat_gbf_seed0.pt")]) == 0
    text = capsys.readouterr().out
    assert "quantized layers" in text and "balance ratio" in text and "gbfusion_0" in text
    assert main(["report", str(out / "models" / "qat_seed0.pt")]) == 0
    assert "no GBFusion node" in capsys.readouterr().out


def test_report_bad_checkpoint(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.pt")]) == 2
    assert "CHECKPOINT" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["report", str(bad)]) == 2
    assert "cannot load CHECKPOINT" in capsys.readouterr().err
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(1)}, state)
    assert main(["report", str(state)]) == 2
    assert "not a model" in capsys.readouterr().err


def test_generator_is_deterministic_per_seed():
    cfg = ShapesConfig(size=16)
    x1, y1 = generate(6, seed=3, cfg=cfg)
    x2, y2 = generate(6, seed=3, cfg=cfg)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = generate(6, seed=4, cfg=cfg)
    assert not torch.equal(x1, x3)
    assert x1.shape == (6, 3, 16, 16) and x1.dtype == torch.float32
    assert y1.shape == (6, 16, 16) and y1.dtype == torch.int64
    xt, yt, xv, yv = make_splits(8, 4, seed=0, cfg=cfg)
    assert xt.shape[0] == 8 and xv.shape[0] == 4 and not torch.equal(xt[:4], xv)


def test_masks_match_images():
    # Without pixel noise, an image equals its background exactly where the mask says
    # background, and differs from it where a shape was drawn.
    cfg = ShapesConfig(size=24, noise=0.0)
    images, masks, background = generate(12, seed=0, cfg=cfg, return_background=True)
    assert int(masks.min()) >= 0 and int(masks.max()) < NUM_CLASSES
    bg = (masks == 0).unsqueeze(1).expand_as(images)
    assert torch.equal(images[bg], background[bg])
    fg = (masks > 0)
    changed = (images - background).abs().amax(1) > 1e-6
    assert fg.any() and changed[fg].float().mean() > 0.95
    assert set(masks.unique().tolist()) == set(range(NUM_CLASSES))


@pytest.mark.parametrize("args, option", [
    (["--quantizer", "foo"], "--quantizer"),
    (["--bits", "1"], "--bits"),
    (["--bits", "9"], "--bits"),
    (["--seeds", "0"], "--seeds"),
])
def test_cli_bad_options(args, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        code = main(["demo", "--quick", "--out", str(tmp_path / "o"), *args])
        raise SystemExit(code)
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_cli_unwritable_out_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _cli("demo", "--quick", "--out", str(blocker / "sub"), env={"Q2EXT_CACHE_DIR": str(tmp_path / "c")},
                timeout=60)
    assert proc.returncode == 2 and "--out" in proc.stderr
    assert not (tmp_path / "c").exists()  # nothing was trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_cuda_without_cuda(tmp_path, capsys):
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cuda" in capsys.readouterr().err
