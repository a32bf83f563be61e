"""Dataset reinforcement generation: one driver for image-text (MobileCLIP / DataCompDR) and labelled data
(ImageNet+ DR).

For each input shard the driver writes one reinforced shard of the same name. Per sample it draws ``n_aug``
augmentation parameter sets, seeded by (seed, uid, aug index) so any rerun draws the same ones, renders them,
runs the teachers batched across samples and stores:

- image-text (``mode="clip"``): ``paug.json``, ``syn.json`` (synthetic captions), ``npz`` (float32) or
  ``pth.gz`` (bf16) with ``image_emb`` [n_aug, sum D] and ``text_emb`` [1 + n_syn, sum D], ``txt``, ``json``
  (uid, sha256), and the ``jpg`` when asked;
- labelled (``mode="classify"``): ``paug.json`` and the ensemble's top-k (value, class) per augmentation.

Resumable at shard granularity: an output tar is written to a tmp name and ``os.replace``d, then a
``<name>.done.json`` marker; a shard with both is skipped on restart, so ``kill -9`` loses at most the shard in
progress and never duplicates a sample. Ranks (``torchrun``) take input shards ``i % world_size == rank``.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from vfmkit.data.decode import decode_uint8
from vfmkit.data.shards import iter_shard

DONE_SUFFIX = ".done.json"
METADATA = "reinforced.json"


# ----------------------------------------------------------------------------------------------- input shards


def dist_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment variables; (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def out_name(url: str) -> str:
    """Output shard name of an input shard: the same name (a compressed ``x.tar.gz`` / ``x.tgz`` -> ``x.tar``)."""
    name = os.path.basename(url)
    for ext in (".tar.gz", ".tgz"):
        if name.endswith(ext):
            return name[: -len(ext)] + ".tar"
    return name


def rank_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """The input shards of ``rank``: index ``i % world_size == rank`` (every shard has exactly one owner)."""
    names = [out_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards must have distinct file names (one output shard per input shard)")
    return [u for i, u in enumerate(urls) if i % world_size == rank]


def shard_done(out_dir: Path, name: str) -> bool:
    """True when ``name``'s output tar and its done marker both exist (the shard is skipped on resume)."""
    return (out_dir / name).is_file() and (out_dir / (name + DONE_SUFFIX)).is_file()


# ----------------------------------------------------------------------------------------------- options


@dataclass
class ReinforceArgs:
    """Options of one reinforcement run (the CLI flags of ``vfmkit reinforce``, or a YAML mapping)."""

    mode: str = "clip"  # "clip" (image-text, DataCompDR layout) or "classify" (labelled, ImageNet+ layout)
    teachers: list[str] = field(default_factory=lambda: ["offline"])
    n_aug: int = 10
    recipe: dict = field(default_factory=dict)  # AugRecipe fields, e.g. {"name": "rrc_ra", "size": 224}
    seed: int = 0
    batch_size: int = 64  # images per teacher forward
    chunk: int = 32  # samples prepared together (augmentations, captions, mixing partners)
    storage: str = "npz"  # "npz" (float32) or "pth.gz" (bf16); classification always stores topk.npz
    images: bool = False  # also store the source jpg in the reinforced shard
    device: str | None = None  # None: cuda when available
    prefetch: bool = True  # prepare the next chunk in a thread while the teachers run
    # image-text
    captions: str | None = (
        None  # captioner spec (openclip:NAME:TAG, saved dir) or a *.jsonl (uid -> captions)
    )
    n_syn: int = 5
    top_p: float = 0.9
    # labelled
    class_index: list[int] | None = None  # backbone logit columns of the target classes (label order)
    temperature: float = 1.0
    topk: int = 10
    densify: str = "smooth"  # recommended densify mode for readers ("smooth" or "zeros"), stored in metadata

    def __post_init__(self) -> None:
        if self.mode not in ("clip", "classify"):
            raise ValueError(f"mode must be 'clip' or 'classify', got {self.mode!r}")
        if self.n_aug < 1 or self.batch_size < 1 or self.chunk < 1:
            raise ValueError("n_aug, batch_size and chunk must be >= 1")
        if self.densify not in ("smooth", "zeros"):
            raise ValueError(f"densify must be 'smooth' or 'zeros', got {self.densify!r}")


