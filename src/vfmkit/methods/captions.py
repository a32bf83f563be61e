"""Synthetic captions: open_clip CoCa captioners (pretrained or a tiny one trained here) and JSONL caption files.

The same :class:`Captioner` serves a user's pretrained open_clip CoCa (``openclip:coca_ViT-L-14:<tag or file>``)
and the tiny CoCa that :func:`train_tiny_coca` trains offline on Flickr8k train captions. Captions are sampled
with nucleus (top-p) sampling, N per image, seeded per batch so a rerun (or a resumed reinforcement run) gives the
same captions. A caption source can also be a JSONL file with one ``{"uid": ..., "captions": [...]}`` per line.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from vfmkit.data.decode import resize_center_crop
from vfmkit.data.io import atomic_save_safetensors, atomic_write_bytes

CAPTIONER_FORMAT = "vfmkit-captioner/1"
SOT_ID, EOT_ID = 49406, 49407  # open_clip SimpleTokenizer's <start_of_text> / <end_of_text>

# A tiny CoCa (about 14M parameters, most of them the 49k-token embedding and output layer) that trains on CPU.
TINY_COCA_CFG: dict = {
    "embed_dim": 128,
    "vision_cfg": {
        "image_size": 64,
        "layers": 2,
        "width": 128,
        "patch_size": 8,
        "head_width": 32,
        "attentional_pool": True,
        "attn_pooler_heads": 4,
        "attn_pooler_queries": 16,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 128,
        "heads": 4,
        "layers": 2,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 128,
        "heads": 4,
        "layers": 2,
        "attn_pooler_heads": 4,
    },
}


def _init_text_decoder(dec: torch.nn.Module) -> None:
    """CLIP-style init of a CoCa text decoder. open_clip 3.3 never initialises it (its ``init_parameters`` refers to
    a missing ``self.transformer`` and is not called), so ``text_projection`` is left as ``torch.empty`` garbage
    (logits ~1e35) in a model that is not loaded from a checkpoint."""
    proj_std = dec.width**-0.5 * (2 * dec.layers) ** -0.5
    attn_std, fc_std = dec.width**-0.5, (2 * dec.width) ** -0.5
    for block in [*dec.resblocks, *dec.cross_attn]:
        torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    torch.nn.init.normal_(dec.text_projection, std=dec.width**-0.5)


def create_tiny_coca(cfg: dict | None = None) -> open_clip.CoCa:
    """A randomly initialised open_clip CoCa from ``cfg`` (default :data:`TINY_COCA_CFG`)."""
    model = open_clip.CoCa(**json.loads(json.dumps(cfg or TINY_COCA_CFG)))
    _init_text_decoder(model.text_decoder)
    return model


class Captioner(torch.nn.Module):
    """An open_clip CoCa plus its tokenizer and image preprocessing, taking images in [0, 1]."""

    def __init__(
        self,
        model: open_clip.CoCa,
        image_size: int,
        mean: tuple,
        std: tuple,
        model_cfg: dict | None = None,
        name: str = "coca",
        vocab: list[int] | None = None,
    ):
        super().__init__()
        self.model = model.eval()
        self.image_size = int(image_size)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.model_cfg = model_cfg
        self.name = name
        self.context_length = int(model.context_length)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)
        # A compact vocabulary (model id i <-> CLIP BPE id vocab[i]; 0 is padding) makes the tiny CoCa's 49k-way
        # output layer a few-thousand-way one; None keeps open_clip's full vocabulary (pretrained CoCa).
        self.vocab = list(vocab) if vocab is not None else None
        if self.vocab is not None:
            self._to_compact = {t: i for i, t in enumerate(self.vocab) if i > 0}
        self.sot_id = self._to_compact[SOT_ID] if self.vocab is not None else SOT_ID
        self.eot_id = self._to_compact[EOT_ID] if self.vocab is not None else EOT_ID

    def preprocess(self, images: list[Tensor] | Tensor) -> Tensor:
        """Images (each [3, H, W], uint8 or float in [0, 1]) -> normalised [B, 3, S, S] (short-side resize + centre crop)."""
        out = [resize_center_crop(im, self.image_size) for im in images]
        x = torch.stack(out).to(self.mean.device)
        return (x - self.mean) / self.std

    def tokenize(self, texts: list[str]) -> Tensor:
        """Captions -> model token ids [B, context_length] (0-padded; OOV tokens of a compact vocab dropped)."""
        if self.vocab is None:
            return self.tokenizer(texts, context_length=self.context_length)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for r, text in enumerate(texts):
            ids = [self._to_compact[t] for t in self.tokenizer.encode(text) if t in self._to_compact]
            ids = [self.sot_id, *ids[: self.context_length - 2], self.eot_id]
            out[r, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, tokens: Tensor) -> list[str]:
        """Generated ids [B, T] -> captions (the text between start-of-text and the first end-of-text)."""
        texts = []
        for row in tokens.tolist():
            row = row[1:]
            if self.eot_id in row:
                row = row[: row.index(self.eot_id)]
            row = [t for t in row if t != 0]  # padding after an early end
            if self.vocab is not None:
                row = [self.vocab[t] for t in row]
            texts.append(self.tokenizer.decode(row).strip())
        return texts

    @torch.no_grad()
    def generate(
        self,
        images: list[Tensor] | Tensor,
        n: int = 5,
        *,
        top_p: float = 0.9,
        seed: int = 0,
        seq_len: int = 30,
        temperature: float = 1.0,
        min_seq_len: int = 5,
    ) -> list[list[str]]:
        """``n`` nucleus-sampled captions per image -> list (per image) of ``n`` strings.

        Sampling is seeded by ``seed`` (through a forked RNG, so the caller's RNG is untouched): the same images and
        seed give the same captions.
        """
        x = self.preprocess(images).repeat_interleave(n, dim=0)  # [B*n, 3, S, S]: one batched decode for all
        seq_len = min(seq_len, self.context_length - 1)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if getattr(open_clip.coca_model, "_has_transformers", False):
                ids = self.model.generate(
                    x,
                    generation_type="top_p",
                    top_p=top_p,
                    seq_len=seq_len,
                    temperature=temperature,
                    min_seq_len=min_seq_len,
                    sot_token_id=self.sot_id,
                    eos_token_id=self.eot_id,
                )
            else:
                ids = top_p_generate(
                    self.model,
                    x,
                    top_p=top_p,
                    seq_len=seq_len,
                    temperature=temperature,
                    min_seq_len=min_seq_len,
                    sot_id=self.sot_id,
                    eot_id=self.eot_id,
                )
        texts = self.decode(ids)
        return [texts[i * n : (i + 1) * n] for i in range(len(texts) // n)]


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter, as transformers' TopPLogitsWarper: drop the tokens whose ascending cumulative
    probability is <= 1 - top_p, always keeping the most likely one. logits [B, V] -> [B, V]."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))


@torch.no_grad()
def top_p_generate(
    model: open_clip.CoCa,
    images: Tensor,
    *,
    top_p: float = 0.9,
    seq_len: int = 30,
    temperature: float = 1.0,
    min_seq_len: int = 5,
    pad_id: int = 0,
    sot_id: int = SOT_ID,
    eot_id: int = EOT_ID,
) -> Tensor:
    """open_clip ``CoCa.generate(generation_type="top_p")`` without its transformers dependency.

    open_clip 3.3 imports ``BeamSearchScorer`` from transformers, which transformers 5 (needed by
    sentence-transformers 6) removed, so its ``generate`` refuses to run; this is the same loop (min-length
    EOS suppression, top-p, temperature, EOS at ``seq_len``). images [B, 3, S, S] normalised -> ids [B, T<=seq_len].
    """
    was_training = model.training
    model.eval()
    image_latent, image_embs = model._encode_image(images)
    out = torch.full((images.shape[0], 1), sot_id, dtype=torch.long, device=images.device)
    while True:
        cur_len = out.shape[1]
        done = (out[:, -1] == eot_id) | (out[:, -1] == pad_id)
        if done.all():
            break
        logits = model(images, out, image_latent=image_latent, image_embs=image_embs, output_labels=False)[
            "logits"
        ][:, -1][~done]
        if cur_len < min_seq_len:
            logits[:, eot_id] = float("-inf")
        probs = F.softmax(_top_p_filter(logits, top_p) / temperature, dim=-1)
        sample = torch.full((out.shape[0], 1), pad_id, dtype=torch.long, device=out.device)
        if cur_len + 1 == seq_len:
            sample[~done] = eot_id
        else:
            sample[~done] = torch.multinomial(probs, 1)
        out = torch.cat((out, sample), dim=-1)
        if out.shape[1] >= seq_len:
            break
    model.train(was_training)
    return out


def save_captioner(captioner: Captioner, out_dir: str | Path) -> Path:
    """Write ``captioner.json`` + ``model.safetensors`` atomically; reload with :func:`load_captioner`."""
    if captioner.model_cfg is None:
        raise ValueError("only captioners built from a model config (e.g. the tiny CoCa) can be saved here")
    out = Path(out_dir)
    atomic_save_safetensors(out / "model.safetensors", captioner.model)
    meta = {
        "format": CAPTIONER_FORMAT,
        "name": captioner.name,
        "model_cfg": captioner.model_cfg,
        "image_size": captioner.image_size,
        "mean": captioner.mean.flatten().tolist(),
        "std": captioner.std.flatten().tolist(),
        "vocab": captioner.vocab,
    }
    atomic_write_bytes(out / "captioner.json", json.dumps(meta, indent=1).encode())
    return out


def load_captioner(spec: str, device: str = "cpu") -> Captioner:
    """``openclip:NAME:TAG_OR_FILE`` (an open_clip CoCa, e.g. ``openclip:coca_ViT-L-14:mscoco_finetuned_laion2B-s13B-b90k``)
    or a directory written by :func:`save_captioner` (the ``models/spec.py`` grammar)."""
    from vfmkit.models.spec import parse_model_spec

    ms = parse_model_spec(spec)
    if ms.kind == "openclip":
        name = ms.require("openclip", what="captioner", size=False).name
        model = open_clip.create_model(name, pretrained=ms.source, device=device)
        if not isinstance(model, open_clip.CoCa):
            raise ValueError(f"captioner {spec!r}: {name} is not a CoCa model")
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
        return Captioner(model, size, tuple(pp["mean"]), tuple(pp["std"]), name=name).to(device)
    path = Path(spec)
    meta_path = path / "captioner.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"captioner {spec!r}: no {meta_path} (expected openclip:NAME:TAG or a saved dir)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"captioner file {meta_path} is corrupt: {e}") from e
    if meta.get("format") != CAPTIONER_FORMAT:
        raise ValueError(
            f"captioner file {meta_path}: format {meta.get('format')!r} is not {CAPTIONER_FORMAT}"
        )
    from safetensors.torch import load_file

    model = create_tiny_coca(meta["model_cfg"])
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    except Exception as e:  # a truncated/corrupt weights file: name it
        raise ValueError(f"captioner weights {path / 'model.safetensors'} cannot be loaded: {e}") from e
    return Captioner(
        model,
        meta["image_size"],
        tuple(meta["mean"]),
        tuple(meta["std"]),
        model_cfg=meta["model_cfg"],
        name=meta.get("name", "coca"),
        vocab=meta.get("vocab"),
    ).to(device)


def read_captions_jsonl(path: str | Path) -> dict[str, list[str]]:
    """JSONL ``{"uid": str, "captions": [str, ...]}`` per line -> {uid: captions}. Bad lines are named."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                uid, caps = str(rec["uid"]), rec["captions"]
                if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                    raise TypeError("'captions' must be a list of strings")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: bad caption record ({e})") from e
            out[uid] = caps
    return out


def write_captions_jsonl(path: str | Path, captions: dict[str, list[str]]) -> None:
    """{uid: captions} -> JSONL (one record per line, in the dict's order), written atomically."""
    buf = io.StringIO()
    for uid, caps in captions.items():
        buf.write(json.dumps({"uid": uid, "captions": list(caps)}, ensure_ascii=False) + "\n")
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


class CoCaCaptions:
    """Caption source backed by a :class:`Captioner`: ``n`` top-p captions per image, seeded per call."""

    def __init__(self, captioner: Captioner, n: int, top_p: float = 0.9, seq_len: int = 30):
        self.captioner, self.n, self.top_p, self.seq_len = captioner, n, top_p, seq_len

    def describe(self) -> dict:
        return {
            "source": "coca",
            "name": self.captioner.name,
            "n": self.n,
            "top_p": self.top_p,
            "seq_len": self.seq_len,
            "generation": "top_p",
        }

    def __call__(self, uids: list[str], images: list[Tensor], seed: int) -> list[list[str]]:
        """uids [B], images B x [3, H, W] -> B lists of ``n`` captions."""
        return self.captioner.generate(images, self.n, top_p=self.top_p, seed=seed, seq_len=self.seq_len)


class JsonlCaptions:
    """Caption source backed by a JSONL file (uid -> captions); takes the first ``n`` of each uid."""

    def __init__(self, path: str | Path, n: int):
        self.path, self.n = str(path), n
        self.table = read_captions_jsonl(path)

    def describe(self) -> dict:
        return {"source": "jsonl", "path": os.path.basename(self.path), "n": self.n}

    def __call__(self, uids: list[str], images: list[Tensor] | None = None, seed: int = 0) -> list[list[str]]:
        out = []
        for uid in uids:
            caps = self.table.get(uid)
            if caps is None or len(caps) < self.n:
                have = 0 if caps is None else len(caps)
                raise KeyError(f"{self.path}: uid {uid!r} has {have} captions, {self.n} needed")
            out.append(caps[: self.n])
        return out


def make_caption_source(
    spec: str, n: int, *, top_p: float = 0.9, seq_len: int = 30, device: str = "cpu"
) -> CoCaCaptions | JsonlCaptions:
    """``*.jsonl`` / ``jsonl:PATH`` -> :class:`JsonlCaptions`; a captioner spec -> :class:`CoCaCaptions`."""
    if spec.startswith("jsonl:") or spec.endswith(".jsonl"):
        return JsonlCaptions(spec.removeprefix("jsonl:"), n)
    return CoCaCaptions(load_captioner(spec, device=device), n, top_p=top_p, seq_len=seq_len)


# --------------------------------------------------------------------------------------- training the tiny CoCa


@dataclass
class CocaArgs:
    """``method_args`` of the ``coca_tiny`` recipe."""

    caption_loss_weight: float = 2.0
    clip_loss_weight: float = 1.0
    image_size: int = 64
    max_images: int | None = None  # cap on training images (tests, quick runs)
    captions_per_image: int = 5  # caption columns per image; short lists are cycled


def read_image_captions(
    urls: list[str], image_size: int, max_images: int | None
) -> tuple[Tensor, list[list[str]]]:
    """Shards with ``jpg`` + json ``captions`` (or ``txt``) -> (uint8 [N,3,S,S] short-side-resized centre crops,
    N caption lists). Images are shrunk once to the captioner's size so a few thousand fit in memory."""
    from vfmkit.data.decode import decode_uint8
    from vfmkit.data.shards import iter_shard

    images, captions = [], []
    for url in urls:
        for sample in iter_shard(url):
            meta = json.loads(sample["json"]) if "json" in sample else {}
            caps = meta.get("captions") or ([sample["txt"].decode("utf-8")] if "txt" in sample else [])
            if not caps or "jpg" not in sample:
                raise KeyError(
                    f"{url}: sample {sample['__key__']} lacks a jpg or a caption (json 'captions'/txt)"
                )
            img = decode_uint8(sample["jpg"], name=sample["__key__"], backend="torchvision")
            images.append((resize_center_crop(img, image_size) * 255).round().to(torch.uint8))
            captions.append(list(caps))
            if max_images is not None and len(images) >= max_images:
                return torch.stack(images), captions
    if not images:
        raise ValueError(f"no samples in {urls}")
    return torch.stack(images), captions


def build_vocab(captions: list[str], tokenizer: open_clip.SimpleTokenizer) -> list[int]:
    """The compact vocabulary of a caption corpus: [pad slot, SOT, EOT, every CLIP BPE id seen, sorted]."""
    seen = {t for c in captions for t in tokenizer.encode(c)} - {SOT_ID, EOT_ID}
    return [-1, SOT_ID, EOT_ID, *sorted(seen)]


def caption_table(captioner: Captioner, images: Tensor, captions: list[list[str]], per_image: int) -> dict:
    """-> {"image": uint8 [N,3,S,S], "text": long [N, per_image, L]} (short caption lists are cycled)."""
    text = torch.stack([captioner.tokenize([c[i % len(c)] for i in range(per_image)]) for c in captions])
    return {"image": images, "text": text}


def coca_loss_fn(args: CocaArgs, mean: Tensor, std: Tensor):
    """open_clip's CoCaLoss on a batch {"image": uint8 [B,3,S,S], "text": long [B,C,L]}; one caption per image,
    chosen by a generator seeded with the step (so a resumed run picks the same captions)."""
    loss = open_clip.CoCaLoss(
        caption_loss_weight=args.caption_loss_weight, clip_loss_weight=args.clip_loss_weight
    )

    def loss_fn(model, batch: dict, step: int):
        img = (batch["image"].float() / 255.0 - mean.to(batch["image"].device)) / std.to(
            batch["image"].device
        )
        g = torch.Generator().manual_seed(step)
        col = torch.randint(batch["text"].shape[1], (batch["text"].shape[0],), generator=g)
        text = batch["text"][torch.arange(len(col)), col.to(batch["text"].device)]
        out = model(img, text)
        clip_l, cap_l = loss(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
        )
        return clip_l + cap_l, {"clip_loss": float(clip_l.detach()), "caption_loss": float(cap_l.detach())}

    return loss_fn


def caption_shards(
    captioner: Captioner,
    urls: list[str],
    out_path: str | Path,
    n: int = 5,
    *,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 16,
    seq_len: int = 30,
) -> int:
    """Caption every image of ``urls`` (``n`` top-p captions each, batched) and write a JSONL (uid -> captions).

    Batch b is sampled with seed ``seed + b``: the same inputs and settings give the same file. Returns the count.
    """
    from vfmkit.data.decode import decode_uint8
    from vfmkit.data.shards import iter_shard

    table: dict[str, list[str]] = {}
    uids: list[str] = []
    images: list[Tensor] = []
    batch_index = 0

    def flush() -> None:
        nonlocal batch_index
        for uid, caps in zip(
            uids,
            captioner.generate(images, n, top_p=top_p, seed=seed + batch_index, seq_len=seq_len),
            strict=True,
        ):
            table[uid] = caps
        batch_index += 1
        uids.clear()
        images.clear()

    for url in urls:
        for raw in iter_shard(url):
            meta = json.loads(raw["json"]) if "json" in raw else {}
            try:
                img = decode_uint8(raw, backend="torchvision")
            except (KeyError, ValueError) as e:
                raise ValueError(f"{url}: sample {raw['__key__']}: unreadable image ({e})") from e
            uids.append(str(meta.get("uid", raw["__key__"])))
            images.append(img)
            if len(images) == batch_size:
                flush()
    if images:
        flush()
    write_captions_jsonl(out_path, table)
    return len(table)
