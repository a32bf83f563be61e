"""A time-stamped stream of image-text shards cut into time steps (TiC-CLIP, arXiv:2310.16226).

``tag_stream`` reads any vfmkit / img2dataset shards, takes each sample's time from its json (``timestamp``: unix
seconds or an ISO date; or ``year``) or from a ``uid,timestamp`` CSV, groups the times by year, by month or by
custom cut points, and writes one folder per step::

    out/stream.json                      steps, counts, classnames (see read_stream)
    out/step-00/train/  out/step-00/eval/ ...

The held-out ``eval`` split is decided per *group* (json ``group``, else the uid) by a hash of the group, so all
members of a group (e.g. the skin-tone variants of one emoji) fall on the same side, in every step.

The replay buffer is a budget in samples (``mix_counts``); which old samples are kept is decided by
``replay_subset``: the ``n`` samples with the smallest ``seed_of(salt, uid)``. That is deterministic (a rerun picks
the same samples) and nested (a smaller budget keeps a subset of what a larger one kept), like a buffer that only
ever drops samples. ``build_mix`` writes the data mix of one step (its own shards, written once), interleaved by
``mix_order`` so that every prefix and every shard of the mix holds each step's share.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vfmkit.data.io import atomic_write_json
from vfmkit.data.rng import seed_of
from vfmkit.data.shards import MANIFEST, ShardWriter, iter_shard, list_shards, read_manifest

STREAM_FILE = "stream.json"
STREAM_FORMAT = "vfmkit-stream/1"
MIX_KINDS = ("new", "all", "exp", "equal")


class StreamError(ValueError):
    """A stream problem; the message names the file, sample or key."""


def parse_time(value: object) -> datetime:
    """A json/CSV time value -> UTC datetime: a year (int <= 9999), unix seconds, or an ISO 8601 date string."""
    if isinstance(value, bool) or value is None:
        raise StreamError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        if 0 < value <= 9999 and float(value).is_integer():
            return datetime(int(value), 1, 1, tzinfo=UTC)
        return datetime.fromtimestamp(float(value), tz=UTC)
    s = str(value).strip()
    if s.isdigit() and len(s) <= 4:
        return datetime(int(s), 1, 1, tzinfo=UTC)
    try:
        return parse_time(float(s))
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as e:
        raise StreamError(f"not a time: {value!r} (year, unix seconds or ISO 8601)") from e
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Grouping:
    """How times become steps: ``by`` = "year", "month" or "boundaries" (then ``cuts``: ascending cut points;
    step k holds times in [cut[k-1], cut[k]), the first step everything before ``cuts[0]``)."""

    by: str = "year"
    cuts: tuple[datetime, ...] = ()

    @classmethod
    def make(cls, by: str = "year", boundaries: Sequence[object] | None = None) -> Grouping:
        if boundaries:
            cuts = tuple(parse_time(b) for b in boundaries)
            if list(cuts) != sorted(cuts) or len(set(cuts)) != len(cuts):
                raise StreamError(f"boundaries must be strictly ascending, got {list(boundaries)!r}")
            return cls("boundaries", cuts)
        if by not in ("year", "month"):
            raise StreamError(f"grouping {by!r}: expected 'year', 'month' or custom boundaries")
        return cls(by)

    def key(self, t: datetime) -> object:
        if self.by == "year":
            return t.year
        if self.by == "month":
            return (t.year, t.month)
        return sum(t >= c for c in self.cuts)


def is_heldout(group: str, eval_frac: float, salt: str = "tic-eval") -> bool:
    """Whether ``group`` is in the held-out eval split: a hash of the group, so a group is never split."""
    return seed_of(salt, group) / 2.0**64 < eval_frac


def replay_subset(uids: Iterable[str], n: int, salt: str = "tic-replay") -> list[str]:
    """The ``n`` uids with the smallest ``seed_of(salt, uid)``, in that order (deterministic, nested in ``n``)."""
    ranked = sorted(set(uids), key=lambda u: (seed_of(salt, u), u))
    return ranked[: max(0, n)]


def mix_counts(sizes: Sequence[int], t: int, kind: str, budget: int | None = None) -> list[int]:
    """Samples taken from each step 0..t for step ``t``'s training mix.

    ``new``: step t only (Sequential). ``all``: every sample so far (Cumulative-All, Oracle, Restart). ``equal``:
    all of step t plus a replay buffer of ``budget`` samples (default: the size of step t) split equally over the
    old steps. ``exp``: the same buffer with old steps' shares halving with age (t-1 gets 1/2, t-2 1/4, ...,
    normalised). A step never gives more than it has, so the buffer is at most ``budget``.
    """
    if kind not in MIX_KINDS:
        raise StreamError(f"mix kind {kind!r}: expected one of {', '.join(MIX_KINDS)}")
    if not 0 <= t < len(sizes):
        raise StreamError(f"step {t} outside the stream's {len(sizes)} steps")
    if kind == "new":
        return [0] * t + [sizes[t]]
    if kind == "all" or t == 0:
        return list(sizes[: t + 1])
    budget = sizes[t] if budget is None else int(budget)
    if budget < 0:
        raise StreamError(f"replay budget must be >= 0 samples, got {budget}")
    w = [1.0] * t if kind == "equal" else [2.0 ** -(t - j) for j in range(t)]
    total = sum(w)
    shares = [math.floor(budget * x / total) for x in w]
    return [min(sizes[j], shares[j]) for j in range(t)] + [sizes[t]]


def _uid(meta: dict, key: str) -> str:
    return str(meta.get("uid", key))


def _load_times_csv(path: str | Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        if not rows.fieldnames or not {"uid", "timestamp"} <= set(rows.fieldnames):
            raise StreamError(f"{path}: expected a CSV with columns uid,timestamp (got {rows.fieldnames})")
        return {r["uid"]: r["timestamp"] for r in rows}


def _label(key: object, times: list[datetime]) -> str:
    lo, hi = min(times), max(times)
    if isinstance(key, tuple):
        return f"{key[0]}-{key[1]:02d}"
    return str(lo.year) if lo.year == hi.year else f"{lo.year}-{hi.year}"


def tag_stream(
    spec: str | Path | list[str],
    out_dir: str | Path,
    *,
    by: str = "year",
    boundaries: Sequence[object] | None = None,
    timestamps_csv: str | Path | None = None,
    eval_frac: float = 0.2,
    shard_size: int = 1000,
    extra: dict | None = None,
) -> dict:
    """Cut the shards of ``spec`` into time steps with held-out eval splits; returns the ``stream.json`` dict.

    Written once: an existing ``stream.json`` made from the same source and settings is returned as is. A sample
    with no readable time (or no json) is skipped, named in ``skipped`` and counted in ``n_skipped``.
    """
    out = Path(out_dir)
    grouping = Grouping.make(by, boundaries)
    tag = {
        "source": [str(u) for u in list_shards(spec)],
        "by": grouping.by,
        "boundaries": [c.isoformat() for c in grouping.cuts],
        "eval_frac": eval_frac,
        "timestamps_csv": str(timestamps_csv) if timestamps_csv else None,
    }
    if (out / STREAM_FILE).is_file():
        s = read_stream(out)
        if s.get("tag") == tag:
            return s
        (out / STREAM_FILE).unlink()  # no stream.json may describe shards that are about to be rewritten
    times_csv = _load_times_csv(timestamps_csv) if timestamps_csv else None
    # pass 1: times and groups (cheap: json only is parsed)
    recs, skipped, classnames = [], [], {}
    for url in tag["source"]:
        for raw in iter_shard(url):
            key = raw["__key__"]
            try:
                meta = json.loads(raw["json"]) if "json" in raw else {}
                uid = _uid(meta, key)
                if times_csv is not None:
                    if uid not in times_csv:
                        raise StreamError(f"uid {uid!r} not in {timestamps_csv}")
                    tv = times_csv[uid]
                elif "timestamp" in meta:
                    tv = meta["timestamp"]
                elif "year" in meta:
                    tv = meta["year"]
                else:
                    raise StreamError("json has no 'timestamp' or 'year'")
                t = parse_time(tv)
            except (StreamError, ValueError, UnicodeDecodeError) as e:
                skipped.append({"url": url, "key": key, "reason": f"{type(e).__name__}: {e}"})
                continue
            if "label" in meta and "class" in meta:
                classnames[int(meta["label"])] = str(meta["class"])
            recs.append((url, key, uid, str(meta.get("group", uid)), t, grouping.key(t)))
    if not recs:
        raise StreamError(f"no sample of {spec!r} has a readable time ({len(skipped)} skipped)")
    keys = sorted({r[5] for r in recs})
    index = {k: i for i, k in enumerate(keys)}
    where = {(r[0], r[1]): (index[r[5]], is_heldout(r[3], eval_frac), r[2], r[3], r[4]) for r in recs}
    # pass 2: copy each sample into its step's split (members unchanged, json gains step/time/group)
    writers = {}
    try:
        for i in range(len(keys)):
            for split in ("train", "eval"):
                writers[i, split] = ShardWriter(
                    out / f"step-{i:02d}" / split, max_count=shard_size
                ).__enter__()
        for url in tag["source"]:
            for raw in iter_shard(url):
                w = where.get((url, raw["__key__"]))
                if w is None:
                    continue
                step, held, uid, group, t = w
                meta = json.loads(raw["json"]) if "json" in raw else {}
                meta.update(uid=uid, group=group, step=step, time=t.isoformat())
                sample = {k: v for k, v in raw.items() if not k.startswith("__")}
                sample.update(__key__=raw["__key__"], json=meta)
                writers[step, "eval" if held else "train"].write(sample)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w._abort()
        raise
    steps = []
    for i, k in enumerate(keys):
        rs = [r for r in recs if r[5] == k]
        ts = [r[4] for r in rs]
        tr = [r for r in rs if not where[r[0], r[1]][1]]
        ev = [r for r in rs if where[r[0], r[1]][1]]
        steps.append(
            {
                "index": i,
                "label": _label(k, ts),
                "start": min(ts).isoformat(),
                "end": max(ts).isoformat(),
                "n_train": len(tr),
                "n_eval": len(ev),
                "n_groups_train": len({r[3] for r in tr}),
                "n_groups_eval": len({r[3] for r in ev}),
            }
        )
    stream = {
        "format": STREAM_FORMAT,
        "tag": tag,
        "steps": steps,
        "n_skipped": len(skipped),
        "skipped": skipped[:100],
        "classnames": [classnames[i] for i in sorted(classnames)],
        **(extra or {}),
    }
    atomic_write_json(out / STREAM_FILE, stream)
    return stream


def read_stream(stream_dir: str | Path) -> dict:
    """``stream.json`` of a stream folder; errors name the file."""
    p = Path(stream_dir) / STREAM_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no {STREAM_FILE} in {str(stream_dir)!r}: run `vfmkit tic prepare` first")
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StreamError(f"corrupt stream file {str(p)!r}: {e}") from e
    if not isinstance(s, dict) or s.get("format") != STREAM_FORMAT or not isinstance(s.get("steps"), list):
        raise StreamError(f"{str(p)!r} is not a {STREAM_FORMAT} file")
    return s


def step_split(stream_dir: str | Path, step: int, split: str) -> Path:
    """Folder of one step's ``train`` or ``eval`` shards."""
    if split not in ("train", "eval"):
        raise StreamError(f"split {split!r}: expected 'train' or 'eval'")
    return Path(stream_dir) / f"step-{step:02d}" / split


