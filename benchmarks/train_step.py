"""vfmkit's CLIP training step against open_clip's own training code, same model, batch and machine.

Both run in this process on the same pre-made batches (data loading excluded on both sides):
  - peer: ``open_clip_train.train.train_one_epoch`` (open_clip's trainer, args from its own parser);
  - vfmkit: ``vfmkit.engine.train`` with the plain CLIP method's loss.
Rounds alternate peer/vfmkit to share the machine's noise; the median samples/s of each is compared.

CPU (default): the tiny ViT of ../shared/bench (64 px, 4 layers), batch 64, fp32.
GPU: ``--device cuda --models MobileCLIP2-S0,ViT-B-16 --batch 256`` (bf16), floor 1.3x open_clip eager.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (for _record)
from _record import machine, now, record  # noqa: E402


class _Batches:
    """A fixed list of batches; for open_clip it mimics its DataInfo/dataloader interface."""

    def __init__(self, batches, as_tuple: bool):
        self.batches, self.as_tuple = batches, as_tuple
        self.num_batches, self.num_samples = len(batches), len(batches) * len(batches[0]["image"])

    def __iter__(self):
        for b in self.batches:
            yield (b["image"], b["text"]) if self.as_tuple else b

    def __len__(self):
        return len(self.batches)


def make_batches(bundle, n: int, batch: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    s = bundle.image_size
    ctx = bundle.tokenizer(["x"]).shape[1]
    return [
        {
            "image": torch.randn(batch, 3, s, s, generator=g).to(device),
            "text": torch.randint(1, 49000, (batch, ctx), generator=g).to(device),
        }
        for _ in range(n)
    ]


def run_open_clip(name: str, batches: list[dict], device: str, precision: str) -> float:
    """samples/s of open_clip's train_one_epoch over ``batches`` (after 3 warm-up steps)."""
    from open_clip.loss import ClipLoss
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    from vfmkit.models.factory import create_clip

    torch.manual_seed(0)
    model = create_clip(name, device=device, output_dict=True).model
    args = parse_args(
        [
            "--model",
            name,
            "--precision",
            precision,
            "--device",
            device,
            "--lr",
            "1e-3",
            "--wd",
            "0.1",
            "--warmup",
            "10",
            "--batch-size",
            str(len(batches[0]["image"])),
            "--log-every-n-steps",
            "100000",
            "--grad-clip-norm",
            "1.0",
        ]
    )
    args.device, args.distributed, args.world_size, args.rank, args.local_rank = device, False, 1, 0, 0
    args.wandb = args.save_logs = False
    args.accum_freq = 1
    args.distill = False  # open_clip_train.main derives it from --distill-model
    # open_clip's own optimizer setup (main.py): decay on weights, none on gains/biases/logit_scale
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": 0.1},
        ],
        lr=1e-3,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    sched = cosine_lr(opt, 1e-3, 10, 10_000)
    loss = ClipLoss()
    scaler = None

    class Data:
        def __init__(self, b):
            self.dataloader = _Batches(b, as_tuple=True)

        def set_epoch(self, e):
            pass

    train_one_epoch(model, {"train": Data(batches[:3])}, loss, 0, opt, scaler, sched, None, args)
    _sync(device)
    t0 = time.perf_counter()
    train_one_epoch(model, {"train": Data(batches)}, loss, 0, opt, scaler, sched, None, args)
    _sync(device)
    return sum(len(b["image"]) for b in batches) / (time.perf_counter() - t0)


