"""Every recipe in ``src/vfmkit/recipes/`` runs through ``vfmkit train`` (the registry and the one engine) for 2
steps on the embedded data, with tiny overrides (small images, batches, sample caps). A new recipe must be added
to ``TINY`` (the test fails on a recipe it does not know), so no recipe can drift out of ``vfmkit train``.
Also: the loss settings ``local_loss`` / ``gather_with_grad`` are method args that the methods read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vfmkit
from vfmkit.cli import main
from vfmkit.config import ConfigError, load_config

RECIPES = sorted(p.stem for p in (Path(vfmkit.__file__).parent / "recipes").glob("*.yaml"))
COMMON = [
    "train.steps=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.ckpt_every=0",
    "train.progress=false",
    "train.tensorboard=false",
    "optim.warmup_steps=1",
]
VIT = "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"
GPT = "model.kwargs={n_embd: 32, n_layer: 2, n_head: 2}"

# recipe -> overrides (``{child}`` is a subcloned child made by the test, ``{tmp}`` the test's folder)
TINY: dict[str, list[str]] = {
    "clip_tiny": ["data.batch_size=8", "data.image_size=32"],
    "cliptex_tiny": ["data.batch_size=8", "data.image_size=32"],
    "catlip_tiny": [
        "data.batch_size=8",
        "data.image_size=32",
        "data.train={tmp}/fl",
        "method_args.min_count=1",
        "method_args.backend=wordnet",
    ],
    "coca_tiny": ["data.batch_size=4", "method_args.image_size=32", "method_args.max_images=16"],
    "mobileclip_tiny": [
        "data.batch_size=4",
        "data.image_size=32",
        "method_args.online_teachers=[offline]",
        "method_args.use_syn=false",
    ],
    "dr_imagenette": [
        "data.batch_size=8",
        "data.image_size=32",
        "data.val=null",
        "method_args.mode=plain",
        "method_args.epochs=0",
        "method_args.reinforced=''",
        "method_args.num_classes=10",
    ],
    "fastfill_imagenette": [
        "data.batch_size=16",
        "method_args.old_encoder=timm:test_byobnet:random@32",
        "method_args.new_encoder=efficientnet-lite0@64",
        "method_args.train_set={tmp}/ff",
        "method_args.hidden_dim=16",
        "method_args.probe_steps=2",
    ],
    "fastfill_paper": [
        "data.batch_size=16",
        "method_args.old_encoder=timm:test_byobnet:random@32",
        "method_args.new_encoder=efficientnet-lite0@64",
        "method_args.train_set={tmp}/ff",
        "method_args.gallery={tmp}/ff",
        "method_args.hidden_dim=16",
        "method_args.probe_steps=2",
    ],
    "subclone_vit_parent": [
        VIT,
        "method_args.image_size=32",
        "method_args.max_train=16",
        "method_args.max_val=8",
        "data.batch_size=8",
    ],
    "subclone_vit_child": [
        "method_args.init={child}",
        "method_args.image_size=32",
        "method_args.max_train=16",
        "method_args.max_val=8",
        "data.batch_size=8",
    ],
    "subclone_lm_parent": [
        GPT,
        "method_args.max_train=32",
        "method_args.max_val=8",
        "method_args.vocab_size=200",
        "method_args.context_length=16",
        "data.batch_size=8",
    ],
    "subclone_lm_child": [
        "method_args.init={child}",
        "method_args.vocab={child}/vocab.json",
        "method_args.max_train=32",
        "method_args.max_val=8",
        "method_args.context_length=16",
        "data.batch_size=8",
    ],
    "merge_camvid": [
        "data.train=builtin:flickr8k/train",
        "data.batch_size=2",
        "method_args.teacher_b=efficientnet-lite0",
        "method_args.dense_train=builtin:camvid/train",
        "method_args.dense_val=''",
        "method_args.batch_b=2",
        "method_args.image_size_a=64",
        "method_args.crop_b=[64,96]",
    ],
    "teacher_align_tiny": [
        "data.batch_size=8",
        "method_args.max_train_images=16",
        "method_args.image_size=64",
        "method_args.val=''",
    ],
}
# recipes other engineers own (their tests run them); listed so the coverage check knows them
ELSEWHERE = {"tic_emoji", "camvid_teacher", "dense_probe"}


def test_every_recipe_is_covered():
    unknown = [r for r in RECIPES if r not in TINY and r not in ELSEWHERE]
    assert not unknown, f"recipes without a tiny vfmkit-train run here: {unknown}"


def _child(tmp: Path, parent_recipe: str, over: list[str]) -> Path:
    """Train a 2-step tiny parent with vfmkit train, then subclone it with vfmkit subclone run."""
    assert (
        main(["train", parent_recipe, "--out", str(tmp / "parent"), *[a for o in over for a in ("--set", o)]])
        == 0
    )
    child = tmp / "child"
    assert (
        main(
            [
                "subclone",
                "run",
                str(tmp / "parent"),
                "--out",
                str(child),
                "--layers",
                "1",
                "--width",
                "16",
                "--n-calib",
                "8",
                "--n-heldout",
                "8",
            ]
        )
        == 0
    )
    return child


def _small_shards(out: Path, name: str, n: int = 24) -> Path:
    from conftest import read_builtin_samples

    from vfmkit.data.shards import ShardWriter

    with ShardWriter(out, max_count=1000) as w:
        for s in read_builtin_samples(name, n):
            w.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    return out


@pytest.mark.parametrize("recipe", sorted(TINY))
def test_recipe_runs_through_vfmkit_train(recipe, tmp_path, capsys):
    over = [o.replace("{tmp}", str(tmp_path)) for o in TINY[recipe]]
    if any("{child}" in o for o in over):
        parent = recipe.replace("child", "parent")
        child = _child(tmp_path, parent, [*COMMON, *TINY[parent]])
        over = [o.replace("{child}", str(child)) for o in over]
    if any(str(tmp_path / "ff") in o for o in over):
        _small_shards(tmp_path / "ff", "imagenette/train")
    if any(str(tmp_path / "fl") in o for o in over):
        _small_shards(tmp_path / "fl", "flickr8k/train")
    capsys.readouterr()
    argv = [
        "train",
        recipe,
        "--out",
        str(tmp_path / "run"),
        *[a for o in [*COMMON, *over] for a in ("--set", o)],
    ]
    assert main(argv) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 2 and final["loss"] == final["loss"]  # trained 2 steps, finite loss


def test_loss_settings_are_method_args():
    from vfmkit.engine.distributed import DistInfo
    from vfmkit.methods.clip import ClipArgs, make_contrastive_loss
    from vfmkit.methods.mobileclip import MobileClipArgs

    with pytest.raises(ConfigError, match="train.local_loss"):
        load_config("clip_tiny", ["train.local_loss=false"])
    assert {"local_loss", "gather_with_grad"} <= set(ClipArgs.__dataclass_fields__)
    assert {"local_loss", "gather_with_grad"} <= set(MobileClipArgs.__dataclass_fields__)
    cfg = load_config("clip_tiny", ["method_args.local_loss=false", "method_args.gather_with_grad=false"])
    loss = make_contrastive_loss("clip", cfg, DistInfo())
    assert loss.local_loss is False and loss.gather_with_grad is False
    assert make_contrastive_loss("clip", load_config("clip_tiny"), DistInfo()).local_loss is True


def test_supervised_method_trains_a_handed_module_like_the_engine(tmp_path):
    """``supervised`` (CatLIP's downstream fine-tuning) through registry.run_job = the engine called by hand."""
    import copy

    import torch
    from torch import nn

    from vfmkit.data.loader import TensorLoader
    from vfmkit.engine import train
    from vfmkit.methods.registry import run_job

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 5, (40,))
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    over = ["train.steps=4", "train.progress=false", "train.tensorboard=false", "data.batch_size=16"]
    cfg = load_config({"method": "supervised", "out_dir": str(tmp_path / "a"), "method_args": {}}, over)

    def ce(m, batch, step):
        return torch.nn.functional.cross_entropy(m(batch["x"]).float(), batch["y"].long()), {}

    train(cfg, a, ce, TensorLoader({"x": x, "y": y}, 16, seed=0), out_dir=tmp_path / "a")
    cfg_b = load_config({"method": "supervised", "out_dir": str(tmp_path / "b"), "method_args": {}}, over)
    job, res = run_job(cfg_b, build_kwargs={"model": b, "tensors": {"x": x, "y": y}})
    assert res.step == 4 and job.model is b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), b.parameters(), strict=True))
    with pytest.raises(ConfigError, match="'supervised' trains a module handed to it"):
        run_job(load_config({"method": "supervised", "out_dir": str(tmp_path / "c")}, over))
