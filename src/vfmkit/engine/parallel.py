"""Parallelism as small functions over the model, applied in order by ``parallelize`` (as torchtitan does).

Each ``apply_*`` takes a module and returns the module to run: ``apply_channels_last`` (memory format),
``apply_ddp`` (DistributedDataParallel), ``apply_fsdp2`` (``torch.distributed.fsdp.fully_shard`` per
top-level child, then the root) and ``apply_compile`` (``torch.compile``). ``parallelize`` picks them from
``train.parallel``, ``train.compile`` and ``train.channels_last``.

FSDP2 cannot shard a 0-d parameter (CLIP's ``logit_scale``). Rather than reshape it (which would change the
saved weights, and open_clip loads ``logit_scale`` as a scalar), scalars are left out of sharding
(``ignored_params``) and kept replicated: every rank holds the whole value and its gradient is averaged over
ranks by a post-accumulate hook, so the step equals the single-process one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from vfmkit.config import ConfigError, RunConfig
from vfmkit.engine.distributed import DistInfo

PARALLEL = ("ddp", "fsdp2")


def apply_channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights for convolutions (inputs are moved to channels_last by the engine as well)."""
    return model.to(memory_format=torch.channels_last)


def apply_ddp(model: nn.Module, dist_info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=find_unused_parameters
    )


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP2 leaves whole on every rank: the 0-d ones, which ``fully_shard`` cannot shard."""
    return [p for p in model.parameters() if p.ndim == 0]


def _average_grad_over_ranks(p: torch.Tensor) -> None:
    dist.all_reduce(p.grad)  # gloo has no AVG: sum, then divide
    p.grad.div_(dist.get_world_size())


def apply_fsdp2(model: nn.Module) -> nn.Module:
    """``fully_shard`` each top-level child that trains, then the root; 0-d parameters stay replicated.

    The model is modified in place (its class becomes an ``FSDPModule``) and returned; parameter names, and
    so the state dict the engine saves, are unchanged.
    """
    from torch.distributed.fsdp import fully_shard

    scalars = replicated_params(model)
    ignored = set(scalars) or None
    for child in model.children():
        if any(p.requires_grad and p.ndim > 0 for p in child.parameters()):
            fully_shard(child, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad_over_ranks)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    return torch.compile(model)


def parallelize(
    model: nn.Module, cfg: RunConfig, dist_info: DistInfo, find_unused_parameters: bool = False
) -> tuple[nn.Module, nn.Module]:
    """Apply what the config asks, in order: channels_last, then DDP or FSDP2 (when distributed), then compile.

    Returns ``(wrapped, run_model)``: ``wrapped`` is the DDP/FSDP2 module (``no_sync`` lives there),
    ``run_model`` is what the loss is computed with (the compiled one when ``train.compile``).
    """
    t = cfg.train
    if t.parallel not in PARALLEL:
        raise ConfigError(f"config key 'train.parallel': unknown value {t.parallel!r} (ddp, fsdp2)")
    if t.channels_last:
        model = apply_channels_last(model)
    wrapped = model
    if dist_info.distributed:
        wrapped = (
            apply_fsdp2(model)
            if t.parallel == "fsdp2"
            else apply_ddp(model, dist_info, find_unused_parameters)
        )
    run_model = apply_compile(wrapped) if t.compile else wrapped
    return wrapped, run_model


def is_sharded(cfg: RunConfig, dist_info: DistInfo) -> bool:
    return cfg.train.parallel == "fsdp2" and dist_info.distributed


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes FSDP2's mix of sharded (DTensor) and replicated grads.

    With plain tensors only it is torch's own function (same numbers). Otherwise the sharded norm is
    completed over ranks (``full_tensor``, a collective: every rank calls this) and combined with the norm
    of the replicated grads.
    """
    params = [p for p in params if p.grad is not None]
    sharded = [p.grad for p in params if _is_dtensor(p.grad)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in params if not _is_dtensor(p.grad)]
    norm = torch.nn.utils.get_total_norm(sharded).full_tensor()
    if plain:
        plain_norm = torch.nn.utils.get_total_norm([p.grad for p in plain]).to(norm.device)
        norm = torch.linalg.vector_norm(torch.stack([norm, plain_norm]))
    # clip_grads_with_norm_ takes the parameters (it scales their .grad)
    torch.nn.utils.clip_grads_with_norm_([p for p in params if _is_dtensor(p.grad)], max_norm, norm)
    if plain:
        torch.nn.utils.clip_grads_with_norm_(plain, max_norm, norm)
    return norm


class FullParams(nn.Module):
    """A view of a sharded model whose ``parameters()``/``buffers()`` are the full tensors (a collective).

    ``AveragedModel.update_parameters`` reads only those two, so the EMA copy (kept whole on every rank)
    can follow an FSDP2 model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._m = [model]  # a list, so the model is not registered as a submodule

    def parameters(self, recurse: bool = True):  # noqa: D102
        for p in self._m[0].parameters(recurse):
            yield p.full_tensor() if _is_dtensor(p) else p

    def buffers(self, recurse: bool = True):  # noqa: D102
        for b in self._m[0].buffers(recurse):
            yield b.full_tensor() if _is_dtensor(b) else b


def optimizer_groups(groups: list[dict], sharded: bool) -> list[dict]:
    """Under FSDP2, split each group into its sharded and replicated parameters (a fused/foreach AdamW
    step cannot mix DTensors and plain tensors); otherwise the groups unchanged."""
    if not sharded:
        return groups
    out = []
    for g in groups:
        ps = list(g["params"])
        for part in ([p for p in ps if _is_dtensor(p)], [p for p in ps if not _is_dtensor(p)]):
            if part:
                out.append({**g, "params": part})
    return out
