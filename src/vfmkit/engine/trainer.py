"""The one training loop every vfmkit method runs through.

A method supplies ``model``, ``loss_fn(model, batch, step) -> (loss, logs)`` and a loader; the engine
owns precision, DDP/FSDP2, gradient accumulation, clipping, AdamW + warm-up cosine, EMA, atomic
checkpoints with exact resume (model, optimizer, scheduler, RNG, data position, step) and logging.

``train`` reads as its steps: prepare the output, place the model (+ EMA), restore weights, parallelize
(``engine/parallel.py``: DDP or FSDP2, compile), build the optimizer, restore the training state, then per
step: train_step, log, evaluate, save_checkpoint; and finish (final eval and weights). Collectives
(checkpoint gathers, FSDP2 full-state gathers) run on every rank; rank 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vfmkit.config import RunConfig, to_dict
from vfmkit.data.io import atomic_save_safetensors, atomic_write_text
from vfmkit.data.lock import FolderLock, probe_writable
from vfmkit.engine.checkpoint import (
    check_resume_config,
    checkpoint_candidates,
    discard_checkpoints,
    module_tensors,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trim_log,
)
from vfmkit.engine.distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from vfmkit.engine.parallel import (
    FullParams,
    apply_channels_last,
    clip_grad_norm_,
    is_sharded,
    optimizer_groups,
    parallelize,
)

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
    on_final: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.train.steps`` optimizer steps; see the module docstring.

    ``after_step(model)`` runs after each optimizer step (e.g. clamping a learnt temperature).
    ``stop_after`` ends the call after that many steps of this invocation (a deliberate interruption,
    as a kill would be) without changing the schedule; the next call resumes from the checkpoint.
    ``on_final(out_dir)`` runs on rank 0 right after the final weights are written (e.g. the open_clip config
    that makes the run folder loadable as ``local-dir:``).
    """
    run = _Run(
        cfg,
        model,
        loss_fn,
        loader,
        Path(out_dir or cfg.out_dir),
        dist_info or init_distributed(),
        eval_fn,
        after_step,
    )
    run.on_final = on_final
    run.prepare_output()  # takes OUT/.lock (a second run on the same folder fails at once), probes writability
    try:
        run.place_model()
        state = run.restore_weights()  # before wrapping, so DDP and FSDP2 both start from the full checkpoint
        run.parallelize(find_unused_parameters)
        run.make_optimizer(groups)
        run.restore_state(state)
        run.open_logs()
        started_at = run.step
        if run.step >= cfg.train.steps:
            run.say_complete()
        while run.step < cfg.train.steps:
            agg = run.train_step()
            run.log(agg)
            if run.eval_due():
                run.evaluate()
            if run.checkpoint_due():
                run.save_checkpoint()
            if stop_after is not None and run.step - started_at >= stop_after:
                break
        return run.finish()
    finally:
        run.release_output()


