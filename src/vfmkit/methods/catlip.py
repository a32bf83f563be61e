"""CatLIP (arXiv:2404.15653): pretrain an image tower as a multi-label classifier over WordNet synsets.

Pipeline:

1. ``build_vocab_from_shards``: captions -> nouns -> WordNet noun synsets -> the most frequent synsets.
2. ``label_shards``: copy image-text shards, adding a ``labels.json`` member (``{"rows": [...], "vocab": sha}``,
   the multi-hot indices of the union of a sample's captions), so training never re-parses captions.
3. ``CatlipModel`` (image tower + linear head over the vocabulary) trained by the one engine with
   ``catlip_loss``: binary cross-entropy summed over the vocabulary and averaged over the batch.
4. Transfer Init (``plan_transfer_init`` / ``transfer_head``): a downstream classifier's rows start from
   the vocabulary rows of the matching synsets, walking up (hypernyms) or down (hyponyms) WordNet when
   a class is not in the vocabulary; the plan says which rows were used and why.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job
from vfmkit.text.vocab import Vocabulary, build_vocab
from vfmkit.text.wordnet import WordNet, WordNetError, load_wordnet, offset_to_wnid

LABELS_MEMBER = "labels.json"


@dataclass
class CatlipArgs:
    """``method_args`` of a CatLIP recipe."""

    vocab: str | None = None  # vocabulary JSON; None: built from data.train into out_dir/vocab.json
    senses: str = "first"  # "first" (paper) or "all" noun senses per word
    backend: str = "spacy"  # "spacy" (POS tags + lemmas) or "wordnet" (no tagger)
    compounds: bool = True  # also count adjacent noun-noun WordNet compounds ("swimming pool")
    min_count: int = 5  # a synset must occur in at least this many captions
    max_size: int = 24320  # vocabulary size cap (the paper's DataComp-1.3B size)
    head_bias: str = "prior"  # "prior": bias = logit of each synset's frequency; "zero"
    labelled_dir: str | None = None  # where labelled shards go; None: out_dir/labelled


def parse_args(cfg: RunConfig) -> CatlipArgs:
    a = parse_section(CatlipArgs, cfg.method_args, "method_args")
    for key, val, ok in (
        ("senses", a.senses, ("first", "all")),
        ("backend", a.backend, ("spacy", "wordnet")),
        ("head_bias", a.head_bias, ("prior", "zero")),
    ):
        if val not in ok:
            raise ConfigError(f"config key 'method_args.{key}': {val!r} is not one of {', '.join(ok)}")
    return a


# ---- reading captions from shards -------------------------------------------------------------------
def _samples(spec: str | list[str]) -> Iterator[dict]:
    """Every raw sample of ``spec`` in shard and tar order (the one reader, ``shards.iter_shard``)."""
    from vfmkit.data.shards import iter_shard, list_shards

    for url in list_shards(spec):
        yield from iter_shard(url)


def sample_captions(raw: dict[str, bytes]) -> list[str]:
    """All captions of a sample: ``json["captions"]`` when present (Flickr8k has 5), else ``txt``."""
    if "json" in raw:
        caps = json.loads(raw["json"]).get("captions")
        if caps:
            return [str(c) for c in caps]
    if "txt" in raw:
        return [raw["txt"].decode("utf-8")]
    return []


def _tagger(args: CatlipArgs, wordnet: WordNet):
    from vfmkit.text.nouns import CaptionTagger

    return CaptionTagger(backend=args.backend, senses=args.senses, compounds=args.compounds, wordnet=wordnet)


SampleSynsets = dict[tuple[str, str], list[list[int]]]


def tag_shards(spec: str | list[str], tagger: Any) -> SampleSynsets:
    """``{(url, key): [synset offsets per caption]}`` for every sample in ``spec``: one tagging pass that
    both the vocabulary and the labels reuse."""

    keys, caps = [], []
    for raw in _samples(spec):
        cs = sample_captions(raw)
        keys.append(((raw["__url__"], raw["__key__"]), len(cs)))
        caps.extend(cs)
    flat = tagger.synsets(caps) if caps else []
    out: SampleSynsets = {}
    i = 0
    for k, n in keys:
        out[k] = flat[i : i + n]
        i += n
    return out


def build_vocab_from_shards(
    spec: str | list[str],
    args: CatlipArgs | None = None,
    wordnet: WordNet | None = None,
    tagger: Any = None,
    tagged: SampleSynsets | None = None,
) -> Vocabulary:
    """Count synsets over every caption of every sample in ``spec`` (any ``list_shards`` spec)."""
    args = args or CatlipArgs()
    wn = wordnet or load_wordnet()
    if tagged is None:
        tagged = tag_shards(spec, tagger or _tagger(args, wn))
    per_caption = [s for caps in tagged.values() for s in caps]
    if not per_caption:
        raise ValueError(f"no captions found in {spec!r}")
    meta = {
        "senses": args.senses,
        "backend": args.backend,
        "compounds": args.compounds,
        "source": spec if isinstance(spec, str) else list(spec),
    }
    return build_vocab(per_caption, wn, min_count=args.min_count, max_size=args.max_size, meta=meta)


def label_shards(
    spec: str | list[str],
    vocab: Vocabulary,
    out_dir: str | Path,
    args: CatlipArgs | None = None,
    tagger: Any = None,
    shard_size: int = 1000,
    tagged: SampleSynsets | None = None,
) -> dict:
    """Copy the shards in ``spec`` to ``out_dir`` adding ``labels.json`` = ``{"rows": [...], "vocab": sha}``.

    Rows are the union over a sample's captions. Returns the manifest; it records ``catlip_vocab`` (the
    vocabulary's sha) so a trainer can refuse labels made with another vocabulary. ``tagged`` (from
    ``tag_shards``) skips re-parsing the captions.
    """
    from vfmkit.data.shards import ShardWriter, read_manifest

    args = args or CatlipArgs()
    if tagged is None:
        tagged = tag_shards(spec, tagger or _tagger(args, load_wordnet()))
    sha, n_empty = vocab.sha256(), 0
    extra = {
        "kind": "catlip-labelled",
        "catlip_vocab": sha,
        "vocab_size": len(vocab),
        "source": spec if isinstance(spec, str) else list(spec),
    }
    with ShardWriter(out_dir, max_count=shard_size, extra=extra) as w:
        for raw in _samples(spec):
            key = raw["__key__"]
            rows = vocab.encode(o for s in tagged[(raw["__url__"], key)] for o in s)
            n_empty += not rows
            w.write(
                {
                    "__key__": key,
                    **{e: b for e, b in raw.items() if e != LABELS_MEMBER},
                    LABELS_MEMBER: {"rows": rows, "vocab": sha},
                }
            )
        w.extra["n_without_labels"] = n_empty
        vocab.save(Path(out_dir) / "vocab.json")  # a labelled folder carries its own vocabulary
    return read_manifest(out_dir)


# ---- model, decoder, loss ---------------------------------------------------------------------------
class CatlipModel(nn.Module):
    """An image tower followed by a linear classifier. ``forward``: images [B,3,H,W] -> logits [B,C]."""

    def __init__(self, visual: nn.Module, num_classes: int, image_size: int):
        super().__init__()
        self.visual = visual
        with torch.no_grad():  # the tower's output width, whatever kind of tower it is
            was = visual.training
            visual.eval()
            dim = int(visual(torch.zeros(1, 3, image_size, image_size)).shape[-1])
            visual.train(was)
        self.embed_dim = dim
        self.head = nn.Linear(dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,D] (the tower's output, not normalised)."""
        return self.visual(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def create_catlip_model(
    name: str,
    vocab: Vocabulary,
    *,
    pretrained: str | None = None,
    image_size: int | None = None,
    head_bias: str = "prior",
) -> tuple[CatlipModel, Any]:
    """The image tower of open_clip model ``name`` + a head over ``vocab``; returns (model, ClipBundle)."""
    from vfmkit.models.factory import create_clip

    bundle = create_clip(name, pretrained=pretrained, image_size=image_size)
    model = CatlipModel(bundle.model.visual, len(vocab), bundle.image_size)
    if head_bias == "prior":
        # Start at the label prior: otherwise the first steps only learn that most synsets are absent.
        with torch.no_grad():
            model.head.bias.copy_(torch.logit(vocab.prior()))
    return model, bundle


def catlip_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE, summed over the vocabulary and averaged over the batch (the paper's reduction).

    logits, targets: [B, V] (targets in {0, 1}). Returns a scalar."""
    return (
        F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]
    )


def make_catlip_loss_fn() -> Callable:
    """Engine loss: batch ``{"image": [B,3,H,W], "target": [B,V]}``; logs ``top1_hit`` (argmax is a label)."""

    def loss_fn(model: nn.Module, batch: dict, step: int):
        logits = model(batch["image"])
        loss = catlip_loss(logits, batch["target"])
        with torch.no_grad():
            hit = batch["target"].gather(1, logits.argmax(1, keepdim=True)).mean()
        return loss, {"top1_hit": float(hit)}

    return loss_fn


def make_catlip_decoder(transform: Callable, vocab: Vocabulary) -> Callable:
    """raw sample -> ``{"image": [3,H,W], "target": [V]}`` from the cached ``labels.json`` (no captions)."""
    from vfmkit.data.decode import decode_image

    sha, size = vocab.sha256(), len(vocab)

    def decode(raw: dict) -> dict:
        if LABELS_MEMBER not in raw:
            raise KeyError(f"{LABELS_MEMBER} (shard not labelled: run `vfmkit catlip label`)")
        lab = json.loads(raw[LABELS_MEMBER])
        if lab.get("vocab") != sha:
            raise ValueError(f"labels made with vocabulary {lab.get('vocab')}, training with {sha}")
        target = torch.zeros(size)
        if lab["rows"]:
            target[torch.as_tensor(lab["rows"], dtype=torch.long)] = 1.0
        return {"image": transform(decode_image(raw)), "target": target}

    return decode


# ---- Transfer Init ----------------------------------------------------------------------------------
@dataclass
class TransferPlan:
    """``rows[c]``: vocabulary rows averaged into class ``c`` (empty: no match); ``report[c]`` says why."""

    rows: list[list[int]]
    report: list[dict] = field(default_factory=list)

    def describe(self) -> list[str]:
        out = []
        for r in self.report:
            via = ", ".join(r["via"]) or "-"
            out.append(
                f"{r['class']} -> {r['synset']}: {r['match']}"
                f"{'' if r['match'] in ('exact', 'none') else ' +' + str(r['depth'])} via {via}"
            )
        return out


def resolve_class(ref: str | int, wordnet: WordNet) -> int:
    """A class as wnid (``n01440764``), offset, synset name (``church.n.02``) or plain name (first sense)."""
    try:
        return wordnet.to_offset(ref)
    except WordNetError:
        pass
    offs = wordnet.noun_synsets(str(ref).strip().replace(" ", "_"), "first")
    if not offs:
        raise WordNetError(f"class {ref!r} is not a WordNet noun, wnid or synset name")
    return offs[0]


def _plan_one(ref: str | int, vocab: Vocabulary, wn: WordNet, max_up: int, max_down: int) -> dict:
    off = resolve_class(ref, wn)
    rec = {
        "class": str(ref),
        "synset": wn.name(off),
        "wnid": offset_to_wnid(off),
        "match": "none",
        "depth": 0,
        "rows": [],
        "via": [],
        "paths": [],
    }
    if off in vocab.index:
        rec.update(match="exact", rows=[vocab.index[off]], via=[wn.name(off)])
        return rec
    up_d, up = wn.nearest(off, vocab.index, "up", max_up)
    down_d, down = wn.nearest(off, vocab.index, "down", max_down)
    # Nearest wins; on a tie prefer hypernyms: a hypernym's row fires on all of the class's images.
    if up and (not down or up_d <= down_d):
        kind, depth, paths = "hypernym", up_d, up
    elif down:
        kind, depth, paths = "hyponym", down_d, down
    else:
        return rec
    hits = sorted({p[-1] for p in paths}, key=lambda o: vocab.index[o])
    rec.update(
        match=kind,
        depth=depth,
        rows=[vocab.index[o] for o in hits],
        via=[wn.name(o) for o in hits],
        paths=[[wn.name(o) for o in p] for p in paths],
    )
    return rec


def plan_transfer_init(
    vocab: Vocabulary,
    classes: list[str | int],
    wordnet: WordNet | None = None,
    *,
    max_up: int = 6,
    max_down: int = 3,
) -> TransferPlan:
    """Which vocabulary rows initialise each downstream class (exact synset, else nearest hypernyms,
    else nearest hyponyms within ``max_up`` / ``max_down`` steps)."""
    wn = wordnet or load_wordnet()
    report = [_plan_one(c, vocab, wn, max_up, max_down) for c in classes]
    return TransferPlan([r["rows"] for r in report], report)


def transfer_head(head: nn.Linear, plan: TransferPlan, bias: str = "mean") -> nn.Linear:
    """A new ``Linear(D, C)`` whose weight row ``c`` is the mean of ``head``'s rows ``plan.rows[c]``.

    ``bias="mean"`` (default) gives every class the same bias, the mean transferred bias: a pretraining bias
    encodes how often a synset is *captioned* (dog.n.01 far more than fish.n.01), not the downstream class
    prior, and copied it makes the most captioned class win every image. ``bias="copy"`` copies them anyway.
    Classes with no match get zero weights: a neutral start. head: Linear(D, V) over the vocabulary."""
    if bias not in ("mean", "copy"):
        raise ValueError(f"bias must be 'mean' or 'copy', got {bias!r}")
    new = nn.Linear(head.in_features, len(plan.rows))
    with torch.no_grad():
        new.weight.zero_()
        used = [r for rows in plan.rows for r in rows]
        new.bias.fill_(float(head.bias[used].mean()) if used else 0.0)
        for c, rows in enumerate(plan.rows):
            if rows:
                idx = torch.as_tensor(rows, dtype=torch.long)
                new.weight[c] = head.weight[idx].mean(0)
                if bias == "copy":
                    new.bias[c] = head.bias[idx].mean()
    return new


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """images [N,3,H,W] -> logits [N,C] in eval mode."""
    was = model.training
    model.eval()
    out = torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    model.train(was)
    return out


def load_catlip_run(run_dir: str | Path) -> tuple[CatlipModel, Vocabulary, Any]:
    """Rebuild a trained CatLIP model from a run directory (``config.json``, ``vocab.json``,
    ``model.safetensors``); returns (model, vocab, ClipBundle)."""
    from safetensors.torch import load_file

    from vfmkit.config import load_config

    run = Path(run_dir)
    for f in ("config.json", "vocab.json", "model.safetensors"):
        if not (run / f).is_file():
            raise FileNotFoundError(f"not a CatLIP run directory: {run / f} is missing")
    cfg = load_config(json.loads((run / "config.json").read_text()))
    vocab = Vocabulary.load(run / "vocab.json")
    model, bundle = create_catlip_model(cfg.model.name, vocab, image_size=cfg.data.image_size)
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    return model, vocab, bundle


# ---- the engine job ---------------------------------------------------------------------------------
def _labelled_manifest(spec: str) -> dict | None:
    """The manifest of ``spec`` if it is a folder of CatLIP-labelled shards, else None."""
    from vfmkit.data.shards import ShardError, read_manifest

    p = Path(spec)
    if not p.is_dir():
        return None
    try:
        m = read_manifest(p)
    except (FileNotFoundError, ShardError):
        return None
    return m if m.get("kind") == "catlip-labelled" else None


def prepare_data(cfg: RunConfig, args: CatlipArgs, is_main: bool = True) -> tuple[Vocabulary, str]:
    """Vocabulary + labelled shards for ``cfg.data.train``; builds/labels what is missing (main rank only).

    ``data.train`` already labelled: use it (vocabulary: ``method_args.vocab`` or its ``vocab.json``).
    Otherwise: vocabulary from ``method_args.vocab`` or built into ``out_dir/vocab.json`` (reused when
    present), labels into ``method_args.labelled_dir`` or ``out_dir/labelled`` (reused when they match)."""
    out = Path(cfg.out_dir)
    m = _labelled_manifest(cfg.data.train)
    if m is not None:
        vocab = Vocabulary.load(args.vocab or Path(cfg.data.train) / "vocab.json")
        if m.get("catlip_vocab") != vocab.sha256():
            raise ConfigError(
                f"config key 'method_args.vocab': shards in {cfg.data.train} were labelled with "
                f"vocabulary {m.get('catlip_vocab')}, not {vocab.sha256()}"
            )
        return vocab, cfg.data.train
    vocab_path = Path(args.vocab) if args.vocab else out / "vocab.json"
    labelled = Path(args.labelled_dir) if args.labelled_dir else out / "labelled"
    if is_main:
        tagged = None
        if vocab_path.is_file():
            vocab = Vocabulary.load(vocab_path)
        else:
            tagged = tag_shards(cfg.data.train, _tagger(args, load_wordnet()))
            vocab = build_vocab_from_shards(cfg.data.train, args, tagged=tagged)
            vocab.save(vocab_path)
        lm = _labelled_manifest(str(labelled))
        if lm is None or lm.get("catlip_vocab") != vocab.sha256():
            label_shards(cfg.data.train, vocab, labelled, args, tagged=tagged)
    from vfmkit.engine.distributed import barrier

    barrier()
    return Vocabulary.load(vocab_path), str(labelled)


def build(cfg: RunConfig, dist_info: DistInfo) -> Job:
    """The CatLIP pretraining job: image tower + vocabulary head, multi-label BCE, cached labels."""
    from vfmkit.data.loader import ShardLoader

    args = parse_args(cfg)
    vocab, spec = prepare_data(cfg, args, dist_info.is_main)
    if dist_info.is_main:
        vocab.save(Path(cfg.out_dir) / "vocab.json")  # load_catlip_run() needs it beside the weights
    torch.manual_seed(cfg.seed)
    model, bundle = create_catlip_model(
        cfg.model.name,
        vocab,
        pretrained=cfg.model.pretrained,
        image_size=cfg.data.image_size,
        head_bias=args.head_bias,
    )
    loader = ShardLoader.from_config(
        cfg, make_catlip_decoder(bundle.preprocess_train, vocab), dist_info, urls=spec
    )
    return Job(model, make_catlip_loss_fn(), loader, extra={"bundle": bundle, "vocab": vocab})


# ---- downstream: probe / fine-tune after Transfer Init -------------------------------------------------
def load_class_shards(
    spec: str | list[str], transform: Callable, classes: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class shards (json ``label``/``wnid``) -> images [N,3,H,W], labels [N] (long).

    With ``classes`` (wnids), labels are positions in that list (so any class order works)."""
    from vfmkit.data.decode import decode_image

    pos = {c: i for i, c in enumerate(classes or [])}
    xs, ys = [], []
    for raw in _samples(spec):
        try:
            meta = json.loads(raw["json"])
            y = pos.get(meta.get("wnid"), meta.get("label"))
            if y is None:
                raise KeyError("json label")
            xs.append(transform(decode_image(raw)))
            ys.append(int(y))
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"bad sample {raw['__key__']!r} in {raw['__url__']}: {e}") from e
    if not xs:
        raise ValueError(f"no samples in {spec!r}")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _downstream_cfg(steps: int, lr: float, batch_size: int, seed: int, weight_decay: float) -> RunConfig:
    from vfmkit.config import load_config

    return load_config(
        {
            "method": "catlip",
            "seed": seed,
            "data": {"batch_size": batch_size},
            "optim": {"lr": lr, "weight_decay": weight_decay, "warmup_steps": max(1, steps // 10)},
            "train": {
                "steps": steps,
                "log_every": max(1, steps // 5),
                "progress": False,
                "tensorboard": False,
                "ckpt_every": 0,
                "resume": False,
            },
        }
    )


def fit_downstream(
    net: CatlipModel,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    *,
    mode: str,
    steps: int,
    lr: float,
    batch_size: int,
    out_dir: str | Path,
    seed: int = 0,
) -> CatlipModel:
    """Train ``net`` (tower + C-way head) with CE through the engine: ``mode="probe"`` trains only the head
    on cached tower features; ``"finetune"`` trains everything on the images. Returns ``net``."""
    if mode == "probe":  # the one engine-trained linear probe, on cached tower features
        from vfmkit.eval.probe import fit_linear_head

        feats = predict(_Features(net), train_x)
        fit_linear_head(
            net.head, feats, train_y, _downstream_cfg(steps, lr, batch_size, seed, weight_decay=0.0), out_dir
        )
    elif mode == "finetune":  # method 'supervised' (CE on the handed tensors) through the registry
        from vfmkit.config import derive
        from vfmkit.methods.registry import run_job

        cfg = derive(
            _downstream_cfg(steps, lr, batch_size, seed, weight_decay=0.05),
            {
                "method": "supervised",
                "out_dir": str(out_dir),
                "method_args": {"input_key": "image", "label_key": "label"},
            },
        )
        run_job(cfg, build_kwargs={"model": net, "tensors": {"image": train_x, "label": train_y}})
    else:
        raise ValueError(f"mode must be 'probe' or 'finetune', got {mode!r}")
    return net


class _Features(nn.Module):
    def __init__(self, net: CatlipModel):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def transfer_eval(
    model: CatlipModel,
    vocab: Vocabulary,
    bundle: Any,
    classes: list[str],
    train_spec: str,
    val_spec: str,
    *,
    mode: str = "probe",
    steps: int = 100,
    lr: float | None = None,
    batch_size: int = 64,
    transfer_init: bool = True,
    out_dir: str | Path = "runs/transfer",
    max_up: int = 6,
    max_down: int = 3,
    seed: int = 0,
) -> dict:
    """Transfer Init (or a random head), evaluate before training, probe or fine-tune, evaluate again."""
    import copy

    from vfmkit.eval.classification import classification_metrics

    plan = plan_transfer_init(vocab, classes, max_up=max_up, max_down=max_down)
    torch.manual_seed(seed)
    net = copy.deepcopy(model)
    net.head = transfer_head(model.head, plan) if transfer_init else nn.Linear(model.embed_dim, len(classes))
    train_x, train_y = load_class_shards(train_spec, bundle.preprocess_val, classes)
    val_x, val_y = load_class_shards(val_spec, bundle.preprocess_val, classes)
    res: dict[str, Any] = {
        "mode": mode,
        "transfer_init": transfer_init,
        "classes": classes,
        "steps": steps,
        "n_train": len(train_y),
        "n_val": len(val_y),
    }
    if transfer_init:
        res.update(plan=plan.report, plan_lines=plan.describe())
    res["init_top1"] = classification_metrics(predict(net, val_x), val_y)["top1"]
    lr = lr if lr is not None else (1e-2 if mode == "probe" else 3e-4)
    fit_downstream(
        net,
        train_x,
        train_y,
        mode=mode,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        out_dir=out_dir,
        seed=seed,
    )
    res.update(classification_metrics(predict(net, val_x), val_y))
    return res
