"""q2ext.nn.GBFusion: the closed-loop controller, freeze, clamp, dtypes, torch.compile, DDP, report."""
import math
import os
import socket

import pytest
import torch
from torch import nn

import q2ext
from q2ext.nn import GBFusion


def _imbalanced_step(m, g, gain=10.0, c=(8, 8)):
    """One training step where branch 0's gradient is `gain` times larger than branch 1's.

    The output gradient has zero channel mean within each branch's channels, so the
    LayerNorm's mean subtraction does not spread the loud branch's gradient to the other.
    """
    xs = [torch.randn(4, ci, 8, 8, generator=g).requires_grad_() for ci in c]
    out = m(*xs)
    r = torch.randn(out.shape, generator=g)
    r = torch.cat([p - p.mean(1, keepdim=True) for p in r.split(list(c), 1)], 1)
    r[:, : c[0]] *= gain
    (out * r).sum().backward()
    return xs


def _run(m, steps, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _imbalanced_step(m, g, **kw)


def test_controller_balances_a_tenfold_imbalance():
    m = GBFusion(2)
    g = torch.Generator().manual_seed(0)
    _imbalanced_step(m, g)
    start = float(m.balance_ratio)
    assert start > 4  # the synthetic imbalance is visible in G-bar
    _run(m, 150)
    ratio = float(m.balance_ratio)
    assert ratio < 1.1, f"balance ratio {start:.2f} -> {ratio:.3f} after 150 steps"
    # equilibrium: alpha_1 / alpha_0 = 10 undoes the gain, i.e. lam_1 - lam_0 = ln 10
    assert float(m.lam[1] - m.lam[0]) == pytest.approx(math.log(10), rel=0.1)
    assert m.lam[0] < 0 < m.lam[1] and m.alpha[0] < m.alpha[1]  # the loud branch was turned down
    # the instantaneous energies are balanced too, not just the EMA
    xs = _imbalanced_step(m, torch.Generator().manual_seed(7))
    gn = [x.grad.norm().item() for x in xs]
    assert max(gn) / min(gn) < 1.3


def test_tau_offsets_are_respected():
    tau = [0.4, -0.4]
    m = GBFusion(2, tau=tau, eta=0.1)
    _run(m, 300, gain=1.0)
    log_ratio = math.log(m.g_ema[0] / m.g_ema[1])
    assert abs(log_ratio - (tau[0] - tau[1])) < 0.08, log_ratio


def test_freeze_stops_the_controller_and_eval_does_not_update():
    m = GBFusion(2)
    _run(m, 5)
    m.freeze()
    lam, ge = m.lam.clone(), m.g_ema.clone()
    _run(m, 5, seed=1)
    assert torch.equal(m.lam, lam) and torch.equal(m.g_ema, ge)
    m.unfreeze().eval()
    _run(m, 2, seed=2)
    assert torch.equal(m.lam, lam)
    m.train()
    _run(m, 1, seed=3)
    assert not torch.equal(m.lam, lam)


def test_lam_clamp_holds():
    # balancing a 1e4 imbalance needs lam_1 - lam_0 = ln(1e4) = 9.2: more than the clamp allows
    m = GBFusion(2, eta=5.0, lam_clip=1.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        _imbalanced_step(m, g, gain=1e4)
        assert m.lam.abs().max() <= 1.5
    assert m.lam.tolist() == [-1.5, 1.5]


def test_module_matches_op_and_keeps_fp32_state():
    m = GBFusion(2, affine=True, num_channels=7).bfloat16()
    assert m.lam.dtype == torch.float32 and m.g_ema.dtype == torch.float32 and m.weight.dtype == torch.bfloat16
    xs = [torch.randn(2, 3, 4, 4).bfloat16().requires_grad_(), torch.randn(2, 4, 4, 4).bfloat16().requires_grad_()]
    out = m(xs)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 7, 4, 4)
    out.float().square().sum().backward()
    assert m.weight.grad is not None and m.weight.grad.dtype == torch.bfloat16
    assert all(x.grad is not None for x in xs) and m.g_ema.min() > 0
    with pytest.raises(ValueError, match="expects 2 branches"):
        m(xs[0])
    with pytest.raises(ValueError, match="num_channels"):
        GBFusion(2, affine=True)
    with pytest.raises(ValueError, match="num_branches"):
        GBFusion(1)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.fuse = GBFusion(2)
        self.head = nn.Conv2d(11, 4, 1)

    def forward(self, x):
        up = nn.functional.interpolate(self.b(x), scale_factor=2.0)
        return self.head(self.fuse(self.a(x), 3 * up))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    eager = _Net()
    comp = _Net()
    comp.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp, fullgraph=True)
    xs = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    for x in xs:
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.sin().sum().backward()
        yc.sin().sum().backward()
        torch.testing.assert_close(comp.fuse.lam, eager.fuse.lam, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(comp.fuse.g_ema, eager.fuse.g_ema, rtol=1e-5, atol=1e-7)
    assert eager.fuse.lam.abs().max() > 0
    for pe, pc in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5)


def test_gradient_energy_report():
    net = _Net()
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    rep = q2ext.gradient_energy_report(net)
    data = rep.data()
    assert list(data) == ["fuse"]
    d = data["fuse"]
    assert d["g_ema"] == pytest.approx(net.fuse.g_ema.tolist()) and sum(d["alpha"]) == pytest.approx(1.0)
    assert d["balance_ratio"] == pytest.approx(max(d["g_ema"]) / min(d["g_ema"]))
    text = rep.table()
    assert "| fuse | concat | 0 |" in text and "balance ratio" in text


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _TwoNodes(nn.Module):
    def __init__(self):
        super().__init__()
        self.synced, self.local = _Net(), _Net()
        self.local.fuse.sync_ddp = False

    def forward(self, x):
        return self.synced(x) + self.local(x)


def _ddp_worker(rank, world, port, out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = _TwoNodes()
    # broadcast_buffers=False: lam must stay identical through the all-reduce alone
    model = DDP(net, broadcast_buffers=False)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8, generator=g) * (1 + 3 * rank)).sin().sum().backward()
    lam = torch.stack([net.synced.fuse.lam, net.synced.fuse.g_ema, net.local.fuse.lam, net.local.fuse.g_ema])
    gathered = [torch.zeros_like(lam) for _ in range(world)]
    dist.all_gather(gathered, lam)
    if rank == 0:
        torch.save(gathered, out_path)
    dist.destroy_process_group()


def test_ddp_keeps_lam_identical(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "lam.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0, r1 = torch.load(out)
    assert torch.equal(r0[:2], r1[:2]) and r0[0].abs().max() > 0  # synced node: identical lam and G-bar
    assert not torch.equal(r0[2:], r1[2:])  # the test can fail: unsynced, the ranks drift apart


def test_in_place_change_of_saved_output_is_refused():
    """fp32 without affine saves the output (it is y): autograd refuses a backward after an
    in-place change of it instead of computing wrong gradients; out of place is fine."""
    xs = [torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(2)]
    m = GBFusion(2, mode="add")
    y = m(xs)
    y.relu_()
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()
    torch.relu(m(xs)).sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)
