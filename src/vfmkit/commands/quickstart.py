"""``vfmkit quickstart``: the main job end to end on the embedded data, in minutes on a laptop CPU.

    vfmkit quickstart [--out DIR] [--steps N] [--teacher SPEC ...] [--val-data SHARDS]

1. load the teacher (the shipped offline EfficientNet-Lite0 + MiniLM teacher, or ``--teacher openclip:NAME:TAG``);
2. reinforce ``builtin:flickr8k/train`` into ``OUT/reinforced`` (``vfmkit reinforce clip``: stored augmentations +
   teacher embeddings; resumable, finished shards are skipped on a rerun);
3. train the same tiny student plain (CLIP) and reinforced (MobileCLIP distillation) for the same steps, seed and
   recipe, through the method registry and the one engine, evaluating held-out retrieval every few steps;
4. evaluate the untrained, plain and reinforced students (and the teacher) on held-out retrieval (R@1, R@5, R@10)
   and Imagenette zero-shot, print a table with each arm's training CPU and wall seconds and the step at which
   the reinforced student first reaches plain's final R@1, write ``OUT/report.md``, ``OUT/curves.png`` and
   ``OUT/results.json``.

The embedded ``builtin:flickr8k/heldout`` (200 Flickr8k train-split photos never used for training) stands in for
Flickr8k val; ``--val-data`` points at real val shards (``vfmkit data import ... --split val``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="teacher -> reinforce -> plain vs reinforced student -> eval + report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder (reruns resume)")
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per student (default: the recipe's)"
    )
    p.add_argument(
        "--teacher",
        action="append",
        dest="teachers",
        metavar="SPEC",
        help="teacher spec, repeatable: 'offline' (default, shipped) or openclip:NAME:TAG_OR_FILE",
    )
    p.add_argument("--recipe", default="mobileclip_tiny", help="student recipe (method mobileclip)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for both students, e.g. --set data.batch_size=32",
    )
    p.add_argument("--data", default="builtin:flickr8k/train", help="image-text training shards")
    p.add_argument("--val-data", default="builtin:flickr8k/heldout", help="retrieval evaluation shards")
    p.add_argument(
        "--zeroshot-data", default="builtin:imagenette/val", help="zero-shot classification shards"
    )
    p.add_argument(
        "--n-aug",
        type=int,
        default=3,
        help="augmentations stored per image (3 keeps the default run under 10 minutes on 2 cores)",
    )
    p.add_argument("--eval-points", type=int, default=6, help="held-out evaluations during training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--aug", default="rrc", help="stored augmentation recipe (rrc: crop only, as plain CLIP's)"
    )
    p.add_argument(
        "--aug-scale",
        type=float,
        default=0.9,
        help="RandomResizedCrop min scale of the stored augmentations (0.9: open_clip's plain default)",
    )
    p.add_argument(
        "--keep-teacher-images",
        action="store_true",
        help="also distil on the images the offline teacher was aligned on (excluded by default)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vfmkit.pipelines.quickstart import QuickstartOptions, run_quickstart

    opts = QuickstartOptions(
        out=Path(args.out),
        steps=args.steps,
        teachers=args.teachers,
        recipe=args.recipe,
        overrides=list(args.overrides),
        data=args.data,
        val_data=args.val_data,
        zeroshot_data=args.zeroshot_data,
        n_aug=args.n_aug,
        eval_points=args.eval_points,
        seed=args.seed,
        aug=args.aug,
        aug_scale=args.aug_scale,
        keep_teacher_images=args.keep_teacher_images,
    )
    table, summary, report, total = run_quickstart(opts)
    print(table)
    print(summary)
    print(f"report: {report}  curves: {opts.out / 'curves.png'}  total {total:.0f}s")
    return 0