def split_uids(stream_dir: str | Path, step: int, split: str = "train") -> list[str]:
    """uids of one step's split, in shard order."""
    return [
        _uid(json.loads(raw["json"]), raw["__key__"])
        for url in list_shards(step_split(stream_dir, step, split))
        for raw in iter_shard(url)
    ]


MIX_ORDER = (
    "stride-hash/1"  # the order build_mix writes a mix in (part of its tag: a new order rewrites old mixes)
)


def mix_order(groups: Sequence[Sequence[str]], salt: str = "tic-mix-order") -> list[tuple[int, str]]:
    """The order of a mix's samples: ``(group, uid)`` pairs, every prefix holding each group's share.

    Within a group, uids in ``seed_of(salt, uid)`` order (a deterministic shuffle); across groups, stride
    scheduling: the m-th sample of a group of n (out of N) sits at ``(m + 1/2) * N / n`` (ties: lower group first),
    so the first K samples hold within about one sample of ``K * n / N`` from each group, for every K.
    """
    keyed = []
    for j, g in enumerate(groups):
        ranked = sorted(set(g), key=lambda u: (seed_of(salt, u), u))
        n = len(ranked)
        keyed += [((m + 0.5) / n, j, u) for m, u in enumerate(ranked)]
    keyed.sort(key=lambda x: (x[0], x[1]))
    return [(j, u) for _, j, u in keyed]


