"""``supervised``: cross-entropy training of a module a pipeline or another method hands over, on in-memory
tensors, through the registry and the one engine (CatLIP's downstream fine-tuning goes this way).

    job, result = registry.run_job(cfg, build_kwargs={"model": net, "tensors": {"image": x, "label": y}})

``method_args`` (:class:`SupervisedArgs`): ``input_key`` / ``label_key`` name the tensors. Batches of
``min(data.batch_size, N)`` are drawn by a ``TensorLoader`` seeded with ``cfg.seed``. Without a handed model and
tensors there is nothing to train: ``vfmkit train`` refuses it with a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job


@dataclass
class SupervisedArgs:
    input_key: str = "x"
    label_key: str = "y"


def build(
    cfg: RunConfig,
    dist_info: DistInfo,
    model: nn.Module | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Job:
    from vfmkit.data.loader import TensorLoader

    args = parse_section(SupervisedArgs, cfg.method_args, "method_args")
    if model is None or tensors is None:
        raise ConfigError(
            "config key 'method': 'supervised' trains a module handed to it "
            "(registry.run_job(cfg, build_kwargs={'model': ..., 'tensors': ...}))"
        )
    for k in (args.input_key, args.label_key):
        if k not in tensors:
            raise ConfigError(f"config key 'method_args': no tensor {k!r} (have {sorted(tensors)})")
    n = next(iter(tensors.values())).shape[0]
    loader = TensorLoader(
        tensors,
        min(cfg.data.batch_size, n),
        seed=cfg.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )

    def loss_fn(m: nn.Module, batch: dict, step: int):
        logits = m(batch[args.input_key])
        y = batch[args.label_key]
        return F.cross_entropy(logits.float(), y.long()), {
            "acc": float((logits.argmax(1) == y).float().mean())
        }

    return Job(model, loss_fn, loader)
