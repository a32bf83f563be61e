"""Method registry: ``method`` in a recipe names a module whose ``build(cfg, dist_info) -> Job`` sets up a run."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from vfmkit.config import ConfigError, RunConfig
from vfmkit.engine.distributed import DistInfo

METHODS = {
    "clip": "vfmkit.methods.clip",
    "mobileclip": "vfmkit.methods.mobileclip",
    "dr": "vfmkit.methods.dr",
    "catlip": "vfmkit.methods.catlip",
    "teacher_align": "vfmkit.methods.teacher_align",
    "coca": "vfmkit.methods.coca",
    "subclone": "vfmkit.methods.subclone",
    "fastfill": "vfmkit.methods.fastfill",
    "supervised": "vfmkit.methods.supervised",
    "tic": "vfmkit.methods.tic",
    "seg": "vfmkit.methods.seg",
    "cliptex": "vfmkit.methods.cliptex",
    "transfer": "vfmkit.methods.transfer",
    "merge": "vfmkit.methods.merge",
}


@dataclass
class Job:
    """What a method hands the engine."""

    model: nn.Module
    loss_fn: Callable
    loader: Iterable
    after_step: Callable[[nn.Module], None] | None = None
    eval_fn: Callable[[nn.Module, int], dict] | None = None
    find_unused_parameters: bool = False
    groups: list[dict] | None = None  # optimizer parameter groups (engine.train's ``groups``)
    # The config to train with when the method derives one from the given config (e.g. ``train.steps`` from a
    # number of epochs once the data is known); None: the given config. A validated config is never edited.
    cfg: RunConfig | None = None
    extra: dict[str, Any] | None = None
    # called with the run folder once the final weights are written (engine.train's ``on_final``)
    on_final: Callable[[Any], None] | None = None


def build_job(cfg: RunConfig, dist_info: DistInfo, **build_kwargs: Any) -> Job:
    """The job of ``cfg.method``; ``build_kwargs`` go to the method's ``build`` (in-memory inputs a pipeline
    already holds, e.g. subclone's loaded tensors)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"config key 'method': unknown method {cfg.method!r} (known: {', '.join(METHODS)})")
    mod = importlib.import_module(METHODS[cfg.method])
    return mod.build(cfg, dist_info, **build_kwargs)


def run_job(
    cfg: RunConfig,
    eval_fn: Callable[[nn.Module, int], dict] | None = None,
    *,
    eval_for: Callable[[Job], Callable[[nn.Module, int], dict]] | None = None,
    build_kwargs: dict[str, Any] | None = None,
    **train_kwargs: Any,
) -> tuple[Job, Any]:
    """Build the method's job and train it with the one engine -> (job, TrainResult).

    ``eval_fn`` replaces the method's own; ``eval_for(job)`` builds one from the job (e.g. from the model bundle
    in ``job.extra``). The trained model is ``job.model`` (a pipeline that goes on to evaluate or save it uses
    this rather than :func:`run`).
    """
    from vfmkit.engine import init_distributed, train

    dist_info = init_distributed()
    job = build_job(cfg, dist_info, **(build_kwargs or {}))
    if eval_for is not None:
        eval_fn = eval_for(job)
    if job.groups is not None:
        train_kwargs.setdefault("groups", job.groups)
    if job.on_final is not None:
        train_kwargs.setdefault("on_final", job.on_final)
    cfg = job.cfg or cfg
    res = train(
        cfg,
        job.model,
        job.loss_fn,
        job.loader,
        out_dir=cfg.out_dir,
        eval_fn=eval_fn or job.eval_fn,
        after_step=job.after_step,
        find_unused_parameters=job.find_unused_parameters,
        dist_info=dist_info,
        **train_kwargs,
    )
    return job, res


def run(cfg: RunConfig, eval_fn: Callable[[nn.Module, int], dict] | None = None, **train_kwargs: Any):
    """Build the method's job and train it with the one engine (``eval_fn`` replaces the method's own)."""
    return run_job(cfg, eval_fn, **train_kwargs)[1]
