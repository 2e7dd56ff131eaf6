"""DDP: a prepared model trained on 2 CPU processes (gloo) matches single-process training
on the same global batch, and quantizer initialisation/calibration agree across ranks."""
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import q2ext

WORLD = 2
STEPS = 4
BATCH = 8  # global batch; each rank takes BATCH // WORLD


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return q2ext.prepare(m, q2ext.QConfig(first_layer_bits=None, last_layer_bits=None))


def _data():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(BATCH, 3, 8, 8, generator=g) * (1 + i) for i in range(STEPS)]
    ys = [torch.randint(0, 4, (BATCH,), generator=g) for _ in range(STEPS)]
    calib = [torch.randn(BATCH, 3, 8, 8, generator=g) for _ in range(2)]
    return xs, ys, calib


def _shard(t, rank, world):
    return t.chunk(world)[rank]


def _train(model, rank=0, world=1, calibrate=False, wrap=lambda m: m):
    xs, ys, calib = _data()
    if calibrate:
        q2ext.calibrate(model, [_shard(c, rank, world) for c in calib])
    net = wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in zip(xs, ys):
        opt.zero_grad(set_to_none=True)
        # Mean over the local batch; DDP averages gradients over ranks = the global mean.
        F.cross_entropy(net(_shard(x, rank, world)), _shard(y, rank, world)).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ddp = lambda m: nn.parallel.DistributedDataParallel(m)  # noqa: E731
        results = {
            # DDP wraps the model before its quantizers have seen data: init inside DDP.
            "first_batch": _train(_model(), rank, world, wrap=ddp),
            "calibrate": _train(_model(), rank, world, calibrate=True, wrap=ddp),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, timeout_s=150):
    ctx = mp.start_processes(_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            raise AssertionError(f"DDP workers did not finish in {timeout_s}s")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ddp_matches_single_process(tmp_path):
    ranks = _spawn(tmp_path)
    for mode in ("first_batch", "calibrate"):
        single = _train(_model(), calibrate=mode == "calibrate")
        r0, r1 = ranks[0][mode], ranks[1][mode]
        for k in single:
            # Ranks hold identical parameters, buffers and quantizer decisions.
            assert torch.equal(r0[k], r1[k]), (mode, k)
            torch.testing.assert_close(r0[k].float(), single[k].float(), rtol=1e-3, atol=1e-4,
                                       msg=f"{mode}: {k}")
        assert bool(r0["0.input_quantizer.offset_active"]) and not bool(r0["2.input_quantizer.offset_active"])
        # Quantizers really learned: the step sizes moved from their initial values.
        assert not torch.equal(r0["2.input_quantizer.scale"], _initial_scale(mode, "2"))


def _initial_scale(mode, layer):
    model = _model()
    xs, _, calib = _data()
    if mode == "calibrate":
        q2ext.calibrate(model, calib)
    else:
        with torch.no_grad():
            model(xs[0])
    return dict(model.named_modules())[layer].input_quantizer.scale.detach()
