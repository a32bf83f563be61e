"""Weight subcloning benchmark: train the destination from subcloned init vs random init (same recipe, same
steps, same engine; only the initial state dict differs) on real data, and report the steps each needs to reach
random init's final metric.

- ViT (timm) on Imagenette: parent 4 blocks x 128 at 32 px, child 3 blocks x 64; metric: val top-1 (higher).
- GPT-2 (transformers) on Flickr8k TRAIN-split captions: parent 4 layers x 128, child 3 x 64; metric: held-out
  per-token loss (lower). Held-out captions belong to TRAIN-split images never trained on (Flickr8k val unused).

Parents are cached under ``.cache/subclone-bench`` (the engine resumes them if interrupted). Also prints the
child-parent function check (pearson on held-out outputs) for every scaling mode, the evidence for the default.

    PYTHONPATH=src python3 benchmarks/subclone.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from vfmkit.commands import subclone as cmd
from vfmkit.config import load_config
from vfmkit.methods import subclone as sc

ROOT = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("VFMKIT_BENCH_CACHE", ROOT.parent / ".cache" / "subclone-bench"))  # git-ignored
SHARED = Path(os.environ.get("VFMKIT_SHARED_DATA", ROOT.parent.parent / "shared" / "data"))
FLOOR = 3.0
COMMON = ["train.progress=false", "train.tensorboard=false", "train.log_every=10", "data.batch_size=64"]


def vit_data(n_train: int, n_val: int) -> dict:
    """Imagenette train/val at 32 px: a seeded random subset of the real train and val tars."""
    f = CACHE / f"imagenette32_{n_train}_{n_val}.pt"
    if f.is_file():
        return torch.load(f, weights_only=True)
    rng = random.Random(0)
    tr = cmd.read_samples(str(SHARED / "imagenette" / "train.tar"))
    va = cmd.read_samples(str(SHARED / "imagenette" / "val.tar"))
    tr, va = rng.sample(tr, min(n_train, len(tr))), rng.sample(va, min(n_val, len(va)))
    x, y = cmd.decode_images(tr, 32)
    vx, vy = cmd.decode_images(va, 32)
    data = {"train": {"x": x, "y": y}, "val": {"x": vx, "y": vy}}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(data, f.with_suffix(".tmp"))
    os.replace(f.with_suffix(".tmp"), f)
    return data


def lm_data(n_heldout_images: int = 300, vocab_size: int = 1024, context: int = 24) -> dict:
    """Flickr8k TRAIN-split captions; the captions of ``n_heldout_images`` train images are held out."""
    import csv

    train_names = sorted(json.loads((SHARED / "flickr8k" / "splits.json").read_text())["train"])
    random.Random(0).shuffle(train_names)
    held = set(train_names[:n_heldout_images])
    keep = set(train_names)
    with (SHARED / "flickr8k" / "captions.csv").open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["image"] in keep]  # never Flickr8k val
    texts = [r["caption"] for r in rows if r["image"] not in held]
    vtexts = [r["caption"] for r in rows if r["image"] in held]
    vocab = cmd.WordVocab.build(texts, vocab_size)
    ids, mask = vocab.encode(texts, context)
    vids, vmask = vocab.encode(vtexts, context)
    return {"train": {"x": ids, "mask": mask}, "val": {"x": vids, "mask": vmask}, "vocab": vocab}


def train_parent(name: str, recipe: str, overrides: list[str], data: dict) -> Path:
    out = CACHE / name
    stamp = json.dumps(overrides)
    if (out / "arch.json").is_file() and (out / "model.safetensors").is_file():
        if sc.read_arch(out).get("bench_stamp") == stamp:
            print(f"[{name}] cached parent {out}")
            return out
        shutil.rmtree(out)
    t0 = time.time()
    r = cmd.run_training(load_config(recipe, COMMON + overrides), out, data=data)
    arch = json.loads((out / "arch.json").read_text())
    sc._atomic_write(out / "arch.json", json.dumps({**arch, "bench_stamp": stamp}, indent=1).encode())
    print(f"[{name}] trained parent {r['step']} steps in {time.time() - t0:.0f}s; last eval {r['evals'][-1]}")
    return out


def calib(task: str, data: dict, split: str, n: int) -> list[dict]:
    """The first ``n`` samples of a split as batches (train: calibration; val: the held-out function check)."""
    d, sl = data[split], slice(0, n)
    if task == "vit":
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # timm vit_tiny's pretrained_cfg stats (as in training)
        x = cmd.normalize(d["x"][sl], mean, std)
        return [{"x": x[i:i + 64]} for i in range(0, len(x), 64)]
    return [{"x": d["x"][sl][i:i + 64], "mask": d["mask"][sl][i:i + 64]} for i in range(0, len(d["x"][sl]), 64)]


def subclone_child(task: str, parent_dir: Path, data: dict, dims: dict, out: Path) -> dict:
    """Subclone with every scaling mode (function check each), save the default ("paper") child."""
    parent, _ = sc.load_model(parent_dir)
    cal, held = calib(task, data, "train", 256), calib(task, data, "val", 256)
    checks = {}
    for mode in sc.SCALE_MODES:
        for blocks in sc.BLOCK_MODES:
            r = sc.subclone(parent, cal, scale=mode, block_select=blocks, **dims)
            checks[f"{mode}/{blocks}"] = round(sc.function_check(parent, r.model, held)["pearson"], 4)
            if mode == "paper" and blocks == "middle":
                best = r
    sc.save_model(out, best.model, best.arch, {"task": sc.read_arch(parent_dir).get("task")})
    print(f"[{task}] child-parent pearson on held-out outputs by scale/blocks: {checks}")
    return checks


def steps_to(evals: list[dict], key: str, target: float, higher: bool) -> int | None:
    for h in evals:
        v = h[f"eval/{key}"]
        if (v >= target) if higher else (v <= target):
            return h["step"]
    return None


def train_children(task: str, recipe: str, sub_dir: Path, overrides: list[str], data: dict) -> dict:
    key, higher = ("acc", True) if task == "vit" else ("loss", False)
    runs = {}
    for init in ("subclone", "random"):
        out = CACHE / f"{task}_child_{init}"
        shutil.rmtree(out, ignore_errors=True)  # fresh each run (the engine would resume otherwise)
        how = f"method_args.init={sub_dir}" if init == "subclone" else f"method_args.arch={sub_dir}"
        how = [how] if init == "subclone" else [how, "method_args.init=null"]
        cfg = load_config(recipe, COMMON + overrides + how)
        t0 = time.time()
        r = cmd.run_training(cfg, out, data=data)
        runs[init] = {"evals": [{"step": h["step"], f"eval/{key}": round(h[f"eval/{key}"], 4)} for h in r["evals"]],
                      "seconds": round(time.time() - t0, 1)}
    target = runs["random"]["evals"][-1][f"eval/{key}"]
    s_rand = steps_to(runs["random"]["evals"], key, target, higher)
    s_sub = steps_to(runs["subclone"]["evals"], key, target, higher)
    ratio = s_rand / s_sub if s_sub else 0.0
    first = runs["subclone"]["evals"][0][f"eval/{key}"]
    print(f"[{task}] target = random init's final {key} {target:.4f}: random needs {s_rand} steps, subclone "
          f"{s_sub} (first eval {first:.4f}); ratio {ratio:.2f}x")
    return {"metric": key, "target": target, "steps_random": s_rand, "steps_subclone": s_sub, "ratio": ratio,
            "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny smoke version (numbers not meaningful)")
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    q = a.quick
    p_steps, c_steps, every = (20, 20, 5) if q else (150, 100, 10)
    t0 = time.time()
    results = {}
    vd = vit_data(600 if q else 3000, 200 if q else 500)
    vit_model = "model.kwargs={patch_size: 8, embed_dim: 128, depth: 4, num_heads: 4}"
    vp = train_parent("vit_parent" + ("_q" if q else ""), "subclone_vit_parent",
                      [vit_model, "method_args.image_size=32", f"train.steps={p_steps}", "train.eval_every=100",
                       "optim.lr=2e-3", "optim.warmup_steps=20"], vd)
    vchecks = subclone_child("vit", vp, vd, {"layers": 3, "width": 64}, CACHE / "vit_sub")
    child_over = ["method_args.image_size=32", f"train.steps={c_steps}", f"train.eval_every={every}",
                  "optim.lr=2e-3", "optim.warmup_steps=10"]
    results["vit_imagenette"] = {**train_children("vit", "subclone_vit_child", CACHE / "vit_sub", child_over, vd),
                                 "function_check_pearson": vchecks}
    ld = lm_data()
    lm_model = ("model.kwargs={n_embd: 128, n_layer: 4, n_head: 4, resid_pdrop: 0.0, embd_pdrop: 0.0, "
                "attn_pdrop: 0.0}")
    lm_common = ["method_args.context_length=24", "method_args.max_val=0"]
    lp = train_parent("lm_parent" + ("_q" if q else ""), "subclone_lm_parent",
                      [lm_model, f"train.steps={p_steps}", "train.eval_every=100", "optim.lr=2e-3",
                       "optim.warmup_steps=20"] + lm_common, ld)
    lchecks = subclone_child("lm", lp, ld, {"layers": 3, "width": 64}, CACHE / "lm_sub")
    lover = lm_common + [f"train.steps={c_steps}", f"train.eval_every={every}", "optim.lr=2e-3",
                         "optim.warmup_steps=10", f"method_args.vocab={lp / 'vocab.json'}"]
    results["gpt2_flickr8k"] = {**train_children("lm", "subclone_lm_child", CACHE / "lm_sub", lover, ld),
                                "function_check_pearson": lchecks}
    write(results, time.time() - t0, q)
    return 0


def write(results: dict, seconds: float, quick: bool) -> None:
    rv, rl = results["vit_imagenette"]["ratio"], results["gpt2_flickr8k"]["ratio"]
    headline = (f"steps to reach random init's final metric, random/subclone: ViT on Imagenette {rv:.2f}x, GPT-2 on "
                f"Flickr8k captions {rl:.2f}x (floor {FLOOR}x)")
    doc = {"headline": headline, "floor": FLOOR, "floor_met": bool(min(rv, rl) >= FLOOR), "quick": quick,
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
           "seconds": round(seconds, 1), "results": results}
    print(headline)
    print(f"floor_met={doc['floor_met']} in {seconds:.0f}s")
    if not quick:
        out = ROOT / "results" / "subclone.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        sc._atomic_write(out, json.dumps(doc, indent=1).encode())


if __name__ == "__main__":
    sys.exit(main())