class _Run:
    """The state one ``train`` call shares between its named steps (in the order ``train`` calls them)."""

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        loss_fn: LossFn,
        loader: Iterable,
        out: Path,
        dist_info: DistInfo,
        eval_fn: Callable | None,
        after_step: Callable | None,
    ):
        self.cfg, self.t = cfg, cfg.train
        self.model, self.loss_fn, self.loader, self.out = model, loss_fn, loader, out
        self.dist_info, self.device = dist_info, dist_info.device
        self.eval_fn, self.after_step = eval_fn, after_step
        self.sharded = is_sharded(cfg, dist_info)
        self.ckpt_root = out / "checkpoints"
        self.ema: nn.Module | None = None
        self.step, self.epoch, self.resumed = 0, 0, None
        self.history: list[dict] = []
        self.logs: dict[str, float] = {}

    # --- setup -------------------------------------------------------------------------------------------
    def prepare_output(self) -> None:
        """Lock the folder, check it (and the checkpoint folder) can be written, refuse a resume whose config
        trains something else than the folder's ``config.json``, then write the config (atomically)."""
        self.lock = None
        if self.dist_info.is_main:
            self.lock = FolderLock(self.out, f"vfmkit train {self.cfg.method}").acquire()
            try:
                probe_writable(self.ckpt_root, "checkpoint folder")
                if self.t.resume and checkpoint_candidates(self.ckpt_root):
                    check_resume_config(self.out, to_dict(self.cfg))
                elif not self.t.resume:
                    discard_checkpoints(self.ckpt_root)  # start over: no old run's checkpoint to fall back to
                atomic_write_text(self.out / "config.json", json.dumps(to_dict(self.cfg), indent=2))
            except BaseException:
                self.release_output()
                raise
        barrier()

    def release_output(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def place_model(self) -> None:
        """Model on its device (channels_last if asked), and the EMA copy."""
        self.model.to(self.device)
        if self.t.channels_last:
            apply_channels_last(self.model)
        if self.t.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(self.t.ema_decay), use_buffers=True
            )

    def restore_weights(self) -> dict | None:
        """Load the latest checkpoint's weights (model, EMA); return its training state, or None."""
        found = resume_checkpoint(self.ckpt_root, self.model, self.ema) if self.t.resume else None
        return found[1] if found is not None else None

    def parallelize(self, find_unused_parameters: bool) -> None:
        """DDP or FSDP2 when distributed, then compile (engine/parallel.py)."""
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        self.wrapped, self.run_model = parallelize(
            self.model, self.cfg, self.dist_info, find_unused_parameters
        )

    def make_optimizer(self, groups: list[dict] | None) -> None:
        o = self.cfg.optim
        if groups is not None and self.sharded:  # fully_shard replaced the parameters: map them by name
            now = dict(self.model.named_parameters())
            groups = [{**g, "params": [now[self._names[id(p)]] for p in g["params"]]} for g in groups]
        groups = optimizer_groups(groups or param_groups(self.model, o.weight_decay), self.sharded)
        self.opt = torch.optim.AdamW(
            groups,
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            fused=True,  # one fused kernel for all parameters, on CPU and GPU alike
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.cfg))

    def restore_state(self, state: dict | None) -> None:
        """Optimizer, scheduler, RNG, step, epoch and data position from a checkpoint's state."""
        data_state = None
        if state is not None:
            _load_optimizer_state(self.opt, self.model, state["optimizer"], self.cfg, self.dist_info)
            self.sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"][min(self.dist_info.rank, len(state["rng"]) - 1)])
            self.step, self.epoch, data_state = state["step"], state["epoch"], state.get("data")
            self.resumed = self.step
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        if data_state is not None and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(data_state[min(self.dist_info.rank, len(data_state) - 1)])

    def open_logs(self) -> None:
        """log.jsonl (+ TensorBoard), the progress bar, the data iterator and the throughput clocks."""
        if self.dist_info.is_main:  # the steps this run (re)does leave no older line behind in log.jsonl
            trim_log(self.out / "log.jsonl", self.step)
        self.logger = _Logger(self.out, self.dist_info.is_main, self.t.tensorboard)
        self.it = iter(self.loader)
        self.pbar = None
        # redirected (CI, nohup, a cluster job): plain lines, one per log step, instead of a \r-joined bar
        self.plain = bool(self.t.progress and self.dist_info.is_main and not sys.stderr.isatty())
        self.start_step = self.step
        if self.t.progress and self.dist_info.is_main and not self.plain:
            from tqdm import tqdm

            self.pbar = tqdm(
                total=self.t.steps,
                initial=self.step,
                desc=f"train {self.cfg.method}",
                unit="step",
                dynamic_ncols=True,
            )
        self.model.train()
        self.seen, self.window_n = 0, 0
        self.t0 = self.window_t = time.perf_counter()

    # --- the loop ----------------------------------------------------------------------------------------
    def next_batch(self) -> Any:
        for _ in range(2):
            try:
                return next(self.it)
            except StopIteration:
                self.epoch += 1
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                self.it = iter(self.loader)
        raise RuntimeError("the training loader yields no batch: is the dataset smaller than one batch?")

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's logs (still tensors)."""
        t = self.t
        self.opt.zero_grad(set_to_none=True)
        # Logged values stay tensors until a log step: no host-device sync on the hot path.
        agg: dict[str, Any] = {}
        n_batch = 0
        for micro in range(t.grad_accum):
            batch = to_device(self.next_batch(), self.device, t.channels_last)
            n_batch += batch_size_of(batch)
            sync = micro == t.grad_accum - 1
            no_sync = not sync and hasattr(self.wrapped, "no_sync")
            with self.wrapped.no_sync() if no_sync else nullcontext(), autocast_ctx(self.cfg, self.device):
                loss, mlogs = self.loss_fn(self.run_model, batch, self.step)
            (loss / t.grad_accum).backward()
            for k, v in {"loss": loss, **mlogs}.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                agg[k] = agg.get(k, 0.0) + v / t.grad_accum
        if t.grad_clip:
            agg["grad_norm"] = clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.after_step is not None:
            self.after_step(self.model)
        if self.ema is not None:
            self.ema.update_parameters(FullParams(self.model) if self.sharded else self.model)
        self.step += 1
        self.seen += n_batch * self.dist_info.world_size
        self.window_n += n_batch * self.dist_info.world_size
        return agg

    def log(self, agg: dict[str, Any]) -> None:
        """Every ``log_every`` steps and at the end: the rank-averaged logs to log.jsonl/TensorBoard/the bar."""
        step = self.step
        if step % self.t.log_every == 0 or step == self.t.steps:
            self.logs = logs = {k: float(v) for k, v in agg.items()}
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(f"loss is {logs['loss']} at step {step}")
            now = time.perf_counter()
            rec = {
                "step": step,
                "epoch": self.epoch,
                "lr": self.sched.get_last_lr()[0],
                "samples_per_s": self.window_n / max(now - self.window_t, 1e-9),
            }
            rec.update({k: all_reduce_mean(v, self.device) for k, v in logs.items()})
            if hasattr(
                self.loader, "n_corrupt"
            ):  # the run's total so far, over all ranks: seen, not only in state.pt
                n = all_reduce_mean(float(self.loader.n_corrupt), self.device) * self.dist_info.world_size
                rec["n_corrupt"] = self.logs["n_corrupt"] = int(round(n))
            self.window_t, self.window_n = now, 0
            self.history.append(rec)
            self.logger.log(rec)
            if self.plain:
                self.print_line(step, logs["loss"])
            if self.pbar is not None:
                self.pbar.set_postfix(
                    loss=f"{logs['loss']:.4f}",
                    sps=f"{self.seen / max(time.perf_counter() - self.t0, 1e-9):.1f}",
                )
        if self.pbar is not None:
            self.pbar.update(1)

    def print_line(self, step: int, loss: float) -> None:
        """``train METHOD step S/T loss L samples/s X eta ...`` on stderr (the plain-log form of the bar)."""
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        eta = (self.t.steps - step) * elapsed / done if done else float("nan")
        print(
            f"train {self.cfg.method} step {step}/{self.t.steps} loss {loss:.4f} "
            f"samples/s {self.seen / max(elapsed, 1e-9):.1f} eta {_fmt_seconds(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def say_complete(self) -> None:
        """A rerun of a finished run: say so and where its results are (rank 0, stderr)."""
        if self.dist_info.is_main:
            print(
                f"train {self.cfg.method}: {self.out} is already complete (step {self.step}/{self.t.steps}); "
                f"results: {self.out / 'model.safetensors'}, {self.out / 'log.jsonl'}",
                file=sys.stderr,
                flush=True,
            )

    def eval_due(self) -> bool:
        t = self.t
        return (
            self.eval_fn is not None
            and bool(t.eval_every)
            and self.step % t.eval_every == 0
            and self.step < t.steps
        )

    def evaluate(self) -> dict:
        return _run_eval(self.eval_fn, self.model, self.ema, self.step, self.history, self.logger)

    def checkpoint_due(self) -> bool:
        t = self.t
        return bool(t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.steps

    def save_checkpoint(self) -> None:
        """Gather on every rank (data positions, RNG states, and under FSDP2 the full weights and optimizer
        state: collectives), then rank 0 writes."""
        data = [self.loader.state_dict()] if hasattr(self.loader, "state_dict") else None
        rngs = [rng_state()]
        if self.dist_info.distributed:
            import torch.distributed as dist

            gathered_d: list = [None] * self.dist_info.world_size
            gathered_r: list = [None] * self.dist_info.world_size
            dist.all_gather_object(gathered_d, data[0] if data else None)
            dist.all_gather_object(gathered_r, rngs[0])
            data, rngs = (gathered_d if data else None), gathered_r
        model_to_save = _full_state_module(self.model) if self.sharded else self.model
        optimizer = _optimizer_state(self.opt, self.model, self.cfg, self.dist_info)
        if self.dist_info.is_main:
            state = {
                "optimizer": optimizer,
                "scheduler": self.sched.state_dict(),
                "rng": rngs,
                "step": self.step,
                "epoch": self.epoch,
                "data": data,
            }
            save_checkpoint(self.ckpt_root, self.step, model_to_save, state, self.ema, keep=self.t.keep_ckpts)
        barrier()

    # --- the end -----------------------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        """Final evaluation and, when the schedule is done, the final weights (gathered on every rank under
        FSDP2, written by rank 0)."""
        elapsed = time.perf_counter() - self.t0
        if self.pbar is not None:
            self.pbar.close()
        final = dict(self.logs)
        done = self.step == self.t.steps
        if self.eval_fn is not None and done:
            final.update(self.evaluate())
        if done:
            weights = _full_state_module(self.model) if (self.sharded and self.ema is None) else self.model
            if self.dist_info.is_main:
                save_final_weights(self.out, weights, self.ema)
                if getattr(self, "on_final", None) is not None:
                    self.on_final(self.out)
        barrier()
        self.logger.close()
        return TrainResult(
            self.step, self.out, self.history, final, self.seen / max(elapsed, 1e-9), self.resumed
        )


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


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
    """``out/model.safetensors``: the weights a user loads (the EMA weights when EMA is on), written atomically."""
    src = ema.module if ema is not None else model
    state, metadata = module_tensors(src)
    atomic_save_safetensors(out / "model.safetensors", state, metadata)


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


def _optimizer_state(
    opt: torch.optim.Optimizer, model: nn.Module, cfg: RunConfig, dist_info: DistInfo
) -> dict:
    if cfg.train.parallel == "fsdp2" and dist_info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return opt.state_dict()


def _load_optimizer_state(opt, model, sd: dict, cfg: RunConfig, dist_info: DistInfo) -> None:
    if cfg.train.parallel == "fsdp2" and dist_info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(sd)