def default_recipe(args: ReinforceArgs) -> dict:
    """DataCompDR's RRC + RandAugment for image-text; ImageNet+'s recommended RRC+flip+RA+RE for labels."""
    base = {"name": "rrc_ra"} if args.mode == "clip" else {"name": "rrc_flip_ra_re"}
    return {**base, **args.recipe}


# ----------------------------------------------------------------------------------------------- one chunk


@dataclass
class Chunk:
    """Samples prepared together: decoded sources, drawn params and the augmentations rendered per size.

    ``renders[size]`` is float [N * n_aug, 3, size, size] in [0, 1], sample-major (sample i's augmentations
    at rows ``i * n_aug ... i * n_aug + n_aug - 1``).
    """

    index: int
    keys: list[str] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)
    jpgs: list[bytes] = field(default_factory=list)
    images: list[Tensor] = field(default_factory=list)  # uint8 [3, H, W] sources (captioner input)
    meta: list[dict] = field(default_factory=list)  # the input json of each sample
    texts: list[str | None] = field(default_factory=list)  # real caption
    params: list[list] = field(default_factory=list)  # n_aug AugParams per sample
    partners: list[list] = field(default_factory=list)  # per sample, per aug: the partner's index or None
    renders: dict[int, Tensor] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "url/key: why" of unreadable samples


def _real_caption(sample: dict, meta: dict) -> str | None:
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    caps = meta.get("captions")
    return caps[0] if caps else meta.get("caption")


