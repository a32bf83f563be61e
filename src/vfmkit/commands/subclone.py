"""``vfmkit subclone``: subclone a trained parent into a smaller child, and train parents/children offline.

    vfmkit subclone train --recipe subclone_vit_parent --out runs/vit_parent      # a parent, here, on real data
    vfmkit subclone run runs/vit_parent --out runs/vit_child --layers 3 --width 96   # subclone + function check
    vfmkit subclone train --recipe subclone_vit_child --set method_args.init=runs/vit_child --out runs/vit_ft
    vfmkit subclone run vit_small_patch16_224 --pretrained vit_s.safetensors --num-classes 1000 --out ... --width 192
    vfmkit subclone run vit_tiny_patch16_224 --pretrained augreg_in21k ...   (a timm tag; timm:NAME:TAG too)

A named parent without --pretrained has random weights and is refused (--allow-random-parent: warned loudly).

A parent is a vfmkit run/subclone directory (``arch.json`` + ``model.safetensors``), a timm ViT name, an open_clip
model name (its ``--tower visual`` or ``text``), or a local transformers GPT-2 directory (``config.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def cmd_run(a: argparse.Namespace) -> int:
    import yaml

    from vfmkit.methods.subclone import RANDOM_PARENT_NOTE, SubcloneError
    from vfmkit.pipelines.subclone import SubcloneOptions, subclone_parent

    kw = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.model_arg)}
    opts = SubcloneOptions(
        a.parent,
        a.out,
        a.layers,
        a.width,
        a.heads,
        a.mlp_hidden,
        a.scale,
        a.blocks,
        a.calib,
        a.heldout,
        a.n_calib,
        a.n_heldout,
        a.pretrained,
        a.tower,
        a.num_classes,
        kw,
        a.allow_random_parent,
    )
    try:
        info = subclone_parent(opts)
    except (SubcloneError, ValueError) as e:  # a bad parent/child/data spec: say why, no traceback
        print(f"vfmkit subclone run: error: {e}", file=sys.stderr)
        return 2
    pd, cd, check = info["plan"].parent, info["plan"].child, info["function_check"]
    if info["parent_weights"].startswith("random"):
        print(
            f"WARNING: {info['parent']} is a RANDOMLY INITIALISED parent (--allow-random-parent): "
            f"{RANDOM_PARENT_NOTE}",
            file=sys.stderr,
        )
    print(
        f"subclone {info['parent']}: layers {pd.layers}->{cd.layers} width {pd.width}->{cd.width} heads "
        f"{pd.heads}->{cd.heads} mlp {pd.mlp_hidden}->{cd.mlp_hidden}, blocks kept {info['blocks_kept']}"
    )
    print(
        f"function check on {check['n_outputs']} held-out outputs ({info['heldout']}): pearson "
        f"{check['pearson']:.4f} cosine {check['cosine']:.4f} top1-agree {check['top1_agree']:.4f}"
    )
    print(f"wrote {Path(a.out) / 'arch.json'} and model.safetensors")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from vfmkit.config import load_config
    from vfmkit.pipelines.subclone import run_training

    cfg = load_config(a.recipe, a.set)
    out = a.out or cfg.out_dir
    r = run_training(cfg, out)
    last = r["evals"][-1] if r["evals"] else r["final"]
    print(
        f"trained {r['step']} steps -> {out}; last eval: "
        + ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k.startswith("eval/"))
    )
    return 0


def register(subparsers: Any) -> None:
    from vfmkit.methods.subclone import BLOCK_MODES, SCALE_MODES

    p = subparsers.add_parser(
        "subclone",
        help="weight subcloning: a smaller model initialised from a larger one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="subclone_cmd", required=True)
    r = sub.add_parser("run", help="subclone PARENT into a smaller child and print the function check")
    r.add_argument("parent", help="run dir with arch.json, timm/open_clip name, or transformers GPT-2 dir")
    r.add_argument("--out", required=True, help="output dir: arch.json + model.safetensors")
    r.add_argument("--layers", type=int)
    r.add_argument("--width", type=int, help="residual (embedding) dimension")
    r.add_argument("--heads", type=int, help="default: width / parent head dim")
    r.add_argument("--mlp-hidden", type=int, help="default: parent's MLP ratio")
    r.add_argument("--scale", choices=SCALE_MODES, default="paper")
    r.add_argument("--blocks", choices=BLOCK_MODES, default="middle")
    r.add_argument("--calib", help="calibration data spec (default: builtin train split)")
    r.add_argument("--heldout", help="held-out data for the function check (default: builtin val/heldout)")
    r.add_argument("--n-calib", type=int, default=256)
    r.add_argument("--n-heldout", type=int, default=256)
    r.add_argument(
        "--pretrained",
        help="a named parent's weights: a file, or a timm / open_clip pretrained tag "
        "(e.g. augreg_in21k, laion2b_s34b_b79k); without it a named parent is refused",
    )
    r.add_argument(
        "--allow-random-parent",
        action="store_true",
        help="subclone a named parent with no --pretrained anyway (random init: a loud warning)",
    )
    r.add_argument(
        "--tower", choices=("visual", "text"), default="visual", help="open_clip tower to subclone"
    )
    r.add_argument("--num-classes", type=int, help="classes of a timm parent's head")
    r.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra timm model kwarg for a named parent (YAML value), e.g. img_size=64",
    )
    r.set_defaults(func=cmd_run)
    t = sub.add_parser("train", help="train a parent or a child with a subclone_* recipe through the engine")
    t.add_argument("--recipe", default="subclone_vit_parent")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out")
    t.set_defaults(func=cmd_train)
