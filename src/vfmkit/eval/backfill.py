"""Backfilling evaluation (FastFill, arXiv:2303.04766): retrieval metrics and backfilling curves.

All distances are squared l2 and are computed in blocks of queries, so memory is ``block_size x N`` and never
``N x N``. When the query set *is* the gallery (the paper's protocol), ``exclude_self=True`` drops each query's
own gallery entry: it is neither retrieved nor counted as a positive.

A backfilling curve mixes two galleries: at fraction ``beta`` the first ``round(beta * N)`` items of an
``order`` use their new-model features, the rest keep their old (transformed) features. Old features may be
``None`` ("no transformation" between incompatible spaces): those items cannot be compared with a new-model
query, so they are never retrieved, yet they still count as positives for mAP.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from vfmkit.data.io import atomic_write_bytes, atomic_write_text

METRICS = ("top1", "top5", "mAP")


def default_fractions(steps: int = 21) -> list[float]:
    """The paper's backfilled fractions ``beta = i / steps`` for ``i = 0..steps`` (22 points by default)."""
    return [i / steps for i in range(steps + 1)]


def _sq_l2(q: Tensor, g: Tensor) -> Tensor:
    """Squared l2 distances ``[B, N]`` between ``q [B, D]`` and ``g [N, D]`` (clamped: no tiny negatives)."""
    d = q.pow(2).sum(1, keepdim=True) - 2.0 * q @ g.T + g.pow(2).sum(1).unsqueeze(0)
    return d.clamp_min_(0.0)


def _rank_sums(dist: Tensor, match: Tensor, n_pos: Tensor, topk: Sequence[int]) -> dict[str, float]:
    """Per-block sums of CMC top-k hits and AP.

    dist: ``[B, N]`` float, ``inf`` for items that cannot be retrieved (self-match, incompatible features).
    match: ``[B, N]`` bool, True where the gallery item is relevant to the query (self already False).
    n_pos: ``[B]`` number of relevant gallery items per query, including unretrievable ones.
    Returns sums over the block: ``top{k}``, ``AP`` (over queries with ``n_pos > 0``) and ``n_ap``.
    """
    order = dist.argsort(dim=1, stable=True)
    hits = match.gather(1, order) & torch.isfinite(dist.gather(1, order))
    out = {f"top{k}": hits[:, :k].any(1).sum().item() for k in topk}
    hf = hits.to(torch.float64)
    ranks = torch.arange(1, hf.shape[1] + 1, dtype=torch.float64, device=hf.device)
    prec_at_hit = (hf.cumsum(1) / ranks) * hf
    has = n_pos > 0
    ap = prec_at_hit.sum(1)[has] / n_pos[has].to(torch.float64)
    out["AP"] = ap.sum().item()
    out["n_ap"] = int(has.sum().item())
    return out


