"""SAM-CLIP-style merging (issue 15): the merged model's initialisation, the two-stream step, per-group learning
rates, zero-shot segmentation and resume of Stage II. Teacher A is the shipped offline teacher; teacher B a tiny
CamVid seg model trained for a few steps on the embedded subset (mechanics only)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from vfmkit.config import ConfigError, load_config

TINY_MERGE = {
    "data": {"train": "builtin:flickr8k/train", "batch_size": 2, "shuffle_buffer": 0},
    "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0, "schedule": "constant"},
    "train": {
        "steps": 1,
        "progress": False,
        "tensorboard": False,
        "ckpt_every": 0,
        "log_every": 1,
        "grad_clip": 0.0,
        "eval_every": 0,
    },
}


def _cfg(tmp: Path, method_args: dict, **sections) -> object:
    d = copy.deepcopy(TINY_MERGE)
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return load_config(
        {
            "method": "merge",
            "out_dir": str(tmp),
            **d,
            "method_args": {
                "batch_b": 2,
                "image_size_a": 64,
                "crop_b": [64, 96],
                "dense_val": "",
                **method_args,
            },
        }
    )


@pytest.fixture(scope="session")
def teacher_b_dir(tmp_path_factory) -> Path:
    """A tiny CamVid seg run (Lite0 + ASPP, 2 steps on the embedded subset): a real seg run folder."""
    from vfmkit.methods.registry import run

    out = tmp_path_factory.mktemp("camvid_b")
    cfg = load_config(
        "camvid_teacher",
        [
            f"out_dir={out}",
            "data.train=builtin:camvid/train",
            "data.val=builtin:camvid/val",
            "data.batch_size=2",
            "train.steps=2",
            "train.ckpt_every=0",
            "train.progress=false",
            "train.tensorboard=false",
            "train.eval_every=0",
            "optim.warmup_steps=1",
            "method_args.crop=[64,96]",
        ],
    )
    run(cfg, eval_fn=lambda m, s: {})
    assert (out / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def teachers(teacher_b_dir):
    from vfmkit.methods.merge import load_teacher_b
    from vfmkit.models.teachers import load_teacher

    return load_teacher("offline"), load_teacher_b(str(teacher_b_dir))


def test_head_initialisation_copies_the_intended_weights(teachers):
    from vfmkit.models.merge import build_merged_model, teacher_a_proj_init

    ta, tb = teachers
    m = build_merged_model(tb, ta.embed_dim, proj_init=teacher_a_proj_init(ta))
    net_b = tb.tower.net
    # the shared backbone and Head_B are B's, tensor for tensor
    for (k, v), (k2, v2) in zip(tb.tower.state_dict().items(), m.tower.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    for (k, v), (k2, v2) in zip(tb.head.state_dict().items(), m.head_b.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    # Head_A: a copy of the last stage (last block + head conv + BN) and of A's image head
    last = net_b._blocks[-1].state_dict()
    got = m.head_a.blocks[0].state_dict()
    assert list(last) == list(got) and all(torch.equal(last[k], got[k]) for k in last)
    assert torch.equal(m.head_a.conv_head.weight, net_b._conv_head.weight)
    assert torch.equal(m.head_a.bn.running_var, net_b._bn1.running_var)
    assert torch.equal(m.head_a.proj.linear.weight, ta.heads.image_head.linear.weight.float())
    assert m.split == len(net_b._blocks) - 1
    # copies, not shared tensors: training the merged model leaves the teachers alone
    assert m.head_a.conv_head.weight.data_ptr() != net_b._conv_head.weight.data_ptr()
    assert m.tower.net._conv_head.weight.data_ptr() != net_b._conv_head.weight.data_ptr()
    # at initialisation the merged model's B path is teacher B, and Head_A on B's backbone is a function of it
    x = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(x, "b"), tb(x), atol=1e-5)
        dense, emb = m(x, "dense_a"), m(x, "a")
        expect = torch.nn.functional.normalize(dense.mean((2, 3)), dim=-1)
        assert torch.allclose(emb, expect, atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        build_merged_model(tb, ta.embed_dim, pool="median")


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, teachers):
    """One Stage II engine step, with the batch and RNG state the loss saw recorded."""
    from vfmkit.engine import train
    from vfmkit.engine.distributed import DistInfo
    from vfmkit.methods.registry import build_job

    ta, tb = teachers
    out = tmp_path_factory.mktemp("merge_step")
    cfg = _cfg(out, {"stage": "multitask", "w_a": 1.0, "w_b": 3.0}, optim={"eps": 1e-12})
    job = build_job(cfg, DistInfo(), teacher_a=ta, teacher_b=tb)
    init = copy.deepcopy(job.model)
    seen = {}

    def loss_fn(m, batch, step):
        seen["batch"] = copy.deepcopy(batch)
        seen["rng"] = torch.get_rng_state()
        return job.loss_fn(m, batch, step)

    train(cfg, job.model, loss_fn, job.loader, out_dir=cfg.out_dir, groups=job.groups)
    return cfg, job, init, seen


def test_two_stream_step_equals_one_step_on_the_summed_loss(one_step, teachers):
    """The engine's step on {"a", "b"} = backward of each stream's loss accumulated, then one AdamW step."""
    from vfmkit.methods.merge import dense_kd_loss

    cfg, job, init, seen = one_step
    ta, tb = teachers
    assert set(seen["batch"]) == {"a", "b"}
    assert seen["batch"]["a"]["image"].shape[0] == 2 and seen["batch"]["b"]["image"].shape[-2:] == (64, 96)
    m = copy.deepcopy(init)
    m.train()
    torch.set_rng_state(seen["rng"])  # the same dropout draws as the engine's forward
    xa, xb = seen["batch"]["a"]["image"], seen["batch"]["b"]["image"]
    with torch.no_grad():
        ta_t, tb_t = ta.encode_image(xa), tb(xb)
    la = (1 - (m(xa, "a") * ta_t).sum(-1)).mean()
    la.backward()  # stream A's gradients ...
    lb = 3.0 * dense_kd_loss(m(xb, "b"), tb_t)
    lb.backward()  # ... accumulated with stream B's
    params = dict(m.named_parameters())
    names = {id(p): n for n, p in job.model.named_parameters()}
    groups = [{**g, "params": [params[names[id(p)]] for p in g["params"]]} for g in job.groups]
    o = cfg.optim
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    opt.step()
    got = job.model.state_dict()
    worst = max(float((v.float() - got[k].float()).abs().max()) for k, v in m.state_dict().items())
    assert worst < 1e-6, worst
    moved = max(float((v.float() - got[k].float()).abs().max()) for k, v in init.state_dict().items())
    assert moved > 1e-5  # the step changed the weights (so the comparison above is not vacuous)


def test_per_group_learning_rates_are_applied(one_step):
    """Adam's first step moves a weight by lr * g / (|g| + eps): the largest move of each part is its lr."""
    from vfmkit.models.merge import MergedModel

    cfg, job, _, _ = one_step
    m = job.model
    assert isinstance(m, MergedModel)
    lr = cfg.optim.lr
    seen_mults = sorted({g["lr_mult"] for g in job.groups})
    assert seen_mults == [0.1, 1.0]
    init = one_step[2]  # the weights before the step
    for part, mult in (("tower", 0.1), ("head_b", 0.1), ("head_a", 1.0)):
        a, b = getattr(init, part).state_dict(), getattr(m, part).state_dict()
        biggest = max(
            float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point() and "running" not in k
        )
        assert biggest == pytest.approx(lr * mult, rel=0.02), (part, biggest)  # float32 rounding


