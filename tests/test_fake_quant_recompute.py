"""Eager memory of the quantized layers: the float op's saved quantized input/weight are
replaced by the quantizer's input and recomputed in the backward.  Same gradients bit for
bit as saving them, less peak memory, and a clear error when the input was modified in
place in between."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q2ext
from q2ext.benchmarks.common import peak_memory_bytes

CFG = q2ext.QConfig(first_layer_bits=None, last_layer_bits=None, freeze_network_input=False)


def _no_recompute(model):
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "recompute_quantized"):
            m.recompute_quantized = False
    return model


def _grads(model, x, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


LAYERS = {
    "conv": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2)),
             (2, 3, 9, 9)),
    "conv channels_last": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)),
                           "channels_last"),
    "conv transpose groups 2": (lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.ConvTranspose2d(4, 6, 2, 2, groups=2)),
                                (2, 4, 5, 5)),
    "linear 3d": (lambda: nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3)), (2, 4, 7)),
}


@pytest.mark.parametrize("a_quantizer", ["auto", "lsq+", "pact"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_recompute_gives_identical_gradients(name, a_quantizer):
    build, shape = LAYERS[name]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last) if shape == "channels_last" \
        else torch.randn(shape)
    cfg = q2ext.QConfig(first_layer_bits=None, last_layer_bits=None, freeze_network_input=False,
                        a_quantizer=a_quantizer, a_per_channel=name == "conv")
    model = q2ext.prepare(build(), cfg).train()
    loss_fn = lambda out: (out.float() ** 2).mean()  # noqa: E731
    _grads(model, x, loss_fn)  # initialise the quantizers
    saving = _no_recompute(model)
    la, ga = _grads(model, x, loss_fn)
    lb, gb = _grads(saving, x, loss_fn)
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1) for i in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(16) for _ in range(4))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def _step_peak(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return peak_memory_bytes(step, setup=lambda: opt.zero_grad(set_to_none=True))


def test_recompute_lowers_the_step_peak_to_near_float():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    fp32 = Net().train()
    model = q2ext.prepare(fp32, CFG).train()
    fp, rec, saved = _step_peak(fp32, x, y), _step_peak(model, x, y), _step_peak(_no_recompute(model), x, y)
    # Saving adds one quantized copy of every conv input (4 x 64 KiB/sample here); the
    # recomputed step keeps only transients (one layer's quantized tensors at a time).
    assert rec < saved - 4 * 8 * 16 * 32 * 32 * 4 * 0.5, (fp, rec, saved)
    assert rec <= 1.3 * fp, (fp, rec, saved)


def test_in_place_change_of_the_input_is_an_error():
    torch.manual_seed(0)
    model = q2ext.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)), CFG).train()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()  # initialise
    h = model[0](x)
    out = model[1](h)
    with torch.no_grad():
        h.mul_(2)  # the second layer's input, after its forward
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_no_hooks_without_grad_or_when_disabled():
    torch.manual_seed(0)
    model = q2ext.prepare(nn.Sequential(nn.Conv2d(3, 4, 3)), CFG).train()
    x = torch.randn(2, 3, 8, 8)
    model(x)
    with torch.no_grad():
        y = model[0].input_quantizer(x)
    assert not hasattr(y, "_q2ext_recompute")  # nothing to recompute outside autograd
    y = model[0].input_quantizer(x)
    info = y._q2ext_recompute
    assert info[0]() is x  # a weak reference: y never keeps x alive