def build_mix(
    stream_dir: str | Path,
    t: int,
    kind: str,
    out_dir: str | Path,
    budget: int | None = None,
    salt: str = "tic-replay",
    shard_size: int = 1000,
) -> dict:
    """Write step ``t``'s training mix (``mix_counts`` samples of each step, chosen by ``replay_subset``).

    The samples are written in ``mix_order``: interleaved so that every prefix, hence every shard, holds each
    step's share of the mix. A training run that sees less than one pass of the mix (or reads its shards in any
    order through a small shuffle buffer) still sees the configured mix, not mostly the shards it happened to
    read first. The order is a pure function of the uids: a rerun writes byte-identical shards.

    Returns the mix's shard manifest; its ``tic_mix`` entry holds the kind, counts and the uids per step. Written
    once: an existing manifest with the same tag is returned as is (a rerun or resume reuses it).
    """
    import shutil
    import tempfile
    from contextlib import ExitStack

    s = read_stream(stream_dir)
    sizes = [st["n_train"] for st in s["steps"]]
    counts = mix_counts(sizes, t, kind, budget)
    tag = {
        "stream": str(Path(stream_dir).resolve()),
        "t": t,
        "kind": kind,
        "budget": budget,
        "salt": salt,
        "counts": counts,
        "order": MIX_ORDER,
    }
    out = Path(out_dir)
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
        if m.get("tic_mix", {}).get("tag") == tag:
            return m
        (out / MANIFEST).unlink()
    chosen = {}
    for j, n in enumerate(counts):
        uids = split_uids(stream_dir, j)
        chosen[j] = set(uids if n >= len(uids) else replay_subset(uids, n, salt))
    pos = {ju: p for p, ju in enumerate(mix_order([sorted(chosen[j]) for j in range(t + 1)]))}
    # external bucketing, so memory stays at one bucket: each sample goes to the staging shard of its position's
    # bucket (in read order, noted in `staged`), then each bucket is sorted by position into the mix
    bucket = max(shard_size, -(-len(pos) // 256))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        staged: dict[int, list[int]] = {}
        seen: set[int] = set()  # a uid listed twice in a step's shards is written once
        with ExitStack() as stack:
            writers: dict[int, ShardWriter] = {}
            for j in range(t + 1):
                for url in list_shards(step_split(stream_dir, j, "train")):
                    for raw in iter_shard(url):
                        p = pos.get((j, _uid(json.loads(raw["json"]), raw["__key__"])))
                        if p is None or p in seen:
                            continue
                        seen.add(p)
                        b = p // bucket
                        if b not in writers:
                            writers[b] = stack.enter_context(
                                ShardWriter(staging / f"b{b:05d}", max_count=bucket + 1)
                            )
                            staged[b] = []
                        writers[b].write(
                            {k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}
                        )
                        staged[b].append(p)
        with ShardWriter(out, max_count=shard_size) as w:
            for b in sorted(staged):
                samples = [r for u in list_shards(staging / f"b{b:05d}") for r in iter_shard(u)]
                for _, raw in sorted(zip(staged[b], samples, strict=True), key=lambda x: x[0]):
                    w.write({k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")})
            w.extra["tic_mix"] = {
                "tag": tag,
                "n": sum(counts),
                "uids": {str(j): sorted(v) for j, v in chosen.items()},
            }
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_manifest(out)
