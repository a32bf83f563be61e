"""Weight subcloning (Samragh et al., arXiv:2312.09299): initialise a smaller transformer from a trained larger one.

Steps, as in the paper:

1. Importance on a calibration batch of real data (``measure_importance``): mean |activation| over batch and
   tokens of every residual-stream dimension (summed over every norm input, i.e. every point where the stream
   is read), of every attention head's output after the softmax (``softmax(QK^T)V``, scored as a group) and of
   every MLP hidden unit (per layer).
2. One residual order shared by every tensor that touches the stream (patch/token/position embeddings, class
   token, norms, layer scales, every projection and the head's input); heads and MLP units ordered per block.
   The leading ``d'`` dims / top heads / top units are kept, in importance order (``make_plan``).
3. Blocks are removed from the middle, keeping the first and the last (``block_select="middle"``), or by the
   paper's observation that the blocks with the smallest ``||f(x)|| / ||x + f(x)||`` matter least (``"ratio"``).
4. Weight matrices are rescaled by ``sqrt(n / n')`` of the dimension they read (``scale="paper"``); norms,
   biases and embeddings never are. See docs/subclone.md for the measured comparison of scaling modes.

The output is a JSON architecture description plus a state dict that loads with ``strict=True`` into the
library's own class (timm ``VisionTransformer``, open_clip ``VisionTransformer`` / ``TextTransformer``,
transformers ``GPT2LMHeadModel``): ``build_model(arch)`` builds it, ``load_model(dir)`` loads a saved one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.data.samples import decode_images, normalize, read_samples
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job
from vfmkit.text.wordvocab import WordVocab

R, QKV, A, H = "R", "QKV", "A", "H"  # axis roles: residual stream, packed q/k/v, attention inner, MLP hidden
SCALE_MODES = ("paper", "residual", "none")
BLOCK_MODES = ("middle", "ratio")


@dataclass
class Dims:
    """Sizes of a pre-norm transformer: ``width = d``, ``heads * head_dim = d_attn``, ``mlp_hidden = h``."""

    layers: int
    width: int
    heads: int
    head_dim: int
    mlp_hidden: int


@dataclass
class Rule:
    """How one state-dict entry is cut: ``roles[i]`` names what axis ``i`` indexes (None: untouched)."""

    pattern: str  # full match on the key; group ``b`` is the block index for per-block tensors
    roles: tuple[str | None, ...]
    in_axis: int | None = None  # the axis a weight matrix reads from (for scaling); None: not a matrix

    def match(self, key: str) -> re.Match | None:
        return re.fullmatch(self.pattern, key)


class SubcloneError(ValueError):
    """A parent/child combination that cannot be subcloned; the message says why."""


RANDOM_PARENT_NOTE = (
    "subcloning a randomly initialised parent transfers nothing (measured: importance correlation 0.057 on "
    "vit_tiny_patch16_224); the child is no better than a fresh init"
)


def parent_source(
    spec: str, pretrained: str | None, allow_random: bool = False
) -> tuple[str, str | None, bool]:
    """Where a parent's weights come from -> (the parent spec to load, its weights, whether it is random).

    ``spec`` is a model spec (``vfmkit.models.spec``): a directory (a trained run/subclone, a transformers
    folder: its own weights), ``NAME``, ``timm:NAME[:SOURCE]`` or ``openclip:NAME[:SOURCE]``; ``pretrained``
    (``--pretrained``) is a weights file or a timm / open_clip pretrained tag and overrides ``SOURCE``
    (``random`` asks for the seeded init). A named parent with no weights is refused (SubcloneError) unless
    ``allow_random``; then the caller warns."""
    from vfmkit.models.spec import parse_model_spec

    ms = parse_model_spec(spec)
    if ms.kind == "path":
        return spec, pretrained, False
    if ms.kind not in ("name", "timm", "openclip"):
        raise SubcloneError(
            f"parent {spec!r} is a {ms.kind} spec; a parent is a directory, NAME, timm:NAME or openclip:NAME"
        )
    src = pretrained or ms.source
    src = None if src in (None, "", "random") else src
    if src is None and not allow_random:
        raise SubcloneError(
            f"parent {spec!r} has no pretrained weights (no --pretrained): {RANDOM_PARENT_NOTE}. Give --pretrained "
            "FILE or a pretrained tag (timm, e.g. augreg_in21k; open_clip, e.g. laion2b_s34b_b79k), a trained "
            "parent directory, or --allow-random-parent to subclone the random init anyway"
        )
    return ms.name, src, src is None


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _ratio(hidden: int, width: int) -> float:
    """An ``mlp_ratio`` for which ``int(width * ratio) == hidden`` holds exactly (libraries floor it)."""
    r = hidden / width
    return r if int(width * r) == hidden else (hidden + 0.5) / width


def _block_rules(
    prefix: str,
    ln: tuple[str, str],
    attn: tuple[str, str, str, str],
    mlp: tuple[str, str],
    ls: tuple[str, str] | None,
) -> list[Rule]:
    """Rules for torch-Linear style blocks (weights ``[out, in]``) such as timm's and open_clip's."""
    qkv_w, qkv_b, out_w, out_b = attn
    b = prefix + r"(?P<b>\d+)\."
    rules = [
        Rule(b + rf"(?:{ln[0]}|{ln[1]})\.(?:weight|bias)", (R,)),
        Rule(b + qkv_w, (QKV, R), 1),
        Rule(b + qkv_b, (QKV,)),
        Rule(b + out_w, (R, A), 1),
        Rule(b + out_b, (R,)),
        Rule(b + rf"{mlp[0]}\.weight", (H, R), 1),
        Rule(b + rf"{mlp[0]}\.bias", (H,)),
        Rule(b + rf"{mlp[1]}\.weight", (R, H), 1),
        Rule(b + rf"{mlp[1]}\.bias", (R,)),
    ]
    if ls:
        rules.append(Rule(b + rf"(?:{ls[0]}|{ls[1]})\.gamma", (R,)))
    return rules


# ----------------------------------------------------------------------------------------------- families
class Family:
    """What subcloning needs to know about one library's transformer class."""

    name = ""

    def dims(self, model: nn.Module) -> Dims: ...
    def blocks(self, model: nn.Module) -> list[nn.Module]: ...
    def rules(self, model: nn.Module) -> list[Rule]: ...
    def arch(self, model: nn.Module) -> dict: ...
    def child_arch(self, arch: dict, d: Dims) -> dict: ...
    def build(self, arch: dict) -> nn.Module: ...

    def attn_site(self, block: nn.Module) -> tuple[nn.Module, str]:
        """(module, kind): kind ``"pre"`` means the module's input is the per-head attention output."""
        ...

    def mlp_site(self, block: nn.Module) -> nn.Module:
        """The MLP's second projection: its input is the hidden activation ``[B, T, h]``."""
        ...

    def stream_norms(self, model: nn.Module) -> list[nn.Module]:
        """Every norm whose input is the residual stream ``[B, T, d]`` (pre-attn, pre-MLP, final)."""
        ...

    def run(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Model output used by the function check: ``[B, C]`` or ``[B, T, V]``."""
        ...


class TimmViT(Family):
    name = "timm_vit"

    def check(self, m: nn.Module) -> None:
        from timm.layers import Mlp

        blk = m.blocks[0]
        if m.global_pool == "map" or getattr(m, "attn_pool", None) is not None:
            raise SubcloneError("timm ViT with attention-pool head (global_pool='map') is not supported")
        if getattr(blk.attn, "qkv", None) is None or not isinstance(blk.mlp, Mlp):
            raise SubcloneError(
                f"timm ViT block {type(blk).__name__} (separate q/k/v or gated MLP) unsupported"
            )
        if not (_is_identity(blk.attn.norm) and _is_identity(blk.mlp.norm)):
            raise SubcloneError("timm ViT with scale_attn_norm / scale_mlp_norm is not supported")

    def dims(self, m: nn.Module) -> Dims:
        a = m.blocks[0].attn
        return Dims(len(m.blocks), m.embed_dim, a.num_heads, a.head_dim, m.blocks[0].mlp.fc1.out_features)

    def blocks(self, m):
        return list(m.blocks)

    def rules(self, m):
        tok = (None, None, R)
        top = [
            Rule(r"cls_token", tok),
            Rule(r"reg_token", tok),
            Rule(r"pos_embed", tok),
            Rule(r"patch_embed\.proj\.weight", (R, None, None, None)),
            Rule(r"patch_embed\.proj\.bias", (R,)),
            Rule(r"(?:norm_pre|norm|fc_norm)\.(?:weight|bias)", (R,)),
            Rule(r"head\.weight", (None, R), 1),
            Rule(r"head\.bias", (None,)),
            Rule(r"blocks\.\d+\.attn\.(?:q_norm|k_norm)\.(?:weight|bias)", (None,)),
        ]
        return top + _block_rules(
            r"blocks\.",
            ("norm1", "norm2"),
            (r"attn\.qkv\.weight", r"attn\.qkv\.bias", r"attn\.proj\.weight", r"attn\.proj\.bias"),
            ("mlp.fc1", "mlp.fc2"),
            ("ls1", "ls2"),
        )

    def arch(self, m):
        from timm.layers import LayerScale

        self.check(m)
        blk, d = m.blocks[0], self.dims(m)
        kw = dict(
            img_size=list(m.patch_embed.img_size),
            patch_size=list(m.patch_embed.patch_size),
            in_chans=m.patch_embed.proj.in_channels,
            num_classes=m.num_classes,
            global_pool=m.global_pool,
            embed_dim=d.width,
            depth=d.layers,
            num_heads=d.heads,
            mlp_ratio=_ratio(d.mlp_hidden, d.width),
            qkv_bias=blk.attn.qkv.bias is not None,
            proj_bias=blk.attn.proj.bias is not None,
            qk_norm=not _is_identity(blk.attn.q_norm),
            class_token=m.cls_token is not None,
            reg_tokens=m.num_reg_tokens,
            no_embed_class=m.no_embed_class,
            pre_norm=not _is_identity(m.norm_pre),
            fc_norm=not _is_identity(m.fc_norm),
            final_norm=not (_is_identity(m.norm) and _is_identity(m.fc_norm)),
            init_values=1e-5 if isinstance(blk.ls1, LayerScale) else None,
            dynamic_img_size=bool(m.dynamic_img_size),
        )
        arch_name = (getattr(m, "pretrained_cfg", None) or {}).get("architecture") or "vit_base_patch16_224"
        return {"family": self.name, "arch": arch_name, "kwargs": kw}

    def child_arch(self, arch, d):
        kw = dict(
            arch["kwargs"],
            embed_dim=d.width,
            depth=d.layers,
            num_heads=d.heads,
            mlp_ratio=_ratio(d.mlp_hidden, d.width),
        )
        return dict(arch, kwargs=kw)

    def build(self, arch):
        import timm

        kw = dict(arch["kwargs"])
        kw["img_size"], kw["patch_size"] = tuple(kw["img_size"]), tuple(kw["patch_size"])
        return timm.create_model(arch["arch"], pretrained=False, **kw)

    def attn_site(self, block):
        return block.attn.proj, "pre"

    def mlp_site(self, block):
        return block.mlp.fc2

    def stream_norms(self, m):
        return [n for b in m.blocks for n in (b.norm1, b.norm2)] + [m.norm]

    def run(self, m, batch):
        return m(batch["x"])


def _openclip_block_rules() -> list[Rule]:
    return _block_rules(
        r"transformer\.resblocks\.",
        ("ln_1", "ln_2"),
        (r"attn\.in_proj_weight", r"attn\.in_proj_bias", r"attn\.out_proj\.weight", r"attn\.out_proj\.bias"),
        ("mlp.c_fc", "mlp.c_proj"),
        ("ls_1", "ls_2"),
    )


class _OpenClipTower(Family):
    """Shared by open_clip's VisionTransformer and TextTransformer (same ResidualAttentionBlock)."""

    def check_blocks(self, m: nn.Module) -> None:
        from open_clip.transformer import ResidualAttentionBlock

        if not isinstance(m.transformer.resblocks[0], ResidualAttentionBlock):
            raise SubcloneError(
                "open_clip custom blocks (qk_norm, scaled cosine attention, ...) are not supported"
            )

    def dims(self, m):
        blk = m.transformer.resblocks[0]
        w = m.transformer.width
        return Dims(
            len(m.transformer.resblocks),
            w,
            blk.attn.num_heads,
            w // blk.attn.num_heads,
            blk.mlp.c_fc.out_features,
        )

    def common_cfg(self, m: nn.Module) -> dict:
        from open_clip.transformer import LayerScale, QuickGELU

        blk, d = m.transformer.resblocks[0], self.dims(m)
        cfg = dict(
            width=d.width,
            layers=d.layers,
            mlp_ratio=_ratio(d.mlp_hidden, d.width),
            ls_init_value=1e-5 if isinstance(blk.ls_1, LayerScale) else None,
        )
        if blk.ln_1.eps != 1e-5:
            cfg["norm_kwargs"] = {"eps": blk.ln_1.eps}
        return cfg | {"_quick_gelu": isinstance(blk.mlp.gelu, QuickGELU)}

    def blocks(self, m):
        return list(m.transformer.resblocks)

    def attn_site(self, block):
        return block.attn, "mha"

    def mlp_site(self, block):
        return block.mlp.c_proj


class OpenClipVisual(_OpenClipTower):
    name = "open_clip_visual"

    def rules(self, m):
        return [
            Rule(r"conv1\.weight", (R, None, None, None)),
            Rule(r"class_embedding", (R,)),
            Rule(r"positional_embedding", (None, R)),
            Rule(r"(?:ln_pre|ln_post)\.(?:weight|bias)", (R,)),
            Rule(r"proj", (R, None), 0),
        ] + _openclip_block_rules()

    def arch(self, m):
        self.check_blocks(m)
        if m.attn_pool is not None:
            raise SubcloneError("open_clip VisionTransformer with attentional pooling is not supported")
        cfg = self.common_cfg(m)
        qg = cfg.pop("_quick_gelu")
        size = list(m.image_size)
        cfg.update(
            image_size=size[0] if size[0] == size[1] else size,
            patch_size=m.patch_size[0],
            head_width=self.dims(m).head_dim,
            no_ln_pre=_is_identity(m.ln_pre),
            pool_type=m.pool_type,
            final_ln_after_pool=m.final_ln_after_pool,
            output_tokens=m.output_tokens,
            pos_embed_type="learnable" if m.positional_embedding.requires_grad else "sin_cos_2d",
        )
        return {"family": self.name, "embed_dim": m.output_dim, "quick_gelu": qg, "vision_cfg": cfg}

    def child_arch(self, arch, d):
        cfg = dict(
            arch["vision_cfg"],
            width=d.width,
            layers=d.layers,
            head_width=d.head_dim,
            mlp_ratio=_ratio(d.mlp_hidden, d.width),
        )
        return dict(arch, vision_cfg=cfg)

    def build(self, arch):
        from open_clip.model import _build_vision_tower

        return _build_vision_tower(arch["embed_dim"], dict(arch["vision_cfg"]), quick_gelu=arch["quick_gelu"])

    def stream_norms(self, m):
        return [n for b in m.transformer.resblocks for n in (b.ln_1, b.ln_2)] + [m.ln_post]

    def run(self, m, batch):
        out = m(batch["x"])
        return out[0] if isinstance(out, tuple) else out


class OpenClipText(_OpenClipTower):
    name = "open_clip_text"

    def rules(self, m):
        proj = [
            Rule(r"text_projection", (R, None), 0),
            Rule(r"text_projection\.weight", (None, R), 1),
            Rule(r"text_projection\.bias", (None,)),
        ]
        return (
            [
                Rule(r"token_embedding\.weight", (None, R)),
                Rule(r"positional_embedding", (None, R)),
                Rule(r"cls_emb", (R,)),
                Rule(r"ln_final\.(?:weight|bias)", (R,)),
            ]
            + proj
            + _openclip_block_rules()
        )

    def arch(self, m):
        self.check_blocks(m)
        cfg = self.common_cfg(m)
        qg = cfg.pop("_quick_gelu")
        proj = m.text_projection
        cfg.update(
            context_length=m.context_length,
            vocab_size=m.vocab_size,
            heads=self.dims(m).heads,
            embed_cls=m.cls_emb is not None,
            pad_id=m.pad_id,
            eos_id=m.eos_id,
            no_causal_mask=m.attn_mask is None,
            pool_type=m.pool_type,
            output_tokens=m.output_tokens,
            proj_type="none" if proj is None else "linear",
            proj_bias=isinstance(proj, nn.Linear) and proj.bias is not None,
        )
        return {"family": self.name, "embed_dim": m.output_dim or m.width, "quick_gelu": qg, "text_cfg": cfg}

    def child_arch(self, arch, d):
        cfg = dict(
            arch["text_cfg"],
            width=d.width,
            layers=d.layers,
            heads=d.heads,
            mlp_ratio=_ratio(d.mlp_hidden, d.width),
        )
        return dict(arch, text_cfg=cfg)

    def build(self, arch):
        from open_clip.model import _build_text_tower

        return _build_text_tower(arch["embed_dim"], dict(arch["text_cfg"]), quick_gelu=arch["quick_gelu"])

    def stream_norms(self, m):
        return [n for b in m.transformer.resblocks for n in (b.ln_1, b.ln_2)] + [m.ln_final]

    def run(self, m, batch):
        out = m(batch["x"])
        return out[0] if isinstance(out, tuple) else out


GPT2_KEYS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "tie_word_embeddings",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "initializer_range",
)


