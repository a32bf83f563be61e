"""CatLIP vs CLIP pretraining, same image tower, same data, same steps, same machine, one run.

Data: the real Flickr8k TRAIN split (6,091 photos, 5 captions each; never ``val``), decoded once to uint8
tensors at the tower's small CPU resolution (both methods read the same in-memory tensors: data loading is
excluded from both sides, the comparison is the training step). Downstream: a class-balanced subset of the
real Imagenette train/val tars (10 ImageNet classes whose ids are WordNet synsets).

  - CLIP: ``vfmkit.methods.clip`` (open_clip ``ClipLoss``), image + text tower of ``vfm-tiny-vit``, one of an
    image's 5 captions drawn per step.
  - CatLIP: ``vfmkit.methods.catlip``, the same image tower (same init) + a linear head over the synset
    vocabulary built from the same captions (spaCy + WordNet), multi-label BCE; labels parsed once, cached.
  (a) throughput: CLIP and CatLIP optimizer steps alternate in rounds (robust to load changes on a shared
      CPU); median seconds per step each. Floor: CatLIP >= 1.1x CLIP's samples/s.
  (b) Imagenette after each pretraining: linear probe (L-BFGS on frozen tower features, ``vfmkit.eval.probe``),
      Transfer Init accuracy with no training at all, a short head-only probe and a short full fine-tune
      through the engine, CatLIP heads with and without Transfer Init; a random (untrained) tower as reference.
  Paper (arXiv:2404.15653, ViT-B/16 on DataComp-1.3B): CatLIP matches CLIP's transfer accuracy at 2.7x less
  pretraining compute, and Transfer Init helps most with little downstream data.

    PYTHONPATH=src python3 benchmarks/catlip.py [--data /work/shared/data] [--steps 60] [--image-size 32]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # benchmarks/ (for _record)
from _record import machine, now, record  # noqa: E402

CACHE = ROOT.parent / "runs" / "bench_catlip_cache"


def _decode(data: bytes, size: int) -> torch.Tensor:
    """JPEG bytes -> uint8 [3, size, size] (shorter side resized, centre crop)."""
    from PIL import Image
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size * 2, size * 2))  # DCT-domain downscale: decode cost independent of source size
    img = img.convert("RGB")
    return center_crop(resize(pil_to_tensor(img), size, antialias=True), [size, size])


def load_flickr(root: Path, size: int) -> tuple[torch.Tensor, list[list[str]]]:
    """Flickr8k TRAIN split only: images uint8 [N,3,S,S], captions (5 per image)."""
    names = sorted(json.loads((root / "splits.json").read_text())["train"])
    caps: dict[str, list[str]] = {}
    with open(root / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):
            caps.setdefault(row["image"], []).append(row["caption"])
    want, imgs = set(names), {}
    with tarfile.open(root / "images.tar") as tf:
        for m in tf:
            base = os.path.basename(m.name)
            if m.isfile() and base in want:
                imgs[base] = _decode(tf.extractfile(m).read(), size)
    names = [n for n in names if n in imgs and caps.get(n)]
    return torch.stack([imgs[n] for n in names]), [caps[n] for n in names]


def load_imagenette(root: Path, size: int, split: str, per_class: int, wnids: list[str]):
    """The first ``per_class`` images of each class (sorted member order): uint8 [N,3,S,S], labels [N]."""
    pos, xs, ys, seen = {w: i for i, w in enumerate(wnids)}, [], [], {w: 0 for w in wnids}
    with tarfile.open(root / f"{split}.tar") as tf:
        members = sorted((m for m in tf if m.isfile()), key=lambda m: m.name)
        for m in members:
            w = m.name.split("/")[0]
            if w in pos and seen[w] < per_class:
                seen[w] += 1
                xs.append(_decode(tf.extractfile(m).read(), size))
                ys.append(pos[w])
    return torch.stack(xs), torch.tensor(ys)


def labels_for(captions: list[list[str]], min_count: int):
    """CatLIP vocabulary + per-image rows from the captions (spaCy + WordNet), cached by caption hash."""
    from vfmkit.text.nouns import CaptionTagger
    from vfmkit.text.vocab import Vocabulary, build_vocab
    from vfmkit.text.wordnet import load_wordnet

    h = hashlib.sha256(json.dumps([captions, min_count]).encode()).hexdigest()[:16]
    vpath, lpath = CACHE / f"vocab-{h}.json", CACHE / f"rows-{h}.json"
    if vpath.is_file() and lpath.is_file():
        cached = json.loads(lpath.read_text())
        return Vocabulary.load(vpath), cached["rows"], cached["tag_captions_per_s"], True
    wn = load_wordnet()
    tagger = CaptionTagger("spacy", "first", wordnet=wn)
    flat = [c for cs in captions for c in cs]
    t0 = time.perf_counter()
    syn = tagger.synsets(flat)
    rate = len(flat) / (time.perf_counter() - t0)
    vocab = build_vocab(syn, wn, min_count=min_count, meta={"senses": "first", "backend": "spacy"})
    rows, i = [], 0
    for cs in captions:
        rows.append(vocab.encode(o for s in syn[i : i + len(cs)] for o in s))
        i += len(cs)
    from vfmkit.data.io import atomic_write_json

    vocab.save(vpath)
    atomic_write_json(lpath, {"rows": rows, "tag_captions_per_s": rate})
    return vocab, rows, rate, False


def engine_cfg(args, steps: int, lr: float, wd: float, warmup: int):
    from vfmkit.config import load_config

    return load_config(
        {
            "seed": args.seed,
            "data": {"batch_size": args.batch},
            "optim": {"lr": lr, "weight_decay": wd, "warmup_steps": warmup},
            "train": {
                "steps": steps,
                "log_every": max(1, steps // 4),
                "progress": False,
                "tensorboard": False,
                "ckpt_every": 0,
                "resume": False,
            },
        }
    )


def clip_job(args):
    """The CLIP side: open_clip model, the lead's ClipLoss + loss_fn; one of 5 captions drawn per sample."""
    from vfmkit.engine import init_distributed
    from vfmkit.methods.clip import clamp_logit_scale, make_clip_loss_fn, make_contrastive_loss
    from vfmkit.models.factory import create_clip

    torch.manual_seed(args.seed)  # same seed as the CatLIP tower: identical image-tower init
    bundle = create_clip(args.model, image_size=args.image_size)
    base = make_clip_loss_fn(
        make_contrastive_loss("clip", engine_cfg(args, 1, 1e-3, 0.2, 1), init_distributed())
    )

    def loss_fn(model, batch, step):
        g = torch.Generator().manual_seed(args.seed * 100003 + step)
        pick = torch.randint(batch["tokens"].shape[1], (batch["tokens"].shape[0],), generator=g)
        text = batch["tokens"][torch.arange(len(pick)), pick]
        return base(model, {"image": batch["image"], "text": text}, step)

    return bundle, loss_fn, clamp_logit_scale