def _masks(q_lab: Tensor, g_lab: Tensor, q_start: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """Relevance ``[B, N]`` and self mask ``[B, N]`` (all False unless ``exclude_self``)."""
    match = q_lab.unsqueeze(1) == g_lab.unsqueeze(0)
    self_mask = torch.zeros_like(match)
    if exclude_self:
        rows = torch.arange(q_lab.shape[0], device=q_lab.device)
        self_mask[rows, rows + q_start] = True
        match &= ~self_mask
    return match, self_mask


def _check(query: Tensor, q_lab: Tensor, gallery: Tensor, g_lab: Tensor, exclude_self: bool) -> None:
    if query.ndim != 2 or gallery.ndim != 2:
        raise ValueError(
            f"features must be [N, D]; got query {tuple(query.shape)}, gallery {tuple(gallery.shape)}"
        )
    if q_lab.shape != (query.shape[0],) or g_lab.shape != (gallery.shape[0],):
        raise ValueError("labels must be [N] and match the features' first dimension")
    if exclude_self and query.shape[0] != gallery.shape[0]:
        raise ValueError("exclude_self needs the query set to be the gallery (same N, same order)")


def backfill_curve(
    query: Tensor,
    query_labels: Tensor,
    gallery_new: Tensor,
    gallery_old: Tensor | None,
    gallery_labels: Tensor,
    order: Tensor,
    *,
    fractions: Sequence[float] | None = None,
    exclude_self: bool = False,
    topk: Sequence[int] = (1, 5),
    block_size: int = 1024,
) -> dict:
    """Retrieval metrics of new-model queries against a partially backfilled gallery.

    query: ``[Q, D]`` new-model query features; query_labels ``[Q]``.
    gallery_new: ``[N, D]`` new-model gallery features; gallery_old: ``[N, D]`` old features mapped to the new
    space (or directly comparable), or None when old items cannot be compared; gallery_labels ``[N]``.
    order: ``[N]`` permutation of gallery indices, backfilled first to last.
    Returns ``{"fraction": [F], "top1": [F], "top5": [F], "mAP": [F], "auc": {metric: mean over F}}``
    (metrics in percent, like the paper).
    """
    _check(query, query_labels, gallery_new, gallery_labels, exclude_self)
    n = gallery_new.shape[0]
    if order.shape != (n,) or not torch.equal(order.sort().values.cpu(), torch.arange(n)):
        raise ValueError(f"order must be a permutation of range({n})")
    if gallery_old is not None and gallery_old.shape != gallery_new.shape:
        raise ValueError(
            f"old {tuple(gallery_old.shape)} and new {tuple(gallery_new.shape)} galleries differ"
        )
    fractions = list(default_fractions() if fractions is None else fractions)
    rank = torch.empty(n, dtype=torch.long)
    rank[order.cpu()] = torch.arange(n)  # rank[i] = position of item i in the backfilling order
    rank = rank.to(gallery_new.device)
    sums = [{} for _ in fractions]
    for s in range(0, query.shape[0], block_size):
        q, ql = query[s : s + block_size], query_labels[s : s + block_size]
        match, self_mask = _masks(ql, gallery_labels, s, exclude_self)
        n_pos = match.sum(1)
        d_new = _sq_l2(q, gallery_new).masked_fill_(self_mask, math.inf)
        d_old = (
            torch.full_like(d_new, math.inf)
            if gallery_old is None
            else _sq_l2(q, gallery_old).masked_fill_(self_mask, math.inf)
        )
        for i, beta in enumerate(fractions):
            new_mask = (rank < round(beta * n)).unsqueeze(0)
            r = _rank_sums(torch.where(new_mask, d_new, d_old), match, n_pos, topk)
            for k, v in r.items():
                sums[i][k] = sums[i].get(k, 0) + v
    out: dict = {"fraction": fractions}
    for k in topk:
        out[f"top{k}"] = [100.0 * sm[f"top{k}"] / query.shape[0] for sm in sums]
    out["mAP"] = [100.0 * sm["AP"] / max(sm["n_ap"], 1) for sm in sums]
    out["auc"] = {m: sum(out[m]) / len(fractions) for m in out if m != "fraction"}
    return out


def retrieval_scores(
    query: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None,
    gallery_labels: Tensor,
    *,
    exclude_self: bool = False,
    topk: Sequence[int] = (1, 5),
    block_size: int = 1024,
) -> dict[str, float]:
    """CMC top-k and mAP (percent) of ``query [Q, D]`` against ``gallery [N, D]`` with squared l2 distance."""
    n = gallery_labels.shape[0]
    c = backfill_curve(
        query, query_labels, gallery, None, gallery_labels, torch.arange(n), fractions=[1.0],
        exclude_self=exclude_self, topk=topk, block_size=block_size,
    )  # fmt: skip
    return {m: v[0] for m, v in c.items() if m not in ("fraction", "auc")}


def order_random(n: int, seed: int = 0) -> Tensor:
    """A random backfilling order ``[n]`` (deterministic in ``seed``)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def order_by_uncertainty(log_sigma2: Tensor) -> Tensor:
    """FastFill's order ``[N]``: highest predicted uncertainty ``s = log sigma^2`` first (ties: lower index)."""
    return torch.sort(log_sigma2.flatten().cpu(), descending=True, stable=True).indices


def order_oracle(new: Tensor, transformed_old: Tensor) -> Tensor:
    """Oracle order ``[N]``: largest ``||phi_new - h(phi_old)||`` first; needs the new model on every item."""
    err = (new - transformed_old).pow(2).sum(1)
    return torch.sort(err.cpu(), descending=True, stable=True).indices


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of ``a [N]`` and ``b [N]`` (ties broken by index; enough for float scores)."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"rank_correlation needs two [N] tensors with N >= 2; got {a.numel()}, {b.numel()}")
    ra = a.flatten().cpu().double().argsort().argsort().double()
    rb = b.flatten().cpu().double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def save_report(curves: dict[str, dict], path: str | Path, extra: dict | None = None) -> Path:
    """Write ``{"curves": {name: curve}, **extra}`` as JSON atomically; returns the path."""
    p = Path(path)
    atomic_write_text(p, json.dumps({"curves": curves, **(extra or {})}, indent=2))
    return p


def plot_curves(curves: dict[str, dict], path: str | Path, title: str = "Backfilling") -> Path:
    """One panel per metric: metric vs fraction backfilled, AUC in each legend entry. Writes a PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if all(m in c for c in curves.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for name, c in curves.items():
            ax.plot(c["fraction"], c[m], marker=".", label=f"{name} (AUC {c['auc'][m]:.1f})")
        ax.set_xlabel("fraction backfilled")
        ax.set_ylabel(f"{m} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
