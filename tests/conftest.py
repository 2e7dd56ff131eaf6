"""Test-session setup shared by every test module.

TRITON_INTERPRET must be in the environment before triton reads it (at import and when
a @triton.jit function is defined/launched): setting it from a test module is too late
once another module imported q2ext (and with it triton).  With it, the Triton kernels
run on CPU tensors under the interpreter, so they are tested on machines without a GPU.
"""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# Caches the library writes (int8 engine choices, demo checkpoints) go to a fresh folder, not
# the user's home: a test never depends on what an earlier run left behind.
os.environ.setdefault("Q2EXT_CACHE_DIR", tempfile.mkdtemp(prefix="q2ext-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_isa_and_threads():
    """Every test starts from the same global RNG state (its result does not depend on which
    tests ran before it); tests may force a CPU code path or a thread count: put both back."""
    import q2ext

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if q2ext.has_compiled():
        q2ext.set_cpu_isa("auto")
