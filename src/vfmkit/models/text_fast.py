"""Exact length-bucketed text encoding for open_clip's causal text towers.

open_clip runs every caption through the text transformer at the full context length (32 for the tiny
configs, 77 for OpenAI's), although Flickr8k captions average 14 tokens. With the causal mask, a token's output
depends only on the tokens before it, and CLIP pools the EOT token (``argmax`` / ``eos`` pooling), so the padding
after EOT never reaches the embedding: dropping it gives the same embedding and the same gradients. This module
sorts a batch's captions by length, splits them into a few buckets and runs each bucket trimmed to its own
longest caption; the result is scattered back into the batch order. On the quickstart's student this cuts the
text tower's cost by about half, and it is what makes MobileCLIP's second caption branch cheap (issue 20).

Applied by :func:`enable_length_bucketing` (``create_clip`` calls it) by switching the model's class to a
subclass of open_clip's ``CLIP`` / ``CustomTextCLIP`` whose ``encode_text`` buckets: no new parameters, the same
state dict, ``isinstance`` checks still hold, ``copy.deepcopy`` keeps it. Towers it cannot prove exact for
(no causal mask, ``last``/``first`` pooling, a CLS token, a padding mask, CoCa, HF text towers) keep open_clip's
own path, as do tracing, scripting, ONNX export and ``torch.compile`` (one static shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import ResidualAttentionBlock, TextTransformer
from torch import Tensor, nn

MAX_BUCKETS = 4
MIN_BUCKET = 16  # rows per bucket: fewer and the per-call overhead outweighs the padding saved


def _exporting() -> bool:
    return bool(
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )


def _parts(m: nn.Module) -> dict | None:
    """The text tower's pieces when bucketing is exact for it, else None."""
    if type(m) in (CLIP, BucketedCLIP):
        parts = {
            "emb": m.token_embedding,
            "pos": m.positional_embedding,
            "tr": m.transformer,
            "mask": m.attn_mask,
            "ln": m.ln_final,
            "proj": m.text_projection,
            "pool": m.text_pool_type,
            "eos": getattr(m, "text_eos_id", None),
        }
    elif type(m) in (CustomTextCLIP, BucketedCustomTextCLIP) and type(m.text) is TextTransformer:
        t = m.text
        if t.cls_emb is not None or t.use_pad_mask:
            return None
        parts = {
            "emb": t.token_embedding,
            "pos": t.positional_embedding,
            "tr": t.transformer,
            "mask": t.attn_mask,
            "ln": t.ln_final,
            "proj": t.text_projection,
            "pool": t.pool_type,
            "eos": getattr(t, "eos_id", None),
        }
        if getattr(t, "output_tokens", False):
            return None
    else:
        return None
    if parts["mask"] is None or parts["pool"] not in ("argmax", "eos"):
        return None
    if parts["pool"] == "eos" and parts["eos"] is None:
        return None
    m = parts["mask"]
    if m.dim() != 2 or not torch.equal(m, torch.full_like(m, float("-inf")).triu(1)):
        return None  # only open_clip's plain causal mask makes the trimmed positions irrelevant
    return parts


def pooled_index(text: Tensor, pool: str, eos: int | None) -> Tensor:
    """The position CLIP pools per row (open_clip's ``text_global_pool``)."""
    if pool == "argmax":
        return text.argmax(dim=-1)
    return (text == eos).int().argmax(dim=-1)


