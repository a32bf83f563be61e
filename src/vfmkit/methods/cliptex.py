"""CLIPTeX (arXiv:2310.14108): CLIP trained with stored expert pseudo-labels through light dense heads.

``L = L_CLIP + lam * sum_t w_t L_t`` where ``L_CLIP`` is open_clip's contrastive loss and each task ``t`` (one per
expert in the pseudo-labelled shards' ``pseudolabels.json``) has a light head (``eval.dense.DenseHead``, linear
or ASPP) on the image tower's spatial map (a ViT's last-block patch tokens, read in the same forward pass that
gives the pooled CLIP embedding). Per task kind: cross-entropy with void ignored (class ids), BCE + soft dice
(probabilities), the scale-invariant log loss (depth). Heads' logits are upsampled (bilinear) to the label size.

Each training sample replays a paired crop + flip on the image and every label: one of the stored parameter
sets (``paug``) when there are any, else a fresh draw from the engine-seeded torch generator; a ``crop=True``
expert's label was made on exactly that region. A sample whose jpg's sha256 differs from the one its labels
were made from (``labels.json``) is a corrupt sample (``LabelMismatchError``): named, counted, not trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job

LABELS_EXT = "labels.json"
META = "pseudolabels.json"


class LabelMismatchError(ValueError):
    """The image is not the one the stored pseudo-labels were made from (sha256 differs)."""


@dataclass
class CliptexArgs:
    loss: str = "clip"
    caption: str = "random"
    lam: float = 1.0  # lambda of L_CLIP + lam * sum_t w_t L_t
    weights: dict = field(default_factory=dict)  # task name -> w_t (default 1)
    head: str = "linear"  # "linear" or "aspp"
    head_width: int = 64
    dice_weight: float = 1.0  # probability tasks: BCE + dice_weight * dice
    scale: tuple = (0.35, 1.0)  # fresh-draw crop area range (when the shards store no paug)
    flip_p: float = 0.5
    max_logit_scale: float = 100.0
    local_loss: bool = True
    gather_with_grad: bool = True
    tasks: list = field(default_factory=list)  # train heads for these tasks only (default: all in the shards)
    freeze_clip: bool = (
        False  # CLIP frozen (e.g. model.pretrained = a CLIP run): only the heads train (a probe)
    )


# ------------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # classes | prob | depth
    num_classes: int | None = None
    void: int | None = None
    crop: bool = False

    @property
    def out_channels(self) -> int:
        return int(self.num_classes) if self.kind == "classes" else 1


def read_tasks(train_spec: str) -> list[Task]:
    """The tasks of pseudo-labelled shards: their ``pseudolabels.json`` (written by ``vfmkit reinforce dense``)."""
    from vfmkit.data.shards import list_shards

    urls = list_shards(train_spec)
    path = Path(urls[0]).parent / META
    if not path.is_file():
        raise ConfigError(
            f"config key 'data.train': {train_spec!r} has no {META} (make it with 'vfmkit reinforce dense')"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    return [
        Task(e["name"], e["kind"], e.get("num_classes"), e.get("void"), bool(e.get("crop")))
        for e in meta["experts"]
    ]


def select_tasks(tasks: list[Task], names) -> list[Task]:
    """The tasks named in ``method_args.tasks`` (all when empty); an unknown name is a config error."""
    if not names:
        return list(tasks)
    unknown = sorted(set(names) - {t.name for t in tasks})
    if unknown:
        raise ConfigError(
            f"config key 'method_args.tasks': no task {unknown} in the shards (tasks: {[t.name for t in tasks]})"
        )
    return [t for t in tasks if t.name in set(names)]


def task_loss(task: Task, logits: Tensor, target: Tensor, dice_weight: float = 1.0) -> Tensor:
    """One task's loss: logits ``[B, C, H, W]`` at the label size, target ``[B, H, W]``."""
    from vfmkit.eval.dense import depth_loss, seg_loss

    if task.kind == "classes":
        return seg_loss(logits, target, task.void)
    if task.kind == "prob":
        z, t = logits[:, 0].float(), target.float()
        bce = F.binary_cross_entropy_with_logits(z, t)
        p = torch.sigmoid(z)
        inter = (p * t).sum(dim=(1, 2))
        dice = 1 - (2 * inter + 1) / (p.sum(dim=(1, 2)) + t.sum(dim=(1, 2)) + 1)
        return bce + dice_weight * dice.mean()
    if task.kind == "depth":
        return depth_loss(logits, target)
    raise ValueError(f"unknown task kind {task.kind!r}")


