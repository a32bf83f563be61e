"""The one training loop every vfmkit method runs through.

A method supplies ``model``, ``loss_fn(model, batch, step) -> (loss, logs)`` and a loader; the engine
owns precision, DDP/FSDP2, gradient accumulation, clipping, AdamW + warm-up cosine, EMA, atomic
checkpoints with exact resume (model, optimizer, scheduler, RNG, data position, step) and logging.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vfmkit.config import RunConfig, to_dict
from vfmkit.engine.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vfmkit.engine.distributed import DistInfo, all_reduce_mean, barrier, init_distributed

LossFn = Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    history: list[dict] = field(default_factory=list)
    final_logs: dict = field(default_factory=dict)
    samples_per_s: float = 0.0
    resumed_from: int | None = None


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        for v in batch.values():
            n = batch_size_of(v)
            if n:
                return n
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0])
    return 0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no decay on gains, biases, norms, embeddings' scalars and logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n or "norm" in n
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    o, total = cfg.optim, max(1, cfg.train.steps)

    def f(step: int) -> float:
        if o.warmup_steps > 0 and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def autocast_ctx(cfg: RunConfig, device: torch.device):
    prec = cfg.train.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" else "fp32"
    if prec == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if prec != "fp32":
        raise ValueError(f"config key 'train.precision': unknown precision {prec!r} (auto, fp32, bf16)")
    return nullcontext()


def _wrap_parallel(model: nn.Module, cfg: RunConfig, dist_info: DistInfo, find_unused: bool) -> nn.Module:
    if not dist_info.distributed:
        return model
    if cfg.train.parallel == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for child in model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
        return fully_shard(model)
    if cfg.train.parallel != "ddp":
        raise ValueError(f"config key 'train.parallel': unknown value {cfg.train.parallel!r} (ddp, fsdp2)")
    ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


class _Logger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.f = open(out_dir / "log.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but logging must never kill a run
                self.tb = None

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()


def train(
    cfg: RunConfig,
    model: nn.Module,
    loss_fn: LossFn,
    loader: Iterable,
    *,
    out_dir: str | Path | None = None,
    eval_fn: Callable[[nn.Module, int], dict] | None = None,
    groups: list[dict] | None = None,
    find_unused_parameters: bool = False,
    dist_info: DistInfo | None = None,
    stop_after: int | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.train.steps`` optimizer steps; see the module docstring.

    ``after_step(model)`` runs after each optimizer step (e.g. clamping a learnt temperature).
    ``stop_after`` ends the call after that many steps of this invocation (a deliberate interruption,
    as a kill would be) without changing the schedule; the next call resumes from the checkpoint.
    """
    t = cfg.train
    out = Path(out_dir or cfg.out_dir)
    dist_info = dist_info or init_distributed()
    device = dist_info.device
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    barrier()

    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = None
    if t.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
    # Weights are restored before wrapping, so DDP and FSDP2 both start from the full checkpoint.
    step, epoch, data_state, resumed, state = 0, 0, None, None, None
    ckpt_root = out / "checkpoints"
    last = latest_checkpoint(ckpt_root) if t.resume else None
    if last is not None:
        state = load_checkpoint(last, model, ema)
    ddp_model = _wrap_parallel(model, cfg, dist_info, find_unused_parameters)
    run_model = torch.compile(ddp_model) if t.compile else ddp_model

    o = cfg.optim
    opt = torch.optim.AdamW(
        groups or param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
        fused=True,  # one fused kernel for all parameters, on CPU and GPU alike
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    if state is not None:
        _load_optimizer_state(opt, model, state["optimizer"], cfg, dist_info)
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][min(dist_info.rank, len(state["rng"]) - 1)])
        step, epoch, data_state = state["step"], state["epoch"], state.get("data")
        resumed = step
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if data_state is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(data_state[min(dist_info.rank, len(data_state) - 1)])

    logger = _Logger(out, dist_info.is_main, t.tensorboard)
    history: list[dict] = []
    it = iter(loader)
    pbar = None
    if t.progress and dist_info.is_main:
        from tqdm import tqdm

        pbar = tqdm(total=t.steps, initial=step, desc=f"train {cfg.method}", unit="step", dynamic_ncols=True)

    def next_batch():
        nonlocal it, epoch
        for _ in range(2):
            try:
                return next(it)
            except StopIteration:
                epoch += 1
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
                it = iter(loader)
        raise RuntimeError("the training loader yields no batch: is the dataset smaller than one batch?")

    def checkpoint(step: int) -> None:
        data = [loader.state_dict()] if hasattr(loader, "state_dict") else None
        rngs = [rng_state()]
        if dist_info.distributed:
            import torch.distributed as dist

            gathered_d: list = [None] * dist_info.world_size
            gathered_r: list = [None] * dist_info.world_size
            dist.all_gather_object(gathered_d, data[0] if data else None)
            dist.all_gather_object(gathered_r, rngs[0])
            data, rngs = (gathered_d if data else None), gathered_r
        model_to_save = model
        if cfg.train.parallel == "fsdp2" and dist_info.distributed:
            model_to_save = _full_state_module(model)
        if dist_info.is_main:
            state = {"optimizer": _optimizer_state(opt, model, cfg, dist_info), "scheduler": sched.state_dict(),
                     "rng": rngs, "step": step, "epoch": epoch, "data": data}
            save_checkpoint(ckpt_root, step, model_to_save, state, ema, keep=t.keep_ckpts)
        barrier()

    model.train()
    seen, t0, window_t, window_n = 0, time.perf_counter(), time.perf_counter(), 0
    started_at = step
    logs: dict[str, float] = {}
    while step < t.steps:
        opt.zero_grad(set_to_none=True)
        # Logged values stay tensors until a log step: no host-device sync on the hot path.
        agg: dict[str, Any] = {}
        n_batch = 0
        for micro in range(t.grad_accum):
            batch = to_device(next_batch(), device, t.channels_last)
            n_batch += batch_size_of(batch)
            sync = micro == t.grad_accum - 1
            ctx = ddp_model.no_sync() if (not sync and hasattr(ddp_model, "no_sync")) else nullcontext()
            with ctx, autocast_ctx(cfg, device):
                loss, mlogs = loss_fn(run_model, batch, step)
            (loss / t.grad_accum).backward()
            for k, v in {"loss": loss, **mlogs}.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                agg[k] = agg.get(k, 0.0) + v / t.grad_accum
        if t.grad_clip:
            agg["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(model)
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        seen += n_batch * dist_info.world_size
        window_n += n_batch * dist_info.world_size
        if step % t.log_every == 0 or step == t.steps:
            logs = {k: float(v) for k, v in agg.items()}
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(f"loss is {logs['loss']} at step {step}")
            now = time.perf_counter()
            rec = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                   "samples_per_s": window_n / max(now - window_t, 1e-9)}
            rec.update({k: all_reduce_mean(v, device) for k, v in logs.items()})
            window_t, window_n = now, 0
            history.append(rec)
            logger.log(rec)
            if pbar is not None:
                pbar.set_postfix(loss=f"{logs['loss']:.4f}",
                                 sps=f"{seen / max(time.perf_counter() - t0, 1e-9):.1f}")
        if pbar is not None:
            pbar.update(1)
        if eval_fn is not None and t.eval_every and step % t.eval_every == 0 and step < t.steps:
            _run_eval(eval_fn, model, ema, step, history, logger)
        if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.steps:
            checkpoint(step)
        if stop_after is not None and step - started_at >= stop_after:
            break
    elapsed = time.perf_counter() - t0
    if pbar is not None:
        pbar.close()
    final = dict(logs)
    if eval_fn is not None and step == t.steps:
        final.update(_run_eval(eval_fn, model, ema, step, history, logger))
    if dist_info.is_main and step == t.steps:
        save_final_weights(out, model if not (cfg.train.parallel == "fsdp2" and dist_info.distributed)
                           else _full_state_module(model), ema)
    barrier()
    logger.close()
    return TrainResult(step, out, history, final, seen / max(elapsed, 1e-9), resumed)


