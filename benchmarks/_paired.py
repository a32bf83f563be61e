"""Interleaved paired step-throughput measurement of training setups (arms), shared by the overhead benchmarks.

Every arm is built through the method registry (its real loader, model, loss); :func:`interleave` warms each up,
then runs rounds of ``steps`` timed optimiser steps per arm, alternating the order each round, and
:func:`paired_ratio` takes the median over rounds of arm / base within the same round (arms of a round run back
to back, so the ratio cancels most of the drift in machine load).
"""

from __future__ import annotations

import statistics
import time

import torch


def make_job(method: str, base: dict, method_args: dict):
    """``(cfg, job)`` for ``method`` from a base config dict + its method_args."""
    from vfmkit.config import load_config

    return build(load_config({**base, "method": method, "method_args": method_args}))


def build(cfg):
    """``(cfg, job)``: the method registry's job for a loaded config (single process)."""
    from vfmkit.engine.distributed import init_distributed
    from vfmkit.methods.registry import build_job

    return cfg, build_job(cfg, init_distributed())


class Arm:
    """One training setup: model, optimiser, loss and a loader iterated across epochs like the engine does."""

    def __init__(self, name: str, cfg, job):
        from vfmkit.engine.trainer import param_groups

        self.name, self.cfg, self.job = name, cfg, job
        self.opt = torch.optim.AdamW(
            param_groups(job.model, cfg.optim.weight_decay), lr=cfg.optim.lr, fused=True
        )
        self.epoch, self.it = 0, iter(job.loader)
        job.model.train()

    def next_batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            self.job.loader.set_epoch(self.epoch)
            self.it = iter(self.job.loader)
            return next(self.it)

    def step(self, i: int) -> int:
        """One optimiser step exactly as the engine's hot path (fp32 on CPU); returns the batch size."""
        batch = self.next_batch()
        loss, _ = self.job.loss_fn(self.job.model, batch, i)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.job.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.job.after_step(self.job.model)
        return int(batch["image"].shape[0])

    def timed(self, steps: int) -> float:
        """samples/s over ``steps`` steps (data loading included)."""
        t0, n = time.perf_counter(), 0
        for i in range(steps):
            n += self.step(i)
        return n / (time.perf_counter() - t0)


def interleave(arms: list[Arm], rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """samples/s per arm per round: ``warmup`` untimed steps each (first-touch allocations, shard opening,
    weights paged in), then ``rounds`` rounds of ``steps`` timed steps per arm, the order reversed every other
    round so drift in machine load cancels."""
    for arm in arms:
        arm.timed(warmup)
    sps: dict[str, list[float]] = {arm.name: [] for arm in arms}
    for r in range(rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            sps[arm.name].append(arm.timed(steps))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in sps.items()), flush=True)
    return sps


def paired_ratio(sps: dict[str, list[float]], arm: str, base: str) -> tuple[float, list[float]]:
    """Median over rounds of ``arm`` / ``base`` samples/s within the same round; returns (median, per-round)."""
    rs = [x / p for x, p in zip(sps[arm], sps[base], strict=True)]
    return statistics.median(rs), rs
