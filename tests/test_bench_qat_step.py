"""The QAT-step benchmark's machinery: peak-memory measurement, the profiler's stderr noise
removed (and nothing else), the machine line with the CPU's ISA flags, the six variants
and their FP32 references, and no CUDA_HOME warning from `q2ext demo --help`."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from q2ext.benchmarks import common, qat_step


def test_peak_memory_counts_a_known_allocation_pattern():
    mib = 2 ** 20

    def fn():
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(8 * mib, dtype=torch.uint8)  # peak: a + b live together
        del a, b
        c = torch.empty(6 * mib, dtype=torch.uint8)
        del c

    peak = common.peak_memory_bytes(fn)
    assert 12 * mib <= peak < 12 * mib + 64 * 1024, peak


def test_profiler_noise_is_dropped_and_other_stderr_kept():
    code = ("import sys, torch\n"
            "from q2ext.benchmarks.common import peak_memory_bytes\n"
            "x = torch.ones(1000)\n"
            "def fn():\n"
            "    global x\n"
            "    x = x + 1\n"
            "    print('keep-this-line', file=sys.stderr)\n"
            "print(peak_memory_bytes(fn))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "keep-this-line" in r.stderr
    for noise in ("USDT", "profiler_start", "gpuGetDeviceCount", "Memory block of unknown size"):
        assert noise not in r.stderr, r.stderr


def test_demo_help_prints_no_cuda_home_warning():
    r = subprocess.run([sys.executable, "-m", "q2ext", "demo", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage" in r.stdout
    assert "CUDA_HOME" not in r.stderr and "No CUDA runtime" not in r.stderr, r.stderr


def test_machine_line_names_the_cpu_and_its_isa_flags():
    line = common.machine_info()
    cpu, flags = common._cpuinfo()
    assert cpu in line and torch.__version__ in line
    for flag, name in common._ISA_FLAGS:
        if flag in flags and flag != "avx2":
            assert name in line, (name, line)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


def test_variants_times_and_memory_with_their_references():
    case = qat_step.Case(_Tiny, lambda: (torch.randn(2, 3, 8, 8), torch.tensor([0, 3])), qat_step._classification_loss)
    variants = qat_step.build_variants(case, compile_variants=False)
    assert set(variants) == {"FP32", "q2ext", "naive LSQ", "PyTorch learnable fake-quant",
                             "q2ext, network-input step learned"}
    times = qat_step.time_variants(variants, rounds=1, min_run_time=0.01)
    assert times["FP32"][1] == 1.0 and all(t > 0 for t, _ in times.values())
    peaks = qat_step.memory_variants(variants)
    assert all(p > 0 for p in peaks.values())
    assert qat_step._reference("q2ext, torch.compile") == "FP32, torch.compile"
    assert qat_step._reference("naive LSQ") == "FP32"


def test_unknown_model_is_an_error_naming_it():
    with pytest.raises(ValueError, match="nope"):
        qat_step.run(models=["nope"], compile_variants=False, profile=False, memory=False)