def _run_eval(eval_fn, model, ema, step, history, logger) -> dict:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = eval_fn(ema.module if ema is not None else model, step) or {}
    model.train(was_training)
    rec = {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}
    history.append(rec)
    logger.log(rec)
    return {f"eval/{k}": v for k, v in metrics.items()}


def save_final_weights(out: Path, model: nn.Module, ema: nn.Module | None) -> None:
    """``out/model.safetensors``: the weights a user loads (the EMA weights when EMA is on)."""
    import os

    from safetensors.torch import save_model

    src = ema.module if ema is not None else model
    tmp = out / f".model.safetensors.tmp-{os.getpid()}"
    save_model(src, str(tmp))
    os.replace(tmp, out / "model.safetensors")


def _full_state_module(model: nn.Module) -> nn.Module:
    """A module holding the gathered (full, CPU) weights of an FSDP2-sharded model, for saving."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _StateHolder(sd)


class _StateHolder(nn.Module):
    """Carries a plain state dict under its original names so safetensors' save_model can write it."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        self._sd = {k: v.detach().clone() for k, v in sd.items()}

    def state_dict(self, *args, **kwargs):  # noqa: D102
        return self._sd


def _optimizer_state(opt: torch.optim.Optimizer, model: nn.Module, cfg: RunConfig, dist_info: DistInfo) -> dict:
    if cfg.train.parallel == "fsdp2" and dist_info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def _load_optimizer_state(opt, model, sd: dict, cfg: RunConfig, dist_info: DistInfo) -> None:
    if cfg.train.parallel == "fsdp2" and dist_info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(sd)