def run_vfmkit(
    name: str,
    batches: list[dict],
    device: str,
    precision: str,
    compile_: bool = False,
    channels_last: bool = False,
) -> float:
    from vfmkit.config import load_config
    from vfmkit.engine import DistInfo, train
    from vfmkit.methods.clip import clamp_logit_scale, make_clip_loss_fn, make_contrastive_loss
    from vfmkit.models.factory import create_clip

    torch.manual_seed(0)
    model = create_clip(name, device=device).model
    info = DistInfo(device=torch.device(device))

    def cfg(steps):
        return load_config(
            {
                "optim": {"lr": 1e-3, "weight_decay": 0.1, "beta2": 0.98, "warmup_steps": 10},
                "train": {
                    "steps": steps,
                    "precision": precision,
                    "progress": False,
                    "tensorboard": False,
                    "log_every": 100000,
                    "resume": False,
                    "compile": compile_,
                    "channels_last": channels_last,
                },
            }
        )

    loss_fn = make_clip_loss_fn(make_contrastive_loss("clip", cfg(1), info))
    with tempfile.TemporaryDirectory() as d:
        train(
            cfg(3),
            model,
            loss_fn,
            _Batches(batches[:3], False),
            out_dir=d,
            dist_info=info,
            after_step=clamp_logit_scale,
        )
        _sync(device)
        t0 = time.perf_counter()
        train(
            cfg(len(batches)),
            model,
            loss_fn,
            _Batches(batches, False),
            out_dir=d,
            dist_info=info,
            after_step=clamp_logit_scale,
        )
        _sync(device)
        # the final save (model.safetensors) is part of train(); exclude nothing, it is what users pay
        return sum(len(b["image"]) for b in batches) / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time vfmkit with channels_last + compile")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    models = (args.models or ("MobileCLIP2-S0,ViT-B-16" if gpu else "vfm-tiny-vit")).split(",")
    batch = args.batch or (256 if gpu else 64)
    precision = "bf16" if gpu else "fp32"
    peer_precision = "amp_bfloat16" if gpu else "fp32"
    floor = 1.3 if gpu else 1.0
    from vfmkit.models.factory import create_clip

    rows = []
    for name in models:
        bundle = create_clip(name)
        batches = make_batches(bundle, args.steps, batch, args.device)
        del bundle
        peer, ours = [], []
        for r in range(args.rounds):
            peer.append(run_open_clip(name, batches, args.device, peer_precision))
            ours.append(run_vfmkit(name, batches, args.device, precision))
            print(f"{name} round {r}: open_clip {peer[-1]:.1f} samples/s, vfmkit {ours[-1]:.1f} samples/s")
        row = {
            "model": name,
            "batch": batch,
            "precision": precision,
            "open_clip_samples_per_s": statistics.median(peer),
            "vfmkit_samples_per_s": statistics.median(ours),
            "rounds": args.rounds,
            "steps": args.steps,
        }
        row["ratio"] = row["vfmkit_samples_per_s"] / row["open_clip_samples_per_s"]
        if args.compile:
            row["vfmkit_compile_samples_per_s"] = run_vfmkit(
                name, batches, args.device, precision, True, True
            )
        rows.append(row)
        print(json.dumps(row))
    worst = min(r["ratio"] for r in rows)
    headline = "; ".join(
        f"{r['model']} b{r['batch']} {r['precision']}: vfmkit {r['vfmkit_samples_per_s']:.1f} vs "
        f"open_clip {r['open_clip_samples_per_s']:.1f} samples/s = {r['ratio']:.2f}x"
        for r in rows
    )
    res = {
        "headline": f"CLIP train step, vfmkit engine vs open_clip train_one_epoch ({args.device}): {headline}",
        "floor": floor,
        "floor_met": bool(worst >= floor),
        "worst_ratio": worst,
        "rows": rows,
        "date": now(),
        "machine": machine(),
        "device": args.device,
    }
    summary = f"{res['headline']}\nfloor {floor}x met: {res['floor_met']}"
    print(summary)
    # the recorded block also holds the per-model rows (printed above, as each model finished)
    record(
        "train_step_gpu" if gpu else "train_step",
        res,
        "\n".join([*(json.dumps(r) for r in rows), summary]),
        script="train_step",
    )


if __name__ == "__main__":
    main()