def test_zeroshot_segmentation_recovers_a_hand_built_mask():
    from vfmkit.eval.zeroshot_seg import (
        class_text_embeddings,
        evaluate_zeroshot_seg,
        majority_baseline,
        zeroshot_segment,
    )

    g = torch.Generator().manual_seed(0)
    k, d = 4, 16
    dirs = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:k]  # orthonormal class directions
    names = ["sky", "road", "car", "tree"]
    idx = {n: i for i, n in enumerate(names)}

    def encode_text(texts):  # a prompt's embedding: its class direction, scaled per template
        return torch.stack([dirs[idx[t.split()[-1].rstrip(".")]] * (1 + len(t) % 3) for t in texts])

    text = class_text_embeddings(encode_text, names, ("a photo of a {}.", "a {}."))
    assert torch.allclose(text, dirs, atol=1e-6)
    mask = torch.randint(0, k, (2, 6, 8), generator=g)
    mask[0, 0, :3] = 11  # void pixels are not scored
    clean = mask.clamp(max=k - 1)
    dense = dirs[clean].permute(0, 3, 1, 2) * torch.rand(2, 1, 6, 8, generator=g).add(0.5)
    noise = torch.randn(2, d, 6, 8, generator=g) * 0.05
    dense = dense + noise
    assert torch.equal(zeroshot_segment(dense, text)[mask != 11], mask[mask != 11])
    res = evaluate_zeroshot_seg(
        lambda x: dense, [{"image": torch.zeros(2, 3, 6, 8), "mask": mask}], text, k, 11, names
    )
    assert res["mIoU"] == 100.0 and res["pixel_acc"] == 100.0 and res["n_images"] == 2
    # a swapped class direction is scored as wrong
    res_bad = evaluate_zeroshot_seg(
        lambda x: dense, [{"image": torch.zeros(2, 3, 6, 8), "mask": mask}], text[[1, 0, 2, 3]], k, 11, names
    )
    assert res_bad["iou/sky"] == 0.0 and res_bad["iou/car"] == 100.0
    maj = majority_baseline([torch.tensor([[0, 0, 1]])], [torch.tensor([[0, 1, 11]])], 2, 11)
    assert maj["class"] == 0 and maj["pixel_acc"] == 50.0 and maj["mIoU"] == 25.0


