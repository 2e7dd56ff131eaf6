"""Importing q2ext: the pure-PyTorch fallback when the extension is unavailable
(Q2EXT_NO_EXTENSION=1), and no device initialisation or device query at import.

Each configuration runs once in a fresh interpreter (module-scoped fixture; importing
torch dominates the cost) and reports JSON that the tests below check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, warnings
import torch

# Any CUDA query during `import q2ext` or CPU ops is recorded (and fails loudly).
queries = []
def spy(name):
    def f(*a, **k):
        queries.append(name)
        raise AssertionError("torch.cuda." + name + " called")
    return f
for name in ("is_available", "device_count", "init", "current_device", "get_device_properties",
             "get_device_capability"):
    setattr(torch.cuda, name, spy(name))

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import q2ext
from q2ext import ops
from q2ext.reference import fake_quant as R
from q2ext._ops.fake_quant import MODE_AFFINE

out = {
    "warnings": [(w.category.__name__, str(w.message)) for w in caught],
    "has_compiled": q2ext.has_compiled(),
    "cpu_isa": q2ext.cpu_isa(),
    "cuda_initialized_after_import": torch.cuda.is_initialized(),
    "queries_during_import": list(queries),
}
try:
    q2ext.set_cpu_isa("scalar")
    q2ext.set_cpu_isa("auto")
    out["set_cpu_isa"] = "ok"
except RuntimeError as e:
    out["set_cpu_isa"] = str(e)

def bits(t):
    t = t.contiguous()
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)

def close(g, r):  # parameter grads: reference sums in float64, kernels may not
    return bool(torch.allclose(g.double(), r.double(), rtol=1e-5, atol=1e-6))

gen = torch.Generator().manual_seed(0)
checks = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    x = (torch.randn(3, 4, 5, generator=gen) * 2).to(dtype)
    dy = torch.randn(3, 4, 5, generator=gen).to(dtype)
    s1, s4 = torch.tensor([0.1]), torch.rand(4, generator=gen) * 0.2 + 0.05
    zp4, off4 = torch.tensor([0.0, 1.0, -2.5, 3.0]), torch.tensor([0.01, 0.0, -0.02, 0.03])
    a1 = torch.tensor([2.0])
    cases = {
        "affine": (lambda x, p: ops.fake_quant_affine(x, p[0], p[1], -8, 7, axis=1, grad_factor=0.5), [s4, zp4],
                   lambda x, dy: (R.fake_quant(x, s4, zp4, None, -8, 7, 1, MODE_AFFINE),
                                  R.fake_quant_backward(dy, x, s4, zp4, None, -8, 7, 1, MODE_AFFINE, 0.5))),
        "lsq": (lambda x, p: ops.lsq(x, p[0], 4), [s1],
                lambda x, dy: (R.lsq(x, s1, 4), R.lsq_backward(dy, x, s1, 4))),
        "lsq+": (lambda x, p: ops.lsq(x, p[0], 3, signed=False, axis=1, offset=p[1]), [s4, off4],
                 lambda x, dy: (R.lsq(x, s4, 3, False, 1, off4), R.lsq_backward(dy, x, s4, 3, False, 1, off4))),
        "pact": (lambda x, p: ops.pact(x, p[0], 4), [a1],
                 lambda x, dy: (R.pact(x, a1, 4), R.pact_backward(dy, x, a1, 4))),
    }
    for name, (fn, params, ref) in cases.items():
        xl = x.clone().requires_grad_()
        pl = [p.clone().requires_grad_() for p in params]
        y = fn(xl, pl)
        grads = torch.autograd.grad(y, [xl, *pl], dy)
        ry, rgrads = ref(x, dy)
        checks[f"{name}-{str(dtype)[6:]}"] = {
            "y": bool(torch.equal(bits(y), bits(ry))),
            "dx": bool(torch.equal(bits(grads[0]), bits(rgrads[0]))),
            "dparams": all(close(g, r) for g, r in zip(grads[1:], rgrads[1:]) if r is not None),
        }
out["checks"] = checks
out["cuda_initialized_after_ops"] = torch.cuda.is_initialized()
out["queries"] = queries
print(json.dumps(out))
"""


def _probe(no_extension):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("Q2EXT_NO_EXTENSION", None)
    if no_extension:
        env["Q2EXT_NO_EXTENSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"import probe failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fallback():
    return _probe(no_extension=True)


@pytest.fixture(scope="module")
def compiled():
    out = _probe(no_extension=False)
    if not out["has_compiled"]:
        pytest.skip("q2ext._C is not built here")
    return out


def test_fallback_warns(fallback):
    runtime = [msg for cat, msg in fallback["warnings"] if cat == "RuntimeWarning"]
    assert len(runtime) == 1, fallback["warnings"]
    msg = runtime[0]
    assert "q2ext._C is not built" in msg and "Q2EXT_NO_EXTENSION=1" in msg and "reference kernels" in msg


def test_fallback_reports_no_extension(fallback):
    assert fallback["has_compiled"] is False
    assert fallback["cpu_isa"] == "reference"
    assert "not built" in fallback["set_cpu_isa"]


def test_fallback_ops_give_reference_results(fallback):
    bad = {k: v for k, v in fallback["checks"].items() if not all(v.values())}
    assert len(fallback["checks"]) == 12 and not bad, bad


def test_compiled_import_does_not_warn(compiled):
    assert not [m for _, m in compiled["warnings"] if "q2ext" in m], compiled["warnings"]
    assert compiled["cpu_isa"] in ("scalar", "avx2", "avx512")
    assert compiled["set_cpu_isa"] == "ok"


def test_compiled_ops_match_reference(compiled):
    bad = {k: v for k, v in compiled["checks"].items() if not all(v.values())}
    assert len(compiled["checks"]) == 12 and not bad, bad


@pytest.mark.parametrize("mode", ["fallback", "compiled"])
def test_import_does_not_initialise_cuda(mode, request):
    out = request.getfixturevalue(mode)
    assert out["cuda_initialized_after_import"] is False
    assert out["cuda_initialized_after_ops"] is False


@pytest.mark.parametrize("mode", ["fallback", "compiled"])
def test_import_does_not_query_devices(mode, request):
    """Stronger than the above: not even torch.cuda.is_available()/device_count() is
    called by `import q2ext` or by CPU ops (the probe replaces them with failing spies)."""
    out = request.getfixturevalue(mode)
    assert out["queries_during_import"] == [] and out["queries"] == []
