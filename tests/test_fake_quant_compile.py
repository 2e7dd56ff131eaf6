"""The fake-quant op under torch.compile: Inductor decomposes q2ext::fake_quant and its
backward into ATen ops (so it fuses them with the neighbouring BatchNorm/ReLU and their
backward, keeps its own layout and recomputes rather than saves).  The decomposition
follows the kernels' arithmetic: checked against the reference like the kernels are, and
a compiled prepared block against eager."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import q2ext
from helpers import DTYPES, KINDS, Case, check_against_reference, make_dy, make_params, make_x, with_layout

inductor_decomp = pytest.importorskip("torch._inductor.decomposition")
FQ, FQ_BWD = torch.ops.q2ext.fake_quant.default, torch.ops.q2ext.fake_quant_backward.default


class Decomposed(TorchDispatchMode):
    """Runs q2ext's fake-quant ops through the decompositions registered for Inductor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        table = inductor_decomp.decompositions
        impl = table[func] if func in (FQ, FQ_BWD) else func
        return impl(*args, **(kwargs or {}))


def test_decompositions_are_registered_for_inductor():
    table = inductor_decomp.select_decomp_table()
    assert FQ in table and FQ_BWD in table


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", [None, 1, 0])
@pytest.mark.parametrize("kind", KINDS)
def test_decomposition_matches_reference(kind, axis, dtype):
    case = Case(kind, 4, kind != "pact", axis, grad_factor=0.75 if kind == "affine" else 1.0)
    gen = torch.Generator().manual_seed(3)
    shape = (3, 6, 5, 7)
    p = make_params(case, shape, gen)
    x = with_layout(make_x(case, shape, p, gen, dtype), "channels_last")
    dy = make_dy(shape, gen, dtype)
    with Decomposed():
        results = {"decomposition": case.run(x, p, dy)}
    # Inductor chooses the layout of the decomposed outputs itself.
    check_against_reference(case, x, p, dy, results=results, layout=False)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)])
def test_decomposition_output_mask(need):
    case = Case("lsqp", 3, False, 1)
    gen = torch.Generator().manual_seed(4)
    shape = (2, 4, 3, 3)
    p = make_params(case, shape, gen)
    x, dy = make_x(case, shape, p, gen, torch.float32), make_dy(shape, gen, torch.float32)
    with Decomposed():
        got = case.run(x, p, dy, need)
    ref = case.run(x, p, dy, need)
    for g, r in zip(got, ref):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = self.b2(self.c2(h))  # signed: LSQ+ at fc's input after the pooling
        return self.fc(h.mean((2, 3)))


def test_compiled_prepared_block_has_no_opaque_fake_quant_and_matches_eager():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = q2ext.prepare(Block(), q2ext.QConfig(first_layer_bits=None, last_layer_bits=None,
                                                 freeze_network_input=False)).train()
    x, y = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()  # initialise the quantizers eagerly
    model.zero_grad(set_to_none=True)
    # A fresh batch for the compared step: on the calibration batch, LSQ+'s offset equals
    # the batch minimum, so an element sits exactly on the clip edge, where one ulp of fp32
    # reassociation (Inductor's pooling) decides whether its gradient passes.
    x = torch.randn(4, 3, 12, 12)
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    fn = torch.compile(compiled, fullgraph=True)

    def step(m):
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    loss_c, codes = run_and_get_code(step, fn)
    loss_e = step(eager)
    text = "\n".join(codes)
    assert len(codes) >= 2  # forward and backward
    assert "torch.ops.q2ext" not in text, "a fake-quant op stayed opaque"
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:  # fp32 reassociation in BatchNorm and the reductions
            torch.testing.assert_close(b.grad, a.grad, rtol=2e-3, atol=1e-5, msg=n)