def _as_unit(x: Tensor) -> Tensor:
    """A render (uint8, or float in [0, 1] after mixing: augment's contract) -> float in [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


# ----------------------------------------------------------------------------------------------- generator


class Reinforcer:
    """Teachers + augmentation + storage for one run; :meth:`run_shard` turns one input shard into one
    reinforced shard. Both modes share decoding, parameter drawing, rendering, batching and writing."""

    def __init__(self, args: ReinforceArgs, *, teachers=None, captions=None) -> None:
        from vfmkit.data.augment import AugRecipe, ReplayableAugment

        self.args = args
        # under torchrun each rank drives its own GPU (LOCAL_RANK)
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        self.recipe = AugRecipe.from_dict(default_recipe(args))
        self.aug = ReplayableAugment(self.recipe)
        self.teachers = teachers if teachers is not None else self._load_teachers()
        self.captions = captions
        if args.mode == "clip" and args.n_syn > 0 and captions is None:
            if not args.captions:
                raise ValueError(
                    "image-text reinforcement with n_syn > 0 needs a caption source (--captions)"
                )
            from vfmkit.methods.captions import make_caption_source

            self.captions = make_caption_source(
                args.captions, args.n_syn, top_p=args.top_p, device=self.device
            )
        self.meta = self._make_meta()
        # Each distinct teacher input size gets its own rendering of every augmentation (MobileCLIP's per-teacher
        # resolution); a classifier ensemble gets the recipe's size and resizes per teacher itself.
        self.sizes = sorted(set(self.teachers.image_sizes)) if args.mode == "clip" else [self.recipe.size]

    def _load_teachers(self):
        from vfmkit.models import teachers as T

        if self.args.mode == "clip":
            return T.load_ensemble(self.args.teachers, device=self.device)
        ens = T.load_classifier_ensemble(
            self.args.teachers, self.args.class_index, self.args.temperature, device=self.device
        )
        for t in ens.teachers:
            # The teacher must score the augmented view itself (the view the student replays), not the eval
            # protocol's centre crop of it: the stored targets describe exactly the stored params.
            if getattr(t, "crop_pct", 1.0) != 1.0:
                t.crop_pct = 1.0
        return ens

    def _num_classes(self) -> int:
        if self.args.class_index is not None:
            return len(self.args.class_index)
        probe = torch.zeros(1, 3, self.recipe.size, self.recipe.size)
        return int(self.teachers(probe).shape[-1])

    def _make_meta(self):
        from vfmkit.data.reinforced import ReinforcedMeta, TeacherSpec

        a = self.args
        extra = {
            "seed": a.seed,
            "chunk": a.chunk,
            "images": a.images,
            "generator": "vfmkit.pipelines.reinforce",
        }
        if a.mode == "clip":
            specs = tuple(
                TeacherSpec(t.name, t.embed_dim, t.logit_scale, s)
                for t, s in zip(self.teachers.teachers, a.teachers, strict=False)
            )
            if self.captions is not None:
                extra["captions"] = self.captions.describe()
            extra["teacher_image_sizes"] = self.teachers.image_sizes
            return ReinforcedMeta(
                "multimodal",
                self.recipe,
                a.n_aug,
                specs,
                a.n_syn if self.captions else 0,
                a.storage,
                extra=extra,
            )
        n_cls = self._num_classes()
        extra.update(classifiers=self.teachers.describe(), class_index=a.class_index, densify=a.densify)
        return ReinforcedMeta(
            "classification",
            self.recipe,
            a.n_aug,
            (),
            0,
            "npz",
            num_classes=n_cls,
            topk=min(a.topk, n_cls),
            extra=extra,
        )

    # -- CPU side: decode, draw, render (runs in the prefetch thread) ------------------------------------
    def prepare(self, raws: list[dict], index: int) -> Chunk:
        """Raw samples -> a :class:`Chunk`; unreadable samples are skipped and named in ``chunk.skipped``."""
        c = Chunk(index)
        for raw in raws:
            try:
                meta = json.loads(raw["json"]) if "json" in raw else {}
                img = decode_uint8(raw, name=raw.get("__key__"), backend="torchvision")
                text = _real_caption(raw, meta) if self.args.mode == "clip" else None
                if self.args.mode == "clip" and text is None:
                    raise KeyError("no caption (txt or json captions)")
                if self.args.mode == "classify" and "label" not in meta:
                    raise KeyError("no json label")
            except (KeyError, ValueError, RuntimeError) as e:
                c.skipped.append(f"{os.path.basename(raw['__url__'])}/{raw['__key__']}: {e}")
                continue
            c.keys.append(raw["__key__"])
            c.uids.append(str(meta.get("uid", raw["__key__"])))
            c.jpgs.append(raw.get("jpg") or raw.get("jpeg") or b"")
            c.images.append(img)
            c.meta.append(meta)
            c.texts.append(text)
        c.partners = [[self._partner(c, i, a) for a in range(self.args.n_aug)] for i in range(len(c.keys))]
        c.params = [self._draw(c, i) for i in range(len(c.keys))]
        for size in self.sizes:
            c.renders[size] = (
                torch.stack(
                    [
                        self._render(c, i, p, j, size)
                        for i in range(len(c.keys))
                        for p, j in zip(c.params[i], c.partners[i], strict=True)
                    ]
                )
                if c.keys
                else torch.empty(0, 3, size, size)
            )
        return c

    def _partner(self, c: Chunk, i: int, a: int) -> int | None:
        """Mixing partner of sample i's augmentation a: another sample of the chunk, drawn per (seed, uid, a)."""
        from vfmkit.data.augment import make_rng

        n = len(c.keys)
        if "mix" not in self.recipe.stages or n < 2:
            return None
        j = make_rng(self.args.seed, f"{c.uids[i]}|partner", a).randrange(n - 1)
        return j + (j >= i)

    def _draw(self, c: Chunk, i: int) -> list:
        """The n_aug parameter sets of sample i, seeded by (seed, uid, aug index): identical on any rerun."""
        hw = tuple(c.images[i].shape[-2:])
        out = []
        for a, j in enumerate(c.partners[i]):
            out.append(
                self.aug.sample_for(
                    self.args.seed,
                    c.uids[i],
                    a,
                    hw,
                    partner=None if j is None else c.uids[j],
                    partner_size=None if j is None else tuple(c.images[j].shape[-2:]),
                )
            )
        return out

    def _render(self, c: Chunk, i: int, params, j: int | None, size: int) -> Tensor:
        partner = c.images[j] if params.mix is not None else None
        return _as_unit(self.aug.replay(c.images[i], params, size=size, partner_img=partner))

    # -- teacher side: batched forwards and record encoding ---------------------------------------------
    def _batched(self, fn, x, n: int) -> Tensor:
        """``fn`` over row slices of ``x`` (a tensor or list) of at most ``batch_size`` -> concatenated [n, ...]."""
        bs = self.args.batch_size
        return torch.cat([fn(x[s : s + bs]).float().cpu() for s in range(0, n, bs)])

    def teach(self, c: Chunk, shard_name: str) -> list[dict]:
        """Run the teachers on a prepared chunk -> encoded webdataset samples (bytes values, ``__key__``)."""
        n, a = len(c.keys), self.args.n_aug
        if n == 0:
            return []
        if self.args.mode == "classify":
            return self._teach_classify(c, n, a)
        return self._teach_clip(c, n, a, shard_name)

    def _teach_clip(self, c: Chunk, n: int, a: int, shard_name: str) -> list[dict]:
        from vfmkit.data.augment import make_rng
        from vfmkit.data.reinforced import encode_multimodal, sha256_hex

        per_teacher = [
            self._batched(t.encode_image, c.renders[t.image_size], n * a) for t in self.teachers.teachers
        ]
        img_emb = torch.cat(per_teacher, dim=-1).view(n, a, -1)  # [N, n_aug, sum D]
        syn: list[list[str]] = [[] for _ in range(n)]
        if self.captions is not None:
            # seeded per (run seed, shard, chunk) so a resumed run samples the same captions
            seed = make_rng(self.args.seed, f"{shard_name}|captions", c.index).getrandbits(62)
            syn = self.captions(c.uids, c.images, seed)
        texts = [t for i in range(n) for t in [c.texts[i], *syn[i]]]
        txt_emb = self._batched(self.teachers.encode_text, texts, len(texts)).view(n, 1 + len(syn[0]), -1)
        return [
            encode_multimodal(
                c.keys[i],
                c.uids[i],
                c.params[i],
                syn[i],
                img_emb[i],
                txt_emb[i],
                self.meta,
                sha256=c.meta[i].get("sha256") or sha256_hex(c.jpgs[i]),
                jpg=c.jpgs[i] if self.args.images else None,
                caption=c.texts[i],
            )
            for i in range(n)
        ]

    def _teach_classify(self, c: Chunk, n: int, a: int) -> list[dict]:
        from vfmkit.data.reinforced import encode_classification, sha256_hex, topk_encode

        probs = self._batched(self.teachers, c.renders[self.recipe.size], n * a)  # [N * n_aug, C]
        values, indices = topk_encode(probs, self.meta.topk)
        values, indices = values.view(n, a, -1), indices.view(n, a, -1)
        return [
            encode_classification(
                c.keys[i],
                c.uids[i],
                int(c.meta[i]["label"]),
                c.params[i],
                values[i],
                indices[i],
                self.meta,
                sha256=c.meta[i].get("sha256") or sha256_hex(c.jpgs[i]),
                jpg=c.jpgs[i] if self.args.images else None,
            )
            for i in range(n)
        ]

    # -- one shard ----------------------------------------------------------------------------------------
    def _chunks(self, url: str) -> Iterator[list[dict]]:
        buf: list[dict] = []
        for raw in iter_shard(url):
            buf.append(raw)
            if len(buf) == self.args.chunk:
                yield buf
                buf = []
        if buf:
            yield buf

    def _prepared(self, url: str) -> Iterator[Chunk]:
        """Prepared chunks in order; with ``prefetch`` the next chunk is decoded/rendered in a thread while the
        teachers run on this one (torch ops release the GIL, so this overlaps on a GPU host)."""
        chunks = enumerate(self._chunks(url))
        if not self.args.prefetch:
            yield from (self.prepare(raws, i) for i, raws in chunks)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for i, raws in chunks:
                fut = pool.submit(self.prepare, raws, i)
                if pending is not None:
                    yield pending.result()
                pending = fut
            if pending is not None:
                yield pending.result()

    def run_shard(self, url: str, out_dir: Path, on_samples=None) -> dict:
        """Reinforce one input shard into ``out_dir/<same name>``, atomically, then write its done marker.

        Returns the marker: ``{"name", "count", "sha256", "skipped"}``. ``on_samples(n)`` reports progress.
        """
        from vfmkit.data.io import atomic_write_json
        from vfmkit.data.shards import ShardWriter, sha256_file

        name = out_name(url)
        work = out_dir / f".work-{name}"
        shutil.rmtree(work, ignore_errors=True)  # leftovers of a killed run
        skipped: list[str] = []
        try:
            with ShardWriter(work, prefix="part", max_count=1 << 60) as writer:
                for chunk in self._prepared(url):
                    for sample in self.teach(chunk, name):
                        writer.write(sample)
                    skipped += chunk.skipped
                    if on_samples is not None:
                        on_samples(len(chunk.keys) + len(chunk.skipped))
                count = writer.count
        except BaseException:  # e.g. a full disk: finished shards stay, this one's partial work goes
            shutil.rmtree(work, ignore_errors=True)
            raise
        part = work / "part-000000.tar"
        if count == 0:  # every sample unreadable: still leave a (valid, empty) shard so the set stays aligned
            tarfile.open(part, "w", format=tarfile.GNU_FORMAT).close()
        os.replace(part, out_dir / name)
        marker = {"name": name, "count": count, "sha256": sha256_file(out_dir / name), "skipped": skipped}
        shutil.rmtree(
            work, ignore_errors=True
        )  # before the marker: a kill between them leaves no .work folder
        atomic_write_json(out_dir / (name + DONE_SUFFIX), marker)
        return marker


