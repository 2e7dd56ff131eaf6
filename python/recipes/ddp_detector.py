"""Q² QAT of a torchvision detector on several processes with torchrun (DDP).

    torchrun --standalone --nproc_per_node 2 python/recipes/ddp_detector.py --steps 20
    torchrun --standalone --nproc_per_node 2 python/recipes/ddp_detector.py --resume q2_ckpt.pt --steps 5

gloo on the CPU, nccl with ``--device cuda`` (one GPU per process, ``LOCAL_RANK``).  Every
rank builds the same float FCOS (a small backbone + FPN here; your FP32 checkpoint in
practice), inserts Q-GBFusion at the FPN fusion nodes, keeps a frozen float copy as the
Q-ADA teacher and prepares the student W4A4 - or rebuilds the prepared student from a
q2ext checkpoint (``q2ext.load_checkpoint``: float model + saved QConfig + state).  Each
step runs two forwards, the DDP student on the rank's own images (detection losses; the
Q2Distiller hooks keep its GBFusion outputs) and the teacher (Q-ADA loss), then one
backward.  What keeps the ranks identical:

* gradients: DDP's all-reduce (the inactive LSQ+ offsets get exact zero gradients, so no
  parameter is unused and ``find_unused_parameters`` stays off);
* quantizer initialisation (first forward, inside DDP): the init statistics are
  all-reduced, so every rank starts from the same scales;
* Q-GBFusion's lam: each backward all-reduces the branch energies before the update;
* the teacher is not wrapped in DDP: it has no gradients, and its buffers never change.

With ``--broadcast-buffers 1`` DDP also copies rank 0's buffers (BatchNorm statistics,
lam, quantizer flags) into every rank in place before each forward; with 0 the BatchNorm
running statistics stay per rank (each saw its own data) and everything above still
agrees.  At the end every rank writes its parameters, lam and quantizer scales to
``--out/rank<r>.pt``, rank 0 prints the largest difference between ranks and, with
``--save``, writes a q2ext checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import os
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork

import q2ext
from q2ext.nn import GBFusion

QCONFIG = q2ext.QConfig(w_bits=4, a_bits=4)


def _conv_bn_relu(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TinyBackbone(nn.Module):
    """Four stride-2 stages and an FPN over the last three (two top-down fusion adds)."""

    def __init__(self, width: int = 8, out_channels: int = 32):
        super().__init__()
        w = width
        self.stem, self.c2 = _conv_bn_relu(3, w, 2), _conv_bn_relu(w, 2 * w, 2)
        self.c3, self.c4 = _conv_bn_relu(2 * w, 4 * w, 2), _conv_bn_relu(4 * w, 4 * w, 2)
        self.fpn = FeaturePyramidNetwork([2 * w, 4 * w, 4 * w], out_channels)
        self.out_channels = out_channels

    def forward(self, x):
        c2 = self.c2(self.stem(x))
        c3 = self.c3(c2)
        return self.fpn(OrderedDict([("0", c2), ("1", c3), ("2", self.c4(c3))]))


def build_detector(num_classes: int = 3, size: int = 64) -> FCOS:
    """A small FCOS (GroupNorm head with one conv per branch) on `size` x `size` images."""
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((1.0,),) * 3)
    return FCOS(TinyBackbone(), num_classes, min_size=size, max_size=size, anchor_generator=anchors,
                head=FCOSHead(32, 1, num_classes, num_convs=1))


def synthetic_batch(rank: int, step: int, n: int = 2, size: int = 64, num_classes: int = 3, device="cpu"):
    """Images and box targets, different on every rank and step."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, size, generator=g).to(device))
        xy = torch.rand(2, 2, generator=g) * size * 0.5
        wh = 8 + torch.rand(2, 2, generator=g) * size * 0.4
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, num_classes, (2,), generator=g).to(device)})
    return images, targets


def shared_state(model: nn.Module) -> dict:
    """What must be identical on every rank: parameters (weights, quantizer scales and
    offsets), and every GBFusion's lam and G-bar."""
    state = {f"param:{n}": p.detach().cpu().clone() for n, p in model.named_parameters()}
    for n, m in model.named_modules():
        if isinstance(m, GBFusion):
            state[f"lam:{n}"] = m.lam.detach().cpu().clone()
            state[f"g_ema:{n}"] = m.g_ema.detach().cpu().clone()
    return state


def _buffer_sync(on: bool) -> dict:
    """DDP's per-forward buffer broadcast switch: ``forward_sync_buffers`` where this torch
    has it (``broadcast_buffers`` is deprecated there), else ``broadcast_buffers``."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": on}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--broadcast-buffers", type=int, choices=(0, 1), default=1)
    p.add_argument("--resume", help="a q2ext checkpoint to rebuild the student from (q2ext.load_checkpoint)")
    p.add_argument("--save", help="write a q2ext checkpoint here at the end (rank 0)")
    p.add_argument("--out", help="write rank<r>.pt (shared state and losses) into this directory")
    p.add_argument("--lr", type=float, default=0.01)
    a = p.parse_args(argv)

    cuda = a.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        torch.manual_seed(0)  # the same float model on every rank
        model = build_detector()
        report = q2ext.insert_gbfusion(model)
        teacher = copy.deepcopy(model).to(device)  # frozen by Q2Distiller (eval, no grad)
        start = 0
        if a.resume:
            student, extra = q2ext.load_checkpoint(a.resume, model, map_location="cpu")
            start = int(extra.get("step", 0))
        else:
            student = q2ext.prepare(model, QCONFIG)
        student.to(device).train()
        ddp = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if cuda else None,
                                                  **_buffer_sync(bool(a.broadcast_buffers)))
        distiller = q2ext.Q2Distiller(student, teacher)  # hooks on the student's GBFusion outputs
        opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=1e-4)
        if rank == 0:
            print(f"{world} ranks, {a.device}, broadcast_buffers={bool(a.broadcast_buffers)}; {report}", flush=True)
        losses = []
        for step in range(start, start + a.steps):
            images, targets = synthetic_batch(rank, step, device=device)
            det = sum(ddp(images, targets).values())
            ada = distiller(images)  # the second forward: the teacher
            loss = det + ada
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append([float(det.detach()), float(ada.detach())])
            if rank == 0:
                print(f"step {step}: detection {losses[-1][0]:.4f}  Q-ADA {losses[-1][1]:.5f}", flush=True)
        distiller.remove()
        state = shared_state(student)
        gathered = [None] * world
        dist.all_gather_object(gathered, state)
        if rank == 0:
            worst = max(float((g[k] - state[k]).abs().max()) for g in gathered for k in state)
            print(f"largest difference between ranks over {len(state)} shared tensors: {worst:g}", flush=True)
            if a.save:
                q2ext.save_checkpoint(ddp, a.save, extra={"step": start + a.steps})
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            torch.save({"state": state, "losses": torch.tensor(losses)}, os.path.join(a.out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
