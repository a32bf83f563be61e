"""Classification metrics: top-k accuracy, expected calibration error, negative log-likelihood."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """logits: [N, C], labels: [N]; percentages."""
    out = {}
    for k in ks:
        k_ = min(k, logits.shape[1])
        hit = (logits.topk(k_, dim=1).indices == labels[:, None]).any(1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017), in percent. probs: [N, C]."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (conf[in_bin].mean() - correct[in_bin].mean()).abs()
    return 100.0 * float(ece)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    logits, labels = logits.float(), labels.long()
    probs = logits.softmax(1)
    out = topk_accuracy(logits, labels)
    out["ece"] = expected_calibration_error(probs, labels, n_bins)
    out["nll"] = float(F.cross_entropy(logits, labels))
    return out