# ------------------------------------------------------------------------------------------------ model


class CliptexModel(nn.Module):
    """An open_clip CLIP (ViT image tower) + one light head per task on its last-block patch-token map."""

    def __init__(self, clip: nn.Module, tasks: list[Task], head: str = "linear", width: int = 64) -> None:
        from vfmkit.eval.dense import DenseHead

        super().__init__()
        visual = clip.visual
        if not (hasattr(visual, "forward_intermediates") and hasattr(visual, "patch_size")):
            raise ConfigError(
                f"config key 'model.name': cliptex needs an open_clip ViT image tower (spatial "
                f"patch tokens), got {type(visual).__name__}"
            )
        self.clip, self.tasks = clip, list(tasks)
        ch = visual.transformer.width
        self.heads = nn.ModuleDict({t.name: DenseHead(ch, t.out_channels, head, width) for t in tasks})

    def forward(self, images: Tensor, texts: Tensor) -> dict:
        v = self.clip.visual.forward_intermediates(images, indices=1, output_fmt="NCHW")
        fmap = v["image_intermediates"][-1]
        size = images.shape[-2:]
        dense = {
            n: F.interpolate(h({"out": fmap}), size=size, mode="bilinear", align_corners=False)
            for n, h in self.heads.items()
        }
        return {
            "image_features": F.normalize(v["image_features"], dim=-1),
            "text_features": self.clip.encode_text(texts, normalize=True),
            "logit_scale": self.clip.logit_scale.exp(),
            "dense": dense,
        }


def total_loss(clip_value: Tensor, task_values: dict[str, Tensor], lam: float, weights: dict) -> Tensor:
    """``L_CLIP + lam * sum_t w_t L_t``."""
    return clip_value + lam * sum(float(weights.get(n, 1.0)) * v for n, v in task_values.items())


def make_loss_fn(contrastive: nn.Module, tasks: list[Task], args: CliptexArgs):
    def loss_fn(model: nn.Module, batch: dict, step: int):
        o = model(batch["image"], batch["text"])
        lc = contrastive(o["image_features"], o["text_features"], o["logit_scale"])
        lt = {
            t.name: task_loss(t, o["dense"][t.name], batch[f"label_{t.name}"], args.dice_weight)
            for t in tasks
        }
        value = total_loss(lc, lt, args.lam, args.weights)
        logs = {"loss_clip": float(lc.detach()), "logit_scale": float(o["logit_scale"].detach())}
        logs.update({f"loss_{n}": float(v.detach()) for n, v in lt.items()})
        return value, logs

    return loss_fn


# ------------------------------------------------------------------------------------------------ data


def replay_labels(
    image: Tensor, labels: dict[str, Tensor], params, size, crop_tasks=(), interpolation="bilinear"
):
    """Apply one paired augmentation to ``image [3, H, W]`` and each label: a whole-image label gets the same
    crop box + flip as the image (nearest neighbour); a crop task's label (made on the crop's region) is only
    resized (nearest) to ``size`` and flipped. Returns ``(image, {name: label})``."""
    import torchvision.transforms.v2.functional as TF
    from torchvision import tv_tensors
    from torchvision.transforms import InterpolationMode

    i, j, h, w = params.crop
    out = list(size)
    img = TF.resized_crop(
        image, i, j, h, w, out, interpolation=InterpolationMode(interpolation), antialias=True
    )
    res = {}
    for n, lab in labels.items():
        m = tv_tensors.Mask(lab[None])
        m = TF.resize(m, out) if n in crop_tasks else TF.resized_crop(m, i, j, h, w, out)
        res[n] = m.as_subclass(torch.Tensor)[0]
    if params.flip:
        img = TF.horizontal_flip(img)
        res = {n: v.flip(-1) for n, v in res.items()}
    return img, res