def test_teacher_a_dense_features_pool_to_its_embedding(teachers):
    """Teacher A's dense baseline is its own image head per location: mean-pooled, it is A's embedding."""
    from vfmkit.eval.zeroshot_seg import teacher_dense_features

    ta, _ = teachers
    x = torch.rand(2, 3, ta.image_size, ta.image_size)
    dense = teacher_dense_features(ta)(x)
    emb = torch.nn.functional.normalize(dense.mean((2, 3)), dim=-1)
    assert torch.allclose(emb, ta.encode_image(x), atol=1e-4)


def test_resume_after_interruption_mid_stage_two_equals_uninterrupted(tmp_path, teachers):
    from vfmkit.methods.registry import run_job

    ta, tb = teachers
    kw = {"build_kwargs": {"teacher_a": ta, "teacher_b": tb}}
    margs = {"stage": "multitask"}
    over = {"train": {"steps": 3, "ckpt_every": 1}}
    _, full = run_job(_cfg(tmp_path / "full", margs, **over), **kw)
    _, first = run_job(_cfg(tmp_path / "cut", margs, **over), stop_after=2, **kw)
    assert first.step == 2
    _, rest = run_job(_cfg(tmp_path / "cut", margs, **over), **kw)
    assert rest.resumed_from == 2 and rest.step == 3
    a = (tmp_path / "full" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "cut" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "cut" / "merge.json").read_text())["stage"] == "multitask"


def test_bad_method_args_are_named(tmp_path):
    from vfmkit.methods.merge import parse_args

    with pytest.raises(ConfigError, match="method_args.stage"):
        parse_args(_cfg(tmp_path, {"stage": "three"}))
    with pytest.raises(ConfigError, match="method_args.dense_loss"):
        parse_args(_cfg(tmp_path, {"dense_loss": "mse"}))
    with pytest.raises(ConfigError, match="method_args.nope"):
        parse_args(_cfg(tmp_path, {"nope": 1}))


