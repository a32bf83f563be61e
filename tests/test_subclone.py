"""Weight subcloning: shapes and strict loading, identity at equal sizes, permutation invariance, data-dependent
importance, the scaling rule, block selection and the CLI, on tiny in-process models and embedded real data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vfmkit.data.samples import decode_images, normalize, read_samples
from vfmkit.methods import subclone as sc
from vfmkit.pipelines.subclone import run_training
from vfmkit.text.wordvocab import WordVocab

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Real Imagenette photos from the embedded subset at 32 px: [48, 3, 32, 32] normalised."""
    x, _ = decode_images(read_samples("builtin:imagenette/train", 48), 32)
    return normalize(x, MEAN, STD)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [t for s in read_samples("builtin:flickr8k/train", 12) for t in s.texts][:48]


@pytest.fixture(scope="module")
def vocab(captions) -> WordVocab:
    return WordVocab.build(captions, 120)


def tiny_timm(**kw):
    import timm

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kw}).eval()


def tiny_openclip_visual():
    from open_clip.model import _build_vision_tower

    torch.manual_seed(0)
    return _build_vision_tower(
        24, dict(image_size=32, patch_size=8, width=64, layers=4, head_width=16)
    ).eval()


def tiny_openclip_text():
    from open_clip.model import _build_text_tower

    torch.manual_seed(0)
    return _build_text_tower(24, dict(context_length=16, vocab_size=120, width=64, heads=4, layers=4)).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    conf = GPT2Config(
        vocab_size=120,
        n_positions=16,
        n_embd=64,
        n_layer=4,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(conf).eval()


FACTORIES = {
    "timm_vit": tiny_timm,
    "open_clip_visual": tiny_openclip_visual,
    "open_clip_text": tiny_openclip_text,
    "gpt2": tiny_gpt2,
}


def batches(family: str, images, captions, vocab, n: int = 2, off: int = 0) -> list[dict]:
    if family in ("timm_vit", "open_clip_visual"):
        return [{"x": images[off + 16 * i : off + 16 * (i + 1)]} for i in range(n)]
    ids, mask = vocab.encode(captions, 16)
    if family == "open_clip_text":
        return [{"x": ids[off + 16 * i : off + 16 * (i + 1)]} for i in range(n)]
    return [
        {"x": ids[off + 16 * i : off + 16 * (i + 1)], "mask": mask[off + 16 * i : off + 16 * (i + 1)]}
        for i in range(n)
    ]


def outputs(model, bs) -> torch.Tensor:
    fam = sc.family_of(model)
    with torch.no_grad():
        return torch.cat([fam.run(model, b).reshape(b["x"].shape[0], -1) for b in bs])


@pytest.mark.parametrize("family", list(FACTORIES))
def test_equal_sizes_give_back_the_parent_function(family, images, captions, vocab):
    parent = FACTORIES[family]()
    cal = batches(family, images, captions, vocab)
    res = sc.subclone(parent, cal)
    assert type(res.model) is type(parent)
    # the residual dims really were reordered (so identity is not trivial), yet the function is the same
    assert not torch.equal(res.plan.residual, torch.arange(64))
    held = batches(family, images, captions, vocab, n=1, off=32)
    torch.testing.assert_close(outputs(res.model, held), outputs(parent, held), atol=1e-5, rtol=1e-4)
    assert sc.function_check(parent, res.model, held)["pearson"] > 0.99999


@pytest.mark.parametrize("family", list(FACTORIES))
def test_smaller_child_shapes_and_strict_loading(family, images, captions, vocab, tmp_path):
    parent = FACTORIES[family]()
    res = sc.subclone(parent, batches(family, images, captions, vocab), layers=2, width=32, mlp_hidden=96)
    d = sc.family_of(res.model).dims(res.model)
    assert (d.layers, d.width, d.heads, d.head_dim, d.mlp_hidden) == (2, 32, 2, 16, 96)
    fresh = sc.build_model(res.arch)  # the library's own class, from the JSON config only
    assert type(fresh) is type(parent)
    fresh.load_state_dict(res.model.state_dict(), strict=True)
    sc.save_model(tmp_path / "child", res.model, res.arch)
    loaded, arch = sc.load_model(tmp_path / "child")
    assert arch["family"] == family
    held = batches(family, images, captions, vocab, n=1, off=32)
    torch.testing.assert_close(outputs(loaded, held), outputs(res.model.eval(), held))
    n_child = sum(p.numel() for p in loaded.parameters())
    assert n_child < 0.5 * sum(p.numel() for p in parent.parameters())


def _permute_parent(parent: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """The same function with residual dims, heads and MLP units relabelled (written independently of the
    plan machinery for heads/MLP; residual via a full-size plan with scaling off)."""
    fam = sc.family_of(parent)
    d = fam.dims(parent)
    g = torch.Generator().manual_seed(seed)
    plan = sc.Plan(d, d, list(range(d.layers)), torch.randperm(d.width, generator=g))
    for b in range(d.layers):
        plan.heads[b] = torch.randperm(d.heads, generator=g)
        plan.mlp[b] = torch.randperm(d.mlp_hidden, generator=g)
    state = sc.apply_plan(parent.state_dict(), fam.rules(parent), plan, scale="none")
    out = fam.build(fam.arch(parent)).eval()
    out.load_state_dict(state, strict=True)
    return out


def test_mlp_permutation_by_hand_matches(images):
    """Cross-check of the permutation helper on one block, written by hand for timm's Mlp."""
    parent = tiny_timm()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    manual = tiny_timm()
    manual.load_state_dict(parent.state_dict())
    mlp = manual.blocks[1].mlp
    with torch.no_grad():
        mlp.fc1.weight.copy_(mlp.fc1.weight[perm])
        mlp.fc1.bias.copy_(mlp.fc1.bias[perm])
        mlp.fc2.weight.copy_(mlp.fc2.weight[:, perm])
    torch.testing.assert_close(manual(images[:8]), parent(images[:8]), atol=1e-5, rtol=1e-4)
    assert not torch.equal(manual.blocks[1].mlp.fc1.weight, parent.blocks[1].mlp.fc1.weight)


@pytest.mark.parametrize("family", ["timm_vit", "gpt2"])
def test_permuting_the_parent_does_not_change_the_child(family, images, captions, vocab):
    parent = FACTORIES[family]()
    permuted = _permute_parent(parent)
    cal, held = (
        batches(family, images, captions, vocab),
        batches(family, images, captions, vocab, n=1, off=32),
    )
    torch.testing.assert_close(outputs(permuted, held), outputs(parent, held), atol=1e-5, rtol=1e-4)
    changed = [k for k, v in parent.state_dict().items() if not torch.equal(permuted.state_dict()[k], v)]
    assert len(changed) > 10  # a real relabelling, not a copy
    a = sc.subclone(parent, cal, layers=3, width=32, mlp_hidden=100)
    b = sc.subclone(permuted, cal, layers=3, width=32, mlp_hidden=100)
    torch.testing.assert_close(outputs(b.model, held), outputs(a.model, held), atol=1e-4, rtol=1e-4)
    # and the children are the same tensors, not just the same function: importance order is canonical
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v, atol=1e-5, rtol=1e-4)


def test_importance_depends_on_the_calibration_data(images):
    parent = tiny_timm()
    photos = [{"x": images[:32]}]
    flat = [{"x": images[:32].mean((2, 3), keepdim=True).expand(-1, -1, 32, 32).contiguous()}]  # colour only
    i1, i1b, i2 = (sc.measure_importance(parent, c) for c in (photos, photos, flat))
    assert torch.equal(i1.stream, i1b.stream)  # deterministic on the same data
    assert not torch.equal(i1.stream.argsort(), i2.stream.argsort())
    assert not torch.equal(i1.mlp[1].argsort(), i2.mlp[1].argsort())
    pd = sc.family_of(parent).dims(parent)
    p1 = sc.make_plan(i1, pd, sc.resolve_dims(pd, width=32))
    p2 = sc.make_plan(i2, pd, p1.child)
    assert set(p1.residual.tolist()) != set(p2.residual.tolist())  # a different kept set, not only an order


def test_mlp_importance_is_mean_abs_activation(images):
    """Block 0's MLP score equals mean |GELU(fc1(norm2(x)))| over batch and tokens, computed by hand."""
    m = tiny_timm()
    x = images[:16]
    imp = sc.measure_importance(m, [{"x": x}])
    with torch.no_grad():
        s = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        blk = m.blocks[0]
        s = s + blk.attn(blk.norm1(s))
        hid = blk.mlp.act(blk.mlp.fc1(blk.norm2(s)))
    torch.testing.assert_close(imp.mlp[0], hid.abs().mean((0, 1)), atol=1e-5, rtol=1e-4)
    assert imp.heads[0].shape == (4,) and imp.stream.shape == (64,) and imp.block_ratio.shape == (4,)


def test_open_clip_head_scores_recompute_torch_mha():
    """open_clip's MHA never calls out_proj as a module; the recomputed heads must reproduce its output."""
    v = tiny_openclip_visual()
    blk = v.transformer.resblocks[0]
    x = torch.randn(3, 17, 64)
    mask = torch.full((17, 17), float("-inf")).triu(1)
    ref = blk.attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    heads = sc._mha_heads(blk.attn, (x, x, x), {"attn_mask": mask})
    torch.testing.assert_close(blk.attn.out_proj(heads), ref, atol=1e-5, rtol=1e-4)


def test_scaling_rule_applies_to_matrices_only(images):
    parent = tiny_timm()
    cal = [{"x": images[:16]}]
    kw = dict(layers=4, width=32, mlp_hidden=64)
    paper, none = sc.subclone(parent, cal, scale="paper", **kw), sc.subclone(parent, cal, scale="none", **kw)
    sp, sn = paper.model.state_dict(), none.model.state_dict()
    torch.testing.assert_close(sp["blocks.0.attn.qkv.weight"], sn["blocks.0.attn.qkv.weight"] * math.sqrt(2))
    torch.testing.assert_close(
        sp["blocks.0.mlp.fc2.weight"], sn["blocks.0.mlp.fc2.weight"] * 2.0
    )  # 256 -> 64
    torch.testing.assert_close(sp["head.weight"], sn["head.weight"] * math.sqrt(2))
    for k in (
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
        "pos_embed",
        "cls_token",
        "patch_embed.proj.weight",
    ):
        torch.testing.assert_close(sp[k], sn[k])
    r = none.plan.residual
    torch.testing.assert_close(sn["blocks.0.norm1.weight"], parent.state_dict()["blocks.0.norm1.weight"][r])
    torch.testing.assert_close(sn["pos_embed"], parent.state_dict()["pos_embed"][..., r])


def test_block_selection_keeps_first_and_last():
    assert sc.select_blocks(6, 3, "middle") == [0, 1, 5]
    assert sc.select_blocks(6, 4, "middle") == [0, 1, 4, 5]
    assert sc.select_blocks(6, 6, "middle") == list(range(6))
    ratio = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.3, 0.8])
    assert sc.select_blocks(6, 3, "ratio", ratio) == [0, 2, 5]
    assert sc.select_blocks(6, 4, "ratio", ratio) == [0, 2, 4, 5]