def make_cliptex_decoder(
    tasks: list[Task],
    size: tuple[int, int],
    normalize,
    tokenizer,
    caption: str = "random",
    scale=(0.35, 1.0),
    flip_p: float = 0.5,
):
    """raw pseudo-labelled sample -> ``{"image", "text", "label_<task>"...}``; raises
    :class:`LabelMismatchError` when the jpg is not the one the labels were made from."""
    from vfmkit.data.decode import decode_uint8
    from vfmkit.data.dense import DenseAugment, DenseAugParams
    from vfmkit.methods.clip import pick_caption
    from vfmkit.models.experts import decode_output, label_ext

    aug = DenseAugment(size=tuple(size), scale=tuple(scale), flip_p=flip_p)
    crop_tasks = {t.name for t in tasks if t.crop}

    def decode(raw: dict) -> dict:
        if LABELS_EXT not in raw:
            raise KeyError(f"{LABELS_EXT} (not a pseudo-labelled sample)")
        meta = json.loads(raw[LABELS_EXT])
        jpg = raw.get("jpg") or raw.get("jpeg") or raw.get("png")
        if jpg is None:
            raise KeyError("jpg (missing image)")
        got = hashlib.sha256(jpg).hexdigest()
        if got != meta.get("sha256"):
            raise LabelMismatchError(
                f"uid {meta.get('uid')!r}: image sha256 {got[:12]} is not the "
                f"{str(meta.get('sha256'))[:12]} its pseudo-labels were made from"
            )
        image = decode_uint8(raw)
        H, W = image.shape[-2:]
        stored = meta.get("paug") or []
        if stored:
            a = int(torch.randint(len(stored), (1,)))
            params = DenseAugParams.from_json(stored[a])
        else:
            if crop_tasks:
                raise KeyError("paug (a crop expert's labels need stored crops)")
            a, params = None, aug.sample(random.Random(int(torch.randint(0, 2**62, (1,)))), (H, W))
        labels = {}
        for t in tasks:
            ext = label_ext(t, a if t.crop else None)
            if ext not in raw:
                raise KeyError(f"{ext} (missing pseudo-label)")
            labels[t.name] = decode_output(t.kind, raw[ext])
            if not t.crop and tuple(labels[t.name].shape) != (H, W):
                raise LabelMismatchError(
                    f"uid {meta.get('uid')!r}: label {ext} is {tuple(labels[t.name].shape)}, "
                    f"the image {(H, W)}"
                )
        img, labels = replay_labels(image, labels, params, size, crop_tasks)
        out = {"image": normalize(img.float() / 255.0), "text": tokenizer([pick_caption(raw, caption)])[0]}
        out.update({f"label_{n}": v for n, v in labels.items()})
        return out

    return decode


# ------------------------------------------------------------------------------------------------ build


def _write_clip_dir(bundle, out_dir) -> None:
    """``OUT/clip/``: the CLIP part alone (``model.safetensors`` + ``open_clip_config.json``), an ordinary CLIP
    run dir that ``vfmkit eval``, open_clip's ``local-dir:`` and the dense evaluator read."""
    from safetensors.torch import load_file

    from vfmkit.data.io import atomic_save_safetensors
    from vfmkit.models.factory import write_open_clip_files

    out = Path(out_dir) / "clip"
    out.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(Path(out_dir) / "model.safetensors"))
    atomic_save_safetensors(
        out / "model.safetensors", {k[5:]: v for k, v in sd.items() if k.startswith("clip.")}
    )
    write_open_clip_files(bundle, out)


