"""``vfmkit tic``: TiC-CLIP time-continual CLIP training (arXiv:2310.16226).

    vfmkit tic prepare --out runs/tic/stream                    # embedded emoji subset, 5 steps
    vfmkit tic prepare --emoji ../shared/data/emoji --out runs/tic/stream
    vfmkit tic prepare --shards my/shards --by month --out runs/tic/stream   # json 'timestamp' or 'year'
    vfmkit tic run --stream runs/tic/stream --strategy all --seeds 0,1,2 --out runs/tic
    vfmkit tic report runs/tic

Strategies: oracle, cumulative-all, cumulative-exp, cumulative-equal, sequential, restart, patching, lwf.
Every step of every strategy resumes after a kill; a rerun skips finished steps.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tic", help="TiC-CLIP: time-continual CLIP training and the time matrix",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="tic_command", required=True)

    pp = sub.add_parser("prepare", help="cut a time-stamped stream into steps with held-out eval splits")
    pp.add_argument("--out", required=True, help="stream folder to write")
    src = pp.add_mutually_exclusive_group()
    src.add_argument(
        "--emoji", default=None, help="emoji folder (images.tar + emoji.csv); default: embedded subset"
    )
    src.add_argument(
        "--shards", default=None, help="shards whose json has 'timestamp' or 'year' (or use --timestamps)"
    )
    pp.add_argument("--by", default="year", choices=["year", "month"], help="group times by year or month")
    pp.add_argument(
        "--boundaries", default=None, help="custom cut points, comma-separated (years or ISO dates)"
    )
    pp.add_argument("--timestamps", default=None, help="CSV uid,timestamp giving each sample's time")
    pp.add_argument("--eval-frac", type=float, default=0.2, help="fraction of groups held out per step")
    pp.set_defaults(func=_prepare)

    pr = sub.add_parser("run", help="train strategies over the stream and fill their time matrices")
    pr.add_argument(
        "recipe", nargs="?", default="tic_emoji", help="recipe name or YAML path (default tic_emoji)"
    )
    pr.add_argument("--stream", default=None, help="stream folder (sets method_args.stream)")
    pr.add_argument("--strategy", default="all", help="a strategy, a comma-separated list, or 'all'")
    pr.add_argument("--seeds", default=None, help="comma-separated seeds (default: the recipe's seed)")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, e.g. --set train.steps=50 (the per-step budget C)")  # fmt: skip
    pr.add_argument("--out", default=None, help="output folder (default: the recipe's out_dir)")
    pr.set_defaults(func=_run)

    rp = sub.add_parser("report", help="summarise finished runs: table, summary.json, compute plot")
    rp.add_argument("out", help="the run folder of `vfmkit tic run`")
    rp.set_defaults(func=_report)


def _prepare(args: argparse.Namespace) -> int:
    from vfmkit.pipelines.tic import prepare

    cuts = [b.strip() for b in args.boundaries.split(",") if b.strip()] if args.boundaries else None
    s = prepare(args.out, emoji=args.emoji, shards=args.shards, by=args.by, boundaries=cuts,
                timestamps_csv=args.timestamps, eval_frac=args.eval_frac)  # fmt: skip
    for st in s["steps"]:
        print(f"step {st['index']} {st['label']}: train {st['n_train']}, eval {st['n_eval']} "
              f"({st['n_groups_eval']} groups)")  # fmt: skip
    print(f"stream: {args.out}/stream.json ({s['n_skipped']} samples skipped)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from vfmkit.config import load_config
    from vfmkit.pipelines.tic import STRATEGIES, format_table, run_all

    overrides = list(args.overrides)
    if args.stream:
        overrides.append(f"method_args.stream={args.stream}")
    cfg = load_config(args.recipe, overrides)
    names = list(STRATEGIES) if args.strategy == "all" else [s.strip() for s in args.strategy.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [cfg.seed]
    out = args.out or cfg.out_dir
    summary = run_all(cfg, names, seeds, out)
    print(format_table(summary["strategies"]))
    print(f"summary: {out}/summary.json, plot: {out}/compute_vs_accuracy.png")
    return 0


def _report(args: argparse.Namespace) -> int:
    from vfmkit.pipelines.tic import format_table, report

    summary = report(args.out)
    print(format_table(summary["strategies"]))
    print(json.dumps({"summary": f"{args.out}/summary.json", "seeds": summary["seeds"]}))
    return 0
