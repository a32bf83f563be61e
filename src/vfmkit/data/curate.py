"""Retrieval curation of a transfer set (task-oriented knowledge transfer, arXiv:2311.18237).

Each labelled image queries its k nearest neighbours (cosine similarity of L2-normalised embeddings) in a large
unlabelled pool; the union of the neighbours, deduplicated, is the transfer set.

- :func:`knn_blockwise`: exact kNN over the pool in blocks of ``block`` rows (the pool need not fit in one
  similarity matrix; only ``[Q, k + block]`` scores are held at a time). Ties go to the lower pool index.
- :func:`knn`: FAISS (``faiss-cpu``, an exact ``IndexFlatIP``) when installed and asked for, else blockwise.
- :func:`curate`: per-query ``k`` (one int, or one per query), class balancing (every class keeps the same
  number of pool items, taken nearest first), deduplication (a pool item picked by several queries counts once,
  for the class of its most similar query; near-duplicate pool items above ``dedup_threshold`` cosine are
  dropped after the first). Deterministic: no randomness, every order broken by index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def knn_blockwise(queries: Tensor, pool: Tensor, k: int, block: int = 4096) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` cosine neighbours of each query in ``pool`` -> (scores ``[Q, k]``, indices ``[Q, k]``),
    best first; equal scores ordered by pool index."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q, n = _unit(queries), int(pool.shape[0])
    k = min(k, n)
    best_s = torch.full((q.shape[0], 0), float("-inf"))
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for start in range(0, n, block):
        p = _unit(pool[start : start + block])
        s = q @ p.T
        idx = torch.arange(start, start + p.shape[0]).expand(q.shape[0], -1)
        cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
        # stable sort by (-score, index): sort by index first, then a stable sort on score
        order = torch.argsort(cat_i, dim=1)
        cat_s, cat_i = cat_s.gather(1, order), cat_i.gather(1, order)
        order = torch.sort(cat_s, dim=1, descending=True, stable=True).indices[:, :k]
        best_s, best_i = cat_s.gather(1, order), cat_i.gather(1, order)
    return best_s, best_i


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def knn(queries: Tensor, pool: Tensor, k: int, *, backend: str = "auto", block: int = 4096):
    """kNN by cosine: ``backend`` "exact" (blockwise), "faiss" (needs ``faiss-cpu``) or "auto" (FAISS when
    installed). Returns (scores, indices, backend used)."""
    if backend not in ("auto", "exact", "faiss"):
        raise ValueError(f"backend must be auto, exact or faiss, got {backend!r}")
    use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
    if use_faiss:
        import faiss
        import numpy as np

        p = np.ascontiguousarray(_unit(pool).numpy(), dtype=np.float32)
        index = faiss.IndexFlatIP(p.shape[1])
        index.add(p)
        s, i = index.search(np.ascontiguousarray(_unit(queries).numpy(), dtype=np.float32), min(k, len(p)))
        return torch.from_numpy(s), torch.from_numpy(i).long(), "faiss"
    s, i = knn_blockwise(queries, pool, k, block)
    return s, i, "exact"


@dataclass
class Curated:
    """The curated transfer set: pool indices (sorted), the class each was retrieved for, and its composition."""

    indices: list[int]
    classes: list[int]
    composition: dict = field(default_factory=dict)


def curate(
    query_emb: Tensor,
    query_labels: Tensor,
    pool_emb: Tensor,
    k: int | list[int],
    *,
    balance: bool = True,
    per_class: int | None = None,
    dedup_threshold: float | None = None,
    backend: str = "auto",
    block: int = 4096,
    pool_sources: list[str] | None = None,
) -> Curated:
    """Union of each query's ``k`` nearest pool items (``k`` an int or one per query), deduplicated.

    Each selected pool item is assigned the class of its most similar query. ``balance``: every class keeps the
    same number of items, ``per_class`` or else the smallest class's count, nearest first. ``dedup_threshold``:
    a pool item whose cosine with an already kept item (in order of decreasing query similarity) is above it
    is dropped. ``pool_sources`` (a name per pool item, e.g. "flickr8k"/"imagenette") adds the per-source counts
    to the composition.
    """
    nq = int(query_emb.shape[0])
    ks = [int(k)] * nq if isinstance(k, int) else [int(v) for v in k]
    if len(ks) != nq:
        raise ValueError(f"k has {len(ks)} entries for {nq} queries")
    if min(ks) < 0:
        raise ValueError("k must be >= 0")
    kmax = max(ks) if ks else 0
    if kmax == 0:
        return Curated([], [], {"n": 0})
    scores, idx, used = knn(query_emb, pool_emb, kmax, backend=backend, block=block)
    labels = [int(v) for v in query_labels.tolist()]
    best: dict[int, tuple[float, int, int]] = {}  # pool index -> (score, -query, class) of its best query
    for q in range(nq):
        for j in range(min(ks[q], idx.shape[1])):
            p, s = int(idx[q, j]), float(scores[q, j])
            cand = (s, -q, labels[q])
            if p not in best or cand[:2] > best[p][:2]:
                best[p] = cand
    n_picked = sum(min(v, idx.shape[1]) for v in ks)
    # nearest first; ties by pool index
    order = sorted(best, key=lambda p: (-best[p][0], p))
    n_near_dup = 0
    if dedup_threshold is not None and order:
        unit = _unit(pool_emb[order])
        keep: list[int] = []
        kept_rows: list[int] = []
        for r, p in enumerate(order):
            if kept_rows and float((unit[kept_rows] @ unit[r]).max()) > dedup_threshold:
                n_near_dup += 1
                continue
            keep.append(p)
            kept_rows.append(r)
        order = keep
    by_class: dict[int, list[int]] = {}
    for p in order:
        by_class.setdefault(best[p][2], []).append(p)
    classes_seen = sorted(set(labels))
    if balance:
        cap = per_class if per_class is not None else min(len(by_class.get(c, [])) for c in classes_seen)
        by_class = {c: v[:cap] for c, v in by_class.items()}
    chosen = sorted((p, c) for c, v in by_class.items() for p in v)
    indices, classes = [p for p, _ in chosen], [c for _, c in chosen]
    comp: dict = {
        "n": len(indices),
        "backend": used,
        "queries": nq,
        "neighbours_retrieved": n_picked,
        "duplicates_merged": n_picked - len(best),
        "near_duplicates_dropped": n_near_dup,
        "per_class": {str(c): sum(1 for x in classes if x == c) for c in classes_seen},
    }
    if pool_sources is not None:
        src: dict[str, int] = {}
        for p in indices:
            src[pool_sources[p]] = src.get(pool_sources[p], 0) + 1
        comp["per_source"] = dict(sorted(src.items()))
    return Curated(indices, classes, comp)
