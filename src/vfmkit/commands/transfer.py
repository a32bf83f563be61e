"""``vfmkit transfer run``: task-oriented knowledge transfer (arXiv:2311.18237), one arm per call.

    vfmkit transfer run --out runs/transfer                       # embedded Imagenette + Flickr8k pool
    vfmkit transfer run --config arm.yaml --set distill=feature --set curation=random --out runs/transfer
    vfmkit transfer run --set teacher_weights=runs/t/model.safetensors --set transfer_set=my_shards
    vfmkit transfer run --stop-after finetune-teacher --out runs/transfer
    vfmkit transfer seg --set distill=feature --out runs/transfer_seg  # segmentation: CamVid teacher -> student

Stages (each cached in OUT/<stage>-<hash>/stage.json with the config that made it; arms sharing a stage reuse
it; a killed run resumes): finetune-teacher -> build-transfer-set -> distill -> finetune-student. Options: the
fields of vfmkit.pipelines.transfer.TransferOptions (a YAML mapping in --config, or --set KEY=VALUE).

``seg``: the segmentation arm (vfmkit.pipelines.transfer_seg, options SegTransferOptions): a given dense teacher
(default the CamVid teacher run) -> transfer-set (its per-pixel outputs on n_aug stored views of unlabelled
images, stored once) -> distill (task: per-pixel KL; feature: dense features of the frozen ImageNet Lite0;
none: scratch) -> finetune-student (method seg on the labels, then val mIoU).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "transfer",
        help="task-oriented knowledge transfer into a small model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="transfer_cmd", required=True)
    for name, what, fields, func in (
        ("run", "one arm's stages", "TransferOptions", _run),
        ("seg", "one segmentation arm's stages", "SegTransferOptions", _seg),
    ):
        r = sub.add_parser(name, help=f"run (or resume) {what}")
        r.add_argument("--config", default=None, help=f"YAML mapping of {fields} fields")
        r.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="an option, e.g. --set distill=feature (repeatable; values read as YAML)",
        )
        r.add_argument("--stop-after", default=None, help="end after this stage")
        r.add_argument("--out", default=None, help="output folder (overrides the option 'out')")
        r.set_defaults(func=func)


def _run(args: argparse.Namespace) -> int:
    from vfmkit.pipelines.transfer import options_from, run_transfer

    opts = options_from(args.config, args.overrides, args.out)
    report = run_transfer(opts, stop_after=args.stop_after)
    print(
        json.dumps(
            {
                "top1": report.get("top1"),
                **{
                    k: {kk: vv for kk, vv in v.items() if kk != "composition"}
                    for k, v in report["stages"].items()
                },
            },
            default=str,
        )
    )
    return 0


def _seg(args: argparse.Namespace) -> int:
    from vfmkit.pipelines.transfer_seg import options_from, run_seg_transfer

    opts = options_from(args.config, args.overrides, args.out)
    report = run_seg_transfer(opts, stop_after=args.stop_after)
    print(json.dumps({"mIoU": report.get("mIoU"), **report["stages"]}, default=str))
    return 0
