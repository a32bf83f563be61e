"""MobileCLIP reinforced training: the loss against an independent recomputation of the paper's formula, its
options, and reinforced vs plain training on real embedded data (the distributed exactness test is in
tests/test_distributed.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vfmkit.config import ConfigError, load_config
from vfmkit.methods.mobileclip import DistillClipLoss, MobileClipArgs, make_loss_fn, parse_args


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _kl(p: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(q_logits)) of one row, written out: sum p (log p - log q)."""
    q = torch.softmax(q_logits.double(), -1)
    p = p.double()
    return (p * (p.log() - q.log())).sum()


def reference_distill(img, txt, scale, t_img, t_txt, dims, scales, avg_after=False) -> torch.Tensor:
    """The paper's L_distill = 1/2 (L_I2T + L_T2I), row by row, teacher by teacher (no shared code)."""
    b, total = img.shape[0], 0.0
    s_i2t, s_t2i = scale * img @ txt.T, scale * txt @ img.T
    blocks, o = [], 0
    for d in dims:
        blocks.append(slice(o, o + d))
        o += d
    for direction in range(2):
        p_rows = []
        for sl, s in zip(blocks, scales, strict=True):
            a, c = (t_img[:, sl], t_txt[:, sl]) if direction == 0 else (t_txt[:, sl], t_img[:, sl])
            p_rows.append(torch.softmax(s * a.double() @ c.double().T, -1))
        student = s_i2t if direction == 0 else s_t2i
        if avg_after:
            p = torch.stack(p_rows).mean(0)
            total = total + sum(_kl(p[r], student[r]) for r in range(b)) / b
        else:
            total = total + sum(_kl(p[r], student[r]) for p in p_rows for r in range(b)) / (b * len(dims))
    return 0.5 * total


@pytest.mark.parametrize("avg_after", [False, True])
def test_distill_matches_independent_recomputation(avg_after):
    dims, scales = [12, 8], [70.0, 60.0]
    img, txt = _unit(6, 16, seed=0), _unit(6, 16, seed=1)
    t_img = torch.cat([_unit(6, 12, seed=2), _unit(6, 8, seed=3)], -1)
    t_txt = torch.cat([_unit(6, 12, seed=4), _unit(6, 8, seed=5)], -1)
    scale = torch.tensor(20.0)
    loss = DistillClipLoss(dims, scales, lam=1.0, average_after_softmax=avg_after)
    got, logs = loss(img, txt, scale, t_img, t_txt)
    want = reference_distill(img, txt, scale, t_img, t_txt, dims, scales, avg_after)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert "clip_loss" not in logs  # lambda = 1: pure distillation


def test_lambda_mixes_clip_and_distill_and_lambda_zero_is_open_clip():
    from open_clip.loss import ClipLoss

    img, txt = _unit(8, 16, seed=0), _unit(8, 16, seed=1)
    t_img, t_txt = _unit(8, 10, seed=2), _unit(8, 10, seed=3)
    scale = torch.tensor(10.0)
    clip_ref = ClipLoss()(img, txt, scale)
    zero, _ = DistillClipLoss([10], [50.0], lam=0.0)(img, txt, scale, t_img, t_txt)
    assert zero.item() == pytest.approx(clip_ref.item(), rel=1e-6)
    distill = reference_distill(img, txt, scale, t_img, t_txt, [10], [50.0])
    mixed, logs = DistillClipLoss([10], [50.0], lam=0.75)(img, txt, scale, t_img, t_txt)
    assert mixed.item() == pytest.approx(0.25 * clip_ref.item() + 0.75 * distill.item(), rel=1e-5)
    assert set(logs) == {"clip_loss", "distill_loss"}


def test_distill_is_zero_only_when_student_matches_teacher():
    t_img, t_txt = _unit(8, 16, seed=0), _unit(8, 16, seed=1)
    same, _ = DistillClipLoss([16], [30.0])(t_img, t_txt, torch.tensor(30.0), t_img, t_txt)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    other_scale, _ = DistillClipLoss([16], [30.0])(t_img, t_txt, torch.tensor(10.0), t_img, t_txt)
    assert other_scale.item() > 1e-3  # the teacher's temperature matters: a cooler student is penalised