def test_bad_requests_are_named():
    d = sc.Dims(4, 64, 4, 16, 256)
    with pytest.raises(sc.SubcloneError, match="head dim"):
        sc.resolve_dims(d, width=32, heads=4)
    with pytest.raises(sc.SubcloneError, match="layers"):
        sc.resolve_dims(d, layers=8)
    plan = sc.Plan(d, d, [0], torch.arange(64))
    with pytest.raises(sc.SubcloneError, match="'mystery.weight'"):
        sc.apply_plan({"mystery.weight": torch.zeros(2)}, sc.TimmViT().rules(None), plan)
    with pytest.raises(sc.SubcloneError, match="cannot subclone"):
        sc.family_of(torch.nn.Linear(2, 2))


def test_word_vocab_round_trip(vocab, tmp_path):
    ids, mask = vocab.encode(["A dog runs on the grass ."], 12)
    assert ids[0, 0] == vocab.BOS and vocab.EOS in ids[0].tolist() and mask.sum() == int((ids != 0).sum())
    vocab.save(tmp_path / "v.json")
    assert WordVocab.load(tmp_path / "v.json").itos == vocab.itos


def test_cli_run_end_to_end(tmp_path, capsys):
    from vfmkit.cli import main

    parent = tiny_timm()
    fam = sc.family_of(parent)
    sc.save_model(tmp_path / "parent", parent, fam.arch(parent))
    rc = main(
        [
            "subclone",
            "run",
            str(tmp_path / "parent"),
            "--out",
            str(tmp_path / "child"),
            "--layers",
            "2",
            "--width",
            "32",
            "--n-calib",
            "32",
            "--n-heldout",
            "16",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "function check" in out and "pearson" in out
    arch = json.loads((tmp_path / "child" / "arch.json").read_text())
    assert arch["subclone"]["child_dims"]["width"] == 32 and arch["subclone"]["blocks_kept"] == [0, 3]
    child, _ = sc.load_model(tmp_path / "child")
    assert child.embed_dim == 32 and len(child.blocks) == 2
    rc = main(["subclone", "run", str(tmp_path / "parent"), "--out", str(tmp_path / "bad"), "--width", "30"])
    assert rc == 2 and "head dim" in capsys.readouterr().err


def test_train_recipe_runs_through_the_engine(tmp_path):
    from vfmkit.config import load_config

    cfg = load_config(
        "subclone_vit_parent",
        [
            "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
            "method_args.image_size=32",
            "method_args.max_train=64",
            "method_args.max_val=32",
            "train.steps=4",
            "train.eval_every=2",
            "train.progress=false",
            "data.batch_size=16",
        ],
    )
    r = run_training(cfg, tmp_path / "p")
    assert r["step"] == 4 and r["evals"] and "eval/acc" in r["evals"][-1]
    model, arch = sc.load_model(tmp_path / "p")
    assert arch["task"]["task"] == "vit" and model.embed_dim == 32
    # the trained parent reloads with its exact weights
    torch.testing.assert_close(model.state_dict()["head.weight"], r["model"].state_dict()["head.weight"])
