"""``vfmkit backfill``: FastFill model updates with partial backfilling (arXiv:2303.04766).

    vfmkit backfill                                    # embedded Imagenette subset, recipe fastfill_imagenette
    vfmkit backfill --config fastfill_paper --set method_args.train_set=shards/train \\
        --set method_args.gallery=shards/val --out runs/backfill
    vfmkit backfill --steps simulate,report --out runs/backfill   # rerun only the later steps

Steps (each resumable; outputs already on disk are reused):
  cache     encode train/gallery/query with the old and new encoders -> OUT/features/*.safetensors
  train     the new model's frozen head (or a linear probe), then h for each objective (fct, fastfill)
  simulate  backfilling curves (mAP, CMC top-1/top-5 vs fraction backfilled) -> OUT/curves.json
  report    AUC table -> OUT/report.json and OUT/backfill.png
Encoders: timm:NAME:{random|pretrained|CKPT}[@SIZE], clip:NAME[:PRETRAINED][@SIZE], efficientnet-lite0[@SIZE].
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``backfill`` to the vfmkit CLI."""
    p = subparsers.add_parser("backfill", help="FastFill: learn old->new feature transformation, simulate backfilling",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", default="fastfill_imagenette", help="recipe name or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. method_args.query=gallery (repeatable)")  # fmt: skip
    p.add_argument(
        "--steps", default="cache,train,simulate,report", help="comma-separated subset of the steps"
    )
    p.add_argument("--out", default=None, help="output directory (default: the recipe's out_dir)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from vfmkit.config import load_config
    from vfmkit.pipelines.backfill import run_backfill

    cfg = load_config(args.config, args.overrides)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    res = run_backfill(cfg, steps, args.out)
    if "report" in res:
        out = args.out or cfg.out_dir
        print(f"report: {out}/report.json, plot: {out}/backfill.png")
    return 0
