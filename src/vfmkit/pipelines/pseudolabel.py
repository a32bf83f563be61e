"""CLIPTeX pseudo-label generation (``vfmkit reinforce dense``): each task expert runs once over image-text
shards and its outputs are stored beside the samples.

For each input shard one output shard of the same name holds every input member of each sample (jpg, txt, json,
...) plus ``labels.json`` (``uid``, ``sha256`` of the jpg the labels were made from, the experts, the stored
augmentation parameters ``paug``) and one member per expert output (:func:`vfmkit.models.experts.label_ext`):
class ids as an 8-bit PNG, probabilities quantised to uint8 (PNG), depth as fp16 ``.npy``. With ``n_aug > 0``,
``n_aug`` paired crop+flip parameter sets are drawn per sample from ``seeded_rng("dense", seed, uid, a)`` and
stored; an expert that declares ``crop=True`` is run on each stored crop's region (``<name>.<a>.png``), the others
on the whole image (replaying a crop then crops their label with the same box, as the image).

Resumable and split by rank exactly like reinforcement (it is the same machinery, ``pipelines.reinforce``: one
output tar per input shard written under a ``.work`` folder and ``os.replace``d, then a done marker; finished
shards are skipped on a rerun; rank ``r`` of ``W`` takes shards ``i % W == r``; ``OUT/.lock``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from vfmkit.models.experts import Expert, check_expert, encode_output, label_ext
from vfmkit.pipelines.reinforce import (
    DONE_SUFFIX,
    check_or_write_meta,
    dist_env,
    out_name,
    rank_shards,
    shard_done,
    write_manifest_if_complete,
)

METADATA = "pseudolabels.json"
LABELS = "labels.json"
GENERATOR = "vfmkit.pipelines.pseudolabel/1"


@dataclass
class PseudoLabelArgs:
    n_aug: int = 0  # stored crop parameter sets per sample (needed by experts with crop=True)
    size: tuple[int, int] = (64, 64)  # training output size (H, W) the stored crops are drawn for
    scale: tuple[float, float] = (0.35, 1.0)
    flip_p: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_aug < 0:
            raise ValueError(f"n_aug must be >= 0, got {self.n_aug}")
        self.size = tuple(int(v) for v in self.size)
        self.scale = tuple(float(v) for v in self.scale)

    def augment(self):
        from vfmkit.data.dense import DenseAugment

        return DenseAugment(size=self.size, scale=self.scale, flip_p=self.flip_p)


def metadata(experts: list[Expert], args: PseudoLabelArgs) -> dict:
    return {
        "generator": GENERATOR,
        "kind": "pseudolabels",
        "experts": [e.describe() for e in experts],
        "n_aug": args.n_aug,
        "augment": {"size": list(args.size), "scale": list(args.scale), "flip_p": args.flip_p},
        "seed": args.seed,
    }


def open_sample(raw: dict, aug, seed: int, n_aug: int):
    """A raw shard sample -> ``(jpg bytes, uint8 image [3, H, W], uid, n_aug augmentation params)``: what every
    store of per-view teacher outputs (this module's experts, ``pipelines.transfer_seg``) starts from."""
    from vfmkit.data.decode import decode_uint8

    jpg = raw.get("jpg") or raw.get("jpeg") or raw.get("png")
    if jpg is None:
        raise KeyError("jpg (no image member)")
    image = decode_uint8(raw)
    meta = json.loads(raw["json"]) if "json" in raw else {}
    uid = str(meta.get("uid", raw["__key__"]))
    H, W = int(image.shape[-2]), int(image.shape[-1])
    return jpg, image, uid, [aug.sample_for(seed, uid, a, (H, W)) for a in range(n_aug)]


def labels_record(uid: str, jpg: bytes, image, experts: dict, params: list) -> bytes:
    """The ``labels.json`` member: the sample's uid and image hash, size, experts and stored augmentations."""
    return json.dumps(
        {
            "uid": uid,
            "sha256": hashlib.sha256(jpg).hexdigest(),
            "height": int(image.shape[-2]),
            "width": int(image.shape[-1]),
            "experts": experts,
            "paug": [p.to_json() for p in params],
        },
        sort_keys=True,
    ).encode()


def label_sample(raw: dict, experts: list[Expert], args: PseudoLabelArgs) -> dict:
    """One input sample -> the output sample (its members + ``labels.json`` + each expert's output)."""
    jpg, image, uid, params = open_sample(raw, args.augment(), args.seed, args.n_aug)
    out = {k: v for k, v in raw.items() if not k.startswith("__")}
    out["__key__"] = raw["__key__"]
    entries = {}
    for e in experts:
        if e.crop:
            for a, p in enumerate(params):
                i, j, h, w = p.crop
                out[label_ext(e, a)] = encode_output(e.kind, e(image[:, i : i + h, j : j + w].contiguous()))
        else:
            out[label_ext(e)] = encode_output(e.kind, e(image))
        entries[e.name] = {"kind": e.kind, "crop": e.crop}
    out[LABELS] = labels_record(uid, jpg, image, entries, params)
    return out


def run_shard(url: str, out_dir: Path, experts: list[Expert], args: PseudoLabelArgs, label_fn=None) -> dict:
    """Label one input shard into ``out_dir/<same name>`` atomically, then its done marker (reinforcement's
    layout: ``{"name", "count", "sha256", "skipped"}``). ``label_fn(raw) -> sample`` replaces
    :func:`label_sample` (another store of dense teacher outputs in this layout: ``pipelines.transfer_seg``)."""
    from vfmkit.data.io import atomic_write_json
    from vfmkit.data.shards import ShardWriter, iter_shard, sha256_file

    name = out_name(url)
    work = out_dir / f".work-{name}"
    shutil.rmtree(work, ignore_errors=True)  # leftovers of a killed run
    skipped: list[str] = []
    try:
        with ShardWriter(work, prefix="part", max_count=1 << 60) as writer:
            for raw in iter_shard(url):
                try:
                    sample = label_fn(raw) if label_fn else label_sample(raw, experts, args)
                except Exception as e:  # a corrupt input: named and counted, not labelled
                    skipped.append(f"{name}/{raw.get('__key__')}: {type(e).__name__}: {e}")
                    continue
                writer.write(sample)
            count = writer.count
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    part = work / "part-000000.tar"
    if count == 0:
        tarfile.open(part, "w", format=tarfile.GNU_FORMAT).close()
    os.replace(part, out_dir / name)
    marker = {"name": name, "count": count, "sha256": sha256_file(out_dir / name), "skipped": skipped}
    shutil.rmtree(work, ignore_errors=True)
    atomic_write_json(out_dir / (name + DONE_SUFFIX), marker)
    return marker


def storage_line(out: Path, names: list[str], experts: list[Expert]) -> str:
    """Bytes per sample of the stored labels (all experts together and each), from the finished shards."""
    from vfmkit.data.shards import iter_shard

    per: dict[str, int] = {e.name: 0 for e in experts}
    n = 0
    for name in names:
        if not shard_done(out, name):
            continue
        for s in iter_shard(str(out / name)):
            n += 1
            for k, v in s.items():
                first = k.split(".")[0]
                if first in per:
                    per[first] += len(v)
    if n == 0:
        return "storage: no labelled samples"
    total = sum(per.values())
    detail = ", ".join(f"{k} {v / n / 1024:.2f}" for k, v in per.items())
    return f"storage: {total / n / 1024:.2f} KiB/sample of pseudo-labels ({detail} KiB) over {n} samples"


def pseudolabel(
    inputs,
    out_dir: str | Path,
    experts: list[Expert],
    args: PseudoLabelArgs | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    verbose: bool = True,
) -> dict:
    """Run ``experts`` over the shards ``inputs`` into ``out_dir``; a rerun resumes (finished shards skipped).

    Returns ``{"done", "resumed", "samples", "seconds", "s_per_image", "storage", "manifest"}`` for this rank."""
    from vfmkit.data.lock import FolderLock, probe_writable
    from vfmkit.data.shards import list_shards

    args = args or PseudoLabelArgs()
    if not experts:
        raise ValueError("reinforce dense: no expert given")
    for e in experts:
        check_expert(e)
        if e.crop and args.n_aug < 1:
            raise ValueError(f"expert {e.name!r} expects crops: give n_aug >= 1")
    if len({e.name for e in experts}) != len(experts):
        raise ValueError("expert names must be distinct")
    env_rank, env_world = dist_env()
    rank, world_size = env_rank if rank is None else rank, env_world if world_size is None else world_size
    urls = list_shards(inputs)
    out = Path(out_dir)
    lock = FolderLock(out, "vfmkit reinforce dense").acquire() if rank == 0 else None
    try:
        probe_writable(out)
        check_or_write_meta(out, metadata(experts, args), rank, name=METADATA)
        mine = rank_shards(urls, rank, world_size)
        todo = [u for u in mine if not shard_done(out, out_name(u))]
        if verbose:
            print(
                f"reinforce dense rank {rank}/{world_size}: {len(mine)} shards, {len(mine) - len(todo)} already "
                f"done, {len(todo)} to go",
                flush=True,
            )
        t0, n, done = time.perf_counter(), 0, []
        for url in todo:
            marker = run_shard(url, out, experts, args)
            n += marker["count"]
            done.append(marker["name"])
            if verbose:
                for s in marker["skipped"]:
                    print(f"skipped unreadable sample {s}", flush=True)
        secs = time.perf_counter() - t0
        line = storage_line(out, [out_name(u) for u in mine], experts)
        if verbose:
            print(line, flush=True)
            if n:
                print(
                    f"generation: {n} images in {secs:.1f}s ({1000 * secs / n:.1f} ms/image, all experts)",
                    flush=True,
                )
        manifest = write_manifest_if_complete(urls, out, kind="pseudolabels", metadata=METADATA)
    except BaseException:
        if lock is not None:
            lock.release(discard_if_unused=True)
        raise
    if lock is not None:
        lock.release()
    return {
        "done": done,
        "resumed": len(mine) - len(todo),
        "samples": n,
        "seconds": secs,
        "s_per_image": secs / n if n else None,
        "storage": line,
        "manifest": manifest,
    }
