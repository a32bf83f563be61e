"""The SAM-CLIP-style merged model (arXiv:2310.15308): one backbone, two heads, a frozen text tower.

- The **shared backbone** is teacher B's (the CamVid ``seg`` model's EfficientNet-Lite0 tower, copied): stem and
  blocks up to (not including) its last stage. Its last stage (the remaining blocks + head conv + BN) stays in
  B's path, so at initialisation the merged model's B output equals teacher B's exactly.
- **Head_B** is B's dense head (a :class:`~vfmkit.eval.dense.DenseHead`), kept as it is.
- **Head_A** is new: a copy of the backbone's last stage (initialised from those weights, as SAM-CLIP
  initialises its CLIP head from the encoder's last layers), then a per-location projection (``ProjectionHead``:
  a linear map + optional residual MLP) into teacher A's embedding space, then pooling (``mean`` or ``max``,
  a constructor parameter) -> the image embedding. The per-location projections before pooling are the dense
  features the zero-shot segmentation reads (:meth:`MergedModel.dense_a`).
- **A's text tower** is teacher A's, frozen and not part of the state dict (it is reloaded from its spec):
  :meth:`MergedModel.attach_text`, :meth:`MergedModel.encode_text`.

``forward(images, task)`` with ``task`` in ``"a"`` (L2-normalised embeddings [B, D]), ``"b"`` (B's logits
[B, K, H, W] at the input size), ``"dense_a"`` (per-location embeddings [B, D, h, w], not normalised) and
``"a_trunk"`` (the input is the backbone's map at the split, ``trunk(images)[0]``, e.g. read from the Stage I
cache: ``"a"`` without the backbone) so the engine's wrapped model (DDP) serves every path through one ``forward``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.eval.dense import DenseHead, Lite0Tower, SegModel
from vfmkit.models.offline_teacher import ProjectionHead

__all__ = ["HeadA", "MergedModel", "build_merged_model", "POOLS"]

POOLS = ("mean", "max")


class HeadA(nn.Module):
    """Copied last stage (``blocks`` + ``conv_head`` + ``bn``) -> per-location ``ProjectionHead`` -> pooling."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        conv_head: nn.Module,
        bn: nn.Module,
        swish: nn.Module,
        in_dim: int,
        embed_dim: int,
        hidden: int = 0,
        pool: str = "mean",
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"Head_A pooling must be one of {POOLS}, got {pool!r}")
        self.blocks, self.conv_head, self.bn, self.swish = blocks, conv_head, bn, swish
        self.proj = ProjectionHead(in_dim, embed_dim, hidden)
        self.pool = pool

    def dense(self, h: Tensor) -> Tensor:
        """Backbone features (the last stage's input) -> per-location embeddings [B, D, h, w]."""
        for b in self.blocks:
            h = b(h)
        f = self.swish(self.bn(self.conv_head(h)))  # [B, C, h, w]
        return self.proj(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def pooled(self, dense: Tensor) -> Tensor:
        return dense.mean(dim=(2, 3)) if self.pool == "mean" else dense.amax(dim=(2, 3))


class MergedModel(nn.Module):
    """Shared backbone (``tower``: B's Lite0 tower, split at ``split``) + ``head_b`` + ``head_a``."""

    def __init__(self, tower: Lite0Tower, head_b: DenseHead, head_a: HeadA, split: int) -> None:
        super().__init__()
        self.tower, self.head_b, self.head_a, self.split = tower, head_b, head_a, int(split)
        self.freeze_bn = True
        self._text: list = []  # teacher A (text tower); a list so it is no submodule (not in the state dict)

    # ---- parameter sets (Stage I freezes the backbone; Stage II gives it and Head_B their own lr) ----
    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.tower.parameters())

    def head_b_parameters(self) -> list[nn.Parameter]:
        return list(self.head_b.parameters())

    def head_a_parameters(self) -> list[nn.Parameter]:
        return list(self.head_a.parameters())

    def train(self, mode: bool = True) -> MergedModel:
        super().train(mode)
        if self.freeze_bn:  # BN statistics stay those of teacher B: small two-domain batches would skew them
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # ---- paths ----
    def trunk(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images -> (features at the last stage's input, B's stride-8 map)."""
        n = self.tower.net
        h = n._swish(n._bn0(n._conv_stem(self.tower.prepare(images))))
        low = None
        for i, block in enumerate(n._blocks[: self.split]):
            h = block(h)
            if i == self.tower._low_index:
                low = h
        return h, low

    def logits_b(self, h: Tensor, low: Tensor | None, size) -> Tensor:
        n = self.tower.net
        for block in n._blocks[self.split :]:
            h = block(h)
        out = n._swish(n._bn1(n._conv_head(h)))
        logits = self.head_b({"out": out, "low": low})
        return F.interpolate(logits, size=list(size), mode="bilinear", align_corners=False)

    def forward(self, images: Tensor, task: str = "a") -> Tensor:
        if (
            task == "a_trunk"
        ):  # ``images`` is already the backbone's map at the split (a cached Stage I input)
            return F.normalize(self.head_a.pooled(self.head_a.dense(images)), dim=-1)
        h, low = self.trunk(images)
        if task == "b":
            return self.logits_b(h, low, images.shape[-2:])
        dense = self.head_a.dense(h)
        if task == "dense_a":
            return dense
        if task == "a":
            return F.normalize(self.head_a.pooled(dense), dim=-1)
        raise ValueError(f"task must be 'a', 'b', 'dense_a' or 'a_trunk', got {task!r}")

    # ---- teacher A's frozen text tower ----
    def attach_text(self, teacher: nn.Module) -> MergedModel:
        """Reuse ``teacher.encode_text`` (frozen; not saved with the merged weights)."""
        self._text = [teacher]
        return self

    def encode_text(self, texts: list[str]) -> Tensor:
        if not self._text:
            raise RuntimeError("merged model: no text tower attached (attach_text(teacher A))")
        return self._text[0].encode_text(texts)


class HeadBView(nn.Module):
    """``model(images) -> B's logits``: the merged model seen as a segmentation model (for the dense evaluator)."""

    def __init__(self, merged: MergedModel) -> None:
        super().__init__()
        self.merged = merged

    def forward(self, images: Tensor) -> Tensor:
        return self.merged(images, "b")


def build_merged_model(
    teacher_b: SegModel,
    embed_dim: int,
    *,
    hidden: int = 0,
    pool: str = "mean",
    head_blocks: int = 1,
    proj_init: Callable[[ProjectionHead], None] | None = None,
) -> MergedModel:
    """The merged model initialised from teacher B (deep-copied: the teacher stays untouched).

    ``head_blocks``: how many of the tower's last blocks form the last stage Head_A copies (EfficientNet-Lite0's
    last stage is its one 320-channel block, so 1). ``proj_init(proj)`` initialises Head_A's projection (e.g. from
    teacher A's own image head, whose input is the same 1280-d Lite0 head-conv feature); None keeps it random.
    """
    if not isinstance(teacher_b.tower, Lite0Tower):
        raise ValueError(
            f"merge: teacher B's tower is {type(teacher_b.tower).__name__}; the merged model splits an "
            "EfficientNet-Lite0 tower (a seg run with tower efficientnet-lite0)"
        )
    tower = copy.deepcopy(teacher_b.tower)
    head_b = copy.deepcopy(teacher_b.head)
    n = tower.net
    nb = len(n._blocks)
    if not 1 <= head_blocks < nb - tower._low_index - 1:
        raise ValueError(f"merge: head_blocks must be in 1..{nb - tower._low_index - 2}, got {head_blocks}")
    split = nb - head_blocks
    head_a = HeadA(
        copy.deepcopy(nn.ModuleList(list(n._blocks[split:]))),
        copy.deepcopy(n._conv_head),
        copy.deepcopy(n._bn1),
        copy.deepcopy(n._swish),
        tower.channels,
        embed_dim,
        hidden,
        pool,
    )
    if proj_init is not None:
        proj_init(head_a.proj)
    for p in [*tower.parameters(), *head_b.parameters(), *head_a.parameters()]:
        p.requires_grad_(True)
    return MergedModel(tower, head_b, head_a, split)


def teacher_a_proj_init(teacher_a: nn.Module) -> Callable[[ProjectionHead], None] | None:
    """An initialiser copying teacher A's image head into Head_A's projection when A is the offline teacher
    (its image head reads the same 1280-d Lite0 feature); None for another teacher."""
    heads = getattr(teacher_a, "heads", None)
    src = getattr(heads, "image_head", None)
    if not isinstance(src, ProjectionHead):
        return None

    def init(proj: ProjectionHead) -> None:
        if (src.mlp is None) != (proj.mlp is None) or src.linear.weight.shape != proj.linear.weight.shape:
            raise ValueError("merge: Head_A's projection does not have teacher A's image head's shape")
        proj.load_state_dict({k: v.detach().clone().float() for k, v in src.state_dict().items()})

    return init
