"""`q2ext demo`: the quick run end to end, the ultrasound generator, the statistics, CLI errors,
`q2ext report` on a demo checkpoint."""
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
from q2ext.demo.config import TASK_CHOICES, TASKS, DemoConfig  # noqa: E402
from q2ext.demo.seg.data import NUM_CLASSES, UltrasoundConfig, generate  # noqa: E402
from q2ext.demo.seg.task import SegTask  # noqa: E402
from q2ext.demo.stats import area_under_curve, ema, paired, steps_to_reach  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]
ARMS = ("E", "A", "B", "C", "G")


def _cli(*args, env=None, timeout=180):
    """Run `python -m q2ext ...` in a subprocess (exit codes and stderr as a user sees them)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "q2ext", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module", params=["seg", "det"])
def quick_run(request, tmp_path_factory):
    task = request.param
    out = tmp_path_factory.mktemp("demo") / "out"
    cache = tmp_path_factory.mktemp("cache")  # CI runs never share an FP32 cache
    args = ["--task", task] if task != "seg" else []  # seg: the default
    proc = _cli("demo", "--quick", *args, "--out", str(out), "--no-progress", env={"Q2EXT_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cache, proc, task


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_demo_results_keys(quick_run):
    out, cache, proc, task = quick_run
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["task"] == task and res["config"]["bits"] == 3 and res["config"]["data_seed"] == 1234
    assert _finite(res["wall_seconds"]) and res["wall_seconds"] > 0
    for arm in ARMS:
        row = res["summary"][arm]
        assert _finite(row["score_mean"]) and 0 <= row["score_mean"] <= 100
        assert len(row["score_per_seed"]) == 1 and all(_finite(s) for s in row["score_per_seed"])
        assert _finite(res["premise"][arm]["balance_ratio"]) and res["premise"][arm]["balance_ratio"] >= 1
    for key in ("B-A", "C-B", "C-G", "E-A", "B-G"):
        p = res["paired"][key]
        assert _finite(p["mean"]) and _finite(p["std"]) and len(p["per_seed"]) == 1
        a, b = key.split("-")
        assert p["per_seed"][0] == pytest.approx(res["summary"][a]["score_per_seed"][0]
                                                 - res["summary"][b]["score_per_seed"][0])
    run = res["seeds"]["0"]["B"]
    assert len(run["val"]) == len(run["steps"]) == len(run["alpha"]) == len(run["energy"]) + 1
    assert all(g > 0 for node in run["energy"][0] for g in node)
    # one activation-quantizer policy: the conv after each LN node reads a full-range LSQ+ grid
    grids = res["seeds"]["0"]["grids"]
    assert all(g.startswith("LSQ+ 8 levels") for arm in ("A", "B", "C") for g in grids[arm].values())
    assert all(g == "unsigned LSQ 8 levels" for g in grids["G"].values())
    for name in ("val_curves.png", "gradient_energy.png", "alpha.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "| paired delta (test) |" in proc.stdout and "wall time" in proc.stdout
    assert sorted(p.name for p in (out / "models").iterdir()) == [f"arm{a}_seed0.pt" for a in sorted(ARMS)]
    cached = sorted(p.name.split("_")[1] for p in (cache / "demo").glob(f"{task}_*.pt"))
    assert cached == ["fp32", "fp32ln"]  # both FP32 checkpoints are cached


def test_quick_demo_same_batches_and_start(quick_run):
    """Every QAT arm of a seed starts from the same FP32-LN checkpoint: A and B are identical
    until the controller has moved alpha, so their first validation point agrees."""
    out, _, _, _ = quick_run
    runs = json.loads((out / "results.json").read_text())["seeds"]["0"]
    assert runs["A"]["val"][0] == runs["B"]["val"][0] == runs["C"]["val"][0]
    assert runs["A"]["alpha"][-1] == [[0.5, 0.5]] * len(runs["node_names"])  # frozen uniform
    assert runs["B"]["alpha"][-1] != runs["A"]["alpha"][-1]  # the closed loop moved


def test_quick_demo_deployment_check(quick_run):
    """Every int8 model predicts what the fake-quant model it implements predicts (class
    argmax per pixel or detection cell, >= 99 %); the default convert keeps the trained
    model's function; every row (keep, both folds with and without the fine-tune) is
    reported."""
    out, _, proc, _ = quick_run
    dep = json.loads((out / "results.json").read_text())["deploy"]
    assert dep["bits"] == 8 and dep["seed"] == 0 and dep["int8_layers"] > 0 and dep["quantizer"] == "auto"
    rows = {r["name"]: r for r in dep["rows"]}
    assert len(rows) == 10
    int8 = [r for r in dep["rows"] if r["name"].startswith("int8") or r["name"].endswith(", int8")]
    assert len(int8) == 5 and all(r["agreement_vs_fake_quant"] >= 99.0 for r in int8), int8
    keep = rows['int8, convert() (gbfusion="keep", the default)']
    assert keep["agreement_vs_trained"] >= 99.0 and abs(keep["delta"]) <= 1.0, keep
    for mode in ("scalar", "per_channel"):
        assert f"fold {mode} + fine-tune (2 steps), fake quant" in rows and f"fold {mode}, int8" in rows
    assert all(_finite(r["score"]) and _finite(r["delta"]) for r in dep["rows"])
    assert "Deployment check (W8A8" in proc.stdout and 'gbfusion="keep", the default' in proc.stdout


def test_report_on_a_demo_checkpoint(quick_run, capsys):
    out, _, _, _ = quick_run
    first_node = json.loads((out / "results.json").read_text())["seeds"]["0"]["node_names"][0]
    assert main(["report", str(out / "models" / "armB_seed0.pt")]) == 0
    text = capsys.readouterr().out
    assert "quantized layers" in text and "balance ratio" in text and first_node in text
    assert main(["report", str(out / "models" / "armG_seed0.pt")]) == 0
    assert "no GBFusion node" in capsys.readouterr().out


def test_report_bad_checkpoint(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.pt")]) == 2
    assert "CHECKPOINT" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["report", str(bad)]) == 2
    assert "cannot load CHECKPOINT" in capsys.readouterr().err


# ---------------------------------------------------------------------------- generator
SMALL = UltrasoundConfig(size=32, chunk=8)


def test_generator_is_deterministic_per_seed():
    x1, y1 = generate(12, seed=3, cfg=SMALL)
    x2, y2 = generate(12, seed=3, cfg=SMALL)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = generate(12, seed=4, cfg=SMALL)
    assert not torch.equal(x1, x3)
    assert x1.shape == (12, 1, 32, 32) and x1.dtype == torch.float32 and 0 <= x1.min() and x1.max() <= 1
    assert y1.shape == (12, 32, 32) and y1.dtype == torch.int64
    x4, y4 = generate(8, seed=3, cfg=SMALL)  # whole chunks do not depend on how many are drawn
    assert torch.equal(x4, x1[:8]) and torch.equal(y4, y1[:8])


def test_splits_are_disjoint_draws():
    splits = SegTask().make_splits(0, quick=True)
    (xt, _), (xv, _), (xs, _) = splits["train"], splits["val"], splits["test"]
    assert not torch.equal(xt[:len(xv)], xv) and not torch.equal(xv[:len(xs)], xs)
    assert abs(float(xt.mean())) < 1e-4 and abs(float(xt.std()) - 1) < 1e-3  # standardised on train


def test_masks_match_images():
    images, masks, maps = generate(256, seed=0, cfg=UltrasoundConfig(size=32, chunk=64), return_maps=True)
    assert int(masks.min()) >= 0 and int(masks.max()) < NUM_CLASSES
    assert set(masks.unique().tolist()) == set(range(NUM_CLASSES))
    # outside the lesions and their posterior columns the echo map is the tissue's, unchanged
    untouched = (masks == 0) & (maps["gain"] == 1)
    assert torch.equal(maps["echo"][untouched], maps["tissue"][untouched])
    # inside a lesion the echo level differs from the tissue's
    assert ((maps["echo"] - maps["tissue"]).abs() > 1e-6)[masks > 0].float().mean() > 0.99
    img = images[:, 0]
    assert img[masks == 1].mean() < img[masks == 0].mean() - 0.1  # cysts are anechoic
    below = maps["gain"] != 1
    assert (maps["gain"][below] > 1).any() and (maps["gain"][below] < 1).any()  # enhancement and shadowing


# ---------------------------------------------------------------------------- statistics
def test_paired_statistics_on_a_tiny_table():
    b = {"0": 71.0, "1": 70.0, "2": 69.5}
    a = {"0": 72.0, "1": 69.5, "2": 71.5}
    p = paired(a, b)
    assert p["per_seed"] == pytest.approx([1.0, -0.5, 2.0])
    assert p["mean"] == pytest.approx(2.5 / 3)
    assert p["std"] == pytest.approx(math.sqrt(((1 - 2.5 / 3) ** 2 + (-0.5 - 2.5 / 3) ** 2 + (2 - 2.5 / 3) ** 2) / 2))
    assert (p["positive"], p["negative"], p["n"]) == (2, 1, 3)
    with pytest.raises(ValueError, match="different seeds"):
        paired(a, {"0": 1.0})


def test_convergence_statistics():
    assert ema([0.0, 10.0, 10.0]) == [0.0, 5.0, 7.5]
    assert steps_to_reach([0, 10, 20], [0.0, 10.0, 10.0], 7.0) == 20  # the raw curve reaches 7 at 10
    assert steps_to_reach([0, 10, 20], [0.0, 1.0, 2.0], 7.0) is None
    # mean over [0, 40] of 0 -> 10 (first 20 steps), then held at the best 10
    assert area_under_curve([0, 20], [0.0, 10.0], 10.0, 40) == pytest.approx((100 + 200) / 40)


# ---------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args, option", [
    (["--quantizer", "foo"], "--quantizer"),
    (["--bits", "1"], "--bits"),
    (["--bits", "9"], "--bits"),
    (["--seeds", "0"], "--seeds"),
    (["--task", "cls"], "--task"),
    (["--data-seed", "-1"], "--data-seed"),
    (["--data-seed", "x"], "--data-seed"),
])
def test_cli_bad_options(args, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        code = main(["demo", "--quick", "--out", str(tmp_path / "o"), *args])
        raise SystemExit(code)
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("field", ["deploy_finetune_steps", "deploy_finetune_batches", "deploy_epochs"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_config_rejects_bad_deployment_sizes(field, value):
    with pytest.raises(ValueError, match=field):
        DemoConfig(**{field: value})


def test_every_task_choice_is_registered():
    assert set(TASK_CHOICES) == set(TASKS) == {"seg", "det"}


def test_cli_unwritable_out_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _cli("demo", "--quick", "--out", str(blocker / "sub"), env={"Q2EXT_CACHE_DIR": str(tmp_path / "c")})
    assert proc.returncode == 2 and "--out" in proc.stderr
    assert not (tmp_path / "c").exists()  # nothing was trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_cuda_without_cuda(tmp_path, capsys):
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cuda" in capsys.readouterr().err
