"""``vfmkit teacher``: build the offline CLIP-like teacher, or measure a teacher's retrieval.

vfmkit teacher build --data /path/flickr8k --out DIR [--image-size 160] [--views 1] [--steps 600]
vfmkit teacher eval  --teacher offline|DIR|openclip:NAME:TAG --data /path/flickr8k [--split val]
"""

from __future__ import annotations

import argparse
import json
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("teacher", help="build / evaluate CLIP-like teachers")
    sub = p.add_subparsers(dest="teacher_cmd", required=True)

    b = sub.add_parser(
        "build", help="train the offline EfficientNet-Lite0 + MiniLM teacher's heads on Flickr8k train"
    )
    b.add_argument("--data", required=True, help="Flickr8k folder: images.tar, captions.csv, splits.json")
    b.add_argument("--out", required=True, help="output teacher directory (heads.safetensors + teacher.json)")
    b.add_argument("--image-size", type=int, default=160)
    b.add_argument("--views", type=int, default=1, help="cached image views per image (view 0 = whole image)")
    b.add_argument("--dim", type=int, default=256, help="shared embedding width")
    b.add_argument("--hidden", type=int, default=0, help="residual MLP width in each head (0: linear heads)")
    b.add_argument("--steps", type=int, default=600)
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--weight-decay", type=float, default=0.1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--cache", default=None, help="feature cache dir (default OUT/cache); reruns resume from it"
    )
    b.add_argument("--no-val", action="store_true", help="skip the val retrieval report")
    b.add_argument("--max-train-images", type=int, default=0, help="use a prefix of the train split (0: all)")
    b.set_defaults(func=_build)

    e = sub.add_parser("eval", help="image-text retrieval R@1/5/10 of a teacher on a Flickr8k split")
    e.add_argument("--teacher", default="offline")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="val", choices=["val", "train"])
    e.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    e.set_defaults(func=_eval)


def _build(args: argparse.Namespace) -> int:
    from vfmkit.pipelines.teacher import build_offline_teacher

    t0 = time.time()
    record = build_offline_teacher(
        args.data,
        args.out,
        image_size=args.image_size,
        n_views=args.views,
        embed_dim=args.dim,
        hidden=args.hidden,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        cache_dir=args.cache,
        eval_val=not args.no_val,
        max_train_images=args.max_train_images,
    )
    print(json.dumps(record, indent=1))
    print(f"teacher saved to {args.out} in {time.time() - t0:.0f}s")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vfmkit.models.teachers import load_teacher
    from vfmkit.pipelines.teacher import encode_flickr_split

    teacher = load_teacher(args.teacher)
    metrics = encode_flickr_split(teacher, args.data, args.split, limit=args.limit)
    print(json.dumps({"teacher": teacher.describe(), "split": args.split, **metrics}, indent=1))
    return 0