def test_weight_interpolation_is_linear_in_alpha():
    from vfmkit.pipelines.merge import interpolate

    sd0 = {"w": torch.zeros(3), "n": torch.tensor(5)}
    sd1 = {"w": torch.tensor([4.0, 8.0, -4.0]), "n": torch.tensor(9)}
    assert torch.equal(interpolate(sd0, sd1, 0.25)["w"], torch.tensor([1.0, 2.0, -1.0]))
    assert (
        torch.equal(interpolate(sd0, sd1, 1.0)["w"], sd1["w"]) and int(interpolate(sd0, sd1, 0.5)["n"]) == 5
    )


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same_weights(a: Path, b: Path) -> bool:
    x, y = _tensors(a), _tensors(b)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_rising_forgetting_keeps_the_earlier_checkpoint(tmp_path, teachers):
    """Early stopping on forgetting through the engine's eval hook: A-only training (no B stream) makes B's
    forgetting (per-pixel KL of Head_B to teacher B on held-out CamVid val images) rise from 0; with a tolerance
    between two measured steps the run keeps the step before it is exceeded, and says so (also across an
    interruption and resume)."""
    from vfmkit.methods.merge import FORGET_FILE, LAST_WEIGHTS
    from vfmkit.methods.registry import run_job

    ta, tb = teachers
    kw = {"build_kwargs": {"teacher_a": ta, "teacher_b": tb}}
    margs = {
        "stage": "a_only",
        "forget_probe_a": "builtin:flickr8k/heldout",
        "forget_probe_b": "builtin:camvid/val",
        "forget_n": 4,
    }
    over = {"train": {"steps": 4, "eval_every": 1, "ckpt_every": 1, "keep_ckpts": 10}, "optim": {"lr": 3e-3}}
    _, res = run_job(_cfg(tmp_path / "last", {**margs, "keep": "last"}, **over), **kw)
    assert "eval/forget/b" in res.final_logs and "eval/forget/a" in res.final_logs
    rec = json.loads((tmp_path / "last" / FORGET_FILE).read_text())
    curve = rec["curve"]
    assert [e["step"] for e in curve] == [0, 1, 2, 3, 4] and rec["kept_step"] == 4
    b = [e["b"] for e in curve]
    assert b[0] < 1e-6 and curve[0]["b_agree"] == 1.0  # the initial model's Head_B is teacher B
    assert all(x < y for x, y in zip(b, b[1:], strict=False)), b  # the forgetting curve rises
    assert not (tmp_path / "last" / LAST_WEIGHTS).exists()

    tol = 0.5 * (b[2] + b[3])
    cut = tmp_path / "tol"  # interrupted after step 3 (its last checkpoint is step 2), then resumed
    over_cut = {**over, "train": {**over["train"], "ckpt_every": 2}}
    cfg_cut = _cfg(cut, {**margs, "keep": "tolerance", "forget_tol_b": tol}, **over_cut)
    _, first = run_job(cfg_cut, stop_after=3, **kw)
    assert first.step == 3 and not (cut / "model.safetensors").exists()
    _, rest = run_job(cfg_cut, **kw)
    assert rest.resumed_from == 2
    rec2 = json.loads((cut / FORGET_FILE).read_text())
    assert [e["b"] for e in rec2["curve"]] == b  # the same run, measured the same
    assert rec2["kept_step"] == 2 and rec2["last_step"] == 4 and "step 3" in rec2["why"]
    # building the finished run's job again (as `vfmkit merge run` does to load a finished stage) leaves its
    # record and its kept weights as they are
    from vfmkit.methods.registry import build_job

    before = {f: (cut / f).read_bytes() for f in (FORGET_FILE, "model.safetensors")}
    build_job(cfg_cut, _one_process(), **kw["build_kwargs"])
    assert {f: (cut / f).read_bytes() for f in before} == before
    # model.safetensors is the step-2 weights (the engine's own step-2 checkpoint), the last step's are kept aside
    ckpt = tmp_path / "last" / "checkpoints"
    assert _same_weights(cut / "model.safetensors", ckpt / "step-000000002" / "model.safetensors")
    assert _same_weights(cut / LAST_WEIGHTS, tmp_path / "last" / "model.safetensors")
    assert not _same_weights(cut / "model.safetensors", cut / LAST_WEIGHTS)

    # keep=best on B's forgetting alone: the rising curve keeps the initial weights
    best = tmp_path / "best"
    margs_b = {**margs, "keep": "best", "forget_w_a": 0.0, "forget_probe_a": ""}
    run_job(_cfg(best, margs_b, **over), **kw)
    assert json.loads((best / FORGET_FILE).read_text())["kept_step"] == 0
    from vfmkit.methods.registry import build_job

    init = build_job(_cfg(tmp_path / "init", {"stage": "a_only"}), _one_process(), **kw["build_kwargs"]).model
    got = _tensors(best / "model.safetensors")
    assert all(torch.equal(v, got[k]) for k, v in init.state_dict().items() if k in got)


