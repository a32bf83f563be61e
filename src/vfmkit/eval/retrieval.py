"""Image-text retrieval recall@K in both directions (several captions per image allowed)."""

from __future__ import annotations

import torch


@torch.no_grad()
def retrieval_metrics(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    txt_img_index: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    block: int = 1024,
) -> dict[str, float]:
    """Recall@K for image->text and text->image.

    img_emb: [N, D], txt_emb: [M, D] (L2-normalised), txt_img_index: [M] image index of each caption.
    An image->text query is correct at K when any of its captions is in the top K; a text->image query
    when its own image is. Similarities are computed in blocks so memory stays O(block * max(N, M)).
    """
    img_emb, txt_emb = img_emb.float(), txt_emb.float()
    idx = txt_img_index.long()
    n, m = img_emb.shape[0], txt_emb.shape[0]
    # text -> image: rank of the true image among all images
    t2i_rank = torch.empty(m, dtype=torch.long)
    for s in range(0, m, block):
        sim = txt_emb[s : s + block] @ img_emb.T  # [b, N]
        true = sim.gather(1, idx[s : s + block, None])
        t2i_rank[s : s + block] = (sim > true).sum(1)
    # image -> text: best rank among the image's captions
    i2t_rank = torch.full((n,), m, dtype=torch.long)
    for s in range(0, n, block):
        sim = img_emb[s : s + block] @ txt_emb.T  # [b, M]
        order = sim.argsort(dim=1, descending=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(m).expand_as(order))
        owner = idx[None, :] == torch.arange(s, min(s + block, n))[:, None]  # [b, M]
        ranks = torch.where(owner, ranks, torch.full_like(ranks, m))
        i2t_rank[s : s + block] = ranks.min(1).values
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        out[f"t2i_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    return out