def test_average_after_softmax_with_identical_teachers_equals_one_teacher():
    img, txt = _unit(6, 16, seed=0), _unit(6, 16, seed=1)
    t1i, t1t = _unit(6, 8, seed=2), _unit(6, 8, seed=3)
    one, _ = DistillClipLoss([8], [40.0])(img, txt, torch.tensor(15.0), t1i, t1t)
    two, _ = DistillClipLoss([8, 8], [40.0, 40.0], average_after_softmax=True)(
        img, txt, torch.tensor(15.0), torch.cat([t1i, t1i], -1), torch.cat([t1t, t1t], -1)
    )
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_scale_count_and_width_mismatch_are_errors():
    with pytest.raises(ConfigError, match="one scale per teacher"):
        DistillClipLoss([8, 8], [40.0])
    loss = DistillClipLoss([8, 8], [40.0, 40.0])
    with pytest.raises(ValueError, match="sum of teacher dims"):
        loss(
            _unit(4, 8, seed=0),
            _unit(4, 8, seed=1),
            torch.tensor(10.0),
            _unit(4, 12, seed=2),
            _unit(4, 12, seed=3),
        )


@pytest.mark.parametrize(
    "bad, match",
    [({"caption_mode": "both"}, "caption_mode"), ({"lam": 1.5}, "lam"), ({"lamda": 0.5}, "lamda")],
)
def test_method_args_are_validated(bad, match):
    cfg = load_config({"method": "mobileclip", "method_args": bad})
    with pytest.raises(ConfigError, match=match):
        parse_args(cfg)


def test_build_without_reinforced_data_names_the_key():
    from vfmkit.engine.distributed import init_distributed
    from vfmkit.methods.mobileclip import build

    cfg = load_config({"method": "mobileclip", "model": {"name": "vfm-tiny-vit"}})
    with pytest.raises(ConfigError, match="method_args.reinforced"):
        build(cfg, init_distributed())


@pytest.fixture(scope="module")
def tiny_batch():
    """A real-caption and an other-caption branch of 8 embedded Flickr8k pairs, on a tiny open_clip model."""
    from vfmkit.eval.features import ordered_loader
    from vfmkit.methods.clip import decode_image
    from vfmkit.models.factory import create_clip

    torch.manual_seed(0)
    bundle = create_clip("vfm-tiny-vit")

    def decode(raw):
        caps = json.loads(raw["json"])["captions"]
        toks = bundle.tokenizer([caps[0], caps[1]])
        return {"image": bundle.preprocess_val(decode_image(raw)), "text": toks[0], "syn_text": toks[1]}

    batch = next(iter(ordered_loader("builtin:flickr8k/heldout", decode, batch_size=8)))
    batch.update(t_img=_unit(8, 24, seed=0), t_txt=_unit(8, 24, seed=1), t_syn=_unit(8, 24, seed=2))
    return bundle.model, batch


@pytest.mark.parametrize("mode", ["sum", "mix"])
def test_caption_branches_sum_or_mix(tiny_batch, mode):
    from vfmkit.methods.clip import clip_outputs

    model, batch = tiny_batch
    model.eval()
    args = MobileClipArgs(lam=0.5, caption_mode=mode, syn_ratio=0.3)
    loss = DistillClipLoss([24], [50.0], lam=0.5)
    with torch.no_grad():
        total, logs = make_loss_fn(loss, args)(model, batch, 0)
        o = clip_outputs(model, batch["image"], torch.cat([batch["text"], batch["syn_text"]]))
        real, _ = loss(
            o["image_features"], o["text_features"][:8], o["logit_scale"], batch["t_img"], batch["t_txt"]
        )
        syn, _ = loss(
            o["image_features"], o["text_features"][8:], o["logit_scale"], batch["t_img"], batch["t_syn"]
        )
        no_syn, _ = make_loss_fn(loss, MobileClipArgs(lam=0.5, use_syn=False))(model, batch, 0)
    want = real + syn if mode == "sum" else 0.7 * real + 0.3 * syn
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    assert no_syn.item() == pytest.approx(real.item(), rel=1e-5)
    assert "syn_distill_loss" in logs and abs(real.item() - syn.item()) > 1e-4  # the branches really differ
