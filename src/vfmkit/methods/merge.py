"""``method: merge``: SAM-CLIP-style merging (arXiv:2310.15308) of a language-aligned teacher A and a dense
teacher B into one backbone (``vfmkit.models.merge``), through the one engine.

Losses (per-task weights ``w_a``, ``w_b``):

- ``L_A = 1 - cos(pool(Head_A(backbone(x))), A.encode_image(x))`` on image-text shards (``data.train``, e.g.
  Flickr8k train; only the images are used: A's embedding is the target);
- ``L_B``: dense distillation to teacher B on dense shards (``method_args.dense_train``, e.g. CamVid train; the
  labels are unused, B's logits are the target): per-pixel KL at temperature ``temperature`` (``kl``) or focal +
  dice against B's argmax / probabilities (``focal_dice``).

Two data streams per optimiser step: the loader (:class:`TwoStreamLoader`) yields ``{"a": batch_a, "b": batch_b}``
and the loss is ``w_a * L_A + w_b * L_B``, so one engine step accumulates the gradients of both streams into one
optimiser update (the engine's ``grad_accum`` still works on top: each micro-batch then holds both streams). Each
stream keeps its own resumable position, saved with the engine's checkpoint.

Stages (``method_args.stage``):

- ``probe`` (Stage I): Head_A only, backbone and Head_B frozen; stream A only;
- ``multitask`` (Stage II): both losses, both streams; per-parameter-group learning-rate multipliers via
  ``Job.groups`` (``lr_mult_backbone``, ``lr_mult_head_b``, ``lr_mult_head_a``; the paper: 0.1x on the encoder
  and Head_SAM);
- ``a_only``: everything trains on ``L_A`` only (the fine-tuned end of the weight-interpolation baseline).

``init_from`` (a previous merge run folder) loads its ``model.safetensors`` into the model first (Stage II from
Stage I). ``teacher_b`` is a ``seg`` run folder (the CamVid teacher); a tower spec instead (e.g.
``efficientnet-lite0``) builds an UNTRAINED dense model with a fresh ``head_b`` head, seeded by ``seed``: only for
mechanics checks (the recipe smoke test), never for a result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job

__all__ = [
    "MergeArgs",
    "TwoStreamLoader",
    "build",
    "dense_kd_loss",
    "load_teacher_b",
    "evaluate_merged",
    "MERGE_META",
    "ForgettingTracker",
    "choose_kept",
    "build_probe_cache",
    "cosine_distill_loss",
]

STAGES = ("probe", "multitask", "a_only")
KEEPS = ("last", "best", "tolerance")
MERGE_META = "merge.json"
FORGET_FILE = "forgetting.json"  # the forgetting curve and the kept step (in the run folder)
KEPT_WEIGHTS = "forgetting_kept.safetensors"  # the kept step's weights while the run goes on
LAST_WEIGHTS = "last.safetensors"  # the last step's weights when another step is kept


@dataclass
class MergeArgs:
    teacher_a: str = "offline"  # a teacher spec (models.teachers.load_teacher)
    teacher_b: str = "runs/camvid_teacher"  # a seg run folder (or a tower spec: untrained, mechanics only)
    head_b: str = "aspp"  # the fresh head when teacher_b is a tower spec
    stage: str = "multitask"
    init_from: str = ""  # a merge run folder whose model.safetensors initialises the model
    dense_train: str = "builtin:camvid/train"  # stream B: dense shards (labels unused)
    dense_val: str = ""  # dense val shards for the eval hook (B's mIoU); empty: none
    batch_b: int = 4
    w_a: float = 1.0
    w_b: float = 10.0
    dense_loss: str = "kl"  # "kl" or "focal_dice"
    temperature: float = 1.0
    focal_gamma: float = 2.0
    lr_mult_backbone: float = 0.1
    lr_mult_head_b: float = 0.1
    lr_mult_head_a: float = 1.0
    image_size_a: int = 160  # stream A images: centre view at this side (teacher A's input size)
    crop_b: list[int] = field(default_factory=lambda: [144, 192])  # stream B augmented crop (H, W)
    scale_b: list[float] = field(default_factory=lambda: [0.3, 1.0])
    jitter_b: float = 0.0
    pool: str = "mean"  # Head_A pooling: "mean" or "max"
    hidden: int = 0  # Head_A projection's residual MLP width (0: linear, as teacher A's head)
    head_blocks: int = 1  # backbone blocks Head_A copies (Lite0's last stage is one block)
    proj_from_teacher: bool = True  # initialise Head_A's projection from teacher A's image head when it fits
    eval_batch_size: int = 16
    zeroshot_cls: str = (
        ""  # class shards for A's zero-shot top-1 in the eval hook (e.g. builtin:imagenette/val)
    )
    # early stopping on forgetting (ForgettingTracker): probes measured at build (step 0) and every eval_every
    forget_probe_a: str = ""  # held-out image shards: A's forgetting = cosine distance of Head_A to teacher A
    forget_probe_b: str = ""  # held-out dense shards: B's forgetting = per-pixel KL(teacher B || Head_B)
    forget_n: int = 32  # the first N images of each probe (shard order)
    keep: str = "last"  # which step's weights model.safetensors holds: last | best | tolerance
    forget_tol_b: float = 0.0  # keep=tolerance: stop at the first step where B's forgetting exceeds this
    forget_w_a: float = 1.0  # keep=best: score = forget_w_a * A's forgetting + forget_w_b * B's
    forget_w_b: float = 1.0
    # Stage I cache (stage probe): with the backbone frozen and stream A's one fixed view (the centre view, no
    # augmentation), Head_A's input (the backbone's map at the split) and A's target embedding are functions of
    # the image alone; they are computed ONCE per image into this folder (build_probe_cache: atomic parts,
    # resumable, shared by runs with the same backbone / teacher A / data / view) and Head_A trains on them for
    # as many epochs as wanted (a TensorLoader). "" : no cache (the full forward of both models every step)
    probe_cache: str = ""
    cache_part: int = 512  # images per cache part (the unit of resume)


def parse_args(cfg: RunConfig) -> MergeArgs:
    a = parse_section(MergeArgs, cfg.method_args, "method_args")
    if a.stage not in STAGES:
        raise ConfigError(f"config key 'method_args.stage': {a.stage!r} is not one of {', '.join(STAGES)}")
    if a.dense_loss not in ("kl", "focal_dice"):
        raise ConfigError(
            f"config key 'method_args.dense_loss': {a.dense_loss!r} is not 'kl' or 'focal_dice'"
        )
    if a.pool not in ("mean", "max"):
        raise ConfigError(f"config key 'method_args.pool': {a.pool!r} is not 'mean' or 'max'")
    if a.batch_b < 1:
        raise ConfigError(f"config key 'method_args.batch_b': must be >= 1, got {a.batch_b}")
    if a.temperature <= 0:
        raise ConfigError(f"config key 'method_args.temperature': must be > 0, got {a.temperature}")
    if a.keep not in KEEPS:
        raise ConfigError(f"config key 'method_args.keep': {a.keep!r} is not one of {', '.join(KEEPS)}")
    if a.keep != "last" and not (a.forget_probe_a or a.forget_probe_b):
        raise ConfigError(
            f"config key 'method_args.keep': {a.keep!r} needs a forgetting probe "
            "(method_args.forget_probe_a and/or method_args.forget_probe_b)"
        )
    if a.keep == "tolerance" and not a.forget_probe_b:
        raise ConfigError("config key 'method_args.forget_probe_b': keep 'tolerance' needs B's probe shards")
    if a.keep == "tolerance" and a.forget_tol_b <= 0:
        raise ConfigError(f"config key 'method_args.forget_tol_b': must be > 0, got {a.forget_tol_b}")
    if a.keep != "last" and cfg.train.eval_every < 1:
        raise ConfigError(
            f"config key 'train.eval_every': method_args.keep {a.keep!r} measures forgetting every eval_every "
            "steps, so it must be >= 1"
        )
    if a.probe_cache and a.stage != "probe":
        raise ConfigError(
            f"config key 'method_args.probe_cache': only stage 'probe' (frozen backbone) can train on cached "
            f"maps, not {a.stage!r}"
        )
    if a.cache_part < 1:
        raise ConfigError(f"config key 'method_args.cache_part': must be >= 1, got {a.cache_part}")
    if a.forget_n < 1:
        raise ConfigError(f"config key 'method_args.forget_n': must be >= 1, got {a.forget_n}")
    for key in (
        "w_a",
        "w_b",
        "lr_mult_backbone",
        "lr_mult_head_b",
        "lr_mult_head_a",
        "forget_w_a",
        "forget_w_b",
    ):
        if getattr(a, key) < 0:
            raise ConfigError(f"config key 'method_args.{key}': must be >= 0, got {getattr(a, key)}")
    if len(a.crop_b) != 2 or min(a.crop_b) < 1:
        raise ConfigError(f"config key 'method_args.crop_b': expected [H, W], got {a.crop_b!r}")
    if len(a.scale_b) != 2 or not 0 < a.scale_b[0] <= a.scale_b[1] <= 1:
        raise ConfigError(f"config key 'method_args.scale_b': expected [lo, hi] in (0, 1], got {a.scale_b!r}")
    return a


# ------------------------------------------------------------------------------------------------ two streams


class TwoStreamLoader:
    """Several resumable loaders read in lockstep: each iteration yields ``{name: next batch of that stream}``.

    A stream that runs out starts its next epoch by itself (the streams have different lengths), so iteration
    never ends; ``state_dict`` / ``load_state_dict`` hold every stream's position (the engine saves it with each
    checkpoint), so a resumed run reads exactly the batches an uninterrupted one would.
    """

    def __init__(self, streams: dict[str, Any]) -> None:
        if not streams:
            raise ValueError("TwoStreamLoader needs at least one stream")
        self.streams = dict(streams)
        self._its: dict[str, Any] = {}

    def __iter__(self):
        self._its = {k: iter(s) for k, s in self.streams.items()}
        while True:
            yield {k: self._next(k) for k in self.streams}

    def _next(self, k: str) -> Any:
        for _ in range(2):
            try:
                return next(self._its[k])
            except StopIteration:
                self._its[k] = iter(self.streams[k])  # the stream's next epoch
        raise RuntimeError(f"data stream {k!r} yields no batch: is it smaller than one batch?")

    def set_epoch(self, epoch: int) -> None:  # each stream keeps its own epoch (saved in its state)
        pass

    @property
    def n_corrupt(self) -> int:
        return sum(int(getattr(s, "n_corrupt", 0)) for s in self.streams.values())

    def state_dict(self) -> dict:
        return {k: s.state_dict() for k, s in self.streams.items() if hasattr(s, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.streams) - set(state)
        if missing:
            raise ValueError(f"loader state has no position for stream(s) {', '.join(sorted(missing))}")
        for k, s in self.streams.items():
            s.load_state_dict(state[k])


# ------------------------------------------------------------------------------------------------ Stage I cache

PROBE_CACHE_META = "cache.json"  # the cache folder's fingerprint and progress


def _digest(*tensors_of: dict[str, Tensor]) -> str:
    """sha256 over named tensors (names, shapes, dtypes and bytes): what the cached maps were computed from."""
    import hashlib

    h = hashlib.sha256()
    for d in tensors_of:
        for k in sorted(d):
            v = d[k].detach().cpu().contiguous()
            h.update(f"{k}|{tuple(v.shape)}|{v.dtype}|".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def probe_cache_fingerprint(model: nn.Module, teacher_a: nn.Module, spec: str, size: int, part: int) -> dict:
    """What a Stage I cache is a function of: the backbone's weights (and its input normalisation) up to the
    split, teacher A's weights, the shards (paths and byte sizes), the view (A's centre view at ``size``) and
    the part size."""
    import os

    from vfmkit.data.shards import list_shards

    tower = model.tower
    norm = {"mean": tower.mean, "std": tower.std}
    urls = [os.path.abspath(u) if os.path.exists(u) else u for u in list_shards(spec)]
    return {
        "format": "vfmkit-merge-probe-cache/1",
        "shards": [[u, os.path.getsize(u) if os.path.exists(u) else None] for u in urls],
        "view": f"centre view {size}",
        "split": int(model.split),
        "input_size": list(tower.input_size) if tower.input_size is not None else None,
        "backbone_sha256": _digest(tower.state_dict(), norm),
        "teacher_a_sha256": _digest(teacher_a.state_dict()),
        "part": int(part),
        "dtype": "float32",
    }


@torch.no_grad()
def build_probe_cache(
    model: nn.Module,
    teacher_a: nn.Module,
    spec: str,
    size: int,
    folder: str | Path,
    *,
    part: int = 512,
    batch_size: int = 32,
    on_corrupt: str = "skip",
    device: str | torch.device = "cpu",
    log=print,
) -> dict[str, Tensor]:
    """Stage I's inputs, computed once per image: ``{"h": [N, C, h, w] the backbone's map at the split (what
    Head_A's copied stage consumes), "target": [N, D] teacher A's image embedding}``, float32, in shard order.

    Every ``part`` images are one ``part-NNNNNN.safetensors`` written atomically, so a killed build resumes at
    the first missing part (the shards are read in order again; finished parts are not recomputed).
    ``cache.json`` holds the fingerprint (:func:`probe_cache_fingerprint`); a folder holding another one is
    refused; it also records ``build_s``, the wall seconds spent building (over resumes). A file lock makes
    concurrent runs on one folder (e.g. two seeds) build it once: the second waits, then reads it."""
    import fcntl

    from safetensors.torch import load_file

    from vfmkit.data.io import atomic_save_safetensors, atomic_write_json
    from vfmkit.eval.features import ordered_loader

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fp = probe_cache_fingerprint(model, teacher_a, spec, size, part)
    meta_p = folder / PROBE_CACHE_META
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = json.loads(meta_p.read_text(encoding="utf-8")) if meta_p.is_file() else None
        if meta is not None and meta["fingerprint"] != fp:
            raise ConfigError(
                f"config key 'method_args.probe_cache': {folder} holds the Stage I cache of another backbone, "
                f"teacher A, data or view ({PROBE_CACHE_META}); use a new folder"
            )
        if meta is None or not meta.get("done"):
            import time

            t0, before = time.perf_counter(), float((meta or {}).get("build_s", 0.0))
            atomic_write_json(meta_p, {"fingerprint": fp, "done": False, "build_s": before})
            was = model.training
            model.eval()
            n_parts, n, n_new, buf = 0, 0, 0, []

            def flush(images: list[Tensor]) -> None:
                nonlocal n_parts, n, n_new
                path = folder / f"part-{n_parts:06d}.safetensors"
                x = torch.cat(images)
                if not path.is_file():
                    hs, ts = [], []
                    for xb in x.split(batch_size):
                        xb = xb.to(device)
                        hs.append(model.trunk(xb)[0].float().cpu())
                        ts.append(teacher_a.encode_image(xb).float().cpu())
                    atomic_save_safetensors(path, {"h": torch.cat(hs), "target": torch.cat(ts)})
                    n_new += len(x)
                    spent = before + time.perf_counter() - t0  # wall seconds building, over resumes
                    atomic_write_json(meta_p, {"fingerprint": fp, "done": False, "build_s": spent})
                n_parts, n = n_parts + 1, n + len(x)

            have = 0
            for b in ordered_loader(spec, _a_decoder(size), batch_size, on_corrupt=on_corrupt):
                buf.append(b["image"])
                have += len(b["image"])
                while have >= part:
                    x = torch.cat(buf)
                    flush([x[:part]])
                    buf, have = ([x[part:]] if len(x) > part else []), len(x) - part
            if have:
                flush(buf)
            model.train(was)
            if n == 0:
                raise ConfigError(f"config key 'data.train': no images in {spec} for the Stage I cache")
            spent = before + time.perf_counter() - t0
            atomic_write_json(
                meta_p, {"fingerprint": fp, "done": True, "parts": n_parts, "n": n, "build_s": spent}
            )
            log(f"merge: Stage I cache {folder}: {n} images ({n_new} computed now) in {n_parts} parts")
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
    parts = [load_file(str(folder / f"part-{i:06d}.safetensors")) for i in range(int(meta["parts"]))]
    out = {k: torch.cat([p[k] for p in parts]) for k in ("h", "target")}
    if len(out["h"]) != int(meta["n"]):
        raise RuntimeError(f"merge: the Stage I cache {folder} holds {len(out['h'])} images, not {meta['n']}")
    return out


def cosine_distill_loss(emb: Tensor, target: Tensor) -> Tensor:
    """``L_A``: the mean of ``1 - <emb, target>`` (Head_A's normalised embedding against A's)."""
    return (1 - (emb * target).sum(-1)).mean()


# ------------------------------------------------------------------------------------------------ losses


def dense_kd_loss(
    student: Tensor, teacher: Tensor, kind: str = "kl", temperature: float = 1.0, gamma: float = 2.0
) -> Tensor:
    """Dense distillation between logits ``[B, K, H, W]``.

    ``kl``: per-pixel KL(p_teacher || p_student) at ``temperature`` (times T^2, Hinton's scaling), mean over
    pixels. ``focal_dice``: focal loss against the teacher's argmax + soft dice against its probabilities.
    """
    s, t = student.float(), teacher.float()
    if kind == "kl":
        ls = F.log_softmax(s / temperature, dim=1)
        lt = F.log_softmax(t / temperature, dim=1)
        return (lt.exp() * (lt - ls)).sum(1).mean() * temperature**2
    if kind == "focal_dice":
        target = t.argmax(1)
        logp = F.log_softmax(s, dim=1).gather(1, target[:, None])[:, 0]
        focal = (-((1 - logp.exp()) ** gamma) * logp).mean()
        ps, pt = s.softmax(1), t.softmax(1)
        inter = (ps * pt).sum((0, 2, 3))
        dice = 1 - ((2 * inter + 1) / (ps.sum((0, 2, 3)) + pt.sum((0, 2, 3)) + 1)).mean()
        return focal + dice
    raise ValueError(f"dense_kd_loss: kind must be 'kl' or 'focal_dice', got {kind!r}")


# ------------------------------------------------------------------------------------------------ forgetting


def choose_kept(curve: list[dict], keep: str, tol_b: float = 0.0) -> tuple[int, str]:
    """The step whose weights a run keeps, from its forgetting curve (entries ``{"step", "a", "b", "score"}``
    in step order) -> (step, why).

    ``last``: the last step. ``best``: the lowest ``score`` (the earliest on a tie). ``tolerance``: early stopping
    on B's forgetting: the step before the first one whose ``b`` exceeds ``tol_b`` (the last step when none
    does; step 0 when the first measurement already does)."""
    if not curve:
        raise ValueError("choose_kept: an empty forgetting curve")
    if keep == "last":
        return int(curve[-1]["step"]), "last step"
    if keep == "best":
        best = min(curve, key=lambda e: (e["score"], e["step"]))
        return int(best["step"]), f"lowest combined forgetting score {best['score']:.6g}"
    if keep == "tolerance":
        for i, e in enumerate(curve):
            if e["b"] > tol_b:
                kept = curve[max(i - 1, 0)]
                return int(kept["step"]), (
                    f"stopped: B's forgetting {e['b']:.6g} > tolerance {tol_b:g} at step {e['step']}"
                )
        return int(curve[-1]["step"]), f"B's forgetting stayed <= tolerance {tol_b:g}"
    raise ValueError(f"choose_kept: keep must be one of {', '.join(KEEPS)}, got {keep!r}")


class ForgettingTracker:
    """Early stopping of a merge run on a forgetting metric, through the engine's eval hook and ``on_final``.

    Forgetting of each teacher's skill on small held-out probes (label-free): A's is the mean cosine distance
    ``1 - cos(Head_A(x), A(x))`` on ``forget_probe_a`` images (A's view), B's the mean per-pixel
    ``KL(p_B || p_merged)`` of Head_B's logits to teacher B's on ``forget_probe_b`` images (resized to
    ``crop_b``); the per-pixel argmax agreement with B is recorded beside it. Measured once on the initial
    weights (step 0, at build) and by the eval hook every ``train.eval_every`` steps and at the end. Whenever
    the step just measured is the one :func:`choose_kept` keeps so far, its weights go to
    ``KEPT_WEIGHTS`` (atomically); at the end (``on_final``) ``model.safetensors`` becomes the kept step's
    weights (copied from ``KEPT_WEIGHTS``, which stays), the last step's are moved to ``LAST_WEIGHTS``, and
    ``FORGET_FILE`` says which step was kept and why.

    The engine still runs its given steps (stopping selects the weights; it does not end the loop). Resume: the
    curve is in ``FORGET_FILE``; the entries at or after the first step measured after a resume are measured
    again (training resumes bit-identically, so they come out the same and the kept weights are rewritten).
    """

    def __init__(
        self, args: MergeArgs, out_dir: Path, teacher_a, teacher_b, num_classes, void, is_main, fresh
    ):
        from vfmkit.methods.seg import ordered_dense_loader

        self.args, self.out, self.is_main = args, Path(out_dir), is_main
        self.curve: list[dict] = []
        self.kept_file_step: int | None = None
        self._trimmed = False
        self.xa = self.ta = self.xb = self.tb = None
        n = args.forget_n
        if args.forget_probe_a:
            xs = _first_images(ShardImages(args.forget_probe_a, _a_decoder(args.image_size_a)), n)
            dev = teacher_a.mean.device if hasattr(teacher_a, "mean") else "cpu"
            with torch.no_grad():
                self.ta = torch.cat([teacher_a.encode_image(x.to(dev)).float().cpu() for x in xs.split(16)])
            self.xa = xs
        if args.forget_probe_b:
            loader = ordered_dense_loader(args.forget_probe_b, 8, args.crop_b, num_classes, void)
            xs = _first_images(loader, n)
            dev = next(teacher_b.parameters()).device
            with torch.no_grad():
                self.tb = torch.cat([teacher_b(x.to(dev)).float().cpu() for x in xs.split(8)])
            self.xb = xs
        p = self.out / FORGET_FILE
        if not fresh and p.is_file():
            state = json.loads(p.read_text(encoding="utf-8"))
            self.curve, self.kept_file_step = state["curve"], state.get("kept_file_step")
        elif is_main:
            for f in (p, self.out / KEPT_WEIGHTS, self.out / LAST_WEIGHTS):
                f.unlink(missing_ok=True)  # a run that starts over keeps nothing of an older one

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        res: dict[str, float] = {}
        score = 0.0
        if self.xa is not None:
            emb = torch.cat([model(x.to(dev), "a").float().cpu() for x in self.xa.split(16)])
            res["a"] = float((1 - (F.normalize(emb, dim=-1) * self.ta).sum(-1)).mean())
            score += self.args.forget_w_a * res["a"]
        if self.xb is not None:
            kl, agree, n = 0.0, 0.0, 0
            for x, t in zip(self.xb.split(8), self.tb.split(8), strict=True):
                s = model(x.to(dev), "b").float().cpu()
                kl += float(dense_kd_loss(s, t, "kl", 1.0)) * len(x)
                agree += float((s.argmax(1) == t.argmax(1)).float().mean()) * len(x)
                n += len(x)
            res["b"], res["b_agree"] = kl / n, agree / n
            score += self.args.forget_w_b * res["b"]
        res["score"] = score
        model.train(was)
        return res

    def record(self, model: nn.Module, step: int) -> dict[str, float]:
        """Measure ``model`` at ``step``, add it to the curve, keep its weights when it is the kept step so far."""
        if step > 0 and not self._trimmed:  # the first eval of this process: later entries predate a resume
            self.curve = [e for e in self.curve if e["step"] < step]
            self._trimmed = True
        res = self.measure(model)
        self.curve = sorted(
            [e for e in self.curve if e["step"] != step] + [{"step": step, **res}], key=lambda e: e["step"]
        )
        kept, _ = choose_kept(self.curve, self.args.keep, self.args.forget_tol_b)
        if self.is_main:
            if kept == step:
                _save_weights(model, self.out / KEPT_WEIGHTS)
                self.kept_file_step = step
            self._write()
        return {f"forget/{k}": v for k, v in res.items()}

    def _write(self, **extra) -> None:
        from vfmkit.data.io import atomic_write_json

        atomic_write_json(
            self.out / FORGET_FILE,
            {
                "keep": self.args.keep,
                "tol_b": self.args.forget_tol_b,
                "w_a": self.args.forget_w_a,
                "w_b": self.args.forget_w_b,
                "curve": self.curve,
                "kept_file_step": self.kept_file_step,
                **extra,
            },
        )

    def finalize(self, out: Path) -> None:
        """``on_final``: the final weights are written; make ``model.safetensors`` the kept step's."""
        import os
        import shutil

        last = int(self.curve[-1]["step"])
        kept, why = choose_kept(self.curve, self.args.keep, self.args.forget_tol_b)
        if kept != last:
            if self.kept_file_step != kept or not (out / KEPT_WEIGHTS).is_file():
                raise RuntimeError(
                    f"merge: the kept step is {kept} but {out / KEPT_WEIGHTS} holds step {self.kept_file_step}"
                )
            os.replace(out / "model.safetensors", out / LAST_WEIGHTS)
            tmp = out / f".{KEPT_WEIGHTS}.{os.getpid()}.tmp"
            shutil.copyfile(out / KEPT_WEIGHTS, tmp)  # a copy: a rerun of the finished run finalises again
            os.replace(tmp, out / "model.safetensors")
        else:
            (out / LAST_WEIGHTS).unlink(missing_ok=True)
        self._write(kept_step=kept, last_step=last, why=why)
        print(f"merge: model.safetensors holds step {kept} of {last} ({why})", flush=True)


class ShardImages:
    """Shards in shard order through ``decode`` (the probes' reader)."""

    def __init__(self, spec: str, decode, batch_size: int = 16) -> None:
        self.spec, self.decode, self.batch_size = spec, decode, batch_size

    def __iter__(self):
        from vfmkit.eval.features import ordered_loader

        return iter(ordered_loader(self.spec, self.decode, self.batch_size))


def _first_images(batches, n: int) -> Tensor:
    got, total = [], 0
    for b in batches:
        got.append(b["image"])
        total += len(b["image"])
        if total >= n:
            break
    if not got:
        raise ConfigError(
            "config key 'method_args.forget_probe_a' / 'forget_probe_b': the probe shards are empty"
        )
    return torch.cat(got)[:n]


def _save_weights(model: nn.Module, path: Path) -> None:
    from vfmkit.data.io import atomic_save_safetensors
    from vfmkit.engine.checkpoint import module_tensors

    state, metadata = module_tensors(model)
    atomic_save_safetensors(path, {k: v.detach().cpu() for k, v in state.items()}, metadata)


# ------------------------------------------------------------------------------------------------ teachers


def load_teacher_b(spec: str, head: str = "aspp", num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """Teacher B, frozen: a ``seg`` run folder (``eval.dense.load_dense_model``); a tower spec builds an untrained
    dense model (mechanics only) with ``num_classes`` outputs."""
    from vfmkit.eval.dense import build_seg_model, load_dense_model
    from vfmkit.models.base import freeze

    if Path(spec).is_dir():
        model = load_dense_model(spec)
    else:
        if num_classes is None:
            raise ValueError(f"teacher B {spec!r} is not a seg run folder and no class count is known")
        torch.manual_seed(seed)
        model = build_seg_model(spec, num_classes, head, finetune=True)
        model.meta = {"tower": spec, "head": head, "num_classes": num_classes, "untrained": True}
    model.finetune = True  # its tower is read through the merged model; the teacher itself is frozen below
    return freeze(model)


def _a_decoder(size: int):
    from vfmkit.data.decode import decode_uint8, plain_view

    def decode(raw: dict) -> dict:
        return {"image": plain_view(decode_uint8(raw, backend="torchvision"), size)}

    return decode


# ------------------------------------------------------------------------------------------------ build


def build(
    cfg: RunConfig,
    dist_info: DistInfo,
    teacher_a: nn.Module | None = None,
    teacher_b: nn.Module | None = None,
) -> Job:
    """The merge job. ``teacher_a`` / ``teacher_b`` may be handed in already loaded (a pipeline running several
    stages loads them once); otherwise they are loaded from ``method_args.teacher_a`` / ``teacher_b``."""
    from safetensors.torch import load_file

    from vfmkit.data.dense import DenseAugment, dense_info, make_dense_decoder
    from vfmkit.data.io import atomic_write_json
    from vfmkit.data.loader import ShardLoader
    from vfmkit.models.merge import build_merged_model, teacher_a_proj_init
    from vfmkit.models.teachers import load_teacher

    args = parse_args(cfg)
    device = getattr(dist_info, "device", "cpu")
    info = dense_info(args.dense_train)
    k, void = int(info["num_classes"]), info["void"]
    if teacher_a is None:
        teacher_a = load_teacher(args.teacher_a)
    if teacher_b is None:
        teacher_b = load_teacher_b(args.teacher_b, args.head_b, k, cfg.seed)
    teacher_a, teacher_b = teacher_a.to(device), teacher_b.to(device)
    kb = int(getattr(teacher_b, "meta", {}).get("num_classes", k))
    if kb != k:
        raise ConfigError(
            f"config key 'method_args.dense_train': {k} classes, but teacher B ({args.teacher_b}) has {kb}"
        )

    torch.manual_seed(cfg.seed)
    init = teacher_a_proj_init(teacher_a) if args.proj_from_teacher else None
    model = build_merged_model(
        teacher_b,
        teacher_a.embed_dim,
        hidden=args.hidden,
        pool=args.pool,
        head_blocks=args.head_blocks,
        proj_init=init,
    )
    if args.init_from:
        w = Path(args.init_from) / "model.safetensors"
        if not w.is_file():
            raise ConfigError(f"config key 'method_args.init_from': no model.safetensors in {args.init_from}")
        model.load_state_dict(load_file(str(w)), strict=True)
    model.attach_text(teacher_a)

    rank, world = getattr(dist_info, "rank", 0), getattr(dist_info, "world_size", 1)
    streams: dict[str, Any] = {}
    cached = None
    if args.probe_cache:  # Stage I on maps computed once per image (the backbone is frozen in this stage)
        from vfmkit.data.loader import TensorLoader

        cached = build_probe_cache(
            model,
            teacher_a,
            cfg.data.train,
            args.image_size_a,
            args.probe_cache,
            part=args.cache_part,
            batch_size=args.eval_batch_size,
            on_corrupt=cfg.data.on_corrupt,
            device=device,
        )
        n = len(cached["h"])
        loader: Any = TensorLoader(
            cached,
            batch_size=min(cfg.data.batch_size, n),
            seed=cfg.seed,
            shuffle=cfg.data.shuffle_buffer
            > 0,  # shuffle_buffer 0: shard order, as the uncached stream reads
            rank=rank,
            world_size=world,
        )
    elif args.w_a > 0 or args.stage == "probe":
        streams["a"] = ShardLoader.from_config(cfg, _a_decoder(args.image_size_a), dist_info)
    if args.stage == "multitask" and args.w_b > 0:
        aug = DenseAugment(size=tuple(args.crop_b), scale=tuple(args.scale_b), jitter=args.jitter_b)
        streams["b"] = ShardLoader(
            args.dense_train,
            make_dense_decoder(aug, seed=cfg.seed, num_classes=k, void=void),
            args.batch_b,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.seed + 1,
            num_workers=cfg.data.num_workers,
            rank=rank,
            world_size=world,
            resampled=cfg.data.resampled,
            on_corrupt=cfg.data.on_corrupt,
            drop_last=True,
        )
    if cached is None:
        if not streams:
            raise ConfigError("config key 'method_args.w_a': stage a_only needs w_a > 0")
        loader = TwoStreamLoader(streams)

    groups = None
    if args.stage == "probe":
        for p in [*model.backbone_parameters(), *model.head_b_parameters()]:
            p.requires_grad_(False)
    elif args.stage == "multitask":
        from vfmkit.engine.trainer import param_groups

        groups = []
        for part, mult in (
            (model.tower, args.lr_mult_backbone),
            (model.head_b, args.lr_mult_head_b),
            (model.head_a, args.lr_mult_head_a),
        ):
            for g in param_groups(part, cfg.optim.weight_decay):
                if g["params"]:
                    groups.append({**g, "lr": cfg.optim.lr * mult, "lr_mult": mult})

    def loss_fn(m, batch, step):
        total: Tensor | float = 0.0
        logs: dict[str, Any] = {}
        if "h" in batch:  # a cached Stage I batch: the backbone's maps and A's targets, read, not recomputed
            la = cosine_distill_loss(m(batch["h"], "a_trunk"), batch["target"])
            total = total + args.w_a * la
            logs["loss_a"] = la.detach()
        if "a" in batch:
            x = batch["a"]["image"]
            with torch.no_grad():
                target = teacher_a.encode_image(x)
            la = cosine_distill_loss(m(x, "a"), target)
            total = total + args.w_a * la
            logs["loss_a"] = la.detach()
        if "b" in batch:
            x = batch["b"]["image"]
            with torch.no_grad():
                target = teacher_b(x)
            lb = dense_kd_loss(m(x, "b"), target, args.dense_loss, args.temperature, args.focal_gamma)
            total = total + args.w_b * lb
            logs["loss_b"] = lb.detach()
        return total, logs

    meta = {
        "format": "vfmkit-merge/1",
        "teacher_a": args.teacher_a,
        "teacher_b": args.teacher_b,
        "stage": args.stage,
        "pool": args.pool,
        "hidden": args.hidden,
        "head_blocks": args.head_blocks,
        "probe_cache": args.probe_cache,
        "embed_dim": teacher_a.embed_dim,
        "num_classes": k,
        "void": void,
        "classes": info["classes"],
    }
    if getattr(dist_info, "is_main", True):
        atomic_write_json(Path(cfg.out_dir) / MERGE_META, meta)

    tracker = None
    if args.forget_probe_a or args.forget_probe_b:
        from vfmkit.engine.checkpoint import checkpoint_candidates

        fresh = not (cfg.train.resume and checkpoint_candidates(Path(cfg.out_dir) / "checkpoints"))
        tracker = ForgettingTracker(
            args, Path(cfg.out_dir), teacher_a, teacher_b, k, void, getattr(dist_info, "is_main", True), fresh
        )
        if not any(e["step"] == 0 for e in tracker.curve):  # a resumed or finished run measured them already
            tracker.record(model, 0)  # the initial weights (B's backbone and Head_B, or init_from's)

    eval_fn = None
    if args.dense_val or cfg.data.val or args.zeroshot_cls or tracker is not None:
        text_a = TextMemo(teacher_a)  # the val captions and prompts are embedded once per run, not per eval

        def eval_fn(m, step):
            res = {}
            if tracker is not None:
                res.update(tracker.record(m, step))
            if args.dense_val or cfg.data.val or args.zeroshot_cls:
                res.update(
                    evaluate_merged(
                        m,
                        text_a,
                        retrieval_val=cfg.data.val,
                        dense_val=args.dense_val or None,
                        image_size_a=args.image_size_a,
                        batch_size=args.eval_batch_size,
                        zeroshot=bool(args.dense_val),
                        zeroshot_cls=args.zeroshot_cls or None,
                    )
                )
            return res

    return Job(
        model,
        loss_fn,
        loader,
        eval_fn=eval_fn,
        groups=groups,
        extra={"meta": meta, "teacher_a": teacher_a, "teacher_b": teacher_b, "forgetting": tracker},
        on_final=tracker.finalize if tracker is not None else None,
    )


# ------------------------------------------------------------------------------------------------ evaluation


class TextMemo:
    """Teacher A's frozen text tower with its embeddings kept: each caption or prompt is embedded once."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher, self.memo = teacher, {}
        self.embed_dim = getattr(teacher, "embed_dim", None)
        self.logit_scale = float(getattr(teacher, "logit_scale", 100.0))

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        for s in range(0, len(todo), 256):
            chunk = todo[s : s + 256]
            for t, e in zip(chunk, self.teacher.encode_text(chunk), strict=True):
                self.memo[t] = e
        return torch.stack([self.memo[t] for t in texts])


@torch.no_grad()
def retrieval_r1(encode_image, encode_text, spec: str, size: int, batch_size: int = 64) -> dict[str, float]:
    """Image-text retrieval on shards with json ``captions``: R@1/5/10 both ways and their mean R@1."""
    from vfmkit.data.decode import decode_float, resize_center_crop
    from vfmkit.eval.features import ordered_loader
    from vfmkit.eval.retrieval import retrieval_metrics

    def decode(raw):
        return {
            "image": resize_center_crop(decode_float(raw), size),
            "captions": json.dumps(json.loads(raw["json"])["captions"]),
        }

    imgs, caps = [], []
    for batch in ordered_loader(spec, decode, batch_size=batch_size):
        imgs.append(F.normalize(encode_image(batch["image"]).float(), dim=-1).cpu())
        caps += [json.loads(c) for c in batch["captions"]]
    flat = [c for cs in caps for c in cs]
    owner = torch.tensor([i for i, cs in enumerate(caps) for _ in cs])
    txt = torch.cat(
        [F.normalize(encode_text(flat[s : s + 256]).float(), dim=-1).cpu() for s in range(0, len(flat), 256)]
    )
    m = retrieval_metrics(torch.cat(imgs), txt, owner)
    return {**m, "R@1": 0.5 * (m["i2t_R@1"] + m["t2i_R@1"])}


@torch.no_grad()
def evaluate_merged(
    model: nn.Module,
    teacher_a: nn.Module,
    *,
    retrieval_val: str | None = None,
    dense_val: str | None = None,
    image_size_a: int = 160,
    batch_size: int = 16,
    zeroshot: bool = True,
    zeroshot_cls: str | None = None,
    zeroshot_classes: str | None = None,
) -> dict[str, float]:
    """A's metrics (retrieval mean R@1 with A's text tower; with ``zeroshot_cls``, zero-shot classification
    top-1 on those class shards, e.g. Imagenette val, Head_A + A's text tower, class-name prompts), B's (dense
    val mIoU of Head_B) and zero-shot segmentation mIoU from Head_A's dense features and the class names' text
    embeddings. ``zeroshot_classes``: a classes file for ``zeroshot_cls`` (``eval.zeroshot.class_names_for``)."""
    from vfmkit.data.dense import dense_info
    from vfmkit.eval.dense import evaluate_segmentation
    from vfmkit.eval.zeroshot_seg import class_text_embeddings, evaluate_zeroshot_seg
    from vfmkit.methods.seg import ordered_dense_loader
    from vfmkit.models.merge import HeadBView

    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out: dict[str, float] = {}
    if retrieval_val:
        r = retrieval_r1(lambda x: model(x.to(dev), "a"), teacher_a.encode_text, retrieval_val, image_size_a)
        out.update({f"a/{k}": v for k, v in r.items()})
    if zeroshot_cls:
        from vfmkit.eval.zeroshot import class_names_for, zeroshot_eval_encoders

        z = zeroshot_eval_encoders(
            lambda x: model(x.to(dev), "a").cpu(),
            teacher_a.encode_text,
            zeroshot_cls,
            class_names_for(zeroshot_cls, zeroshot_classes),
            image_size_a,
            float(getattr(teacher_a, "logit_scale", 100.0)),
            batch_size=batch_size,
        )
        out.update({f"a/zs_{k}": v for k, v in z.items()})
    if dense_val:
        info = dense_info(dense_val)
        k, void, names = int(info["num_classes"]), info["void"], info["classes"]
        seg = evaluate_segmentation(
            HeadBView(model), ordered_dense_loader(dense_val, batch_size, None, k, void), k, void, names, dev
        )
        out["b/mIoU"], out["b/pixel_acc"] = seg["mIoU"], seg["pixel_acc"]
        if zeroshot:
            text = class_text_embeddings(teacher_a.encode_text, names)
            zs = evaluate_zeroshot_seg(
                lambda x: model(x.to(dev), "dense_a"),
                ordered_dense_loader(dense_val, batch_size, None, k, void),
                text,
                k,
                void,
                names,
            )
            out["zs/mIoU"], out["zs/pixel_acc"] = zs["mIoU"], zs["pixel_acc"]
    model.train(was)
    return out
