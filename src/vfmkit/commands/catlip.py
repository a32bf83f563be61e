"""``vfmkit catlip {vocab,label,train,transfer}``: CatLIP from captions to a transferred classifier.

vfmkit catlip vocab --data builtin:flickr8k/train --out runs/catlip/vocab.json --min-count 3
vfmkit catlip label --data builtin:flickr8k/train --vocab runs/catlip/vocab.json --out runs/catlip/shards
vfmkit catlip train [catlip_tiny] --set data.train=runs/catlip/shards --set method_args.vocab=...
vfmkit catlip transfer --run runs/catlip_tiny --classes builtin:imagenette --mode probe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _add_vocab_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--senses", choices=["first", "all"], default="first", help="noun senses per word")
    p.add_argument(
        "--backend",
        choices=["spacy", "wordnet"],
        default="spacy",
        help="spacy: POS tags + lemmas (default); wordnet: no tagger (lower quality)",
    )
    p.add_argument("--no-compounds", action="store_true", help="do not add noun-noun compounds")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "catlip", help="CatLIP: caption synsets -> classification pretraining -> Transfer Init"
    )
    cs = p.add_subparsers(dest="catlip_command", required=True)

    v = cs.add_parser("vocab", help="build the WordNet synset vocabulary from the captions in shards")
    v.add_argument("--data", default="builtin:flickr8k/train", help="shard spec (dir, pattern, builtin:NAME)")
    v.add_argument("--out", required=True, help="vocabulary JSON to write")
    v.add_argument("--min-count", type=int, default=5, help="keep synsets seen in >= this many captions")
    v.add_argument("--max-size", type=int, default=24320, help="keep at most this many synsets")
    v.add_argument("--show", type=int, default=20, help="print this many top synsets")
    _add_vocab_opts(v)
    v.set_defaults(func=run_vocab)

    lab = cs.add_parser("label", help="write shards with cached multi-hot labels (labels.json)")
    lab.add_argument("--data", default="builtin:flickr8k/train")
    lab.add_argument("--vocab", required=True)
    lab.add_argument("--out", required=True, help="output shard folder")
    lab.add_argument("--shard-size", type=int, default=1000)
    _add_vocab_opts(lab)
    lab.set_defaults(func=run_label)

    t = cs.add_parser("train", help="CatLIP pretraining through the engine (builds vocab/labels if needed)")
    t.add_argument("recipe", nargs="?", default="catlip_tiny", help="recipe path or builtin name")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", default=None, help="output directory (overrides out_dir)")
    t.set_defaults(func=run_train)

    x = cs.add_parser("transfer", help="Transfer Init a downstream classifier, then probe or fine-tune")
    x.add_argument("--run", help="CatLIP run directory (config.json, vocab.json, model.safetensors)")
    x.add_argument("--vocab", help="vocabulary JSON (enough for --mode plan)")
    x.add_argument(
        "--classes",
        default="builtin:imagenette",
        help="builtin:imagenette, a classes.json (wnid keys), or comma-separated names/wnids",
    )
    x.add_argument("--mode", choices=["plan", "probe", "finetune"], default="plan")
    x.add_argument("--train-data", default="builtin:imagenette/train")
    x.add_argument("--val-data", default="builtin:imagenette/val")
    x.add_argument("--steps", type=int, default=100)
    x.add_argument("--lr", type=float, default=None, help="default: 1e-2 probe, 3e-4 fine-tune")
    x.add_argument("--batch-size", type=int, default=64)
    x.add_argument("--no-transfer-init", action="store_true", help="random head (the baseline)")
    x.add_argument("--max-up", type=int, default=6, help="hypernym steps to search")
    x.add_argument("--max-down", type=int, default=3, help="hyponym steps to search")
    x.add_argument("--out", default=None, help="folder for the run and transfer.json")
    x.set_defaults(func=run_transfer)


def _args_from(ns: argparse.Namespace, **kw):
    from vfmkit.methods.catlip import CatlipArgs

    return CatlipArgs(senses=ns.senses, backend=ns.backend, compounds=not ns.no_compounds, **kw)


def run_vocab(ns: argparse.Namespace) -> int:
    from vfmkit.methods.catlip import build_vocab_from_shards

    vocab = build_vocab_from_shards(ns.data, _args_from(ns, min_count=ns.min_count, max_size=ns.max_size))
    vocab.save(ns.out)
    m = vocab.meta
    print(
        f"{len(vocab)} synsets (of {m['n_candidates']} seen) from {m['n_captions']} captions; "
        f"{100 * m['coverage']:.1f}% of captions have a vocabulary synset -> {ns.out}"
    )
    for name, c in list(zip(vocab.names, vocab.counts, strict=True))[: ns.show]:
        print(f"  {c:7d}  {name}")
    return 0


def run_label(ns: argparse.Namespace) -> int:
    from vfmkit.methods.catlip import label_shards
    from vfmkit.text.vocab import Vocabulary

    vocab = Vocabulary.load(ns.vocab)
    m = label_shards(ns.data, vocab, ns.out, _args_from(ns), shard_size=ns.shard_size)
    print(
        f"{m['count']} samples labelled ({m['n_without_labels']} without any vocabulary synset) -> {ns.out}"
    )
    return 0


def run_train(ns: argparse.Namespace) -> int:
    from vfmkit.config import ConfigError, load_config
    from vfmkit.methods.registry import run

    overrides = list(ns.overrides) + ([f"out_dir={ns.out}"] if ns.out else [])
    cfg = load_config(ns.recipe, overrides)
    if cfg.method != "catlip":
        raise ConfigError(f"config key 'method': {cfg.method!r} is not 'catlip'")
    res = run(cfg)
    print(json.dumps({"step": res.step, "out_dir": str(res.out_dir), **res.final_logs}))
    return 0


def _classes(spec: str) -> list[str]:
    if spec == "builtin:imagenette":
        from vfmkit.data.builtin import imagenette_classes

        return list(imagenette_classes())
    p = Path(spec)
    if p.is_file():
        return sorted(json.loads(p.read_text()))  # wnid keys, sorted: the label order of class shards
    return [c.strip() for c in spec.split(",") if c.strip()]


def run_transfer(ns: argparse.Namespace) -> int:
    from vfmkit.data.io import atomic_write_json
    from vfmkit.methods.catlip import load_catlip_run, plan_transfer_init, transfer_eval
    from vfmkit.text.vocab import Vocabulary

    if not ns.run and not ns.vocab:
        raise FileNotFoundError("give --run (a CatLIP run directory) or --vocab")
    classes = _classes(ns.classes)
    if ns.mode == "plan":
        vocab = Vocabulary.load(ns.vocab) if ns.vocab else Vocabulary.load(Path(ns.run) / "vocab.json")
        plan = plan_transfer_init(vocab, classes, max_up=ns.max_up, max_down=ns.max_down)
        print("\n".join(plan.describe()))
        if ns.out:
            atomic_write_json(Path(ns.out) / "transfer.json", {"plan": plan.report})
        return 0
    if not ns.run:
        raise FileNotFoundError(f"--mode {ns.mode} needs --run")
    model, vocab, bundle = load_catlip_run(ns.run)
    out = Path(ns.out or Path(ns.run) / f"transfer-{ns.mode}")
    res = transfer_eval(
        model,
        vocab,
        bundle,
        classes,
        ns.train_data,
        ns.val_data,
        mode=ns.mode,
        steps=ns.steps,
        lr=ns.lr,
        batch_size=ns.batch_size,
        transfer_init=not ns.no_transfer_init,
        out_dir=out,
        max_up=ns.max_up,
        max_down=ns.max_down,
    )
    if res.get("plan"):
        print("\n".join(res["plan_lines"]))
    print(json.dumps({k: v for k, v in res.items() if k not in ("plan", "plan_lines")}))
    atomic_write_json(out / "transfer.json", res)
    return 0