def catlip_job(args, vocab):
    from vfmkit.methods.catlip import create_catlip_model, make_catlip_loss_fn

    torch.manual_seed(args.seed)
    model, bundle = create_catlip_model(args.model, vocab, image_size=args.image_size)
    return model, bundle, make_catlip_loss_fn()


def timed_rounds(jobs: dict, data: dict, args) -> dict[str, float]:
    """Alternate ``args.k`` optimizer steps of each job for ``args.rounds`` rounds; median s/step each."""
    import copy

    times: dict[str, list[float]] = {k: [] for k in jobs}
    state = {}
    for name, (model, loss_fn) in jobs.items():
        m = copy.deepcopy(model).train()
        state[name] = (m, loss_fn, torch.optim.AdamW(m.parameters(), lr=1e-4))
    g = torch.Generator().manual_seed(0)
    for r in range(args.rounds + 1):  # round 0 warms up allocators and is discarded
        for name, (m, loss_fn, opt) in state.items():
            idx = torch.randint(len(data[name]["image"]), (args.batch,), generator=g)
            batch = {k: v[idx] for k, v in data[name].items()}
            t0 = time.perf_counter()
            for s in range(args.k):
                opt.zero_grad(set_to_none=True)
                loss, _ = loss_fn(m, batch, s)
                loss.backward()
                opt.step()
            if r:
                times[name].append((time.perf_counter() - t0) / args.k)
    return {k: statistics.median(v) for k, v in times.items()}


