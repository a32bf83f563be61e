"""``vfmkit eval``: zero-shot classification, image-text retrieval and linear probe for a CLIP model; ``--tasks seg``:
a dense probe (CamVid mIoU by default) of any image tower."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a CLIP model (zero-shot, retrieval, linear probe)")
    p.add_argument(
        "--model",
        default="vfm-tiny-vit",
        help="a vfmkit run dir or local-dir:DIR, an open_clip name, hf-hub:REPO, a config .json, timm:NAME",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="open_clip tag, checkpoint file (open_clip_train's epoch_N.pt too) or vfmkit run dir",
    )
    p.add_argument("--tasks", default="zeroshot,retrieval,probe")
    p.add_argument("--retrieval-data", default="builtin:flickr8k/heldout")
    p.add_argument("--zeroshot-data", default="builtin:imagenette/val")
    p.add_argument("--probe-train", default="builtin:imagenette/train")
    p.add_argument(
        "--classes",
        default=None,
        help="zero-shot class names (classes.json, JSON list or text file, label order); default: the "
        "shards' json 'class' (with a classes.json beside them if any); checked against the shards",
    )
    p.add_argument("--out", default=None, help="write results JSON and a Markdown table here")
    p.add_argument(
        "--tower",
        default=None,
        help="task seg: any tower spec (efficientnet-lite0, timm:NAME[:CKPT], "
        "openclip:NAME[:WEIGHTS], a seg run dir); default: the image tower of --model/--pretrained",
    )
    p.add_argument("--seg-train", default="builtin:camvid/train", help="task seg: dense train shards")
    p.add_argument("--seg-val", default="builtin:camvid/val", help="task seg: dense val shards")
    p.add_argument(
        "--seg-head", default="linear", choices=["linear", "aspp"], help="task seg: head on the frozen tower"
    )
    p.add_argument(
        "--seg-steps", type=int, default=300, help="task seg: head training steps (through the engine)"
    )
    p.set_defaults(func=run)


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    cols = sorted({k for r in rows.values() for k in r})
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.2f}" if c in r else "-" for c in cols) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from vfmkit.eval.clip import check_tasks, evaluate_clip
    from vfmkit.models.factory import create_clip

    tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], also=("seg",))
    res: dict = {}
    if [t for t in tasks if t != "seg"]:
        bundle = create_clip(args.model, args.pretrained)
        res = evaluate_clip(
            bundle,
            [t for t in tasks if t != "seg"],
            args.retrieval_data,
            args.zeroshot_data,
            args.probe_train,
            args.classes,
        )
    if "seg" in tasks:
        from vfmkit.eval.dense import seg_tower_spec
        from vfmkit.methods.seg import dense_probe

        tower = args.tower or seg_tower_spec(args.model, args.pretrained)
        seg = dense_probe(
            tower,
            args.seg_train,
            args.seg_val,
            head=args.seg_head,
            steps=args.seg_steps,
            out_dir=Path(args.out or "runs/eval") / f"seg_{args.seg_head}",
        )
        res.update({f"seg/{k}": v for k, v in seg.items() if "/" not in k})
    print(markdown_table({args.model: res}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(res, indent=2))
        (out / "eval.md").write_text(markdown_table({args.model: res}) + "\n")
    return 0
