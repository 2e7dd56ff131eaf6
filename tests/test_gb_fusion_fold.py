"""The whole App. 7.1 fold: scalar and per-channel LayerNorm replacement, the fine-tune
after removing LayerNorm, and convert's fold arguments."""
import copy

import pytest
import torch
import torch.nn.functional as F

import q2ext
from helpers import TinyUNet
from q2ext.nn import FixedFusion, GBFusion

pytestmark = pytest.mark.filterwarnings("ignore:insert_gbfusion rewrote the root module")


def _batch(gen, n=8, hw=16):
    """A learnable toy segmentation: the label is which colour channel dominates a pixel's
    3x3 neighbourhood (0/1/2)."""
    x = torch.rand(n, 3, hw, hw, generator=gen)
    y = F.avg_pool2d(x, 3, 1, 1).argmax(1)
    return x, y


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def trained():
    """A briefly trained W8A8 QAT TinyUNet with one GBFusion node, and data."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train = [_batch(gen) for _ in range(6)]
    model = q2ext.insert_gbfusion(TinyUNet(classes=3), example_inputs=(train[0][0],)).model
    qat = q2ext.prepare(model, q2ext.QConfig(w_bits=8, a_bits=8, a_quantizer="lsq"))
    opt = torch.optim.Adam(qat.parameters(), lr=1e-2)
    qat.train()
    for i in range(60):
        loss = _loss(qat, train[i % len(train)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qat.eval(), train, [_batch(gen) for _ in range(3)]


@torch.no_grad()
def _eval_loss(model, data):
    return sum(float(_loss(model, b)) for b in data) / len(data)


def test_finetune_after_the_fold_improves_over_the_plain_fold(trained):
    qat, train, held_out = trained
    calib = [x for x, _ in train[:3]]
    plain = copy.deepcopy(qat)
    q2ext.fold_gbfusion(plain, calib, fold_shift="keep")
    tuned = copy.deepcopy(qat)
    spec = q2ext.FinetuneSpec(_loss, train[:4], steps=15, lr=2e-5)
    rows = q2ext.fold_gbfusion(tuned, calib, fold_shift="keep", finetune=spec)
    assert not any(isinstance(m, GBFusion) for m in tuned.modules())
    assert len(rows[0]["finetune_losses"]) == 15
    assert not tuned.training and all(not m.training for m in tuned.modules())  # flags restored
    as_trained, folded, fine = _eval_loss(qat, held_out), _eval_loss(plain, held_out), _eval_loss(tuned, held_out)
    assert fine < folded, (as_trained, folded, fine)
    # BatchNorm statistics stay as trained during the fine-tune
    assert torch.equal(tuned.bn_e.running_mean, qat.bn_e.running_mean)


def test_per_channel_replacement_fits_the_layernorm_at_least_as_well(trained):
    qat, train, _ = trained
    calib = [x for x, _ in train[:3]]
    node_name = next(n for n, m in qat.named_modules() if isinstance(m, GBFusion))
    seen = {}
    live = copy.deepcopy(qat)
    node = live.get_submodule(node_name)
    node.freeze()
    node.register_forward_hook(lambda m, a, out: seen.setdefault("ln", []).append(out))
    with torch.no_grad():
        for x in calib:
            live(x)
    errors = {}
    for mode in ("scalar", "per_channel"):
        folded = copy.deepcopy(qat)
        q2ext.fold_gbfusion(folded, calib, fold_shift="keep", mode=mode)
        fixed = folded.get_submodule(node_name)
        assert isinstance(fixed, FixedFusion) and fixed.scale is not None
        got = []
        fixed.register_forward_hook(lambda m, a, out: got.append(out))
        with torch.no_grad():
            for x in calib:
                folded(x)
        errors[mode] = sum(float((g - w).pow(2).sum()) for g, w in zip(got, seen["ln"]))
    assert errors["per_channel"] <= errors["scalar"] * (1 + 1e-6), errors


def test_convert_fold_with_finetune_matches_its_fake_quant_model(trained):
    qat, train, held_out = trained
    calib = [x for x, _ in train[:3]]
    spec = q2ext.FinetuneSpec(_loss, train[:2], steps=3)
    torch.manual_seed(3)
    intm = q2ext.convert(qat, calib, gbfusion="fold", fold_mode="per_channel", finetune=spec)
    torch.manual_seed(3)
    ref = copy.deepcopy(qat)
    q2ext.fold_gbfusion(ref, calib, fold_shift="keep", mode="per_channel", finetune=spec)
    with torch.no_grad():
        for x, _ in held_out:
            want, got = ref(x), intm(x)
            assert float((got - want).norm() / want.norm()) < 1e-4
    assert any(isinstance(m, FixedFusion) for m in intm.modules())
    assert any(isinstance(m, GBFusion) for m in qat.modules())  # convert works on a copy


def test_bad_arguments_are_named(trained):
    qat, train, _ = trained
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        q2ext.FinetuneSpec(_loss, train, steps=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        q2ext.FinetuneSpec(_loss, train, lr=-1.0)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        q2ext.FinetuneSpec("cross_entropy", train)
    with pytest.raises(TypeError, match="batches must be re-iterable"):
        q2ext.FinetuneSpec(_loss, (b for b in train))
    with pytest.raises(ValueError, match="batches is empty"):
        q2ext.fold_gbfusion(copy.deepcopy(qat), [train[0][0]], finetune=q2ext.FinetuneSpec(_loss, [], steps=1))
    with pytest.raises(ValueError, match="mode must be one of"):
        q2ext.fold_gbfusion(copy.deepcopy(qat), [train[0][0]], mode="per-pixel")
    with pytest.raises(ValueError, match="mode='per_channel' needs calib_batches"):
        q2ext.fold_gbfusion(copy.deepcopy(qat), mode="per_channel")
    with pytest.raises(ValueError, match="calib_batches is empty"):
        q2ext.fold_gbfusion(copy.deepcopy(qat), [], mode="per_channel")
    with pytest.raises(TypeError, match="finetune must be a q2ext.FinetuneSpec"):
        q2ext.fold_gbfusion(copy.deepcopy(qat), [train[0][0]], finetune=dict(steps=3))
    with pytest.raises(ValueError, match="pass gbfusion='fold' with it"):
        q2ext.convert(qat, finetune=q2ext.FinetuneSpec(_loss, train))
    with pytest.raises(ValueError, match="convert: fold_mode must be one of"):
        q2ext.convert(qat, gbfusion="fold", fold_mode="channel")
    with pytest.raises(ValueError, match="need calibrated LayerNorm constants"):
        q2ext.convert(qat, gbfusion="fold", fold_mode="per_channel")
