"""``vfmkit merge``: SAM-CLIP-style merging (arXiv:2310.15308) of a language-aligned teacher A and a dense teacher B.

    vfmkit merge run --teacher-b runs/camvid_teacher --out runs/merge            # embedded data by default
    vfmkit merge run --teacher-b runs/camvid_teacher --train runs/dense_data/flickr_train \\
        --retrieval-val runs/dense_data/flickr_val --dense-train runs/dense_data/camvid_train \\
        --dense-val runs/dense_data/camvid_val --out runs/merge

Stage I (Head_A probing, backbone frozen) -> Stage II (multi-task distillation, two streams per step, 0.1x lr on
the backbone and Head_B) and the weight-interpolation baseline (alpha 0..1); every model scored on A's retrieval,
B's mIoU and zero-shot segmentation from text. Resumable: a rerun continues or skips finished stages.
One stage alone is ``vfmkit train merge_camvid --set method_args.stage=probe`` (the recipe).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="SAM-CLIP-style merging of two teachers into one backbone",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="merge_command", required=True)
    r = sub.add_parser("run", help="Stage I -> Stage II, the interpolation baseline, and the evaluation")
    r.add_argument(
        "--out", required=True, help="output folder (stage1/, stage2/, a_only/, eval/, report.json)"
    )
    r.add_argument(
        "--teacher-a", default="offline", help="teacher A spec (default: the shipped offline teacher)"
    )
    r.add_argument(
        "--teacher-b", required=True, help="teacher B: a seg run folder (vfmkit train camvid_teacher)"
    )
    r.add_argument("--train", default="builtin:flickr8k/train", help="image-text shards (stream A)")
    r.add_argument("--retrieval-val", default="builtin:flickr8k/heldout", help="A's retrieval val shards")
    r.add_argument(
        "--dense-train", default="builtin:camvid/train", help="dense shards (stream B, labels unused)"
    )
    r.add_argument("--dense-val", default="builtin:camvid/val", help="dense val shards (B's mIoU, zero-shot)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--stage1-steps", type=int, default=100)
    r.add_argument(
        "--stage1-epochs", type=float, default=0.0, help="> 0: Stage I epochs (overrides its steps)"
    )
    r.add_argument("--batch-stage1", type=int, default=0, help="Stage I batch (0: --batch-a)")
    r.add_argument(
        "--stage1-cache",
        default="auto",
        help="Stage I on maps computed once per image: 'auto' (OUT/stage1_cache), a folder, or '' (none)",
    )
    r.add_argument("--stage1-eval-every", type=int, default=0, help="A's R@1 every N Stage I steps")
    r.add_argument("--stage2-steps", type=int, default=200)
    r.add_argument("--baseline-steps", type=int, default=100)
    r.add_argument("--lr-stage1", type=float, default=8e-4, help="Stage I lr (the paper's 8e-4)")
    r.add_argument("--lr-stage2", type=float, default=4e-4, help="Stage II and A-only baseline base lr")
    r.add_argument(
        "--lr-mult-backbone",
        type=float,
        default=0.1,
        help="Stage II lr multiplier of the shared backbone (the paper's 0.1; docs/merge.md measures 1.0)",
    )
    r.add_argument("--lr-mult-head-b", type=float, default=0.1, help="Stage II lr multiplier of Head_B")
    r.add_argument("--batch-a", type=int, default=16)
    r.add_argument("--batch-b", type=int, default=4)
    r.add_argument("--w-b", type=float, default=10.0, help="weight of B's dense distillation loss")
    r.add_argument(
        "--retrieval-max", type=int, default=0, help="score retrieval on the first N images (0: all)"
    )
    r.add_argument(
        "--zeroshot-val", default="builtin:imagenette/val", help="A's zero-shot top-1 class shards ('' : off)"
    )
    r.add_argument("--zeroshot-classes", default="", help="their classes file (default: found beside them)")
    r.add_argument(
        "--stage2-keep",
        default="last",
        choices=("last", "best", "tolerance"),
        help="early stopping of Stage II on forgetting: which measured step the merged model is",
    )
    r.add_argument("--forget-every", type=int, default=0, help="measure forgetting every N Stage II steps")
    r.add_argument("--forget-probe-a", default="", help="held-out image shards for A's forgetting")
    r.add_argument("--forget-probe-b", default="", help="held-out dense shards for B's forgetting")
    r.add_argument("--forget-n", type=int, default=32, help="probe images of each")
    r.add_argument(
        "--forget-tol-b", type=float, default=0.0, help="--stage2-keep tolerance: B's forgetting (KL) limit"
    )
    r.add_argument(
        "--forget-w-a", type=float, default=1.0, help="--stage2-keep best: weight of A's forgetting"
    )
    r.add_argument(
        "--forget-w-b", type=float, default=1.0, help="--stage2-keep best: weight of B's forgetting"
    )
    r.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from vfmkit.pipelines.merge import MergeOptions, run_merge

    o = MergeOptions(
        out_dir=args.out, teacher_a=args.teacher_a, teacher_b=args.teacher_b, train=args.train,
        retrieval_val=args.retrieval_val, dense_train=args.dense_train, dense_val=args.dense_val, seed=args.seed,
        stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, baseline_steps=args.baseline_steps,
        batch_a=args.batch_a, batch_b=args.batch_b, w_b=args.w_b, retrieval_max=args.retrieval_max,
        zeroshot_val=args.zeroshot_val, zeroshot_classes=args.zeroshot_classes, stage2_keep=args.stage2_keep,
        forget_every=args.forget_every, forget_probe_a=args.forget_probe_a, forget_probe_b=args.forget_probe_b,
        forget_n=args.forget_n, forget_tol_b=args.forget_tol_b, forget_w_a=args.forget_w_a,
        forget_w_b=args.forget_w_b, stage1_epochs=args.stage1_epochs, batch_stage1=args.batch_stage1,
        stage1_cache=args.stage1_cache, stage1_eval_every=args.stage1_eval_every,
        lr_stage1=args.lr_stage1, lr_stage2=args.lr_stage2,
        method_args={"lr_mult_backbone": args.lr_mult_backbone, "lr_mult_head_b": args.lr_mult_head_b},
    )  # fmt: skip
    rep = run_merge(o)
    keys = ("teachers", "stage1", "stage1_curve", "merged", "interpolation", "stage2_forgetting", "times")
    print(json.dumps({k: rep[k] for k in keys if k in rep}))
    return 0