def pretrain(name: str, model, loss_fn, tensors: dict, args, after_step=None):
    from vfmkit.data.loader import TensorLoader
    from vfmkit.engine import train

    loader = TensorLoader(tensors, args.batch, seed=args.seed)
    cfg = engine_cfg(args, args.steps, args.lr, 0.2, max(1, args.steps // 10))
    res = train(cfg, model, loss_fn, loader, out_dir=CACHE / "runs" / name, after_step=after_step)
    first = next(h["loss"] for h in res.history if "loss" in h)
    return {
        "steps": res.step,
        "samples_per_s": res.samples_per_s,
        "loss_first_log": first,
        "loss_last_log": res.history[-1]["loss"],
    }


class _Tower(torch.nn.Module):
    """``model(images) -> features``: lets ``catlip.predict`` batch a tower's features."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def downstream(args, towers: dict, catlip_model, vocab, wnids: list[str], data) -> dict:
    """Imagenette: L-BFGS linear probe per tower; Transfer Init with no training; short probe + fine-tune."""
    import copy

    from vfmkit.eval.classification import classification_metrics
    from vfmkit.eval.probe import linear_probe
    from vfmkit.methods.catlip import CatlipModel, fit_downstream, plan_transfer_init, predict, transfer_head

    tx, ty, vx, vy = data
    out: dict = {}
    for name, visual in towers.items():
        f = _Tower(visual)
        out[f"{name}/linear_probe_top1"] = linear_probe(predict(f, tx), ty, predict(f, vx), vy)["top1"]
    plan = plan_transfer_init(vocab, wnids)
    ti = transfer_head(catlip_model.head, plan)
    net = copy.deepcopy(catlip_model)
    net.head = ti
    out["catlip+TI/no_training_top1"] = classification_metrics(predict(net, vx), vy)["top1"]
    out["transfer_init_plan"] = plan.describe()
    variants = {
        "clip": (towers["clip"], None),
        "catlip": (towers["catlip"], None),
        "catlip+TI": (towers["catlip"], ti),
    }
    for mode, steps, lr in (("probe", args.probe_steps, 1e-2), ("finetune", args.ft_steps, 3e-4)):
        for vname, (visual, head) in variants.items():
            torch.manual_seed(args.seed)  # the same random head for every tower without Transfer Init
            net = CatlipModel(copy.deepcopy(visual), len(wnids), args.image_size)
            if head is not None:
                net.head = copy.deepcopy(head)
            fit_downstream(
                net,
                tx,
                ty,
                mode=mode,
                steps=steps,
                lr=lr,
                batch_size=args.batch,
                out_dir=CACHE / "runs" / f"{mode}-{vname}",
                seed=args.seed,
            )
            out[f"{vname}/{mode}_{steps}steps_top1"] = classification_metrics(predict(net, vx), vy)["top1"]
    return out


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [N,3,S,S] -> float32, the tower's normalisation."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s


def prepare(args) -> dict:
    """Flickr8k train tensors, CatLIP labels, CLIP tokens, both models (same tower init)."""
    t0 = time.perf_counter()
    images, captions = load_flickr(Path(args.data) / "flickr8k", args.image_size)
    vocab, rows, tag_rate, cached = labels_for(captions, args.min_count)
    bundle, clip_loss, clamp = clip_job(args)
    x = normalise(images, bundle.mean, bundle.std)
    tokens = torch.stack([bundle.tokenizer([cs[j % len(cs)] for j in range(5)]) for cs in captions])
    targets = torch.zeros(len(rows), len(vocab))
    for i, r in enumerate(rows):
        targets[i, r] = 1.0
    cat_model, _, cat_loss = catlip_job(args, vocab)
    same_init = all(
        torch.equal(a, b)
        for a, b in zip(
            bundle.model.visual.state_dict().values(), cat_model.visual.state_dict().values(), strict=True
        )
    )
    import copy

    return {
        "x": x,
        "tokens": tokens,
        "targets": targets,
        "vocab": vocab,
        "bundle": bundle,
        "clip_loss": clip_loss,
        "clamp": clamp,
        "cat_model": cat_model,
        "cat_loss": cat_loss,
        "same_init": same_init,
        "random_visual": copy.deepcopy(cat_model.visual),
        "tag_rate": tag_rate,
        "labels_cached": cached,
        "n_images": len(rows),
        "n_captions": sum(len(c) for c in captions),
        "images_without_labels": sum(1 for r in rows if not r),
        "prep_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent.parent / "shared" / "data"))
    ap.add_argument("--model", default="vfm-tiny-vit")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60, help="pretraining steps, each method")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4, help="alternating throughput rounds")
    ap.add_argument("--k", type=int, default=2, help="optimizer steps per method per round")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared CPU: 1)")
    ap.add_argument("--train-per-class", type=int, default=50)
    ap.add_argument("--val-per-class", type=int, default=30)
    ap.add_argument("--probe-steps", type=int, default=50)
    ap.add_argument("--ft-steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]

    p = prepare(args)
    clip_model = p["bundle"].model
    per_step = timed_rounds(
        {"clip": (clip_model, p["clip_loss"]), "catlip": (p["cat_model"], p["cat_loss"])},
        {
            "clip": {"image": p["x"], "tokens": p["tokens"]},
            "catlip": {"image": p["x"], "target": p["targets"]},
        },
        args,
    )
    ratio = per_step["clip"] / per_step["catlip"]
    clip_tr = pretrain(
        "clip",
        clip_model,
        p["clip_loss"],
        {"image": p["x"], "tokens": p["tokens"]},
        args,
        after_step=p["clamp"],
    )
    cat_tr = pretrain(
        "catlip", p["cat_model"], p["cat_loss"], {"image": p["x"], "target": p["targets"]}, args
    )

    from vfmkit.data.builtin import imagenette_classes

    wnids = list(imagenette_classes())
    root, b = Path(args.data) / "imagenette", p["bundle"]
    tx, ty = load_imagenette(root, args.image_size, "train", args.train_per_class, wnids)
    vx, vy = load_imagenette(root, args.image_size, "val", args.val_per_class, wnids)
    towers = {"random": p["random_visual"], "clip": clip_model.visual, "catlip": p["cat_model"].visual}
    ds = downstream(
        args,
        towers,
        p["cat_model"],
        p["vocab"],
        wnids,
        (normalise(tx, b.mean, b.std), ty, normalise(vx, b.mean, b.std), vy),
    )
    report(args, p, per_step, ratio, clip_tr, cat_tr, ds, len(ty), len(vy), t_start, load0)


def report(args, p, per_step, ratio, clip_tr, cat_tr, ds, n_tr, n_va, t_start, load0) -> None:
    floor = 1.1
    ft, pr = f"finetune_{args.ft_steps}steps_top1", f"probe_{args.probe_steps}steps_top1"
    headline = (
        f"CatLIP vs CLIP pretraining ({args.model} image tower, {args.image_size}px, batch {args.batch}, "
        f"{args.steps} steps, Flickr8k train, CPU): step throughput {ratio:.2f}x (floor {floor}x); "
        f"Imagenette linear probe CLIP {ds['clip/linear_probe_top1']:.1f}% vs CatLIP "
        f"{ds['catlip/linear_probe_top1']:.1f}% (random tower {ds['random/linear_probe_top1']:.1f}%); "
        f"fine-tune CLIP {ds[f'clip/{ft}']:.1f}% / CatLIP {ds[f'catlip/{ft}']:.1f}% / "
        f"CatLIP+TransferInit {ds[f'catlip+TI/{ft}']:.1f}%; head probe CLIP {ds[f'clip/{pr}']:.1f}% / "
        f"CatLIP {ds[f'catlip/{pr}']:.1f}% / CatLIP+TransferInit {ds[f'catlip+TI/{pr}']:.1f}%"
    )
    mach = f"{machine()}, load avg {load0:.1f} at start / {os.getloadavg()[0]:.1f} at end"
    res = {
        "headline": headline,
        "floor": floor,
        "floor_met": bool(ratio >= floor),
        "throughput_ratio_catlip_over_clip": ratio,
        "s_per_step": per_step,
        "samples_per_s": {"clip": args.batch / per_step["clip"], "catlip": args.batch / per_step["catlip"]},
        "engine_samples_per_s": {"clip": clip_tr["samples_per_s"], "catlip": cat_tr["samples_per_s"]},
        "pretrain": {"clip": clip_tr, "catlip": cat_tr},
        "same_tower_init": p["same_init"],
        "downstream": ds,
        "imagenette_train": n_tr,
        "imagenette_val": n_va,
        "vocab_size": len(p["vocab"]),
        "vocab_top": p["vocab"].names[:10],
        "n_images": p["n_images"],
        "n_captions": p["n_captions"],
        "images_without_labels": p["images_without_labels"],
        "caption_tagging_captions_per_s": p["tag_rate"],
        "labels_from_cache": p["labels_cached"],
        "paper_claim": "CatLIP ViT-B/16: same transfer accuracy as CLIP at 0.37x the GPU-hours (2.7x); "
        "ImageNet 84.2 fine-tuned; Transfer Init helps most with little downstream data",
        "args": vars(args),
        "wall_s": time.perf_counter() - t_start,
        "date": now(),
        "machine": mach,
    }
    lines = [
        headline,
        f"s/step: CLIP {per_step['clip']:.3f}, CatLIP {per_step['catlip']:.3f} -> {ratio:.2f}x "
        f"(floor {floor}x met: {res['floor_met']}); engine samples/s CLIP {clip_tr['samples_per_s']:.1f}, "
        f"CatLIP {cat_tr['samples_per_s']:.1f}",
        f"pretrain loss (first -> last log): CLIP {clip_tr['loss_first_log']:.3f} -> "
        f"{clip_tr['loss_last_log']:.3f}; CatLIP BCE {cat_tr['loss_first_log']:.2f} -> {cat_tr['loss_last_log']:.2f}",
        f"vocabulary {len(p['vocab'])} synsets from {p['n_captions']} captions; tagging "
        f"{p['tag_rate']:.0f} captions/s{' (cached)' if p['labels_cached'] else ''}; top {p['vocab'].names[:6]}",
    ]
    lines += [f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: " + "; ".join(v) for k, v in ds.items()]
    lines.append(f"date {res['date']}, machine {mach}, wall {res['wall_s']:.0f}s")
    text = "\n".join(lines)
    print(text)
    record("catlip", res, text)


if __name__ == "__main__":
    main()