def _one_process():
    from vfmkit.engine.distributed import DistInfo

    return DistInfo()


def test_choose_kept_and_forgetting_keys_are_checked(tmp_path):
    from vfmkit.methods.merge import choose_kept, parse_args

    curve = [
        {"step": 0, "a": 0.8, "b": 0.0, "score": 0.8},
        {"step": 10, "a": 0.5, "b": 0.01, "score": 0.51},
        {"step": 20, "a": 0.4, "b": 0.05, "score": 0.45},
        {"step": 30, "a": 0.39, "b": 0.2, "score": 0.59},
    ]
    assert choose_kept(curve, "last")[0] == 30
    assert choose_kept(curve, "best")[0] == 20
    assert choose_kept(curve, "tolerance", 0.03)[0] == 10
    assert choose_kept(curve, "tolerance", 1.0)[0] == 30
    ok = {"forget_probe_b": "builtin:camvid/val"}
    every = {"train": {"eval_every": 5}}
    with pytest.raises(ConfigError, match="method_args.keep"):
        parse_args(_cfg(tmp_path, {**ok, "keep": "first"}, **every))
    with pytest.raises(ConfigError, match="method_args.keep"):
        parse_args(_cfg(tmp_path, {"keep": "best"}, **every))  # no probe
    with pytest.raises(ConfigError, match="method_args.forget_probe_b"):
        parse_args(_cfg(tmp_path, {"forget_probe_a": "x", "keep": "tolerance", "forget_tol_b": 0.1}, **every))
    with pytest.raises(ConfigError, match="method_args.forget_tol_b"):
        parse_args(_cfg(tmp_path, {**ok, "keep": "tolerance"}, **every))
    with pytest.raises(ConfigError, match="train.eval_every"):
        parse_args(_cfg(tmp_path, {**ok, "keep": "best"}))
    with pytest.raises(ConfigError, match="method_args.forget_n"):
        parse_args(_cfg(tmp_path, {**ok, "forget_n": 0}))


def test_evaluation_scores_imagenette_zero_shot_with_head_a(teachers):
    """A's second metric: zero-shot top-1 on the embedded Imagenette val (class-name prompts) of the merged
    model's Head_A with A's text tower, equal to the argmax computed by hand, and teacher A's own above chance."""
    import torch.nn.functional as F
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from vfmkit.eval.features import encode_images_labels
    from vfmkit.eval.zeroshot import class_names_for, zeroshot_eval_encoders
    from vfmkit.eval.zeroshot_seg import class_text_embeddings
    from vfmkit.methods.merge import evaluate_merged
    from vfmkit.models.merge import build_merged_model, teacher_a_proj_init

    ta, tb = teachers
    spec = "builtin:imagenette/val"
    names = class_names_for(spec)
    assert len(names) == 10 and "tench" in names[0].lower()
    m = build_merged_model(tb, ta.embed_dim, proj_init=teacher_a_proj_init(ta)).eval()
    res = evaluate_merged(m, ta, zeroshot_cls=spec, image_size_a=64, batch_size=32)
    assert set(res) >= {"a/zs_top1", "a/zs_top5"}
    # by hand: Head_A's embeddings against the prompt-ensembled class embeddings of A's text tower
    from torchvision.transforms.functional import pil_to_tensor

    from vfmkit.data.decode import resize_center_crop

    feats, labels = encode_images_labels(
        lambda x: m(x, "a"), lambda im: resize_center_crop(pil_to_tensor(im), 64), spec, 32
    )
    texts = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    cls = class_text_embeddings(ta.encode_text, names, texts)
    top1 = float((F.normalize(feats, dim=-1) @ cls.T).argmax(1).eq(labels).float().mean()) * 100
    assert res["a/zs_top1"] == pytest.approx(top1, abs=1e-6)
    own = zeroshot_eval_encoders(ta.encode_image, ta.encode_text, spec, names, ta.image_size, ta.logit_scale)
    assert own["top1"] > 30.0, own  # teacher A's own zero-shot skill (10 classes: chance is 10)


