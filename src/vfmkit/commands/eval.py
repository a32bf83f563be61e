"""``vfmkit eval``: zero-shot classification, image-text retrieval and linear probe for a CLIP model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a CLIP model (zero-shot, retrieval, linear probe)")
    p.add_argument("--model", default="vfm-tiny-vit", help="open_clip / vfmkit model name")
    p.add_argument("--pretrained", default=None, help="open_clip tag, checkpoint file or vfmkit run dir")
    p.add_argument("--tasks", default="zeroshot,retrieval,probe")
    p.add_argument("--retrieval-data", default="builtin:flickr8k/heldout")
    p.add_argument("--zeroshot-data", default="builtin:imagenette/val")
    p.add_argument("--probe-train", default="builtin:imagenette/train")
    p.add_argument("--classes", default=None, help="classes.json (default: the embedded Imagenette one)")
    p.add_argument("--out", default=None, help="write results JSON and a Markdown table here")
    p.set_defaults(func=run)


def evaluate_clip(bundle, tasks: list[str], retrieval_data: str, zeroshot_data: str, probe_train: str,
                  classes: str | None) -> dict[str, float]:
    from vfmkit.data.builtin import builtin_path
    from vfmkit.eval.features import encode_image_text, encode_images_labels
    from vfmkit.eval.probe import linear_probe
    from vfmkit.eval.retrieval import retrieval_metrics
    from vfmkit.eval.zeroshot import class_names_from_json, zeroshot_eval

    m, res = bundle.model, {}
    if "retrieval" in tasks:
        i, t, idx = encode_image_text(m, bundle.tokenizer, bundle.preprocess_val, retrieval_data)
        res.update({f"retrieval/{k}": v for k, v in retrieval_metrics(i, t, idx).items()})
    if "zeroshot" in tasks:
        names = class_names_from_json(classes or Path(builtin_path("imagenette")) / "classes.json")
        r = zeroshot_eval(m, bundle.tokenizer, bundle.preprocess_val, zeroshot_data, names)
        res.update({f"zeroshot/{k}": v for k, v in r.items()})
    if "probe" in tasks:
        tx, ty = encode_images_labels(m.encode_image, bundle.preprocess_val, probe_train)
        vx, vy = encode_images_labels(m.encode_image, bundle.preprocess_val, zeroshot_data)
        res.update({f"probe/{k}": v for k, v in linear_probe(tx, ty, vx, vy).items()})
    return res


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    cols = sorted({k for r in rows.values() for k in r})
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.2f}" if c in r else "-" for c in cols) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from vfmkit.models.factory import create_clip

    bundle = create_clip(args.model, args.pretrained)
    res = evaluate_clip(bundle, args.tasks.split(","), args.retrieval_data, args.zeroshot_data,
                        args.probe_train, args.classes)
    print(markdown_table({args.model: res}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(res, indent=2))
        (out / "eval.md").write_text(markdown_table({args.model: res}) + "\n")
    return 0
