"""The one linear probe on frozen features, in two fitting modes.

- :func:`linear_probe`: multinomial logistic regression fitted with L-BFGS (like sklearn) on standardised
  features, scored on a val split (top-1/top-5/ECE/NLL). The evaluation probe.
- :func:`fit_linear_head`: a given ``nn.Linear`` head trained with cross-entropy by SGD-style steps through the
  one training loop (``vfmkit.engine.train``), with the run config's optimiser, schedule and seed: the probe a
  method keeps as a model part (FastFill's new-model head, CatLIP's downstream probe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vfmkit.eval.classification import classification_metrics

__all__ = ["linear_probe", "fit_linear_head"]


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> dict[str, float]:
    """train_x: [N, D] features, train_y: [N] labels; returns val top-1/top-5/ECE/NLL (percent)."""
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6
    tx, vx = (train_x.float() - mean) / std, (val_x.float() - mean) / std
    n_cls = int(max(train_y.max(), val_y.max())) + 1
    w = torch.zeros(tx.shape[1], n_cls, requires_grad=True)
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(tx @ w + b, train_y.long()) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return classification_metrics(vx @ w + b, val_y)


def _ce_loss_fn(model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(batch["x"]).float()
    return F.cross_entropy(logits, batch["y"].long()), {
        "acc": float((logits.argmax(1) == batch["y"]).float().mean())
    }


def fit_linear_head(
    head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, cfg: Any, out_dir: str | Path
) -> nn.Module:
    """Train ``head`` (features ``[N, D]`` -> logits) with CE through the engine; returns it in eval mode.

    ``cfg`` (a RunConfig) gives the steps, optimiser, schedule and seed; batches of ``min(data.batch_size, N)``
    are drawn by a ``TensorLoader`` seeded with ``cfg.seed``."""
    from vfmkit.data.loader import TensorLoader
    from vfmkit.engine import train

    loader = TensorLoader(
        {"x": feats, "y": labels}, batch_size=min(cfg.data.batch_size, feats.shape[0]), seed=cfg.seed
    )
    train(cfg, head, _ce_loss_fn, loader, out_dir=out_dir)
    return head.eval()