# ------------------------------------------------------------------------------------------------ Stage I cache


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> str:
    """The first 12 embedded Flickr8k train images as their own shards (a small real stream A)."""
    from vfmkit.pipelines.merge import held_out_slice

    return held_out_slice("builtin:flickr8k/train", 0, 12, tmp_path_factory.mktemp("few") / "flickr12")


def _probe_cfg(tmp: Path, data: str, cache: str = "", **train) -> object:
    margs = {"stage": "probe", **({"probe_cache": cache, "cache_part": 5} if cache else {})}
    return _cfg(
        tmp,
        margs,
        data={"train": data, "batch_size": 4, "shuffle_buffer": 0},
        train={"steps": 3, **train},
    )


def test_cached_stage_one_batch_has_the_uncached_loss(tmp_path, teachers, few_images):
    """A cached Stage I batch holds the backbone's maps at the split and A's embeddings of the very images the
    uncached stream reads first (shard order), and its loss equals the uncached path's (1e-5)."""
    from vfmkit.engine.distributed import DistInfo
    from vfmkit.methods.registry import build_job

    ta, tb = teachers
    kw = {"teacher_a": ta, "teacher_b": tb}
    plain = build_job(_probe_cfg(tmp_path / "plain", few_images), DistInfo(), **kw)
    cached = build_job(_probe_cfg(tmp_path / "cached", few_images, str(tmp_path / "cache")), DistInfo(), **kw)
    assert len(cached.loader) == 3 and cached.loader.n == 12  # 12 images in parts of 5, 5, 2
    assert sorted(p.name for p in (tmp_path / "cache").glob("part-*")) == [
        f"part-00000{i}.safetensors" for i in range(3)
    ]
    bp, bc = next(iter(plain.loader)), next(iter(cached.loader))
    x = bp["a"]["image"]
    assert set(bc) == {"h", "target"} and len(x) == len(bc["h"]) == 4
    m = plain.model.eval()
    with torch.no_grad():
        assert torch.allclose(bc["h"], m.trunk(x)[0], atol=1e-5)
        assert torch.allclose(bc["target"], ta.encode_image(x), atol=1e-6)
        for a, b in zip(plain.model.state_dict().values(), cached.model.state_dict().values(), strict=True):
            assert torch.equal(a, b)  # the same initial model (seeded)
        lp, _ = plain.loss_fn(m, bp, 0)
        lc, _ = cached.loss_fn(m, bc, 0)
    assert 0.05 < float(lp) < 2.0 and abs(float(lp) - float(lc)) < 1e-5, (float(lp), float(lc))


def test_cached_stage_one_trains_the_same_head_a(tmp_path, teachers, few_images):
    """Three engine steps of Stage I on the cached maps give the Head_A of three steps on the full forward; the
    backbone and Head_B stay B's in both."""
    from vfmkit.methods.registry import run_job

    ta, tb = teachers
    kw = {"build_kwargs": {"teacher_a": ta, "teacher_b": tb}}
    run_job(_probe_cfg(tmp_path / "plain", few_images), **kw)
    run_job(_probe_cfg(tmp_path / "cached", few_images, str(tmp_path / "cache")), **kw)
    a, b = (
        _tensors(tmp_path / "plain" / "model.safetensors"),
        _tensors(tmp_path / "cached" / "model.safetensors"),
    )
    assert set(a) == set(b)
    head = [k for k in a if k.startswith("head_a.") and a[k].is_floating_point()]
    worst = max(float((a[k] - b[k]).abs().max()) for k in head)
    assert worst < 1e-6, worst
    from vfmkit.methods.registry import build_job

    init = build_job(_probe_cfg(tmp_path / "init", few_images), _one_process(), **kw["build_kwargs"]).model
    moved = max(float((init.state_dict()[k] - a[k]).abs().max()) for k in head)
    assert moved > 1e-4  # Head_A did train (lr 1e-3), so the comparison above is not vacuous
    frozen = [k for k in a if not k.startswith("head_a.")]
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], init.state_dict()[k]) for k in frozen)