# ----------------------------------------------------------------------------------------------- driver


def check_or_write_meta(out_dir: Path, meta_dict: dict, rank: int, name: str = METADATA) -> None:
    """Metadata ``name`` is written once (rank 0, atomically); a rerun into the same folder must use the same
    settings (shared by reinforcement and pseudo-labelling)."""
    from vfmkit.data.io import atomic_write_json

    path = out_dir / name
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt metadata {path}: {e}") from e
        if old != meta_dict:
            diff = sorted(k for k in set(old) | set(meta_dict) if old.get(k) != meta_dict.get(k))
            raise ValueError(
                f"{path} was written with other settings (differs in {diff}): use a new output folder"
            )
    elif rank == 0:
        atomic_write_json(path, meta_dict)


def storage_report(meta, n_samples: int | None) -> str:
    """One line: the storage cost per sample (and for the whole input when its size is known)."""
    from vfmkit.data.reinforced import storage_breakdown

    parts = storage_breakdown(meta)
    detail = ", ".join(f"{k} {v / 1024:.1f}" for k, v in parts.items() if k != "total")
    line = f"storage: {parts['total'] / 1024:.1f} KiB/sample ({detail} KiB; {meta.kind}, {meta.storage})"
    if n_samples:
        line += f"; about {parts['total'] * n_samples / 2**20:.1f} MiB for {n_samples} samples"
    return line


