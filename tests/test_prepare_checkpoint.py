"""Checkpoints that rebuild: QConfig.to_dict/from_dict, q2ext.save_checkpoint /
q2ext.load_checkpoint from the float model, exact round trip, weights_only loading."""
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q2ext

pytestmark = pytest.mark.filterwarnings("ignore:insert_gbfusion rewrote the root module")


class Net(nn.Module):
    """An encoder level, a deeper path upsampled and concatenated with the skip (one
    fusion node), a signed (LSQ+) and a non-negative (unsigned) quantized input."""

    def __init__(self):
        super().__init__()
        self.enc, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        skip = F.relu(self.bn(self.enc(x)))
        deep = self.down(skip)  # may go negative: LSQ+ with a learned offset at `fuse`
        h = torch.cat([skip, F.interpolate(deep, scale_factor=2.0)], 1)
        return self.head(F.relu(self.fuse(h)).mean((2, 3)))


def _float(seed, gbfusion=False):
    torch.manual_seed(seed)
    net = Net()
    if gbfusion:
        net = q2ext.insert_gbfusion(net, example_inputs=(torch.randn(2, 3, 16, 16),)).model
    return net


CONFIG = q2ext.QConfig(w_bits=4, a_bits=4, first_layer_bits=None, skip=("head",),
                       overrides={"fuse": {"a_bits": 3}, nn.Conv2d: {"w_per_channel": True}})


def _trained(gbfusion=False):
    model = q2ext.prepare(_float(0, gbfusion), CONFIG).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), opt


def test_qconfig_dict_round_trip_is_plain_data():
    data = CONFIG.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain data only
    assert q2ext.QConfig.from_dict(data) == CONFIG
    assert q2ext.QConfig.from_dict(json.loads(json.dumps(data))) == CONFIG


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="other/9"), "format"),
    (lambda d: d.update(w_bitz=4), "w_bitz"),
    (lambda d: d["skip"].append({"type": "not_imported_pkg.Mod"}), "not_imported_pkg.Mod"),
    (lambda d: d["skip"].append({"type": "torch.nn.functional.relu"}), "torch.nn.functional.relu"),
    (lambda d: d["overrides"].append(["x"]), "overrides[2]"),
    (lambda d: d.update(a_bits=11), "a_bits"),
])
def test_qconfig_from_dict_errors_name_the_entry(mutate, message):
    data = CONFIG.to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        q2ext.QConfig.from_dict(data)


@pytest.mark.parametrize("gbfusion", [False, True])
def test_checkpoint_rebuilds_from_the_float_model_exactly(gbfusion):
    model, opt = _trained(gbfusion)
    buf = io.BytesIO()
    q2ext.save_checkpoint(model, buf, extra={"epoch": 3, "optimizer": opt.state_dict()})
    raw = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # plain tensors and data
    assert raw["qconfig"] == CONFIG.to_dict()

    float_model = _float(123, gbfusion)  # other weights: the load must do the work
    rebuilt, extra = q2ext.load_checkpoint(io.BytesIO(buf.getvalue()), float_model)
    assert extra["epoch"] == 3 and "state" in extra["optimizer"]
    assert q2ext.passes.prepare.prepared_qconfig(rebuilt) == CONFIG
    assert q2ext.summary(rebuilt) == q2ext.summary(model)  # same quantizers, grids and steps
    ref, got = model.state_dict(), rebuilt.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))
    # Training continues identically from both.
    for m in (model, rebuilt):
        m.train().zero_grad(set_to_none=True)
        F.cross_entropy(m(x), torch.tensor([0, 1, 2])).backward()
    for (n, a), (_, b) in zip(model.named_parameters(), rebuilt.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        assert a.grad is None or torch.equal(a.grad, b.grad), n


def test_checkpoint_of_a_ddp_style_wrapper_and_via_a_path(tmp_path):
    model, _ = _trained()
    wrapper = nn.DataParallel(model)  # state dict keys gain "module."; the checkpoint does not
    path = tmp_path / "ckpt.pt"
    q2ext.save_checkpoint(wrapper, path)
    rebuilt, extra = q2ext.load_checkpoint(path, _float(5))
    assert extra == {}
    assert all(not k.startswith("module.") for k in rebuilt.state_dict())


def test_checkpoint_errors():
    with pytest.raises(ValueError, match="not prepared"):
        q2ext.save_checkpoint(_float(0), io.BytesIO())
    model, _ = _trained(gbfusion=True)
    buf = io.BytesIO()
    q2ext.save_checkpoint(model, buf)
    with pytest.raises(ValueError, match="insert_gbfusion"):
        q2ext.load_checkpoint(io.BytesIO(buf.getvalue()), _float(0, gbfusion=False))
    plain = io.BytesIO()
    torch.save(model.state_dict(), plain)
    with pytest.raises(ValueError, match="not a q2ext checkpoint"):
        q2ext.load_checkpoint(io.BytesIO(plain.getvalue()), _float(0, gbfusion=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        q2ext.load_checkpoint("/nonexistent/ckpt.pt", _float(0))


def test_prepare_takes_the_config_dict():
    a = q2ext.prepare(_float(0), CONFIG)
    b = q2ext.prepare(_float(0), CONFIG.to_dict())
    assert q2ext.summary(a) == q2ext.summary(b)
