"""python/recipes/ddp_detector.py under torchrun: 2 CPU processes (gloo) train a small FCOS
with Q-GBFusion, W4A4 and the Q-ADA teacher; the ranks' parameters (quantizer scales
included), lam and G-bar agree exactly, with DDP's per-forward buffer broadcast on and off,
and a run resumed from a q2ext checkpoint (rebuilt on every rank from the float model)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import q2ext

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "python" / "recipes" / "ddp_detector.py"


def _torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the workers import the same q2ext as this test
    env["PYTHONPATH"] = os.pathsep.join([str(Path(q2ext.__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RECIPE),
           *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _ranks(out_dir):
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _assert_ranks_agree(ranks):
    a, b = (r["state"] for r in ranks)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    scales = [k for k in a if k.startswith("param:") and k.endswith(".scale")]
    lams, energies = [k for k in a if k.startswith("lam:")], [k for k in a if k.startswith("g_ema:")]
    assert len(scales) > 20 and len(lams) == 2 == len(energies)
    # The controller measured (and all-reduced) the branch energies.  At these FPN adds
    # they are equal (d(a + b)/da = d(a + b)/db), so lam rightly stays at 0.
    assert all(float(a[k].min()) > 0 for k in energies)
    for r in ranks:
        assert torch.isfinite(r["losses"]).all()
    return a


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_recipe_ranks_agree_and_resume(tmp_path):
    out = _torchrun("--steps", "2", "--broadcast-buffers", "1", "--out", str(tmp_path / "a"),
                    "--save", str(tmp_path / "ckpt.pt"))
    assert "largest difference between ranks" in out
    first = _assert_ranks_agree(_ranks(tmp_path / "a"))

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["extra"]["step"] == 2 and ckpt["qconfig"]["w_bits"] == 4

    _torchrun("--steps", "1", "--broadcast-buffers", "0", "--resume", str(tmp_path / "ckpt.pt"),
              "--out", str(tmp_path / "b"))
    resumed = _assert_ranks_agree(_ranks(tmp_path / "b"))
    moved = [k for k in first if k.startswith("param:") and not torch.equal(first[k], resumed[k])]
    assert len(moved) > len(first) // 2  # the resumed run trained on from the checkpoint