def buckets(lengths: Tensor, max_buckets: int = MAX_BUCKETS, min_bucket: int = MIN_BUCKET) -> list[Tensor]:
    """Row indices grouped into at most ``max_buckets`` buckets of similar length (sorted, equal counts)."""
    order = torch.argsort(lengths, stable=True)
    k = max(1, min(max_buckets, len(order) // max(1, min_bucket)))
    return [c for c in torch.tensor_split(order, k) if len(c)]


def bucketed_text_features(m: nn.Module, parts: dict, text: Tensor) -> Tensor:
    """Text features of ``text`` [B, L] equal to open_clip's ``encode_text`` (unnormalised)."""
    cast = parts["tr"].get_cast_dtype()
    idx = pooled_index(text, parts["pool"], parts["eos"])
    # One embedding lookup for the whole batch: its backward materialises a dense [vocab, width] gradient
    # (7 ms for the tiny configs' 49408 x 128 table), which per bucket would cost more than the padding saved.
    n_max = int(idx.max()) + 1
    emb = parts["emb"](text[:, :n_max]).to(cast) + parts["pos"][:n_max].to(cast)
    tr = parts["tr"]
    blocks = list(tr.resblocks)
    last = blocks.pop() if _eot_only_ok(tr, blocks) else None
    pieces, rows = [], []
    for r in buckets(idx + 1):
        n = int(idx[r].max()) + 1
        x, mask = emb[r, :n], parts["mask"][:n, :n]
        if last is None:
            x = tr(x, attn_mask=mask)
            pieces.append(x[torch.arange(len(r), device=x.device), idx[r]])  # pool, then the per-token LN
        else:
            for blk in blocks:
                x = blk(x, attn_mask=mask)
            pieces.append(_last_block_at_eot(last, x, idx[r]))
        rows.append(r)
    pooled = torch.cat(pieces)
    inv = torch.empty_like(idx)
    inv[torch.cat(rows)] = torch.arange(len(idx), device=idx.device)
    x = parts["ln"](pooled[inv])
    proj = parts["proj"]
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


def _eot_only_ok(tr: nn.Module, blocks: list) -> bool:
    """The last block can be run for the pooled token alone: plain open_clip blocks, batch-first, no
    checkpointing (its outputs at the other positions are never read)."""
    return bool(
        getattr(tr, "batch_first", False)
        and not getattr(tr, "grad_checkpointing", False)
        and all(
            type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
            for b in [*blocks, tr.resblocks[-1]]
        )
    )


def _last_block_at_eot(blk: ResidualAttentionBlock, x: Tensor, idx: Tensor) -> Tensor:
    """open_clip's ``ResidualAttentionBlock`` output at position ``idx`` of each row only: the query is that
    token, the keys/values every token up to it (the causal mask's row ``idx``); the MLP runs on that token
    alone. Equals ``blk(x, attn_mask=causal)[arange, idx]``, at about half the block's cost."""
    rows = torch.arange(x.shape[0], device=x.device)
    h = blk.ln_1(x)
    q = h[rows, idx].unsqueeze(1)  # [b, 1, d]
    ignore = torch.arange(x.shape[1], device=x.device)[None, :] > idx[:, None]  # keys after the token
    a = blk.attn(q, h, h, need_weights=False, key_padding_mask=ignore)[0]
    y = x[rows, idx].unsqueeze(1) + blk.ls_1(a)
    y = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
    return y[:, 0]


class _BucketedText:
    """``encode_text`` through :func:`bucketed_text_features` where that is exact, else open_clip's own."""

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        parts = None if _exporting() else _parts(self)
        if parts is None:
            return super().encode_text(text, normalize=normalize)
        x = bucketed_text_features(self, parts, text)
        return F.normalize(x, dim=-1) if normalize else x


class BucketedCLIP(_BucketedText, CLIP):
    """open_clip's ``CLIP`` with exact length-bucketed ``encode_text`` (see the module docstring)."""


class BucketedCustomTextCLIP(_BucketedText, CustomTextCLIP):
    """open_clip's ``CustomTextCLIP`` with exact length-bucketed ``encode_text``."""


_SUB = {CLIP: BucketedCLIP, CustomTextCLIP: BucketedCustomTextCLIP}


def enable_length_bucketing(model: nn.Module) -> bool:
    """Switch ``model`` to the bucketed subclass when that is exact for its text tower; True if switched."""
    sub = _SUB.get(type(model))
    if sub is None or _parts(model) is None:
        return False
    model.__class__ = sub
    return True