def write_manifest_if_complete(
    urls: list[str], out_dir: Path, kind: str = "reinforced", metadata: str = METADATA
) -> dict | None:
    """Once every input shard has its done marker, write ``manifest.json`` (vfmkit-shards/1, input order).

    Any rank may be the last to finish; the manifest's content depends only on the markers, so concurrent
    writers write the same bytes (atomically). ``kind`` / ``metadata`` name the store (reinforced data,
    pseudo-labels) and its metadata file."""
    from vfmkit.data.io import atomic_write_json
    from vfmkit.data.shards import FORMAT, MANIFEST

    names = [out_name(u) for u in urls]
    if not all(shard_done(out_dir, n) for n in names):
        return None
    markers = [json.loads((out_dir / (n + DONE_SUFFIX)).read_text(encoding="utf-8")) for n in names]
    manifest = {
        "format": FORMAT,
        "shards": [{k: m[k] for k in ("name", "count", "sha256")} for m in markers],
        "count": sum(m["count"] for m in markers),
        "kind": kind,
        "metadata": metadata,
        "skipped": [s for m in markers for s in m["skipped"]],
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def reinforce(
    inputs,
    out_dir: str | Path,
    args: ReinforceArgs,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    reinforcer: Reinforcer | None = None,
) -> dict:
    """Reinforce the shards ``inputs`` (any :func:`~vfmkit.data.shards.list_shards` spec) into ``out_dir``.

    Rank/world size default to torchrun's env vars. Shards already done (tar + marker) are skipped, so rerunning
    the same command after a crash resumes. Returns ``{"done", "resumed", "samples", "seconds",
    "samples_per_s", "manifest"}`` for this rank.
    """
    from vfmkit.data.shards import list_shards

    env_rank, env_world = dist_env()
    rank, world_size = env_rank if rank is None else rank, env_world if world_size is None else world_size
    urls = list_shards(inputs)
    out = Path(out_dir)
    from vfmkit.data.lock import FolderLock, probe_writable

    # rank 0 holds OUT/.lock (torchrun's other ranks share the folder by design; a second job fails at once)
    lock = FolderLock(out, f"vfmkit reinforce {args.mode}").acquire() if rank == 0 else None
    try:
        probe_writable(out)
        res = _reinforce_locked(urls, out, args, rank, world_size, progress, reinforcer)
    except BaseException:
        if lock is not None:
            lock.release(
                discard_if_unused=True
            )  # refused before writing (e.g. unknown teacher): no folder left
        raise
    if lock is not None:
        lock.release()
    return res


def _reinforce_locked(urls, out: Path, args: ReinforceArgs, rank, world_size, progress, reinforcer) -> dict:
    from vfmkit.data.shards import shard_counts

    gen = reinforcer or Reinforcer(args)
    check_or_write_meta(out, gen.meta.to_dict(), rank)
    mine = rank_shards(urls, rank, world_size)
    todo = [u for u in mine if not shard_done(out, out_name(u))]
    counts = shard_counts(urls) or {}
    if rank == 0:
        print(
            storage_report(gen.meta, sum(counts.values()) if len(counts) == len(urls) else None), flush=True
        )
    print(
        f"reinforce rank {rank}/{world_size}: {len(mine)} shards, {len(mine) - len(todo)} already done, "
        f"{len(todo)} to go",
        flush=True,
    )
    bar = _progress_bar(sum(counts.get(u, 0) for u in todo) or None, rank, progress)
    t0, n = time.perf_counter(), 0
    done = []
    for url in todo:
        ts = time.perf_counter()
        marker = gen.run_shard(url, out, on_samples=bar.update if bar else None)
        n += marker["count"]
        done.append(marker["name"])
        dt = time.perf_counter() - ts
        for s in marker["skipped"]:
            print(f"skipped unreadable sample {s}", flush=True)
        if bar is None:
            print(
                f"{marker['name']}: {marker['count']} samples in {dt:.1f}s ({marker['count'] / max(dt, 1e-9):.1f} "
                f"samples/s)",
                flush=True,
            )
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t0
    return {
        "done": done,
        "resumed": len(mine) - len(todo),
        "samples": n,
        "seconds": secs,
        "samples_per_s": n / max(secs, 1e-9),
        "manifest": write_manifest_if_complete(urls, out),
    }


def _progress_bar(total: int | None, rank: int, enabled: bool):
    if not enabled or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="reinforce", dynamic_ncols=True, smoothing=0.1)
