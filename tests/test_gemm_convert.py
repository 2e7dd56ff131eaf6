"""q2ext.convert: QAT model -> int8 model agrees with the fake-quant model."""
import pytest
import torch
import torch.nn as nn

from q2ext import convert
from q2ext.nn import Int8Conv2d, Int8Linear
from q2ext import prepare
from q2ext.qconfig import QConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_convert_w8a8_agrees_with_fake_quant():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.1)
    x = torch.randn(64, 3, 16, 16)
    qat = prepare(net, QConfig(w_bits=8, a_bits=8, a_quantizer="lsq"))
    qat.eval()
    with torch.no_grad():
        qat(x)  # quantizer init
        want = qat(x)
        intm = convert(qat)
        got = intm(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in intm.modules())  # folded
    assert isinstance(intm.conv1, Int8Conv2d) and isinstance(intm.conv2, Int8Conv2d)
    assert isinstance(intm.head, Int8Linear)
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.99
    assert ((got - want).norm() / want.norm()) < 1e-4


class SignedNet(nn.Module):
    """Signed activations everywhere (SiLU, LN-like outputs, raw input): the default
    QConfig's "auto" input quantizers become LSQ+ with active offsets."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2, groups=16)
        self.conv2 = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = nn.functional.silu(self.conv1(x))
        x = nn.functional.silu(self.dw(x))
        x = self.conv2(x)
        return self.head(x.mean(dim=(2, 3)) - 0.1)


@pytest.mark.parametrize("engine", ["q2ext", "onednn", "auto"])
def test_every_prepared_model_converts(engine):
    """prepare with the default QConfig -> one forward -> convert: the int model matches the
    fake-quant model (signed inputs, LSQ+ offsets, depthwise/strided/dilated convs,
    channels-last input, batch 1)."""
    torch.manual_seed(1)
    qat = prepare(SignedNet(), QConfig(w_bits=8, a_bits=8)).eval()
    x = torch.randn(8, 3, 15, 13)
    with torch.no_grad():
        qat(x)
        offsets = [m.input_quantizer for m in qat.modules() if hasattr(m, "input_quantizer")]
        assert all(bool(q.offset_active) for q in offsets)
        intm = convert(qat, engine=engine)
        for inp in (x, x.contiguous(memory_format=torch.channels_last), x[:1]):
            want, got = qat(inp), intm(inp)
            assert ((got - want).norm() / want.norm()) < 1e-4
            assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.999
    layers = [m for m in intm.modules() if isinstance(m, (Int8Conv2d, Int8Linear))]
    assert len(layers) == 4 and all(m.x_offset is not None for m in layers)
