"""``vfmkit subclone``: subclone a trained parent into a smaller child, and train parents/children offline.

    vfmkit subclone train --recipe subclone_vit_parent --out runs/vit_parent      # a parent, here, on real data
    vfmkit subclone run runs/vit_parent --out runs/vit_child --layers 3 --width 96   # subclone + function check
    vfmkit subclone train --recipe subclone_vit_child --set method_args.init=runs/vit_child --out runs/vit_ft
    vfmkit subclone run vit_small_patch16_224 --pretrained vit_s.safetensors --num-classes 1000 --out ... --width 192

A parent is a vfmkit run/subclone directory (``arch.json`` + ``model.safetensors``), a timm ViT name, an open_clip
model name (its ``--tower visual`` or ``text``), or a local transformers GPT-2 directory (``config.json``).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vfmkit.methods import subclone as sc

IMG_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Sample:
    key: str
    image: bytes | None = None
    texts: tuple[str, ...] = ()
    label: int | None = None


def _wnid_index() -> dict[str, int]:
    from vfmkit.data.builtin import imagenette_classes

    return {w: i for i, w in enumerate(imagenette_classes())}


def _finish(key: str, parts: dict[str, bytes], wnids: dict[str, int], src: str) -> Sample | None:
    img = next((parts[e] for e in parts if e.lower() in IMG_EXTS), None)
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt json in sample {key!r} of {src}: {e}") from e
    texts = tuple(meta.get("captions") or ([parts["txt"].decode()] if "txt" in parts else []))
    label = meta.get("label")
    if label is None and "/" in key:  # raw class tree (<wnid>/<file>.JPEG)
        label = wnids.get(key.split("/")[-2])
    if img is None and not texts:
        return None
    return Sample(key, img, texts, label)


def _iter_tar(path: str, wnids: dict[str, int]) -> Iterator[Sample]:
    """webdataset layout (``key.ext`` members grouped by key) or a plain tar of images; names a bad file."""
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"cannot read tar {path}: {e}") from e
    with tf:
        key, parts = None, {}
        for mem in tf:
            if not mem.isfile():
                continue
            d, base = os.path.split(mem.name)
            k, _, ext = base.partition(".")
            k = f"{d}/{k}" if d else k
            if k != key and key is not None:
                if (s := _finish(key, parts, wnids, path)) is not None:
                    yield s
                parts = {}
            key = k
            parts[ext] = tf.extractfile(mem).read()
        if key is not None and (s := _finish(key, parts, wnids, path)) is not None:
            yield s


def read_samples(spec: str, limit: int = 0) -> list[Sample]:
    """Real samples from a shard spec (``builtin:NAME``, shard dir, tar), an image folder, or captions
    (``.csv`` with a ``caption`` column, ``.txt`` one a line). ``limit`` 0 reads all, in stored order."""
    p = Path(spec)
    if p.suffix in (".csv", ".txt") and p.is_file():
        texts = _read_texts(p)
        return [Sample(f"{p.name}:{i}", texts=(t,)) for i, t in enumerate(texts[:limit or None])]
    if p.is_dir() and not any(p.glob("*.tar*")) and not (p / "manifest.json").exists():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower().lstrip(".") in IMG_EXTS)
        return [Sample(str(f.relative_to(p)), image=f.read_bytes()) for f in files[:limit or None]]
    from vfmkit.data.shards import list_shards

    out: list[Sample] = []
    wnids = _wnid_index()
    for url in list_shards(spec):
        for s in _iter_tar(url, wnids):
            out.append(s)
            if limit and len(out) >= limit:
                return out
    return out


def _read_texts(p: Path) -> list[str]:
    if p.suffix == ".txt":
        return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    import csv

    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "caption" not in rows[0]:
        raise ValueError(f"{p}: expected a CSV with a 'caption' column")
    return [r["caption"] for r in rows]


def decode_images(samples: list[Sample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """JPEG bytes -> ``uint8 [N, 3, size, size]`` (resize shorter side + centre crop) and labels ``[N]`` (-1: none)."""
    from PIL import Image

    imgs, labels = [], []
    for s in samples:
        if s.image is None:
            continue
        try:
            im = Image.open(io.BytesIO(s.image)).convert("RGB")
        except Exception as e:  # PIL raises many types for a broken file
            raise ValueError(f"corrupt image in sample {s.key!r}: {e}") from e
        w, h = im.size
        c = min(w, h)
        im = im.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c))
        im = im.resize((size, size), Image.BICUBIC)
        imgs.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3))
        labels.append(-1 if s.label is None else int(s.label))
    if not imgs:
        raise ValueError("no images in the given samples")
    return torch.stack(imgs).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def normalize(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` -> normalised float."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


class WordVocab:
    """A word-level vocabulary built from training captions (GPT-2's BPE files do not ship offline).

    ids: 0 pad, 1 bos, 2 eos, 3 unk, then words by descending count (ties alphabetical).
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    PAD, BOS, EOS, UNK = 0, 1, 2, 3

    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", text.lower())

    @classmethod
    def build(cls, texts: list[str], size: int) -> WordVocab:
        counts = collections.Counter(w for t in texts for w in cls.words(t))
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - len(cls.SPECIALS)]
        return cls(list(cls.SPECIALS) + [w for w, _ in top])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, texts: list[str], context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids ``[B, context]`` (bos, words, eos, pad) and mask ``[B, context]`` (True on real tokens)."""
        ids = torch.zeros(len(texts), context, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [self.BOS] + [self.stoi.get(w, self.UNK) for w in self.words(t)][: context - 2] + [self.EOS]
            ids[i, : len(toks)] = torch.tensor(toks)
        mask = ids != self.PAD
        return ids, mask

    def save(self, path: Path) -> None:
        sc._atomic_write(Path(path), json.dumps({"itos": self.itos}).encode())

    @classmethod
    def load(cls, path: Path) -> WordVocab:
        try:
            return cls(json.loads(Path(path).read_text())["itos"])
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read vocabulary {path}: {e}") from e


# ------------------------------------------------------------------------------------------- training
@dataclass
class SubcloneTrainArgs:
    """``method_args`` of the subclone training recipes (a parent, or a child from a subclone/random init)."""

    task: str = "vit"  # "vit": image classification; "lm": next-token prediction on captions
    init: str | None = None  # dir with arch.json + model.safetensors: start from these weights (a subclone)
    arch: str | None = None  # dir or arch.json: this architecture, random init (the from-scratch baseline)
    image_size: int = 64
    num_classes: int = 10
    vocab_size: int = 2048
    context_length: int = 32
    vocab: str | None = None  # vocab.json to reuse (a child must use its parent's); default: built from data
    max_train: int = 0  # cap on training samples (0: all)
    max_val: int = 500
    flip: bool = True


def model_stats(model: nn.Module) -> tuple[tuple, tuple]:
    """Normalisation mean/std a vision model expects (timm pretrained_cfg, open_clip's, else ImageNet)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    pp = getattr(model, "preprocess_cfg", None) or {}
    if type(model).__module__.startswith("open_clip"):
        import open_clip

        return tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    return IMAGENET_MEAN, IMAGENET_STD


def load_task_data(cfg: Any, args: SubcloneTrainArgs) -> dict[str, Any]:
    """Real train/val tensors for the recipe: images ``uint8`` + labels, or caption ids + masks + vocab."""
    train = read_samples(cfg.data.train, args.max_train if args.task == "vit" else 0)
    val = read_samples(cfg.data.val, args.max_val) if cfg.data.val else []
    if args.task == "vit":
        x, y = decode_images(train, args.image_size)
        vx, vy = decode_images(val, args.image_size) if val else (x[:0], y[:0])
        return {"train": {"x": x, "y": y}, "val": {"x": vx, "y": vy}}
    texts = [t for s in train for t in s.texts][: args.max_train or None]
    vtexts = [t for s in val for t in s.texts][: args.max_val or None]
    vocab = WordVocab.load(Path(args.vocab)) if args.vocab else WordVocab.build(texts, args.vocab_size)
    ids, mask = vocab.encode(texts, args.context_length)
    vids, vmask = vocab.encode(vtexts, args.context_length)
    return {"train": {"x": ids, "mask": mask}, "val": {"x": vids, "mask": vmask}, "vocab": vocab}


def build_task_model(cfg: Any, args: SubcloneTrainArgs, data: dict) -> nn.Module:
    """The model to train: subclone weights (``init``), an architecture at random init (``arch``), or a new
    parent from ``cfg.model`` (timm ViT name / ``gpt2``)."""
    if args.init and args.arch:
        raise ValueError("method_args.init (subclone weights) and method_args.arch (random init) are exclusive; "
                         "set the other to null")
    if args.init:
        return sc.load_model(args.init)[0]
    if args.arch:
        return sc.build_model(sc.read_arch(args.arch))
    if args.task == "vit":
        from vfmkit.models.factory import create_classifier

        return create_classifier(cfg.model.name, args.num_classes, img_size=args.image_size, **cfg.model.kwargs)
    from transformers import GPT2Config, GPT2LMHeadModel

    v = WordVocab
    conf = GPT2Config(vocab_size=len(data["vocab"]), n_positions=args.context_length, bos_token_id=v.BOS,
                      eos_token_id=v.EOS, pad_token_id=v.PAD, **cfg.model.kwargs)
    return GPT2LMHeadModel(conf)


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over real tokens, and the number of predicted tokens."""
    ids, mask = batch["x"], batch["mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tgt = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)), mask[:, 1:].sum()


def make_loss(args: SubcloneTrainArgs, model: nn.Module) -> Callable:
    mean, std = model_stats(model)

    def vit_loss(m, batch, step):
        x = batch["x"]
        if args.flip and m.training:  # cheap real augmentation: per-sample horizontal flip
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        logits = m(normalize(x, mean, std))
        return F.cross_entropy(logits, batch["y"]), {"acc": float((logits.argmax(-1) == batch["y"]).float().mean())}

    def text_loss(m, batch, step):
        loss, _ = lm_loss(m, batch)
        return loss, {}

    return vit_loss if args.task == "vit" else text_loss


@torch.no_grad()
def evaluate(model: nn.Module, args: SubcloneTrainArgs, val: dict, batch_size: int = 256) -> dict[str, float]:
    """Validation ``acc``/``loss`` (ViT) or ``loss``/``ppl`` per token (LM) over the whole val set."""
    dev = next(model.parameters()).device
    n = val["x"].shape[0]
    tot_loss, tot_n, correct = 0.0, 0.0, 0.0
    mean, std = model_stats(model)
    for i in range(0, n, batch_size):
        b = {k: v[i:i + batch_size].to(dev) for k, v in val.items()}
        if args.task == "vit":
            logits = model(normalize(b["x"], mean, std))
            tot_loss += float(F.cross_entropy(logits, b["y"], reduction="sum"))
            correct += float((logits.argmax(-1) == b["y"]).sum())
            tot_n += b["x"].shape[0]
        else:
            loss, k = lm_loss(model, b)
            tot_loss, tot_n = tot_loss + float(loss) * float(k), tot_n + float(k)
    out = {"loss": tot_loss / max(tot_n, 1.0)}
    out.update({"acc": correct / max(tot_n, 1.0)} if args.task == "vit" else {"ppl": float(torch.exp(torch.tensor(out["loss"])))})
    return out


def run_training(cfg: Any, out_dir: str | Path, data: dict | None = None, progress: bool | None = None) -> dict:
    """Train through ``vfmkit.engine.train``; the run dir becomes a loadable parent (arch.json, vocab.json)."""
    from vfmkit.config import parse_section
    from vfmkit.data.loader import TensorLoader
    from vfmkit.engine import train

    args = parse_section(SubcloneTrainArgs, cfg.method_args, "method_args")
    if args.task not in ("vit", "lm"):
        raise ValueError(f"method_args.task must be 'vit' or 'lm', got {args.task!r}")
    data = data or load_task_data(cfg, args)
    torch.manual_seed(cfg.seed)
    model = build_task_model(cfg, args, data)
    if progress is not None:
        cfg.train.progress = progress
    loader = TensorLoader(data["train"], cfg.data.batch_size, seed=cfg.seed)
    has_val = data["val"]["x"].shape[0] > 0
    eval_fn = (lambda m, step: evaluate(m, args, data["val"])) if has_val else None
    res = train(cfg, model, make_loss(args, model), loader, out_dir=out_dir, eval_fn=eval_fn)
    out = Path(out_dir)
    fam = sc.family_of(model)
    extra = {"task": vars(args)}
    sc._atomic_write(out / "arch.json", json.dumps({**fam.arch(model), **extra}, indent=1).encode())
    if "vocab" in data:
        data["vocab"].save(out / "vocab.json")
    evals = [h for h in res.history if any(k.startswith("eval/") for k in h)]
    return {"step": res.step, "history": res.history, "evals": evals, "final": res.final_logs, "model": model}


# -------------------------------------------------------------------------------------------- parents
@dataclass
class Parent:
    model: nn.Module
    kind: str  # "image" or "text"
    source: str
    image_size: int = 0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None
    vocab_file: Path | None = None


def _describe(p: Parent) -> Parent:
    m = p.model
    if p.kind == "image":
        size = getattr(getattr(m, "patch_embed", None), "img_size", None) or m.image_size
        p.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        p.mean, p.std = model_stats(m)
    return p


def load_parent(spec: str, pretrained: str | None = None, tower: str = "visual", num_classes: int | None = None,
                model_kwargs: dict | None = None) -> Parent:
    """Resolve a parent spec (see module docstring) into the library model plus its input pipeline."""
    p = Path(spec)
    if p.is_dir() and (p / "arch.json").is_file():
        model, arch = sc.load_model(p, pretrained)
        kind = "text" if arch["family"] in ("gpt2", "open_clip_text") else "image"
        vocab = p / "vocab.json"
        tok = None
        if vocab.is_file():
            v, ctx = WordVocab.load(vocab), arch.get("task", {}).get("context_length", 32)
            tok = lambda texts: v.encode(texts, ctx)  # noqa: E731
        return _describe(Parent(model, kind, str(p), tokenize=tok, vocab_file=vocab if vocab.is_file() else None))
    if p.is_dir() and (p / "config.json").is_file():
        return _hf_parent(p)
    if p.is_file():
        raise sc.SubcloneError(f"{p} is a weights file: give the model name as PARENT and the file as --pretrained")
    return _named_parent(spec, pretrained, tower, num_classes, model_kwargs or {})


def _hf_parent(p: Path) -> Parent:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(p), local_files_only=True)
    tok = None
    try:
        t = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        t.pad_token = t.pad_token or t.eos_token

        def tok(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            enc = t(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=32)
            return enc["input_ids"], enc["attention_mask"].bool()
    except (OSError, ValueError):
        pass
    return Parent(model, "text", str(p), tokenize=tok)


def _named_parent(name: str, pretrained: str | None, tower: str, num_classes: int | None, kw: dict) -> Parent:
    import open_clip
    import timm

    from vfmkit.models.factory import create_classifier, create_clip, register_tiny_configs

    register_tiny_configs()
    if name in open_clip.list_models():
        b = create_clip(name, pretrained)
        if tower == "visual":
            return _describe(Parent(b.model.visual, "image", name))
        tok = b.tokenizer
        return Parent(sc.text_tower_of(b.model), "text", name, tokenize=lambda t: (ids := tok(t), ids != 0))
    if name in timm.list_models():
        model = create_classifier(name, num_classes if num_classes is not None else 1000, pretrained, **kw)
        return _describe(Parent(model, "image", name))
    raise sc.SubcloneError(f"unknown parent {name!r}: not a directory with arch.json or config.json, not an "
                           "open_clip model name and not a timm model name")


def batches_for(parent: Parent, spec: str, n: int, batch_size: int = 32) -> list[dict]:
    """Calibration / held-out batches ``{"x", "mask"?}`` of ``n`` real samples from ``spec``."""
    samples = read_samples(spec, n if parent.kind == "image" else 0)
    if parent.kind == "image":
        x, _ = decode_images(samples, parent.image_size)
        xs = [normalize(x[i:i + batch_size], parent.mean, parent.std) for i in range(0, len(x), batch_size)]
        return [{"x": t} for t in xs]
    texts = [t for s in samples for t in s.texts][:n]
    if not texts:
        raise ValueError(f"no captions in {spec}")
    if parent.tokenize is None:
        raise sc.SubcloneError(f"no tokenizer known for text parent {parent.source}")
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = parent.tokenize(texts[i:i + batch_size])
        out.append({"x": ids, "mask": mask})
    return out


# ------------------------------------------------------------------------------------------------ CLI
def cmd_run(a: argparse.Namespace) -> int:
    try:
        return _run(a)
    except (sc.SubcloneError, ValueError) as e:  # a bad parent/child/data spec: say why, no traceback
        print(f"vfmkit subclone run: error: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    import yaml

    kw = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.model_arg)}
    parent = load_parent(a.parent, a.pretrained, a.tower, a.num_classes, kw)
    img = parent.kind == "image"
    calib = a.calib or ("builtin:imagenette/train" if img else "builtin:flickr8k/train")
    heldout = a.heldout or ("builtin:imagenette/val" if img else "builtin:flickr8k/heldout")
    torch.manual_seed(0)
    res = sc.subclone(parent.model, batches_for(parent, calib, a.n_calib), layers=a.layers, width=a.width,
                      heads=a.heads, mlp_hidden=a.mlp_hidden, scale=a.scale, block_select=a.blocks)
    check = sc.function_check(parent.model, res.model, batches_for(parent, heldout, a.n_heldout))
    info = {"parent": parent.source, "parent_dims": vars(res.plan.parent), "child_dims": vars(res.plan.child),
            "blocks_kept": res.plan.blocks, "scale": a.scale, "block_select": a.blocks, "calib": calib,
            "n_calib": a.n_calib, "heldout": heldout, "function_check": check,
            "block_ratio": [round(float(r), 4) for r in res.importance.block_ratio]}
    task = sc.read_arch(a.parent).get("task") if (Path(a.parent) / "arch.json").is_file() else None
    sc.save_model(a.out, res.model, res.arch, {"subclone": info, **({"task": task} if task else {})})
    if parent.vocab_file is not None:
        shutil.copyfile(parent.vocab_file, Path(a.out) / "vocab.json")
    pd, cd = res.plan.parent, res.plan.child
    print(f"subclone {parent.source}: layers {pd.layers}->{cd.layers} width {pd.width}->{cd.width} heads "
          f"{pd.heads}->{cd.heads} mlp {pd.mlp_hidden}->{cd.mlp_hidden}, blocks kept {res.plan.blocks}")
    print(f"function check on {check['n_outputs']} held-out outputs ({heldout}): pearson {check['pearson']:.4f} "
          f"cosine {check['cosine']:.4f} top1-agree {check['top1_agree']:.4f}")
    print(f"wrote {Path(a.out) / 'arch.json'} and model.safetensors")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from vfmkit.config import load_config

    cfg = load_config(a.recipe, a.set)
    out = a.out or cfg.out_dir
    r = run_training(cfg, out)
    last = r["evals"][-1] if r["evals"] else r["final"]
    print(f"trained {r['step']} steps -> {out}; last eval: " + ", ".join(
        f"{k}={v:.4f}" for k, v in last.items() if k.startswith("eval/")))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("subclone", help="weight subcloning: a smaller model initialised from a larger one",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="subclone_cmd", required=True)
    r = sub.add_parser("run", help="subclone PARENT into a smaller child and print the function check")
    r.add_argument("parent", help="run dir with arch.json, timm/open_clip name, or transformers GPT-2 dir")
    r.add_argument("--out", required=True, help="output dir: arch.json + model.safetensors")
    r.add_argument("--layers", type=int)
    r.add_argument("--width", type=int, help="residual (embedding) dimension")
    r.add_argument("--heads", type=int, help="default: width / parent head dim")
    r.add_argument("--mlp-hidden", type=int, help="default: parent's MLP ratio")
    r.add_argument("--scale", choices=sc.SCALE_MODES, default="paper")
    r.add_argument("--blocks", choices=sc.BLOCK_MODES, default="middle")
    r.add_argument("--calib", help="calibration data spec (default: builtin train split)")
    r.add_argument("--heldout", help="held-out data for the function check (default: builtin val/heldout)")
    r.add_argument("--n-calib", type=int, default=256)
    r.add_argument("--n-heldout", type=int, default=256)
    r.add_argument("--pretrained", help="weights file (or open_clip tag) for a named parent")
    r.add_argument("--tower", choices=("visual", "text"), default="visual", help="open_clip tower to subclone")
    r.add_argument("--num-classes", type=int, help="classes of a timm parent's head")
    r.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm model kwarg for a named parent (YAML value), e.g. img_size=64")
    r.set_defaults(func=cmd_run)
    t = sub.add_parser("train", help="train a parent or a child with a subclone_* recipe through the engine")
    t.add_argument("--recipe", default="subclone_vit_parent")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out")
    t.set_defaults(func=cmd_train)
