"""Linear probe on frozen features: multinomial logistic regression fitted with L-BFGS (like sklearn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vfmkit.eval.classification import classification_metrics


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
    weight_decay: float = 1e-4, max_iter: int = 200,
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
