"""FastFill (arXiv:2303.04766): compatible model updates with uncertainty-ordered partial backfilling.

A gallery is embedded by an old model; a new model arrives. A transformation ``h`` maps old features into the
new space, so the gallery stays searchable with new-model queries at once; then the gallery is re-embedded with
the new model in an order. FCT learns ``h`` by plain alignment; FastFill adds the frozen new classifier's
loss on ``h(old)`` and a per-sample uncertainty ``s = log sigma^2``:

    L_i  = mu_sim * ||phi_new(x_i) - h(phi_old(x_i))||^2 + mu_disc * CE_ls(W_new h(phi_old(x_i)), y_i)
    loss = mean_i [ 1/2 exp(-s_i) L_i + mu_unc * s_i ]

and backfills the items with the highest predicted ``sigma`` first. The alignment is the *summed* squared error
between l2-normalised features, h(old) included (it lies in [0, 4], comparable to CE; the official code's mean
over ``d`` is ``mu_sim = 1/d``): retrieval and the oracle compare normalised features, so ``s`` must learn the
error of the normalised h(old). (Aligning the raw h(old) let its norm absorb the error: sigma then did not
correlate with the retrieval-space error at all.) Following the pilot note in METHODS.md, the uncertainty head reads h's last hidden layer
(optionally through a stop-gradient), never the transformed feature itself. No BatchNorm: batch size 1 works.

Pipeline (``vfmkit.pipelines.backfill.run_backfill``, used by ``vfmkit backfill`` and ``benchmarks/fastfill.py``): cache features
(safetensors, one file per shard, resumable) -> train h with the engine (TensorLoader) -> simulate curves with
``vfmkit.eval.backfill`` -> JSON + PNG report.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.config import ConfigError, RunConfig, load_config, parse_section, to_dict
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job

OBJECTIVES = ("fct", "fastfill")
UNCERTAINTY_INPUTS = ("hidden", "hidden_detached", "output")


@dataclass
class FastFillArgs:
    """``method_args`` of a backfill run (validated strictly by ``parse_section``)."""

    # Setting: encoders as specs (see ``load_encoder``), data as shard specs.
    old_encoder: str = "timm:resnet10t:random@64"
    new_encoder: str = "efficientnet-lite0@224"
    class_index: list[int] | None = None  # columns of the new model's own classifier, per label (None: all)
    new_classifier: str = "model"  # "model": the new encoder's head (else a probe), "probe": a linear probe
    num_classes: int = 10
    train_set: str = "builtin:imagenette/train"  # where h (and a probe) are fitted
    gallery: str = "builtin:imagenette/train"
    query: str = "builtin:imagenette/val"  # "gallery": the gallery itself, with self-matches excluded
    encode_batch_size: int = 64
    init_seed: int = 0  # seeds random-init encoders so every step of a run sees the same model
    normalize: bool = True  # l2-normalise cached features before h and retrieval
    # Transformation h.
    objectives: list[str] = field(default_factory=lambda: ["fct", "fastfill"])
    hidden_dim: int = 512
    depth: int = 2  # hidden layers
    uncertainty_input: str = "hidden_detached"
    mu_sim: float = 1.0
    mu_disc: float = 1.0
    mu_unc: float = 0.5
    label_smoothing: float = 0.1
    probe_steps: int = 300
    probe_lr: float = 2e-3  # the probe's own lr: a soft head (train acc ~75%), not an overfit one (see docs)
    # ``vfmkit train`` (method fastfill): which h one run trains ("": the first objective) and where the cached
    # features and the new head live ("": out_dir). The backfill pipeline sets both per h.
    objective: str = ""
    work_dir: str = ""
    # Simulation: "<h>/<order>" with h in none|fct|fastfill and order in random|sigma|oracle.
    curves: list[str] = field(
        default_factory=lambda: [
            "none/random",
            "fct/random",
            "fastfill/random",
            "fastfill/sigma",
            "fastfill/oracle",
        ]
    )
    fraction_steps: int = 21
    order_seed: int = 0
    block_size: int = 1024


def parse_args(cfg: RunConfig) -> FastFillArgs:
    """``cfg.method_args`` -> FastFillArgs; unknown keys or bad values raise ConfigError naming them."""
    a = parse_section(FastFillArgs, cfg.method_args, "method_args")
    for o in a.objectives:
        if o not in OBJECTIVES:
            raise ConfigError(
                f"method_args.objectives: unknown objective {o!r} (known: {', '.join(OBJECTIVES)})"
            )
    if a.uncertainty_input not in UNCERTAINTY_INPUTS:
        raise ConfigError(f"method_args.uncertainty_input must be one of {UNCERTAINTY_INPUTS}")
    if a.new_classifier not in ("model", "probe"):
        raise ConfigError("method_args.new_classifier must be 'model' or 'probe'")
    for c in a.curves:
        h, _, order = c.partition("/")
        if h not in ("none", *a.objectives) or order not in ("random", "sigma", "oracle"):
            raise ConfigError(
                f"method_args.curves: bad curve {c!r} (use <none|objective>/<random|sigma|oracle>)"
            )
        if order == "sigma" and h != "fastfill":
            raise ConfigError(f"method_args.curves: {c!r}: only fastfill predicts sigma")
    return a


# ----------------------------------------------------------------------------------------------- transformation


class Transformation(nn.Module):
    """h: old features ``[B, D_old]`` -> (new-space features ``[B, D_new]``, ``s = log sigma^2`` ``[B]`` or None).

    An MLP (Linear-LayerNorm-GELU blocks, no BatchNorm so any batch size works). The uncertainty head is a
    small MLP on the last hidden layer (``hidden``), the same through a stop-gradient (``hidden_detached``),
    or on the output (``output``, the variant that collapsed in the pilot; kept for ablations).
    """

    def __init__(
        self,
        d_old: int,
        d_new: int,
        hidden: int = 512,
        depth: int = 2,
        uncertainty: str | None = "hidden_detached",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_old
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(d, d_new)
        self.uncertainty = uncertainty
        self.unc_head = None
        if uncertainty is not None:
            d_in = d_new if uncertainty == "output" else d
            self.unc_head = nn.Sequential(nn.Linear(d_in, 128), nn.GELU(), nn.Linear(128, 1))
        self.dims = {
            "d_old": d_old,
            "d_new": d_new,
            "hidden": hidden,
            "depth": depth,
            "uncertainty": uncertainty,
        }

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        hid = self.body(x)
        z = self.out(hid)
        if self.unc_head is None:
            return z, None
        u = {"hidden": hid, "hidden_detached": hid.detach(), "output": z}[self.uncertainty]
        return z, self.unc_head(u).squeeze(-1)


class _TrainWrapper(nn.Module):
    """h plus the new model's frozen classifier (buffers: they move with the model and never train)."""

    def __init__(self, h: Transformation, cls_w: Tensor | None, cls_b: Tensor | None, normalize: bool = True):
        super().__init__()
        self.h, self.normalize = h, normalize
        self.register_buffer("cls_w", None if cls_w is None else cls_w.detach().clone().float())
        self.register_buffer("cls_b", None if cls_b is None else cls_b.detach().clone().float())

    def forward(self, old: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        z, s = self.h(old)
        # Retrieval compares l2-normalised features, so both the alignment and the head see h(old) as
        # retrieval will (the returned z is the normalised one).
        zc = F.normalize(z, dim=1) if self.normalize else z
        logits = None if self.cls_w is None else F.linear(zc, self.cls_w, self.cls_b)
        return zc, s, logits


def fastfill_loss(
    z: Tensor,
    new: Tensor,
    s: Tensor | None,
    logits: Tensor | None,
    labels: Tensor | None,
    *,
    mu_sim: float = 1.0,
    mu_disc: float = 1.0,
    mu_unc: float = 0.5,
    label_smoothing: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """Per-sample FastFill loss, uncertainty-weighted when ``s`` is given (FCT: ``s=None``, ``mu_disc=0``).

    z, new: ``[B, D]`` transformed old and new features; s: ``[B]`` log sigma^2; logits: ``[B, C]`` from the
    frozen new classifier on z; labels: ``[B]``. Returns (scalar loss, logs).
    """
    align = (new - z).pow(2).sum(1)
    per = mu_sim * align
    logs = {"align": float(align.mean().detach())}
    if mu_disc and logits is not None:
        ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
        per = per + mu_disc * ce
        logs["ce"] = float(ce.mean().detach())
        logs["acc"] = float((logits.argmax(1) == labels).float().mean())
    if s is None:
        return per.mean(), logs
    logs["log_sigma2"] = float(s.mean().detach())
    return (0.5 * torch.exp(-s) * per + mu_unc * s).mean(), logs


def _sub_config(cfg: RunConfig, **train_over: object) -> RunConfig:
    """A copy of ``cfg`` with ``train`` fields overridden (e.g. the probe's own step count)."""
    d = to_dict(cfg)
    d["train"].update(train_over)
    return load_config(d)


def train_transformation(
    cfg: RunConfig,
    old: Tensor,
    new: Tensor,
    labels: Tensor,
    objective: str,
    classifier: tuple[Tensor, Tensor] | None,
    out_dir: str | Path,
    args: FastFillArgs | None = None,
) -> Transformation:
    """Fit h on cached features (method ``fastfill`` through ``registry.run_job``); returns h in eval mode
    (weights also in ``out_dir``).

    old: ``[N, D_old]``, new: ``[N, D_new]``, labels: ``[N]``; classifier: the frozen new head
    ``(W [C, D_new], b [C])`` used by ``fastfill``. ``cfg.data.batch_size``/``optim``/``train`` apply.
    """
    from vfmkit.config import derive
    from vfmkit.methods.registry import run_job

    a = args or parse_args(cfg)
    sub = derive(
        cfg,
        {"method": "fastfill", "out_dir": str(out_dir), "method_args": {**asdict(a), "objective": objective}},
    )
    job, _ = run_job(sub, build_kwargs={"tensors": (old, new, labels), "classifier": classifier})
    return job.extra["h"].eval()


def build(
    cfg: RunConfig,
    dist_info: DistInfo,
    tensors: tuple[Tensor, Tensor, Tensor] | None = None,
    classifier: tuple[Tensor, Tensor] | None = None,
) -> Job:
    """One h (``method_args.objective``, default the first of ``objectives``) on cached (old, new, label)
    features. Without ``tensors`` the train-set features are cached (resumable) and the new head is taken or
    fitted in ``method_args.work_dir`` (default ``out_dir``), as the backfill pipeline's first steps do."""
    from vfmkit.data.loader import TensorLoader

    a = parse_args(cfg)
    objective = a.objective or a.objectives[0]
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    if tensors is None:
        work = Path(a.work_dir or cfg.out_dir)
        paths = {r: p for r, p in step_cache(cfg, a, work, roles=("old_train", "new_train")).items()}
        old, labels = _load_role(paths, "old_train", a.normalize)
        new, _ = _load_role(paths, "new_train", a.normalize)
        classifier = _new_classifier(cfg, a, new, labels, work)
    else:
        old, new, labels = tensors
    if objective == "fastfill" and classifier is None:
        raise ValueError("fastfill needs the new model's classifier (W, b)")
    torch.manual_seed(cfg.seed)  # h's init is part of the run, like the data order
    unc = a.uncertainty_input if objective == "fastfill" else None
    h = Transformation(old.shape[1], new.shape[1], a.hidden_dim, a.depth, unc)
    w, b = classifier if (objective == "fastfill" and classifier is not None) else (None, None)
    model = _TrainWrapper(h, w, b, a.normalize)
    mu_disc = a.mu_disc if objective == "fastfill" else 0.0

    def loss_fn(m: nn.Module, batch: dict, step: int) -> tuple[Tensor, dict[str, float]]:
        z, s, logits = m(batch["old"])
        return fastfill_loss(
            z.float(), batch["new"], None if s is None else s.float(), None if logits is None else logits.float(),
            batch["label"], mu_sim=a.mu_sim, mu_disc=mu_disc, mu_unc=a.mu_unc, label_smoothing=a.label_smoothing,
        )  # fmt: skip

    bs = min(cfg.data.batch_size, old.shape[0])
    loader = TensorLoader(
        {"old": old, "new": new, "label": labels},
        batch_size=bs,
        seed=cfg.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    return Job(model, loss_fn, loader, extra={"h": h})


def fit_probe(
    cfg: RunConfig,
    feats: Tensor,
    labels: Tensor,
    num_classes: int,
    steps: int,
    out_dir: str | Path,
    lr: float | None = None,
) -> nn.Linear:
    """A linear classifier ``[C, D]`` on (new) features ``[N, D]`` via the engine (the new head when the new model
    has none, or ``new_classifier: probe``). ``lr`` is its own (default ``cfg.optim.lr``): the head's logit scale
    matters, an overfit probe with huge weights pushes h(old) onto class prototypes (see docs/fastfill.md)."""
    from vfmkit.eval.probe import fit_linear_head

    torch.manual_seed(cfg.seed)
    head = nn.Linear(feats.shape[1], num_classes)
    d = to_dict(cfg)
    d["train"].update(steps=steps)
    d["optim"].update(weight_decay=0.0, lr=cfg.optim.lr if lr is None else lr)
    return fit_linear_head(head, feats, labels, load_config(d), out_dir)


@torch.no_grad()
def apply_transformation(
    h: Transformation, old: Tensor, batch_size: int = 4096
) -> tuple[Tensor, Tensor | None]:
    """h over ``old [N, D_old]`` in batches -> (``[N, D_new]`` on CPU, ``s [N]`` or None)."""
    h.eval()
    dev = next(h.parameters()).device
    zs, ss = [], []
    for i in range(0, old.shape[0], batch_size):
        z, s = h(old[i : i + batch_size].to(dev).float())
        zs.append(z.float().cpu())
        if s is not None:
            ss.append(s.float().cpu())
    return torch.cat(zs), (torch.cat(ss) if ss else None)


def save_transformation(h: Transformation, path: str | Path) -> None:
    """Weights as safetensors + its dims in the metadata, written atomically."""
    from vfmkit.data.io import atomic_save_safetensors

    atomic_save_safetensors(path, h, metadata={"dims": json.dumps(h.dims)})


def load_transformation(path: str | Path) -> Transformation:
    """Inverse of ``save_transformation`` (safetensors only: nothing is unpickled)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    try:
        with safe_open(str(p), "pt") as f:
            dims = json.loads(f.metadata()["dims"])
        sd = load_file(str(p))
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"cannot read transformation weights {p}: {e}") from e
    h = Transformation(dims["d_old"], dims["d_new"], dims["hidden"], dims["depth"], dims["uncertainty"])
    h.load_state_dict(sd)
    return h.eval()


# ----------------------------------------------------------------------------------------------- encoders


class ImageEncoder(nn.Module):
    """Frozen image encoder: images ``[B, 3, H, W]`` (float in [0, 1] or uint8) -> features ``[B, D]``.

    ``classifier`` (or None) is the model's own linear head on those features, ``(W [C, D], b [C])``.
    """

    def __init__(
        self, spec: str, body: nn.Module, fn, size: int, mean, std, classifier=None, interp="bilinear"
    ):
        super().__init__()
        self.spec, self.body, self.fn, self.image_size, self.interpolation = (
            spec,
            body.eval(),
            fn,
            size,
            interp,
        )
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.classifier = classifier
        for p in self.body.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        from vfmkit.data.decode import resize_center_crop

        x = images.to(self.mean.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (resize_center_crop(x, self.image_size, self.interpolation) - self.mean) / self.std
        return self.fn(self.body, x).float()


def _timm_encoder(
    spec: str, name: str, src: str, size: int | None, num_classes: int, seed: int
) -> ImageEncoder:
    """``timm:NAME:random`` (seeded init), ``timm:NAME:pretrained`` (timm hub) or ``timm:NAME:CKPT``."""
    import timm

    from vfmkit.models.factory import create_timm_from_state, load_state_dict

    if src in ("", "random"):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    elif src == "pretrained":
        model = timm.create_model(name, pretrained=True)
    else:
        if not Path(src).is_file():
            raise FileNotFoundError(f"encoder checkpoint not found: {src} (in spec {spec!r})")
        model = create_timm_from_state(name, load_state_dict(src))
    dc = timm.data.resolve_data_config({}, model=model)
    head_mod = model.get_classifier()
    cls = (head_mod.weight, head_mod.bias) if isinstance(head_mod, nn.Linear) else None
    fn = lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True)  # noqa: E731
    return ImageEncoder(spec, model, fn, size or dc["input_size"][-1], dc["mean"], dc["std"], cls)


def _lite0_encoder(spec: str, size: int | None) -> ImageEncoder:
    from vfmkit.models.teachers import LITE_MEAN, LITE_STD, build_efficientnet_lite0

    s = size or 224
    model = build_efficientnet_lite0(s)
    fn = lambda m, x: m.extract_features(x).mean((2, 3))  # noqa: E731  # the pooled 1280-d pre-logits
    return ImageEncoder(spec, model, fn, s, LITE_MEAN, LITE_STD, (model._fc.weight, model._fc.bias))


def _clip_encoder(spec: str, name: str, pretrained: str | None, size: int | None) -> ImageEncoder:
    from vfmkit.models.factory import create_clip

    b = create_clip(name, pretrained or None, image_size=size)
    fn = lambda m, x: m.encode_image(x)  # noqa: E731
    return ImageEncoder(spec, b.model, fn, size or b.image_size, b.mean, b.std, None, "bicubic")


def load_encoder(
    spec: str, num_classes: int = 10, seed: int = 0, class_index: list[int] | None = None
) -> ImageEncoder:
    """An image encoder from a spec; ``@SIZE`` at the end sets the input size.

    ``timm:NAME:{random|pretrained|CKPT}``, ``clip:NAME[:PRETRAINED]`` (open_clip or vfmkit tiny names;
    PRETRAINED a tag or a local file), ``efficientnet-lite0``. ``class_index`` selects the rows of the model's
    own classifier per label (e.g. Imagenette's ImageNet indices for EfficientNet-Lite0).
    """
    from vfmkit.models.spec import ModelSpecError, parse_model_spec

    try:
        ms = parse_model_spec(spec)
    except ModelSpecError as e:
        raise ConfigError(str(e)) from e
    if ms.kind == "timm":
        enc = _timm_encoder(spec, ms.name, ms.source or "", ms.size, num_classes, seed)
    elif ms.kind == "openclip":
        enc = _clip_encoder(spec, ms.name, ms.source, ms.size)
    elif ms.kind == "efficientnet-lite0":
        enc = _lite0_encoder(spec, ms.size)
    else:
        raise ConfigError(
            f"unknown encoder spec {spec!r}: use timm:NAME:SRC, clip:NAME[:PRETRAINED], efficientnet-lite0"
        )
    if enc.classifier is not None:
        w, b = (t.detach().float() for t in enc.classifier)
        if class_index is not None:
            if max(class_index) >= w.shape[0]:
                raise ConfigError(
                    f"class_index {max(class_index)} out of range for {spec!r}'s {w.shape[0]}-way head"
                )
            idx = torch.tensor(class_index, dtype=torch.long)
            w, b = w[idx], b[idx]
        enc.classifier = (w, b)
    return enc


# ----------------------------------------------------------------------------------------------- feature cache


def _decode_fn(size: int):
    """Raw webdataset sample -> ``{"image": uint8 [3, size, size], "label": int, "key": str}``; raises if bad."""
    from vfmkit.data.decode import decode_uint8, resize_center_crop

    def decode(raw: dict) -> dict:
        img = resize_center_crop(decode_uint8(raw["jpg"], name=raw.get("__key__")), size)
        meta = json.loads(raw["json"])
        return {
            "image": (img * 255.0).round().to(torch.uint8),
            "label": int(meta["label"]),
            "key": raw["__key__"],
        }

    return decode


def _save_features(path: Path, feats: Tensor, labels: Tensor, keys: list[str], meta: dict) -> None:
    from vfmkit.data.io import atomic_save_safetensors

    md = {"keys": json.dumps(keys), **{k: json.dumps(v) for k, v in meta.items()}}
    atomic_save_safetensors(path, {"features": feats, "labels": labels}, metadata=md)


def load_features(path: str | Path) -> dict:
    """A feature cache -> ``{"features": [N, D] float32, "labels": [N] int64, "keys": [N] str, "meta": dict}``.

    Raises ValueError naming the file when it is truncated, foreign or inconsistent.
    """
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), "pt") as f:
            md = f.metadata() or {}
            out = {"features": f.get_tensor("features"), "labels": f.get_tensor("labels")}
        out["keys"] = json.loads(md.pop("keys"))
        out["meta"] = {k: json.loads(v) for k, v in md.items()}
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"corrupt feature cache {p}: {e}") from e
    n = out["features"].shape[0]
    if out["labels"].shape != (n,) or len(out["keys"]) != n:
        raise ValueError(
            f"corrupt feature cache {p}: {n} features, {out['labels'].shape[0]} labels, {len(out['keys'])} keys"
        )
    return out


@torch.no_grad()
def _encode_shard(
    enc: ImageEncoder, url: str, batch_size: int, on_corrupt: str
) -> tuple[Tensor, Tensor, list, int]:
    from vfmkit.eval.features import ordered_loader

    loader = ordered_loader(url, _decode_fn(enc.image_size), batch_size, on_corrupt)
    feats, labels, keys = [], [], []
    for batch in loader:
        feats.append(enc(batch["image"]).cpu())
        labels.append(torch.as_tensor(batch["label"]).long())
        keys.extend(batch["key"])
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [], loader.n_corrupt
    return torch.cat(feats), torch.cat(labels), keys, loader.n_corrupt


def cache_features(
    enc: ImageEncoder, data: str, out_path: str | Path, *, batch_size: int = 64, on_corrupt: str = "skip"
) -> Path:
    """Encode every sample of shard spec ``data`` -> safetensors at ``out_path`` (features in the keys' order).

    Resumable: each shard is written to ``<out>.parts/`` atomically and skipped on a rerun; the parts are
    merged at the end. Returns ``out_path``.
    """
    from vfmkit.data.shards import list_shards

    out = Path(out_path)
    if out.is_file():
        return out
    parts = out.with_name(out.name + ".parts")
    dev = next(iter(enc.buffers())).device
    urls = list_shards(data)
    if not urls:
        raise FileNotFoundError(f"no shards in {data!r}")
    n_corrupt = 0
    for i, url in enumerate(urls):
        part = parts / f"{i:05d}.safetensors"
        if part.is_file():
            continue
        f, y, k, nc = _encode_shard(enc, url, batch_size, on_corrupt)
        n_corrupt += nc
        _save_features(part, f, y, k, {"url": str(url), "n_corrupt": nc})
    loaded = [load_features(parts / f"{i:05d}.safetensors") for i in range(len(urls))]
    loaded = [x for x in loaded if x["features"].numel()]
    feats = torch.cat([x["features"] for x in loaded])
    meta = {"encoder": enc.spec, "data": data, "device": str(dev),
            "n_corrupt": sum(x["meta"].get("n_corrupt", 0) for x in loaded)}  # fmt: skip
    _save_features(
        out, feats, torch.cat([x["labels"] for x in loaded]), sum((x["keys"] for x in loaded), []), meta
    )
    for i in range(len(urls)):
        (parts / f"{i:05d}.safetensors").unlink(missing_ok=True)
    parts.rmdir()
    return out


# ----------------------------------------------------------------------------------------------- pipeline


def _cache_name(role: str, spec: str, data: str, a: FastFillArgs) -> str:
    """File name keyed by everything that changes the features (a checkpoint's size and mtime included)."""
    import hashlib

    from vfmkit.models.spec import parse_model_spec

    ckpt = parse_model_spec(spec).source or ""
    stamp = [os.path.getsize(ckpt), os.path.getmtime(ckpt)] if os.path.isfile(ckpt) else None
    key = json.dumps([spec, data, a.init_seed, a.num_classes, stamp])
    return f"{role}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.safetensors"


def _feature_jobs(a: FastFillArgs) -> dict[str, tuple[str, str]]:
    """Cache role -> (encoder spec, data spec); query-side ones only when the query set is not the gallery."""
    jobs = {"old_train": (a.old_encoder, a.train_set), "new_train": (a.new_encoder, a.train_set),
            "old_gallery": (a.old_encoder, a.gallery), "new_gallery": (a.new_encoder, a.gallery)}  # fmt: skip
    if a.query != "gallery":
        jobs.update(old_query=(a.old_encoder, a.query), new_query=(a.new_encoder, a.query))
    return jobs


def step_cache(
    cfg: RunConfig, a: FastFillArgs, out: Path, roles: tuple[str, ...] | None = None
) -> dict[str, Path]:
    """Encode train/gallery/query (or only ``roles``) with both encoders (skipping caches already on disk)."""
    paths, encoders = {}, {}
    for role, (spec, data) in _feature_jobs(a).items():
        if roles is not None and role not in roles:
            continue
        p = out / "features" / _cache_name(role.split("_")[0], spec, data, a)
        if not p.is_file():
            if spec not in encoders:
                ci = a.class_index if role.startswith("new") else None
                encoders[spec] = load_encoder(spec, a.num_classes, a.init_seed, ci)
            print(f"[backfill] caching {role}: {spec} on {data}", flush=True)
            cache_features(
                encoders[spec], data, p, batch_size=a.encode_batch_size, on_corrupt=cfg.data.on_corrupt
            )
        paths[role] = p
    return paths


def _load_role(paths: dict[str, Path], role: str, normalize: bool) -> tuple[Tensor, Tensor]:
    d = load_features(paths[role])
    f = d["features"].float()
    return (F.normalize(f, dim=1) if normalize else f), d["labels"].long()


def _new_classifier(
    cfg: RunConfig, a: FastFillArgs, x: Tensor, y: Tensor, out: Path
) -> tuple[Tensor, Tensor]:
    """The frozen new head ``(W [C, D], b [C])``: the new model's own (rescaled for normalised features), or a probe.

    The model's head was trained on unnormalised features; on l2-normalised ones its logits shrink by the
    feature norm, so W is multiplied by the mean training-feature norm (a single scalar: ranking unchanged).
    """
    path = out / "new_classifier.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        sd = load_file(str(path))
        return sd["weight"], sd["bias"]
    head = None
    if a.new_classifier == "model":
        enc = load_encoder(a.new_encoder, a.num_classes, a.init_seed, a.class_index)
        if enc.classifier is not None and enc.classifier[0].shape == (a.num_classes, x.shape[1]):
            w, b = enc.classifier
            if a.normalize:
                raw = load_features(_cache_path(out, "new_train", a))["features"].float()
                w = w * raw.norm(dim=1).mean()
            head = (w, b)
    if head is None:
        print("[backfill] fitting a linear probe on the new features as the new head", flush=True)
        lin = fit_probe(cfg, x, y, a.num_classes, a.probe_steps, out / "runs" / "probe", a.probe_lr)
        head = (lin.weight.detach().cpu(), lin.bias.detach().cpu())
    from vfmkit.data.io import atomic_save_safetensors

    atomic_save_safetensors(path, {"weight": head[0], "bias": head[1]})
    return head


def _cache_path(out: Path, role: str, a: FastFillArgs) -> Path:
    spec, data = _feature_jobs(a)[role]
    return out / "features" / _cache_name(role.split("_")[0], spec, data, a)


def _gallery_query(a: FastFillArgs, out: Path) -> dict[str, Tensor]:
    paths = {r: _cache_path(out, r, a) for r in _feature_jobs(a)}
    g = {}
    g["old_g"], g["y_g"] = _load_role(paths, "old_gallery", a.normalize)
    g["new_g"], _ = _load_role(paths, "new_gallery", a.normalize)
    if a.query == "gallery":
        g["old_q"], g["new_q"], g["y_q"] = g["old_g"], g["new_g"], g["y_g"]
    else:
        g["old_q"], g["y_q"] = _load_role(paths, "old_query", a.normalize)
        g["new_q"], _ = _load_role(paths, "new_query", a.normalize)
    return g