class GPT2(Family):
    """transformers' GPT2LMHeadModel: Conv1D weights are ``[in, out]`` (transposed), lm_head tied to wte."""

    name = "gpt2"

    def dims(self, m):
        c = m.config
        return Dims(c.n_layer, c.n_embd, c.n_head, c.n_embd // c.n_head, m.transformer.h[0].mlp.c_fc.nf)

    def blocks(self, m):
        return list(m.transformer.h)

    def rules(self, m):
        b = r"transformer\.h\.(?P<b>\d+)\."
        tied = bool(m.config.tie_word_embeddings)
        # A tied lm_head is the token embedding itself, which is never rescaled.
        return [
            Rule(r"transformer\.(?:wte|wpe)\.weight", (None, R)),
            Rule(r"lm_head\.weight", (None, R), None if tied else 1),
            Rule(r"transformer\.ln_f\.(?:weight|bias)", (R,)),
            Rule(b + r"ln_[12]\.(?:weight|bias)", (R,)),
            Rule(b + r"attn\.c_attn\.weight", (R, QKV), 0),
            Rule(b + r"attn\.c_attn\.bias", (QKV,)),
            Rule(b + r"attn\.c_proj\.weight", (A, R), 0),
            Rule(b + r"attn\.c_proj\.bias", (R,)),
            Rule(b + r"mlp\.c_fc\.weight", (R, H), 0),
            Rule(b + r"mlp\.c_fc\.bias", (H,)),
            Rule(b + r"mlp\.c_proj\.weight", (H, R), 0),
            Rule(b + r"mlp\.c_proj\.bias", (R,)),
        ]

    def arch(self, m):
        c = m.config
        if getattr(c, "add_cross_attention", False):
            raise SubcloneError("GPT-2 with cross-attention is not supported")
        cfg = {k: getattr(c, k) for k in GPT2_KEYS if hasattr(c, k)}
        cfg["n_inner"] = self.dims(m).mlp_hidden
        return {"family": self.name, "config": cfg}

    def child_arch(self, arch, d):
        if arch["config"].get("scale_attn_by_inverse_layer_idx") and d.layers != arch["config"]["n_layer"]:
            raise SubcloneError(
                "GPT-2 with scale_attn_by_inverse_layer_idx changes function when blocks move"
            )
        return dict(
            arch,
            config=dict(
                arch["config"], n_embd=d.width, n_layer=d.layers, n_head=d.heads, n_inner=d.mlp_hidden
            ),
        )

    def build(self, arch):
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(**arch["config"]))

    def attn_site(self, block):
        return block.attn.c_proj, "pre"

    def mlp_site(self, block):
        return block.mlp.c_proj

    def stream_norms(self, m):
        return [n for b in m.transformer.h for n in (b.ln_1, b.ln_2)] + [m.transformer.ln_f]

    def run(self, m, batch):
        return m(input_ids=batch["x"], attention_mask=batch.get("mask")).logits


