"""``vfmkit data``: import image folders/tars into shards, and inspect shard directories.

vfmkit data import --captions captions.csv --images images.tar --out shards/ [--shard-size N]
                   [--split-file splits.json --split train] [--resize 112 --quality 85] [--compress]
vfmkit data import --class-folders train.tar --out shards/
vfmkit data import --dense camvid/train.tar --classes camvid/classes.json --out shards/   (image + mask pairs)
vfmkit data info SHARDS [--verify]           (a shard dir, an img2dataset folder, one .tar, a brace
                                              pattern 'a-{000..009}.tar', or builtin:flickr8k/train)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data import`` and ``data info`` to the vfmkit CLI."""
    p = subparsers.add_parser(
        "data",
        help="import images into shards; show shard info",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="data_command", required=True)
    imp = sub.add_parser("import", help="image folder/tar + captions CSV, or class folders -> shards")
    src = imp.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--captions", type=Path, help="CSV with an 'image,caption' header (several rows per image ok)"
    )
    src.add_argument("--class-folders", type=Path, help="folder or tar laid out as <class>/<image>")
    src.add_argument(
        "--dense",
        type=Path,
        metavar="IMAGES_AND_LABELS",
        help="folder or tar of image + label-mask pairs (x.jpg + x.label.png) -> dense shards",
    )
    imp.add_argument("--classes", type=Path, help="with --dense: classes.json ({classes: [...], void_label})")
    imp.add_argument("--void", type=int, default=None, help="with --dense: the ignored label id")
    imp.add_argument("--images", type=Path, help="image folder or tar (with --captions)")
    imp.add_argument("--out", type=Path, required=True)
    imp.add_argument("--shard-size", type=int, default=1000)
    imp.add_argument("--split-file", type=Path, help="JSON {split: [image names]} restricting the import")
    imp.add_argument("--split", help="which split of --split-file to import")
    imp.add_argument(
        "--resize", type=int, default=None, help="downscale the shorter side to this many pixels"
    )
    imp.add_argument("--quality", type=int, default=85, help="JPEG quality when re-encoding")
    imp.add_argument("--compress", action="store_true", help="write .tar.gz shards")
    imp.set_defaults(func=_import)
    info = sub.add_parser("info", help="sample counts of any shards train reads")
    info.add_argument("path", help="shard directory, img2dataset folder, .tar, brace pattern or builtin:NAME")
    info.add_argument(
        "--verify",
        action="store_true",
        help="read every shard to the end, check counts and (with a manifest) sha256",
    )
    info.set_defaults(func=_info)


def _split_names(args: argparse.Namespace) -> list[str] | None:
    if (args.split_file is None) != (args.split is None):
        raise ValueError("--split-file and --split go together")
    if args.split_file is None:
        return None
    try:
        splits = json.loads(args.split_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"split file {str(args.split_file)!r} is not valid UTF-8 JSON: {e}") from e
    if args.split not in splits:
        raise ValueError(f"split {args.split!r} not in {str(args.split_file)!r} (has {sorted(splits)})")
    return list(splits[args.split])


def _import(args: argparse.Namespace) -> int:
    from vfmkit.data.importer import import_captions, import_class_folders

    kw = dict(max_size=args.resize, quality=args.quality, compress=args.compress)
    try:
        names = _split_names(args)
        if args.dense is not None:
            from vfmkit.data.dense import import_dense

            m = import_dense(
                args.dense, args.out, args.shard_size, classes=args.classes, void=args.void, names=names, **kw
            )
        elif args.captions is not None:
            if args.images is None:
                raise ValueError("--captions needs --images")
            m = import_captions(args.images, args.captions, args.out, args.shard_size, names=names, **kw)
        else:
            m = import_class_folders(args.class_folders, args.out, args.shard_size, names=names, **kw)
    except ValueError as e:
        print(f"vfmkit data import: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['count']} samples in {len(m['shards'])} shards to {args.out}; skipped {m['n_skipped']}")
    for s in m["skipped"][:20]:
        print(f"  skipped {s['uid']} (key {s['key']}): {s['reason']}")
    if m["n_skipped"] > 20:
        print(f"  ... and {m['n_skipped'] - 20} more (see manifest.json)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from vfmkit.data.shards import describe_shards

    d = describe_shards(args.path, verify=args.verify)
    m = d["manifest"] or {}
    kind = f" ({m['kind']})" if m.get("kind") else ""
    print(
        f"{d['spec']}: {d['count']} samples in {len(d['shards'])} shards{kind}; counts from {d['counts_from']}"
    )
    for k in ("n_skipped", "n_ignored"):
        if k in m:
            print(f"  {k}: {m[k]}")
    if "classes" in m:
        print(f"  classes: {len(m['classes'])}")
    if d["stats"]:
        print("  img2dataset: " + ", ".join(f"{k} {v}" for k, v in d["stats"].items()))
    for s in d["shards"]:
        print(f"  {s['name']}: {s['count']}")
    if d["verify"] is not None:
        v = d["verify"]
        print(
            f"  verify: {v['read']} shards read to the end, {v['sha256_checked']} sha256 checked against the "
            f"manifest: " + ("all shards match" if not v["problems"] else f"{len(v['problems'])} PROBLEM(S)")
        )
        for line in v["problems"]:
            print(f"    {line}")
        return 1 if v["problems"] else 0
    return 0