def test_probe_cache_resumes_and_refuses_another_view(tmp_path, teachers, few_images):
    """A killed cache build (its last part and the done flag lost) resumes at the missing part and gives the
    same tensors; a cache folder made for another view is refused."""
    from vfmkit.methods.merge import PROBE_CACHE_META, build_probe_cache
    from vfmkit.models.merge import build_merged_model

    ta, tb = teachers
    m = build_merged_model(tb, ta.embed_dim)
    folder = tmp_path / "cache"
    logs: list[str] = []
    full = build_probe_cache(m, ta, few_images, 64, folder, part=5, log=logs.append)
    assert full["h"].shape[0] == 12 and full["h"].dtype == torch.float32 and "12 computed now" in logs[-1]
    meta = json.loads((folder / PROBE_CACHE_META).read_text())
    assert meta["done"] and meta["parts"] == 3 and meta["build_s"] > 0
    first = (folder / "part-000000.safetensors").stat().st_mtime_ns
    (folder / "part-000002.safetensors").unlink()  # as a kill during the last part leaves it
    (folder / PROBE_CACHE_META).write_text(json.dumps({**meta, "done": False}))
    again = build_probe_cache(m, ta, few_images, 64, folder, part=5, log=logs.append)
    assert "2 computed now" in logs[-1]  # only the missing part
    assert (folder / "part-000000.safetensors").stat().st_mtime_ns == first
    assert all(torch.equal(full[k], again[k]) for k in full)
    with pytest.raises(ConfigError, match="method_args.probe_cache"):
        build_probe_cache(m, ta, few_images, 96, folder, part=5)
    from vfmkit.methods.merge import parse_args

    with pytest.raises(ConfigError, match="method_args.probe_cache"):
        parse_args(_cfg(tmp_path, {"stage": "multitask", "probe_cache": str(folder)}))


def test_merge_run_cli_passes_the_learning_rates(tmp_path, monkeypatch):
    """`vfmkit merge run --lr-stage2 --lr-mult-backbone --lr-mult-head-b` reach the pipeline's options (the
    Stage II backbone multiplier is what docs/merge.md measured as the lever)."""
    import vfmkit.pipelines.merge as pm
    from vfmkit.cli import main

    seen = {}

    def fake_run(o):
        seen["o"] = o
        return {"merged": {}}

    monkeypatch.setattr(pm, "run_merge", fake_run)
    out = tmp_path / "m"
    argv = ["merge", "run", "--out", str(out), "--teacher-b", str(tmp_path / "b"), "--lr-stage2", "2e-4"]
    argv += ["--lr-mult-backbone", "1.0"]
    assert main(argv) == 0
    o = seen["o"]
    assert o.lr_stage2 == 2e-4 and o.lr_stage1 == 8e-4
    assert o.method_args == {"lr_mult_backbone": 1.0, "lr_mult_head_b": 0.1}
    # the options reach each stage's config; the A-only baseline keeps its own 1x multipliers
    cfg = pm._stage_cfg(o, "stage2", "multitask", 10, o.lr_stage2, {})
    assert cfg.method_args["lr_mult_backbone"] == 1.0 and cfg.optim.lr == 2e-4
    base = pm._stage_cfg(
        o, "a_only", "a_only", 10, o.lr_stage2, {"lr_mult_backbone": 1.0, "lr_mult_head_b": 1.0}
    )
    assert base.method_args["lr_mult_head_b"] == 1.0