def build(cfg: RunConfig, dist_info: DistInfo) -> Job:
    from torchvision.transforms import v2

    from vfmkit.data.loader import ShardLoader
    from vfmkit.methods.clip import clamp_logit_scale, make_contrastive_loss
    from vfmkit.models.factory import create_clip

    args = parse_section(CliptexArgs, cfg.method_args, "method_args")
    if args.loss != "clip":
        raise ConfigError(f"config key 'method_args.loss': cliptex takes 'clip', got {args.loss!r}")
    if args.head not in ("linear", "aspp"):
        raise ConfigError(f"config key 'method_args.head': {args.head!r} is not 'linear' or 'aspp'")
    tasks = select_tasks(read_tasks(cfg.data.train), args.tasks)
    unknown = sorted(set(args.weights) - {t.name for t in tasks})
    if unknown:
        raise ConfigError(
            f"config key 'method_args.weights': no task {unknown} in the shards "
            f"(tasks: {[t.name for t in tasks]})"
        )
    torch.manual_seed(cfg.seed)
    bundle = create_clip(
        cfg.model.name, cfg.model.pretrained, image_size=cfg.data.image_size, **cfg.model.kwargs
    )
    model = CliptexModel(bundle.model, tasks, args.head, args.head_width)
    if args.freeze_clip:
        model.clip.requires_grad_(False)
    size = bundle.image_size if isinstance(bundle.image_size, (tuple, list)) else (bundle.image_size,) * 2
    decode = make_cliptex_decoder(
        tasks,
        tuple(size),
        v2.Normalize(bundle.mean, bundle.std),
        bundle.tokenizer,
        args.caption,
        args.scale,
        args.flip_p,
    )
    loader = ShardLoader.from_config(cfg, decode, dist_info)
    contrastive = make_contrastive_loss(args.loss, cfg, dist_info, args.local_loss, args.gather_with_grad)
    return Job(
        model,
        make_loss_fn(contrastive, tasks, args),
        loader,
        after_step=lambda m: clamp_logit_scale(getattr(m, "module", m).clip, args.max_logit_scale),
        extra={"bundle": bundle, "tasks": tasks},
        on_final=partial(_write_clip_dir, bundle),
    )


# ------------------------------------------------------------------------------------------------ inference


def load_cliptex(run_dir: str | Path) -> tuple[CliptexModel, object]:
    """A finished ``cliptex`` run (``config.json`` + ``model.safetensors``: CLIP + heads) as ``(model, bundle)``,
    in eval mode. The tasks are read from the run's training shards, as at training time."""
    from safetensors.torch import load_file

    from vfmkit.config import load_config
    from vfmkit.models.factory import create_clip

    run_dir = Path(run_dir)
    cfg = load_config(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    args = parse_section(CliptexArgs, cfg.method_args, "method_args")
    bundle = create_clip(cfg.model.name, None, image_size=cfg.data.image_size, **cfg.model.kwargs)
    model = CliptexModel(
        bundle.model, select_tasks(read_tasks(cfg.data.train), args.tasks), args.head, args.head_width
    )
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return model.eval(), bundle


@torch.no_grad()
def predict_masks(
    model: CliptexModel, bundle, images: Tensor, task: str, threshold: float = 0.5, batch_size: int = 64
) -> Tensor:
    """A ``prob`` task head's mask ``bool [N, H, W]`` (sigmoid > ``threshold``) on ``uint8 [N, 3, H, W]`` images,
    at the images' size: resized (bilinear, antialiased) to the model's input size and normalised as in
    training; the head's logits are upsampled (bilinear) back to ``H x W``."""
    kind = {t.name: t.kind for t in model.tasks}.get(task)
    if kind != "prob":
        raise ValueError(f"predict_masks: task {task!r} is {kind!r}, not a 'prob' task of this model")
    size = bundle.image_size if isinstance(bundle.image_size, (tuple, list)) else (bundle.image_size,) * 2
    mean = torch.tensor(bundle.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.std).view(1, 3, 1, 1)
    was_training = model.training
    model.eval()
    v, head = model.clip.visual, model.heads[task]
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float() / 255.0
        H, W = x.shape[-2:]
        if (H, W) != tuple(size):
            x = F.interpolate(x, size=list(size), mode="bilinear", antialias=True, align_corners=False)
        f = v.forward_intermediates((x - mean) / std, indices=1, output_fmt="NCHW", intermediates_only=True)
        z = F.interpolate(
            head({"out": f["image_intermediates"][-1]}), size=(H, W), mode="bilinear", align_corners=False
        )
        out.append(torch.sigmoid(z[:, 0]) > threshold)
    model.train(was_training)
    return torch.cat(out)
