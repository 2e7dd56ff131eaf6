"""`q2ext bench`: one summary table over the benchmark suites, --out, --plot, bad options."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from q2ext import cli
from q2ext.benchmarks import suite


def test_suite_records_are_same_run_ratios():
    table, recs = suite.run(quick=True, only=["ada_loss"])
    assert recs and "speedup" in table
    for r in recs:
        assert r["suite"] == "Q-ADA"
        assert r["baseline_ms"] > 0 and r["q2ext_ms"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["q2ext_ms"])
        assert f"{r['speedup']:.2f}x" in table


def test_bench_cli_writes_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.md", tmp_path / "speedups.png"
    assert cli.main(["bench", "--quick", "--only", "ada_loss", "--out", str(out), "--plot", str(png)]) == 0
    text = out.read_text()
    assert "| suite" in text and "Q-ADA" in text and "torch" in text  # table + machine/torch line
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "summary" in capsys.readouterr().out


def _run(*args):
    return subprocess.run([sys.executable, "-m", "q2ext", "bench", *args], capture_output=True, text=True,
                          timeout=300)


def test_bench_cli_bad_suite_names_the_option():
    r = _run("--only", "nope")
    assert r.returncode == 2 and "--only" in r.stderr and "nope" in r.stderr


def test_bench_cli_unwritable_outputs_fail_before_running(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for opt in ("--out", "--plot"):
        r = _run("--quick", "--only", "ada_loss", opt, str(blocker / "sub" / "x.png"))
        assert r.returncode == 2 and opt in r.stderr
        assert "summary" not in r.stdout  # refused before any benchmark ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_bench_cli_cuda_without_gpu():
    r = _run("--device", "cuda", "--quick", "--only", "ada_loss")
    assert r.returncode == 2 and "--device cuda" in r.stderr
