"""What the Q-GBFusion fold costs, and what the App. 7.1 fine-tune gives back, on a small
U-Net segmentation task that trains in minutes on a CPU.

python python/gb_fusion_fold_cost.py [--steps 400] [--ft-steps 100] [--ft-lr 2e-5] [--seeds 0 1 2]

Task (synthetic, learnable): 48x48 RGB images of noisy textured background with 3-6
rectangles and discs of 4 object classes; a class is a colour *and* a stripe orientation,
so a pixel's label needs its neighbourhood (the encoder's context and the skip path
both matter).  Model: a two-level U-Net (encoder 16-32-64 channels, BatchNorm, two
concat skip merges -> two Q-GBFusion nodes), trained FP32, then W8A8 (``--bits``) QAT (LSQ, q2ext.prepare)
with Q-GBFusion.  Every arm is evaluated on the same held-out images (mDICE over the 4
object classes and background, and argmax agreement with the fake-quant model as trained):

- fake quant as trained (LayerNorm per pixel) and its int8 conversion (gbfusion="keep");
- fold scalar / per-channel (LayerNorm -> calibrated constants), fake quant and int8;
- the same + the fine-tune (task loss only, Adam lr 2e-5, a small subset).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import q2ext

CLASSES = 5  # background + 4 object classes
HW = 48
COLOURS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.9, 0.2, 0.2], [0.2, 0.8, 0.3]])


def make_batch(n, gen):
    """(images [n, 3, HW, HW], labels [n, HW, HW]): classes 1/3 share a colour, 2/4 too;
    stripes (horizontal vs vertical) tell them apart."""
    yy, xx = torch.meshgrid(torch.arange(HW), torch.arange(HW), indexing="ij")
    img = 0.35 + 0.15 * torch.randn(n, 3, HW, HW, generator=gen)
    lab = torch.zeros(n, HW, HW, dtype=torch.long)
    for i in range(n):
        for _ in range(int(torch.randint(3, 7, (1,), generator=gen))):
            c = int(torch.randint(4, (1,), generator=gen))
            cy, cx = torch.randint(6, HW - 6, (2,), generator=gen).tolist()
            r = int(torch.randint(4, 10, (1,), generator=gen))
            if bool(torch.randint(2, (1,), generator=gen)):
                mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            else:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            stripes = ((yy if c < 2 else xx) // 2 % 2).float()
            tex = COLOURS[c].reshape(3, 1, 1) * (0.6 + 0.4 * stripes)
            img[i] = torch.where(mask, tex + 0.08 * torch.randn(3, HW, HW, generator=gen), img[i])
            lab[i][mask] = c + 1
    return img, lab


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1, self.e2, self.e3 = block(3, 16), block(16, 32), block(32, 64)
        self.d2, self.d1 = block(64 + 32, 32), block(32 + 16, 16)
        self.head = nn.Conv2d(16, CLASSES, 1)

    def forward(self, x):
        s1 = self.e1(x)
        s2 = self.e2(F.max_pool2d(s1, 2))
        deep = self.e3(F.max_pool2d(s2, 2))
        u2 = self.d2(torch.cat([F.interpolate(deep, scale_factor=2.0), s2], 1))
        u1 = self.d1(torch.cat([F.interpolate(u2, scale_factor=2.0), s1], 1))
        return self.head(u1)


def train(model, batches, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model, data, ref_preds=None):
    """(mDICE in %, argmax agreement with ref_preds in % or None, predictions)."""
    inter, total, preds = torch.zeros(CLASSES), torch.zeros(CLASSES), []
    for x, y in data:
        p = model(x).argmax(1)
        preds.append(p)
        for c in range(CLASSES):
            inter[c] += ((p == c) & (y == c)).sum()
            total[c] += (p == c).sum() + (y == c).sum()
    dice = (2 * inter / total.clamp_min(1)).mean().item() * 100
    agree = None
    if ref_preds is not None:
        agree = 100 * float(torch.cat([(a == b).flatten() for a, b in zip(preds, ref_preds)]).float().mean())
    return dice, agree, preds


def run_seed(seed, args):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train_set = [make_batch(16, gen) for _ in range(24)]
    val = [make_batch(16, gen) for _ in range(6)]
    fp32 = train(UNet(), train_set, args.steps, 3e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = q2ext.insert_gbfusion(copy.deepcopy(fp32), example_inputs=(train_set[0][0],))
    qat = q2ext.prepare(report.model, q2ext.QConfig(w_bits=args.bits, a_bits=args.bits, a_quantizer="lsq"))
    qat = train(qat, train_set, args.qat_steps, 1e-3)
    calib = [x for x, _ in train_set[:4]]
    subset = train_set[: args.ft_batches]
    spec = q2ext.FinetuneSpec(lambda m, b: F.cross_entropy(m(b[0]), b[1]), subset, args.ft_steps, args.ft_lr)
    rows = {}
    base, _, ref = evaluate(qat, val)
    rows["fake quant, LN per pixel (as trained)"] = (base, 100.0, None)
    rows["int8, convert(gbfusion='keep') (default)"] = (*evaluate(q2ext.convert(qat), val, ref)[:2], None)
    for mode in q2ext.passes.gb_fusion_fold.FOLD_MODES:
        for ft in (None, spec):
            label = f"fold {mode}" + (f" + fine-tune ({args.ft_steps} steps, lr {args.ft_lr:g})" if ft else "")
            folded = copy.deepcopy(qat)
            t0 = time.perf_counter()
            q2ext.fold_gbfusion(folded, calib, fold_shift="keep", mode=mode, finetune=ft)
            secs = time.perf_counter() - t0
            rows[f"{label}, fake quant"] = (*evaluate(folded, val, ref)[:2], secs)
            intm = q2ext.convert(folded.eval(), gbfusion="fold")
            rows[f"{label}, int8"] = (*evaluate(intm, val, ref)[:2], None)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400, help="FP32 training steps")
    p.add_argument("--qat-steps", type=int, default=200)
    p.add_argument("--bits", type=int, default=8, help="W and A bits of the QAT model (LSQ; int8 grids below 8)")
    p.add_argument("--ft-steps", type=int, default=100)
    p.add_argument("--ft-lr", type=float, default=2e-5)
    p.add_argument("--ft-batches", type=int, default=4, help="batches of 16 in the fine-tune subset")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    per_seed = [run_seed(s, args) for s in args.seeds]
    print(f"W{args.bits}A{args.bits} LSQ; seeds {args.seeds}; mDICE (%) on {6 * 16} held-out {HW}x{HW} images, mean [min, max] over seeds; "
          "agreement = argmax agreement with the fake-quant model as trained")
    print("| arm | mDICE | change vs as trained | argmax agreement | fold (+ fine-tune) seconds |\n|---|---|---|---|---|")
    for arm in per_seed[0]:
        d = [r[arm][0] for r in per_seed]
        delta = [r[arm][0] - r["fake quant, LN per pixel (as trained)"][0] for r in per_seed]
        a = [r[arm][1] for r in per_seed]
        s = [r[arm][2] for r in per_seed if r[arm][2] is not None]
        print(f"| {arm} | {statistics.mean(d):.2f} [{min(d):.2f}, {max(d):.2f}] | {statistics.mean(delta):+.2f} | "
              f"{statistics.mean(a):.2f} % | {statistics.mean(s):.1f} |" if s else
              f"| {arm} | {statistics.mean(d):.2f} [{min(d):.2f}, {max(d):.2f}] | {statistics.mean(delta):+.2f} | "
              f"{statistics.mean(a):.2f} % | |")


if __name__ == "__main__":
    main()
