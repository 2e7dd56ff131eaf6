"""q2ext.Q2Distiller (Q-ADA wiring): hooks, frozen teacher, quantizer discovery."""
import copy

import pytest
import torch
from torch import nn

import q2ext
from q2ext.ops import ada_loss


class Net(nn.Module):
    """conv1 -> act1 -> conv2 -> act2 -> head: small CNN with two natural taps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.act2 = nn.SiLU()
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.act2(self.conv2(self.act1(self.conv1(x)))))


def models(seed=0):
    torch.manual_seed(seed)
    teacher = Net()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def features(model, names, x):
    feats, hooks = {}, []
    mods = dict(model.named_modules())
    for n in names:
        hooks.append(mods[n].register_forward_hook(lambda m, a, o, n=n: feats.__setitem__(n, o)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return feats


def test_taps_by_name_value_and_gradients():
    student, teacher = models()
    x = torch.randn(2, 3, 12, 12)
    taps = ["act1", "conv2"]
    distiller = q2ext.Q2Distiller(student, teacher, taps=taps, weight=0.5, quantizers=None)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student.train()
    out = student(x)
    loss = distiller(x)
    fs, ft = features(student, taps, x), features(teacher, taps, x)
    expected = 0.5 * sum(ada_loss(fs[n], ft[n]) for n in taps)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    (loss + 0 * out.sum()).backward()
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    assert student.head.weight.grad.abs().sum() == 0  # head is after every tap
    assert all(p.grad is None for p in teacher.parameters())
    distiller.train()
    teacher.train()  # even if the caller flips it, the distiller's call runs it in eval mode
    student(x)
    distiller(x)
    assert not teacher.training


def test_teacher_never_updates_and_dropout_is_off():
    student, teacher = models(1)
    teacher.act2 = nn.Sequential(nn.Dropout(0.5), nn.SiLU())
    student.act2 = nn.Sequential(nn.Dropout(0.5), nn.SiLU())
    before = copy.deepcopy(teacher.state_dict())
    distiller = q2ext.Q2Distiller(student, teacher, taps=["act2"], quantizers=None)
    opt = torch.optim.SGD(list(student.parameters()) + list(teacher.parameters()), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    losses = []
    for _ in range(2):
        student(x)
        loss = distiller(x)
        losses.append(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    t1 = features(teacher, ["act2"], x)["act2"]
    t2 = features(teacher, ["act2"], x)["act2"]
    assert torch.equal(t1, t2)  # eval mode: the dropout is inactive


def test_auto_quantizer_of_the_consuming_layer():
    student, teacher = models(2)
    student = q2ext.prepare(student)
    x = torch.randn(2, 3, 10, 10)
    distiller = q2ext.Q2Distiller(student, teacher, taps=["act1"])
    student(x)
    loss = distiller(x)
    q = student.conv2.input_quantizer
    assert distiller._quantizer["act1"] is q and q.is_initialized
    fs, ft = features(student, ["act1"], x)["act1"], features(teacher, ["act1"], x)["act1"]
    with torch.no_grad():
        expected = 0.01 * ada_loss(fs, ft, q(fs), q(ft), q.step_size())
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)
    without_delta = 0.01 * ada_loss(fs, ft)
    assert not torch.allclose(loss.detach(), without_delta)  # Delta really entered


def test_auto_without_consumer_warns_and_uses_zero_delta():
    student, teacher = models(3)
    x = torch.randn(1, 3, 8, 8)
    distiller = q2ext.Q2Distiller(student, teacher, taps=["conv2"])  # float student: no input_quantizer
    student(x)
    with pytest.warns(UserWarning, match="Delta = 0"):
        loss = distiller(x)
    fs, ft = features(student, ["conv2"], x)["conv2"], features(teacher, ["conv2"], x)["conv2"]
    torch.testing.assert_close(loss.detach(), 0.01 * ada_loss(fs, ft), rtol=1e-6, atol=0)


def test_callable_quantizer_with_step():
    student, teacher = models(4)
    x = torch.randn(2, 3, 8, 8)

    def quant(v):
        return torch.round(v / 0.2) * 0.2, 0.2

    distiller = q2ext.Q2Distiller(student, teacher, taps=["act1"], quantizers={"act1": quant}, weight=1.0)
    student(x)
    loss = distiller(x)
    fs, ft = features(student, ["act1"], x)["act1"], features(teacher, ["act1"], x)["act1"]
    expected = ada_loss(fs, ft, quant(fs)[0], quant(ft)[0], 0.2)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)


def test_loss_from_caller_run_teacher_and_remove():
    student, teacher = models(5)
    x = torch.randn(1, 3, 8, 8)
    with q2ext.Q2Distiller(student, teacher, taps=["act1"], quantizers=None) as distiller:
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = distiller.loss()
        assert torch.isfinite(loss)
        with pytest.raises(RuntimeError, match="run the student forward"):
            distiller.loss()  # features are released after each call
    student(x)
    assert distiller._student_feats == {}  # hooks removed on leaving the block


def test_gbfusion_taps():
    from q2ext.nn import GBFusion

    class FusionNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 3, padding=1)
            self.fuse = GBFusion(2, "concat")
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(self.fuse(self.a(x), self.b(x)))

    torch.manual_seed(6)
    teacher = FusionNet()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.a.weight.add_(0.1)
    distiller = q2ext.Q2Distiller(student, teacher, quantizers=None)
    assert distiller.taps == ["fuse"]
    x = torch.randn(2, 3, 8, 8)
    out = student(x)
    loss = distiller(x)
    (loss + 0 * out.sum()).backward()
    assert torch.isfinite(loss) and loss > 0
    assert student.a.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(taps=["nope"]), ValueError, r"student has no module named \['nope'\]"),
    (dict(taps=["act1"], teacher_taps=["missing"]), ValueError, r"teacher has no module named \['missing'\]"),
    (dict(taps="gbfusion"), ValueError, "no GBFusion module"),
    (dict(taps="fpn"), ValueError, "taps must be 'gbfusion' or a list"),
    (dict(taps=[]), ValueError, "non-empty list"),
    (dict(taps=["act1"], teacher_taps=["act1", "act2"]), ValueError, "teacher_taps has 2 names"),
    (dict(taps=["act1"], quantizers={"act2": abs}), ValueError, "not taps"),
    (dict(taps=["act1"], quantizers=3), TypeError, "quantizers must be"),
    (dict(taps=["act1"], divergence="l1"), ValueError, "divergence"),
])
def test_bad_construction(kwargs, exc, match):
    student, teacher = models()
    with pytest.raises(exc, match=match):
        q2ext.Q2Distiller(student, teacher, **kwargs)


def test_bad_use():
    student, teacher = models()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="separate"):
        q2ext.Q2Distiller(student, student, taps=["act1"])
    distiller = q2ext.Q2Distiller(student, teacher, taps=["act1"], quantizers=None)
    with pytest.raises(RuntimeError, match="run the student forward"):
        distiller(x)
    distiller.remove()
    # a tap whose teacher counterpart has another shape
    distiller = q2ext.Q2Distiller(student, teacher, taps=["act1"], teacher_taps=["act2"], quantizers=None)
    student(x)
    with pytest.raises(ValueError, match="tap 'act1': teacher feature"):
        distiller(x)
    distiller.remove()
    # a tap that does not output a feature map
    distiller = q2ext.Q2Distiller(student, teacher, taps=["act1"], quantizers=None)
    with pytest.raises(TypeError, match=r"tap 'act1' must output a float tensor \[N, C, \*spatial\]"):
        student.act1(torch.randn(2, 5))
    distiller.remove()


def test_tap_running_twice_is_an_error():
    class Shared(nn.Module):  # one activation module used twice per forward
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.act = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.ReLU()

        def forward(self, x):
            return self.act(self.conv2(self.act(self.conv1(x))))

    torch.manual_seed(0)
    teacher = Shared()
    student = copy.deepcopy(teacher)
    x = torch.randn(1, 3, 8, 8)
    ok = q2ext.Q2Distiller(student, teacher, taps=["conv2"], quantizers=None)
    student(x)
    student(x)  # two student forwards before one distiller call are fine: the latest counts
    assert torch.isfinite(ok(x))
    ok.remove()
    distiller = q2ext.Q2Distiller(student, teacher, taps=["act"], quantizers=None)
    student(x)
    with pytest.raises(RuntimeError, match="more than once"):
        distiller(x)
