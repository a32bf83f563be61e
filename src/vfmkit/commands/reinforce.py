"""``vfmkit reinforce``: dataset reinforcement (teacher targets stored once, replayed at training time).

    vfmkit reinforce clip [DATA] --out DIR [--teacher offline ...] [--captions CAPTIONER|FILE.jsonl] [--n-syn 5]
                          [--n-aug 10] [--recipe rrc_ra] [--size 224] [--storage npz|pth.gz] [--images]
    vfmkit reinforce classify [DATA] --out DIR [--teacher efficientnet-lite0 ...] [--class-index imagenette]
                          [--temperature 1] [--topk 10] [--recipe rrc_flip_ra_re|rrc_flip|rrc_flip_ra_re_mix]
    vfmkit reinforce captions [DATA] --captioner SPEC --out FILE.jsonl [--n 5] [--top-p 0.9]
    vfmkit reinforce train-captioner [--recipe coca_tiny] [--set train.steps=300] [--out DIR]
    vfmkit reinforce dense [DATA] --out DIR [--expert person] [--expert camvid=RUN_DIR] [--n-aug 0] [--size 64]

DATA is any shard spec (directory, pattern, tar, builtin:NAME). Under ``torchrun`` each rank takes shards
``i % WORLD_SIZE == RANK``. Rerunning the same command resumes: finished shards are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _common(p: argparse.ArgumentParser, default_data: str, default_teacher: str, default_recipe: str) -> None:
    p.add_argument("data", nargs="?", default=default_data, help=f"input shards (default {default_data})")
    p.add_argument("--out", type=Path, required=True, help="output folder of reinforced shards")
    p.add_argument(
        "--teacher",
        action="append",
        dest="teachers",
        help=f"teacher spec, repeatable (default {default_teacher})",
    )
    p.add_argument("--n-aug", type=int, default=10, help="augmentations stored per image")
    p.add_argument("--recipe", default=default_recipe, help="augmentation recipe name")
    p.add_argument("--size", type=int, default=224, help="reference (generation) resolution of the recipe")
    p.add_argument(
        "--recipe-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="other AugRecipe fields, e.g. erase_p=0.5 (YAML values)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per teacher forward")
    p.add_argument("--chunk", type=int, default=32, help="samples prepared together")
    p.add_argument("--images", action="store_true", help="also store the source jpg")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--no-prefetch", action="store_true", help="do not overlap preparation with teacher forwards"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(default_teacher=default_teacher)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``reinforce clip|classify|captions|train-captioner`` to the vfmkit CLI."""
    p = subparsers.add_parser(
        "reinforce",
        help="write reinforced shards (teacher targets + augmentation params)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="reinforce_command", required=True)
    clip = sub.add_parser("clip", help="image-text data -> DataCompDR-layout shards")
    _common(clip, "builtin:flickr8k/train", "offline", "rrc_ra")
    clip.add_argument("--captions", help="captioner (openclip:NAME:TAG, saved dir) or a uid->captions .jsonl")
    clip.add_argument("--n-syn", type=int, default=5, help="synthetic captions per image (0: none)")
    clip.add_argument("--top-p", type=float, default=0.9)
    clip.add_argument("--storage", choices=["npz", "pth.gz"], default="npz")
    clip.set_defaults(func=_run, mode="clip")
    cls = sub.add_parser(
        "classify", help="labelled data -> ImageNet+-style shards (top-k teacher probabilities)"
    )
    _common(cls, "builtin:imagenette/train", "efficientnet-lite0", "rrc_flip_ra_re")
    cls.add_argument(
        "--class-index",
        default=None,
        help="'imagenette' (builtin classes.json), a classes.json path, or comma-separated indices",
    )
    cls.add_argument("--temperature", type=float, default=1.0)
    cls.add_argument("--topk", type=int, default=10)
    cls.add_argument("--densify", choices=["smooth", "zeros"], default="smooth")
    cls.set_defaults(func=_run, mode="classify")
    cap = sub.add_parser("captions", help="synthetic captions of shards -> JSONL (uid -> captions)")
    cap.add_argument("data", nargs="?", default="builtin:flickr8k/train")
    cap.add_argument("--captioner", required=True, help="openclip:NAME:TAG_OR_FILE or a saved captioner dir")
    cap.add_argument("--out", type=Path, required=True)
    cap.add_argument("--n", type=int, default=5)
    cap.add_argument("--top-p", type=float, default=0.9)
    cap.add_argument("--seed", type=int, default=0)
    cap.add_argument("--batch-size", type=int, default=16)
    cap.add_argument("--device", default=None)
    cap.set_defaults(func=_captions)
    tr = sub.add_parser("train-captioner", help="train the tiny offline CoCa captioner (recipe coca_tiny)")
    tr.add_argument("--recipe", default="coca_tiny")
    tr.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    tr.add_argument("--out", type=Path, default=None, help="run folder (default: the recipe's out_dir)")
    tr.set_defaults(func=_train_captioner)
    _register_dense(sub)


def _recipe(args: argparse.Namespace) -> dict:
    import yaml

    out = {"name": args.recipe, "size": args.size}
    for kv in args.recipe_set:
        if "=" not in kv:
            raise ValueError(f"--recipe-set {kv!r} must look like key=value")
        k, v = kv.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def build_args(args: argparse.Namespace):
    """argparse namespace -> :class:`~vfmkit.pipelines.reinforce.ReinforceArgs`."""
    from vfmkit.pipelines.reinforce import ReinforceArgs

    kw = dict(
        mode=args.mode,
        teachers=args.teachers or [args.default_teacher],
        n_aug=args.n_aug,
        recipe=_recipe(args),
        seed=args.seed,
        batch_size=args.batch_size,
        chunk=args.chunk,
        images=args.images,
        device=args.device,
        prefetch=not args.no_prefetch,
    )
    if args.mode == "clip":
        kw.update(
            captions=args.captions,
            n_syn=args.n_syn if args.captions else 0,
            top_p=args.top_p,
            storage=args.storage,
        )
    else:
        ci = args.class_index
        if ci is None and str(args.data).startswith("builtin:imagenette"):
            ci = "imagenette"  # the embedded Imagenette labels are the 10 sorted wnids
        from vfmkit.data.builtin import parse_class_index

        kw.update(
            class_index=parse_class_index(ci),
            temperature=args.temperature,
            topk=args.topk,
            densify=args.densify,
        )
    return ReinforceArgs(**kw)


def _run(args: argparse.Namespace) -> int:
    from vfmkit.pipelines.reinforce import reinforce

    res = reinforce(args.data, args.out, build_args(args), progress=not args.no_progress)
    print(
        f"reinforce: {res['samples']} samples in {len(res['done'])} shards ({res['resumed']} resumed) "
        f"at {res['samples_per_s']:.1f} samples/s -> {args.out}"
    )
    if res["manifest"] is not None:
        print(f"complete: {res['manifest']['count']} samples; manifest {args.out / 'manifest.json'}")
    return 0


def _captions(args: argparse.Namespace) -> int:
    import torch

    from vfmkit.data.shards import list_shards
    from vfmkit.methods.captions import caption_shards, load_captioner

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cap = load_captioner(args.captioner, device=device)
    n = caption_shards(
        cap,
        list_shards(args.data),
        args.out,
        args.n,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    print(f"captions: {n} images x {args.n} captions -> {args.out}")
    return 0


def _train_captioner(args: argparse.Namespace) -> int:
    from vfmkit.config import load_config
    from vfmkit.pipelines.captioner import train_captioner

    cfg = load_config(args.recipe, args.overrides)
    out = args.out or Path(cfg.out_dir)
    train_captioner(cfg, out_dir=out)
    print(f"captioner saved to {out / 'captioner'} (use --captions {out / 'captioner'})")
    return 0


def _register_dense(sub) -> None:
    """``vfmkit reinforce dense``: CLIPTeX pseudo-labels (``vfmkit.pipelines.pseudolabel``)."""
    d = sub.add_parser(
        "dense", help="task experts over image-text shards -> pseudo-labels stored beside samples"
    )
    d.add_argument("data", nargs="?", default="builtin:flickr8k/train")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument(
        "--expert",
        action="append",
        dest="experts",
        metavar="SPEC",
        help="'person' (shipped MediaPipe model), 'person:FILE.tflite', or NAME=SEG_RUN_DIR; repeatable "
        "(default person)",
    )
    d.add_argument("--n-aug", type=int, default=0, help="crop parameter sets stored per sample")
    d.add_argument("--size", type=int, default=64, help="training resolution the stored crops are drawn for")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_dense)


def _dense(args: argparse.Namespace) -> int:
    from vfmkit.models.experts import load_expert
    from vfmkit.pipelines.pseudolabel import PseudoLabelArgs, pseudolabel

    experts = [load_expert(s) for s in (args.experts or ["person"])]
    res = pseudolabel(
        args.data,
        args.out,
        experts,
        PseudoLabelArgs(n_aug=args.n_aug, size=(args.size, args.size), seed=args.seed),
    )
    print(
        f"reinforce dense: {res['samples']} samples in {len(res['done'])} shards ({res['resumed']} resumed) "
        f"-> {args.out}"
    )
    return 0
