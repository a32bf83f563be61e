"""Encode shards with a model, in shard order, for evaluation (no shuffling, no dropped samples)."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from vfmkit.data.decode import decode_image


def ordered_loader(spec: str | list[str], decode: Callable, batch_size: int = 128, on_corrupt: str = "skip"):
    """The one evaluation loader: shards in file order, no shuffling, one process, no sample dropped."""
    from vfmkit.data.loader import ShardLoader

    return ShardLoader(
        spec,
        decode,
        batch_size,
        shuffle_buffer=0,
        seed=0,
        num_workers=0,
        on_corrupt=on_corrupt,
        drop_last=False,
    )


@torch.no_grad()
def encode_image_text(
    model,
    tokenizer: Callable,
    preprocess: Callable,
    spec: str,
    batch_size: int = 128,
    device: str = "cpu",
    max_captions: int = 5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-caption shards -> (img_emb [N, D], txt_emb [M, D], txt_img_index [M]), L2-normalised.

    Every caption of an image (json ``captions``, else ``txt``) is a retrieval query of its own.
    """

    def decode(raw):
        caps = json.loads(raw["json"]).get("captions") if "json" in raw else None
        if not caps:
            caps = [raw["txt"].decode() if isinstance(raw["txt"], bytes) else raw["txt"]]
        return {"image": preprocess(decode_image(raw)), "captions": json.dumps(caps[:max_captions])}

    model.eval().to(device)
    imgs, txts = [], []
    for batch in ordered_loader(spec, decode, batch_size):
        f = model.encode_image(batch["image"].to(device))
        imgs.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
        for caps in batch["captions"]:
            caps = json.loads(caps)
            txts.append(caps)
    img_emb = torch.cat(imgs)
    flat, owner = [], []
    for i, caps in enumerate(txts):
        flat.extend(caps)
        owner.extend([i] * len(caps))
    t = []
    for s in range(0, len(flat), batch_size):
        f = model.encode_text(tokenizer(flat[s : s + batch_size]).to(device))
        t.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
    return img_emb, torch.cat(t), torch.tensor(owner)


@torch.no_grad()
def encode_images_labels(
    encode: Callable[[torch.Tensor], torch.Tensor],
    preprocess: Callable,
    spec: str,
    batch_size: int = 128,
    device: str = "cpu",
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-labelled shards (json ``label``) -> (features [N, D], labels [N])."""

    def decode(raw):
        return {"image": preprocess(decode_image(raw)), "label": int(json.loads(raw["json"])["label"])}

    feats, labels = [], []
    for batch in ordered_loader(spec, decode, batch_size):
        f = encode(batch["image"].to(device)).float()
        feats.append((torch.nn.functional.normalize(f, dim=-1) if normalize else f).cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)