FAMILIES: dict[str, Family] = {f.name: f for f in (TimmViT(), OpenClipVisual(), OpenClipText(), GPT2())}


def family_of(model: nn.Module) -> Family:
    """The family handler for a model instance; raises SubcloneError naming the class if unsupported."""
    cls = type(model).__name__
    mod = type(model).__module__
    if cls == "VisionTransformer" and mod.startswith("timm."):
        return FAMILIES["timm_vit"]
    if cls == "VisionTransformer" and mod.startswith("open_clip"):
        return FAMILIES["open_clip_visual"]
    if cls == "TextTransformer" and mod.startswith("open_clip"):
        return FAMILIES["open_clip_text"]
    if cls == "GPT2LMHeadModel":
        return FAMILIES["gpt2"]
    raise SubcloneError(
        f"cannot subclone a {mod}.{cls}: supported are timm VisionTransformer, open_clip "
        "VisionTransformer / TextTransformer (take model.visual or text_tower_of(clip)) and "
        "transformers GPT2LMHeadModel"
    )


def build_model(arch: dict) -> nn.Module:
    """Build the library's own class from an architecture dict (``arch["family"]`` picks the library)."""
    if arch.get("family") not in FAMILIES:
        raise SubcloneError(f"unknown family {arch.get('family')!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[arch["family"]].build(arch)


def text_tower_of(clip: nn.Module) -> nn.Module:
    """open_clip ``CLIP`` keeps its text tower's modules on itself: rebuild it as a standalone TextTransformer.

    The state-dict keys of the text part of ``CLIP`` are exactly those of ``TextTransformer``.
    """
    if hasattr(clip, "text") and type(clip.text).__name__ == "TextTransformer":
        return clip.text
    from open_clip.transformer import TextTransformer

    tt = TextTransformer.__new__(TextTransformer)
    nn.Module.__init__(tt)
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
        setattr(tt, name, getattr(clip, name))
    tt.register_buffer("attn_mask", clip.attn_mask, persistent=False)
    tt.cls_emb, tt.output_tokens, tt.use_pad_mask, tt.correct_cls_mask = None, False, False, False
    tt.context_length = tt.num_pos = clip.context_length
    tt.vocab_size, tt.width = clip.vocab_size, clip.transformer.width
    tt.heads = clip.transformer.resblocks[0].attn.num_heads
    tt.output_dim = clip.text_projection.shape[1] if clip.text_projection is not None else None
    tt.pad_id, tt.eos_id = getattr(clip, "pad_id", 0), getattr(clip, "text_eos_id", 2)
    tt.pool_type = clip.text_pool_type
    return tt


# ------------------------------------------------------------------------------------------- importance
@dataclass
class Importance:
    """Calibration statistics; all are mean |activation| over batch and (valid) tokens."""

    stream: torch.Tensor  # [d]: summed over every norm input (every read of the residual stream)
    heads: list[torch.Tensor]  # per block [H]: mean |softmax(QK^T)V| of each head
    mlp: list[torch.Tensor]  # per block [h]
    block_ratio: torch.Tensor  # [N]: mean ||f(x)|| / ||x + f(x)|| per block (the paper's insight)
    n_tokens: int = 0


def _token_mean_abs(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Sum over batch/tokens of |x| (``[..., C] -> [C]``) and the token count, honouring a ``[B, T]`` mask."""
    x = x.detach().float().abs()
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        w = mask.to(x.dtype).unsqueeze(-1)
        return (x * w).sum((0, 1)), float(w.sum())
    flat = x.reshape(-1, x.shape[-1])
    return flat.sum(0), float(flat.shape[0])


def _mha_heads(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """Recompute ``softmax(QK^T/sqrt(hd))V`` of torch MHA (its out_proj is not called as a module): [B, L, H*hd]."""
    x = args[0]
    mask = kwargs.get("attn_mask")
    n, length, _ = x.shape
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, mha.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 3:
        mask = mask.reshape(n, mha.num_heads, length, length)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask, float("-inf"))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).reshape(n, length, -1)


class _Recorder:
    """Forward hooks that accumulate the statistics of ``Importance`` over calibration batches."""

    def __init__(self, fam: Family, model: nn.Module):
        self.fam, self.model = fam, model
        d, blocks = fam.dims(model), fam.blocks(model)
        self.d = d
        self.stream = torch.zeros(d.width)
        self.heads = [torch.zeros(d.heads) for _ in blocks]
        self.mlp = [torch.zeros(d.mlp_hidden) for _ in blocks]
        self.ratio = torch.zeros(len(blocks))
        self.counts = {"stream": 0.0, "heads": [0.0] * len(blocks), "mlp": [0.0] * len(blocks), "ratio": 0.0}
        self.mask: torch.Tensor | None = None
        self.handles: list = []

    def add_stream(self, x: torch.Tensor) -> None:
        s, n = _token_mean_abs(x, self.mask)
        if x.shape[-1] == self.d.width:
            self.stream += s / max(n, 1.0)  # each norm input is averaged, then summed over layers

    def add_heads(self, i: int, inner: torch.Tensor) -> None:
        s, n = _token_mean_abs(inner, self.mask)
        self.heads[i] += s.reshape(self.d.heads, -1).mean(-1)
        self.counts["heads"][i] += n

    def add_mlp(self, i: int, hid: torch.Tensor) -> None:
        s, n = _token_mean_abs(hid, self.mask)
        self.mlp[i] += s
        self.counts["mlp"][i] += n

    def add_ratio(self, i: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        r = (x_out - x_in).float().norm(dim=-1) / x_out.float().norm(dim=-1).clamp_min(1e-12)
        self.ratio[i] += r.mean()

    def attach(self) -> None:
        for norm in self.fam.stream_norms(self.model):
            self.handles.append(norm.register_forward_pre_hook(lambda _m, a: self.add_stream(a[0])))
        for i, blk in enumerate(self.fam.blocks(self.model)):
            site, kind = self.fam.attn_site(blk)
            if kind == "pre":
                h = site.register_forward_pre_hook(lambda _m, a, i=i: self.add_heads(i, a[0]))
            else:
                h = site.register_forward_hook(
                    lambda m, a, kw, _o, i=i: self.add_heads(i, _mha_heads(m, a, kw)), with_kwargs=True
                )
            self.handles.append(h)
            self.handles.append(
                self.fam.mlp_site(blk).register_forward_pre_hook(lambda _m, a, i=i: self.add_mlp(i, a[0]))
            )
            self.handles.append(blk.register_forward_hook(self._ratio_hook(i), with_kwargs=True))

    def _ratio_hook(self, i: int):
        def hook(_m, args, kwargs, out):
            x_in = args[0] if args else kwargs.get("hidden_states", kwargs.get("q_x"))
            self.add_ratio(i, x_in, out[0] if isinstance(out, tuple) else out)

        return hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@torch.no_grad()
def measure_importance(model: nn.Module, batches: Iterable[dict], family: Family | None = None) -> Importance:
    """Neuron importance from calibration batches ``{"x": input, "mask": [B, T] bool or absent}``.

    ``x`` is ``[B, 3, H, W]`` images for ViTs or ``[B, T]`` token ids for language models.
    """
    fam = family or family_of(model)
    rec = _Recorder(fam, model)
    was_training = model.training
    model.eval()
    rec.attach()
    n_batches = 0
    try:
        for batch in batches:
            rec.mask = batch.get("mask")
            fam.run(model, batch)
            n_batches += 1
    finally:
        rec.detach()
        model.train(was_training)
    if n_batches == 0:
        raise SubcloneError("calibration data gave no batch")
    return Importance(
        stream=rec.stream / n_batches,
        heads=[h / max(c, 1.0) for h, c in zip(rec.heads, rec.counts["heads"], strict=True)],
        mlp=[h / max(c, 1.0) for h, c in zip(rec.mlp, rec.counts["mlp"], strict=True)],
        block_ratio=rec.ratio / n_batches,
        n_tokens=int(rec.counts["mlp"][0]) if rec.counts["mlp"] else 0,
    )


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Which parent units the child keeps, in the child's order (most important first)."""

    parent: Dims
    child: Dims
    blocks: list[int]  # kept parent block indices, ascending
    residual: torch.Tensor  # [d'] parent residual dims
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # parent block -> [H'] parent head indices
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)  # parent block -> [h'] parent units

    def attn_index(self, b: int) -> torch.Tensor:
        """[H' * hd] parent indices into the attention inner dimension of block ``b``."""
        hd = self.parent.head_dim
        return (self.heads[b][:, None] * hd + torch.arange(hd)).reshape(-1)

    def qkv_index(self, b: int) -> torch.Tensor:
        inner = self.parent.heads * self.parent.head_dim
        a = self.attn_index(b)
        return torch.cat([a + c * inner for c in range(3)])


def resolve_dims(
    parent: Dims,
    layers: int | None = None,
    width: int | None = None,
    heads: int | None = None,
    mlp_hidden: int | None = None,
) -> Dims:
    """Child sizes; unspecified ones follow the parent (head dim is kept, MLP ratio is kept)."""
    width = width or parent.width
    layers = layers or parent.layers
    if heads is None:
        if width % parent.head_dim:
            raise SubcloneError(f"width {width} is not a multiple of the parent's head dim {parent.head_dim}")
        heads = width // parent.head_dim
    if width % heads or width // heads != parent.head_dim:
        raise SubcloneError(
            f"width {width} with {heads} heads gives head dim {width / heads:g}; subcloning keeps "
            f"the parent's head dim {parent.head_dim} (use heads={width // parent.head_dim})"
        )
    mlp_hidden = mlp_hidden or round(parent.mlp_hidden * width / parent.width)
    child = Dims(layers, width, heads, parent.head_dim, mlp_hidden)
    for k in ("layers", "width", "heads", "mlp_hidden"):
        if not 1 <= getattr(child, k) <= getattr(parent, k):
            raise SubcloneError(
                f"child {k}={getattr(child, k)} must be in [1, parent's {getattr(parent, k)}]"
            )
    return child


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, largest first; ties go to the lower index (deterministic)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def select_blocks(n: int, k: int, mode: str = "middle", ratio: torch.Tensor | None = None) -> list[int]:
    """Kept block indices: always the first and the last; the rest from the ends ("middle") or by ratio."""
    if mode not in BLOCK_MODES:
        raise SubcloneError(f"block_select must be one of {BLOCK_MODES}, got {mode!r}")
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    if mode == "middle":
        head = (k + 1) // 2
        return list(range(head)) + list(range(n - (k - head), n))
    assert ratio is not None
    inner = _top(ratio[1:-1], k - 2) + 1  # the middle blocks that change the stream most
    return sorted([0, n - 1] + inner.tolist())


def make_plan(imp: Importance, parent: Dims, child: Dims, block_select: str = "middle") -> Plan:
    """Keep the top residual dims / heads / MLP units and choose the blocks (see ``select_blocks``)."""
    blocks = select_blocks(parent.layers, child.layers, block_select, imp.block_ratio)
    plan = Plan(parent, child, blocks, _top(imp.stream, child.width))
    for b in blocks:
        plan.heads[b] = _top(imp.heads[b], child.heads)
        plan.mlp[b] = _top(imp.mlp[b], child.mlp_hidden)
    return plan


def _role_index(plan: Plan, role: str, b: int | None) -> torch.Tensor:
    if role == R:
        return plan.residual
    if b is None:
        raise SubcloneError(f"role {role} outside a block")
    return {QKV: plan.qkv_index, A: plan.attn_index}[role](b) if role != H else plan.mlp[b]


def _scale(plan: Plan, role: str, mode: str) -> float:
    """``sqrt(n / n')`` of the dimension a matrix reads, so its outputs keep their scale."""
    if mode == "none" or (mode == "residual" and role != R):
        return 1.0
    p, c = plan.parent, plan.child
    n, n2 = {R: (p.width, c.width), A: (p.heads, c.heads), H: (p.mlp_hidden, c.mlp_hidden)}[role]
    return math.sqrt(n / n2)


def apply_plan(
    state: dict[str, torch.Tensor],
    rules: list[Rule],
    plan: Plan,
    scale: str = "paper",
    block_prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """Cut (and rescale) every tensor of a parent state dict; raises SubcloneError on an unknown key."""
    if scale not in SCALE_MODES:
        raise SubcloneError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
    child_of = {b: i for i, b in enumerate(plan.blocks)}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        rule, m = next(((r, mm) for r in rules if (mm := r.match(key))), (None, None))
        if rule is None:
            raise SubcloneError(f"no subcloning rule for parameter '{key}' {tuple(t.shape)}")
        b = int(m.group("b")) if "b" in m.groupdict() else None
        if b is not None and b not in child_of:
            continue  # a removed block
        new = t.detach().clone()
        for axis, role in enumerate(rule.roles):
            if role is not None:
                new = new.index_select(axis, _role_index(plan, role, b).to(new.device))
        if rule.in_axis is not None and new.is_floating_point():
            new = new * _scale(plan, rule.roles[rule.in_axis], scale)
        if b is not None:
            key = key[: m.start("b")] + str(child_of[b]) + key[m.end("b") :]
        out[key] = new.contiguous()
    return out


# ----------------------------------------------------------------------------------------- entry points
@dataclass
class SubcloneResult:
    model: nn.Module  # the child, the library's own class, weights loaded strictly
    arch: dict  # JSON architecture of the child (``build_model(arch)`` rebuilds it)
    parent_arch: dict
    plan: Plan
    importance: Importance


def subclone(
    parent: nn.Module,
    calib: Iterable[dict],
    *,
    layers: int | None = None,
    width: int | None = None,
    heads: int | None = None,
    mlp_hidden: int | None = None,
    scale: str = "paper",
    block_select: str = "middle",
) -> SubcloneResult:
    """Subclone ``parent`` into a smaller model of the same library class (see module docstring)."""
    fam = family_of(parent)
    parent_arch = fam.arch(parent)
    pd = fam.dims(parent)
    cd = resolve_dims(pd, layers, width, heads, mlp_hidden)
    imp = measure_importance(parent, calib, fam)
    plan = make_plan(imp, pd, cd, block_select)
    state = apply_plan(parent.state_dict(), fam.rules(parent), plan, scale)
    arch = fam.child_arch(parent_arch, cd)
    child = fam.build(arch)
    child.load_state_dict(state, strict=True)
    child.train(parent.training)
    return SubcloneResult(child, arch, parent_arch, plan, imp)


@torch.no_grad()
def function_check(parent: nn.Module, child: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """Agreement of child and parent outputs on held-out batches.

    ``pearson``: correlation of all output values; ``cosine``: mean per-output-vector cosine; ``top1_agree``:
    fraction of argmax agreements (classes / next tokens). LM outputs ``[B, T, V]`` use only masked-in tokens.
    """
    fp, fc = family_of(parent), family_of(child)
    states = parent.training, child.training
    parent.eval()
    child.eval()
    po, co = [], []
    for batch in batches:
        p, c = fp.run(parent, batch).float(), fc.run(child, batch).float()
        mask = batch.get("mask")
        if p.ndim == 3 and mask is not None:
            p, c = p[mask.bool()], c[mask.bool()]
        po.append(p.reshape(-1, p.shape[-1]))
        co.append(c.reshape(-1, c.shape[-1]))
    parent.train(states[0])
    child.train(states[1])
    p, c = torch.cat(po), torch.cat(co)
    pearson = torch.corrcoef(torch.stack([p.reshape(-1), c.reshape(-1)]))[0, 1]
    return {
        "pearson": float(pearson),
        "cosine": float(F.cosine_similarity(p, c, dim=-1).mean()),
        "top1_agree": float((p.argmax(-1) == c.argmax(-1)).float().mean()),
        "n_outputs": int(p.shape[0]),
    }


# ------------------------------------------------------------------------------------------------ files
def save_model(out_dir: str | Path, model: nn.Module, arch: dict, extra: dict | None = None) -> Path:
    """Write ``arch.json`` (+ ``extra``) and ``model.safetensors`` atomically; returns ``out_dir``."""
    from vfmkit.data.io import atomic_save_safetensors, atomic_write_bytes
    from vfmkit.engine.checkpoint import module_tensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # module_tensors keeps GPT-2's tied lm_head / wte once, as safetensors' save_model does
    atomic_save_safetensors(out / "model.safetensors", *module_tensors(model))
    atomic_write_bytes(out / "arch.json", json.dumps({**arch, **(extra or {})}, indent=1).encode())
    return out


def read_arch(path: str | Path) -> dict:
    p = Path(path)
    p = p / "arch.json" if p.is_dir() else p
    try:
        arch = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SubcloneError(f"cannot read architecture file {p}: {e}") from e
    if not isinstance(arch, dict) or arch.get("family") not in FAMILIES:
        raise SubcloneError(f"{p} does not describe a subclonable model (family {arch.get('family')!r})")
    return arch


def load_model(model_dir: str | Path, weights: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by ``save_model`` (or a vfmkit run dir with ``arch.json``) and load it strictly.

    Returned in eval mode (the engine switches to train mode itself)."""
    from safetensors.torch import load_model as st_load

    d = Path(model_dir)
    arch = read_arch(d)
    model = build_model(arch)
    w = Path(weights) if weights else d / "model.safetensors"
    if not w.is_file():
        raise FileNotFoundError(f"weights not found: {w}")
    try:
        st_load(model, str(w), strict=True)
    except Exception as e:  # a truncated / foreign file: name it
        raise SubcloneError(f"cannot load weights {w} into {arch['family']}: {e}") from e
    return model.eval(), arch


# ------------------------------------------------------------------------------------------- the method
# ``method: subclone`` trains a parent (a timm ViT on images, a GPT-2 on captions), or a child from subclone
# weights (``init``) or at random init (``arch``), through the one engine. Its run dir gets ``arch.json`` (+
# ``vocab.json``) at build time, so a finished run is a loadable parent (``load_model``) for ``vfmkit subclone run``.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class SubcloneTrainArgs:
    """``method_args`` of the subclone training recipes (a parent, or a child from a subclone/random init)."""

    task: str = "vit"  # "vit": image classification; "lm": next-token prediction on captions
    init: str | None = None  # dir with arch.json + model.safetensors: start from these weights (a subclone)
    arch: str | None = None  # dir or arch.json: this architecture, random init (the from-scratch baseline)
    image_size: int = 64
    num_classes: int = 10
    vocab_size: int = 2048
    context_length: int = 32
    vocab: str | None = None  # vocab.json to reuse (a child must use its parent's); default: built from data
    max_train: int = 0  # cap on training samples (0: all)
    max_val: int = 500
    flip: bool = True


def model_stats(model: nn.Module) -> tuple[tuple, tuple]:
    """Normalisation mean/std a vision model expects (timm pretrained_cfg, open_clip's, else ImageNet)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    pp = getattr(model, "preprocess_cfg", None) or {}
    if type(model).__module__.startswith("open_clip"):
        import open_clip

        return tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(
            pp.get("std", open_clip.OPENAI_DATASET_STD)
        )
    return IMAGENET_MEAN, IMAGENET_STD


def load_task_data(cfg: RunConfig, args: SubcloneTrainArgs) -> dict[str, Any]:
    """Real train/val tensors for the recipe: images ``uint8`` + labels, or caption ids + masks + vocab."""
    train = read_samples(cfg.data.train, args.max_train if args.task == "vit" else 0)
    val = read_samples(cfg.data.val, args.max_val) if cfg.data.val else []
    if args.task == "vit":
        x, y = decode_images(train, args.image_size)
        vx, vy = decode_images(val, args.image_size) if val else (x[:0], y[:0])
        return {"train": {"x": x, "y": y}, "val": {"x": vx, "y": vy}}
    texts = [t for s in train for t in s.texts][: args.max_train or None]
    vtexts = [t for s in val for t in s.texts][: args.max_val or None]
    vocab = WordVocab.load(Path(args.vocab)) if args.vocab else WordVocab.build(texts, args.vocab_size)
    ids, mask = vocab.encode(texts, args.context_length)
    vids, vmask = vocab.encode(vtexts, args.context_length)
    return {"train": {"x": ids, "mask": mask}, "val": {"x": vids, "mask": vmask}, "vocab": vocab}


def build_task_model(cfg: RunConfig, args: SubcloneTrainArgs, data: dict) -> nn.Module:
    """The model to train: subclone weights (``init``), an architecture at random init (``arch``), or a new
    parent from ``cfg.model`` (timm ViT name / ``gpt2``)."""
    if args.init and args.arch:
        raise ValueError(
            "method_args.init (subclone weights) and method_args.arch (random init) are exclusive; "
            "set the other to null"
        )
    if args.init:
        return load_model(args.init)[0]
    if args.arch:
        return build_model(read_arch(args.arch))
    if args.task == "vit":
        from vfmkit.models.factory import create_classifier

        return create_classifier(
            cfg.model.name, args.num_classes, img_size=args.image_size, **cfg.model.kwargs
        )
    from transformers import GPT2Config, GPT2LMHeadModel

    v = WordVocab
    conf = GPT2Config(
        vocab_size=len(data["vocab"]),
        n_positions=args.context_length,
        bos_token_id=v.BOS,
        eos_token_id=v.EOS,
        pad_token_id=v.PAD,
        **cfg.model.kwargs,
    )
    return GPT2LMHeadModel(conf)


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over real tokens, and the number of predicted tokens."""
    ids, mask = batch["x"], batch["mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tgt = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)), mask[:, 1:].sum()


def make_loss(args: SubcloneTrainArgs, model: nn.Module) -> Callable:
    mean, std = model_stats(model)

    def vit_loss(m, batch, step):
        x = batch["x"]
        if args.flip and m.training:  # cheap real augmentation: per-sample horizontal flip
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        logits = m(normalize(x, mean, std))
        return F.cross_entropy(logits, batch["y"]), {
            "acc": float((logits.argmax(-1) == batch["y"]).float().mean())
        }

    def text_loss(m, batch, step):
        loss, _ = lm_loss(m, batch)
        return loss, {}

    return vit_loss if args.task == "vit" else text_loss


@torch.no_grad()
def evaluate(model: nn.Module, args: SubcloneTrainArgs, val: dict, batch_size: int = 256) -> dict[str, float]:
    """Validation ``acc``/``loss`` (ViT) or ``loss``/``ppl`` per token (LM) over the whole val set."""
    dev = next(model.parameters()).device
    n = val["x"].shape[0]
    tot_loss, tot_n, correct = 0.0, 0.0, 0.0
    mean, std = model_stats(model)
    for i in range(0, n, batch_size):
        b = {k: v[i : i + batch_size].to(dev) for k, v in val.items()}
        if args.task == "vit":
            logits = model(normalize(b["x"], mean, std))
            tot_loss += float(F.cross_entropy(logits, b["y"], reduction="sum"))
            correct += float((logits.argmax(-1) == b["y"]).sum())
            tot_n += b["x"].shape[0]
        else:
            loss, k = lm_loss(model, b)
            tot_loss, tot_n = tot_loss + float(loss) * float(k), tot_n + float(k)
    out = {"loss": tot_loss / max(tot_n, 1.0)}
    out.update(
        {"acc": correct / max(tot_n, 1.0)}
        if args.task == "vit"
        else {"ppl": float(torch.exp(torch.tensor(out["loss"])))}
    )
    return out


def write_run_files(out_dir: str | Path, model: nn.Module, args: SubcloneTrainArgs, data: dict) -> None:
    """``arch.json`` (the family's architecture + the task args) and, for a language model, ``vocab.json``."""
    from vfmkit.data.io import atomic_write_bytes

    out = Path(out_dir)
    fam = family_of(model)
    atomic_write_bytes(
        out / "arch.json", json.dumps({**fam.arch(model), "task": vars(args)}, indent=1).encode()
    )
    if "vocab" in data:
        data["vocab"].save(out / "vocab.json")


def build(cfg: RunConfig, dist_info: DistInfo, data: dict | None = None) -> Job:
    """The subclone training job. ``data`` (``load_task_data``'s output) may be passed in already loaded."""
    from vfmkit.data.loader import TensorLoader

    args = parse_section(SubcloneTrainArgs, cfg.method_args, "method_args")
    if args.task not in ("vit", "lm"):
        raise ConfigError(f"config key 'method_args.task': must be 'vit' or 'lm', got {args.task!r}")
    data = data or load_task_data(cfg, args)
    torch.manual_seed(cfg.seed)
    model = build_task_model(cfg, args, data)
    if dist_info.is_main:
        write_run_files(cfg.out_dir, model, args, data)
    loader = TensorLoader(
        data["train"],
        cfg.data.batch_size,
        seed=cfg.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    has_val = data["val"]["x"].shape[0] > 0
    eval_fn = (lambda m, step: evaluate(m, args, data["val"])) if has_val else None
    return Job(model, make_loss(args, model), loader, eval_fn=eval_fn, extra={"data": data})
