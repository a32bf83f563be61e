"""``vfmkit train RECIPE.yaml --set optim.lr=1e-3 ...``: any method, through the one engine."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train from a recipe (YAML path or builtin recipe name)")
    p.add_argument("recipe", help="YAML recipe path, or the name of a recipe in vfmkit/recipes")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    p.add_argument("--out", default=None, help="output directory (overrides out_dir)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vfmkit.config import load_config
    from vfmkit.methods.registry import run as run_method

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    cfg = load_config(args.recipe, overrides)
    res = run_method(cfg)
    from vfmkit.engine.distributed import is_main

    if res.history and is_main():  # one result line per run, not one per rank
        print(json.dumps({"step": res.step, "out_dir": str(res.out_dir), **res.final_logs}))
    return 0
