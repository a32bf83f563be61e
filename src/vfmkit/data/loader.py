"""Resumable, seeded, rank/worker-split batch loaders over webdataset shards and in-memory tensors.

``ShardLoader`` reads shards with webdataset's pipeline pieces. Every (rank, worker) "slot" reads a stream that is
a pure function of (seed, epoch, rank, worker): shard order shuffled with ``make_seed(seed, epoch)`` (the same on
every rank), shards split by rank then by worker, or, when there are fewer shards than slots, every slot reads all
shards and keeps samples ``i % n_slots == slot``; then a shuffle buffer with ``Random(make_seed(seed, epoch, slot))``.
Workers decode and collate whole batches and tag each batch with how far into their stream it reaches; the main
process records that position only when it hands the batch to the consumer. ``load_state_dict`` therefore makes
each stream skip exactly the samples already delivered, before decoding, so a resumed epoch neither repeats nor
skips samples (and with ``num_workers=0`` it is identical in order).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate
from webdataset.utils import make_seed

from vfmkit.data.shards import ShardError, fast_tar_samples, list_shards, shard_counts

log = logging.getLogger("vfmkit.data")


class CorruptSampleError(RuntimeError):
    """A sample whose ``decode_fn`` raised, under ``on_corrupt="raise"``; the message names shard and key."""


def _identity(x: Any) -> Any:
    return x


def _resampled(urls: list[str], n: int, seed: int, src: Any = None) -> Iterator[dict]:
    """``n`` shards drawn with replacement by ``Random(seed)``: the draws of webdataset 1.x's deterministic
    ``ResampledShards`` (``make_seed(worker_seed, epoch=0, seed)``), written here because 0.2.x's takes no
    ``seed`` and open_clip_train needs webdataset 0.2.x (so the stream is the same under both)."""
    rng = random.Random(seed)
    for _ in range(n):
        yield {"url": urls[rng.randint(0, len(urls) - 1)]}


def _split(src: Iterator, index: int, count: int) -> Iterator:
    """Every ``count``-th item starting at ``index``: explicit rank/worker split (webdataset's reads env vars)."""
    return islice(src, index, None, count)


def _shard_handler(exn: Exception) -> bool:
    # webdataset appends the url/stream to exn.args before calling the handler, so the message names the shard
    raise ShardError(f"cannot read shard: {exn}") from exn


def _tar_samples(src: Iterator[dict]) -> Iterator[dict]:
    """webdataset's ``tarfile_to_samples`` stage, with a fast path for local plain tars (the same samples:
    keys split at the first dot of the basename, extensions lower-cased, ``__key__`` / ``__url__`` set);
    remote URLs, compressed and pax tars go through webdataset itself."""
    wds_stage = wds.tarfile_to_samples(handler=_shard_handler)
    for d in src:
        try:
            fast = fast_tar_samples(d["url"])  # parses the headers: a truncated or corrupt tar raises here
            if fast is not None:
                yield from fast
        except ValueError as e:
            raise ShardError(f"cannot read shard: {e}") from e
        if fast is None:
            yield from wds_stage(iter([d]))


class _SlotStream(IterableDataset):
    """One epoch of the loader as seen by a DataLoader worker: yields tagged batches and marker records.

    Items are tuples ``(worker, end, corrupt, batch)``: ``end`` is the stream position after the last raw sample
    the item accounts for, ``corrupt`` the ``(index, url, key, error)`` entries met since the previous item and
    ``batch`` the collated batch, or None for the end-of-stream marker (which the main process filters out).
    """

    def __init__(self, loader: ShardLoader, epoch: int, skips: list[int]) -> None:
        super().__init__()
        self.loader, self.epoch, self.skips = loader, epoch, skips

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        ld = self.loader
        src = iter(ld._raw_pipeline(self.epoch, ld.rank, worker))
        skip = self.skips[worker]
        pending: list[dict] = []
        corrupt: list[tuple] = []
        i = skip - 1
        for i, raw in islice(enumerate(src), skip, None):  # skipped samples are never decoded
            try:
                pending.append(ld.decode_fn(raw))
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
                if ld.on_corrupt == "raise":
                    raise CorruptSampleError(
                        f"corrupt sample key={raw.get('__key__')!r} in shard {raw.get('__url__')!r}: {err}"
                    ) from e
                corrupt.append((i, raw.get("__url__"), raw.get("__key__"), err))
                continue
            if len(pending) == ld.batch_size:
                yield worker, i + 1, corrupt, ld.collate_fn(pending)
                pending, corrupt = [], []
        if pending and not ld.drop_last:
            yield worker, i + 1, corrupt, ld.collate_fn(pending)
            corrupt = []
        yield worker, i + 1, corrupt, None


class ShardLoader:
    """Batches from webdataset shards with seeded shuffling, rank/worker splits and an exact resumable position.

    ``decode_fn(raw) -> dict`` gets the raw sample (bytes per extension, ``__key__``, ``__url__``) and raises on a
    bad sample; ``collate_fn(list[dict])`` makes the batch (shapes are whatever decode_fn returns, stacked on a new
    leading batch dim by ``default_collate``). ``shuffle_buffer=0`` reads in shard order without any shuffling.
    ``resampled=True`` draws shards with replacement (per epoch, seeded). With ``world_size > 1``, ``drop_last`` and
    known shard counts, every rank stops after the same number of batches, so DDP steps stay in lockstep.
    After a full epoch the loader moves to the next epoch by itself; ``set_epoch`` sets it explicitly.
    """

    def __init__(
        self,
        urls: str | list[str],
        decode_fn: Callable[[dict], dict],
        batch_size: int,
        *,
        collate_fn: Callable[[list], Any] = default_collate,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = False,
        on_corrupt: str = "skip",
        drop_last: bool = True,
    ) -> None:
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt must be 'skip' or 'raise', got {on_corrupt!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.urls = list_shards(urls)  # FileNotFoundError naming the spec if it resolves to nothing
        self.decode_fn, self.collate_fn, self.batch_size = decode_fn, collate_fn, batch_size
        self.shuffle_buffer, self.seed, self.num_workers = shuffle_buffer, seed, num_workers
        self.rank, self.world_size, self.resampled = rank, world_size, resampled
        self.on_corrupt, self.drop_last = on_corrupt, drop_last
        self.n_workers = max(1, num_workers)
        self.n_slots = world_size * self.n_workers
        # fewer shards than slots: every slot reads all shards and keeps its samples modulo n_slots
        self.sample_split = len(self.urls) < self.n_slots
        self.counts = shard_counts(self.urls)
        self.epoch = 0
        self.corrupt: list[tuple[str, str, str]] = []
        self._corrupt_pos: list[tuple[int, int, int]] = []  # (epoch, worker, index) of each corrupt entry
        self._reset_position()

    @classmethod
    def from_config(
        cls, cfg: Any, decode_fn: Callable[[dict], dict], dist_info: Any = None, **overrides: Any
    ) -> ShardLoader:
        """The training loader of a run config: ``cfg.data`` (train shards, batch size, shuffle buffer, workers,
        resampling, corrupt policy), ``cfg.seed`` and the rank split of ``dist_info`` (None: one process),
        ``drop_last=True``. ``overrides`` replace any of those keyword arguments (``urls=`` the shards, e.g. a
        reinforced set; ``collate_fn=``...). A bad ``data.on_corrupt`` is a ConfigError naming the key."""
        from vfmkit.config import ConfigError

        d = cfg.data
        if d.on_corrupt not in ("skip", "raise"):
            raise ConfigError(f"config key 'data.on_corrupt': {d.on_corrupt!r} is not 'skip' or 'raise'")
        kw: dict[str, Any] = dict(
            urls=d.train,
            batch_size=d.batch_size,
            shuffle_buffer=d.shuffle_buffer,
            seed=cfg.seed,
            num_workers=d.num_workers,
            rank=getattr(dist_info, "rank", 0),
            world_size=getattr(dist_info, "world_size", 1),
            resampled=d.resampled,
            on_corrupt=d.on_corrupt,
            drop_last=True,
        )
        unknown = set(overrides) - set(kw) - {"collate_fn"}
        if unknown:
            raise TypeError(f"ShardLoader.from_config: unknown override(s) {', '.join(sorted(unknown))}")
        kw.update(overrides)
        return cls(kw.pop("urls"), decode_fn, kw.pop("batch_size"), **kw)

    # ---- stream definition (a pure function of seed, epoch, rank, worker) ----
    def _shard_source(self, epoch: int, rank: int, worker: int) -> list:
        """Pipeline stages that yield ``{"url": ...}`` for one slot's shards, in read order."""
        slot = rank * self.n_workers + worker
        shuffle = self.shuffle_buffer > 0
        if self.resampled:
            per_slot = len(self.urls) if self.sample_split else max(1, len(self.urls) // self.n_slots)
            # in sample-split mode all slots must draw the same shard sequence, else the modulo split overlaps
            slot_seed = 0 if self.sample_split else slot
            return [
                partial(_resampled, self.urls, per_slot, make_seed(slot_seed, 0, make_seed(self.seed, epoch)))
            ]
        stages = [wds.SimpleShardList(self.urls, seed=make_seed(self.seed, epoch) if shuffle else None)]
        if not self.sample_split:
            stages += [
                partial(_split, index=rank, count=self.world_size),
                partial(_split, index=worker, count=self.n_workers),
            ]
        return stages

    def _raw_pipeline(self, epoch: int, rank: int, worker: int) -> wds.DataPipeline:
        """Raw (undecoded) samples of one slot's stream."""
        slot = rank * self.n_workers + worker
        stages = self._shard_source(epoch, rank, worker) + [_tar_samples]
        if self.sample_split:
            stages.append(partial(_split, index=slot, count=self.n_slots))
        if self.shuffle_buffer > 0:
            rng = random.Random(make_seed(self.seed, epoch, slot))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        return wds.DataPipeline(*stages)

    def _slot_samples(self, epoch: int, rank: int, worker: int) -> int | None:
        """Raw samples in one slot's stream, from manifest counts (None when unknown)."""
        if self.counts is None:
            return None
        shards = [d["url"] for d in wds.DataPipeline(*self._shard_source(epoch, rank, worker))]
        if not self.sample_split:
            return sum(self.counts[u] for u in shards)
        total = sum(self.counts[u] for u in shards)
        slot = rank * self.n_workers + worker
        return len(range(slot, total, self.n_slots))

    def _rank_batches(self, epoch: int, rank: int) -> int | None:
        ns = [self._slot_samples(epoch, rank, w) for w in range(self.n_workers)]
        if any(n is None for n in ns):
            return None
        round_ = math.floor if self.drop_last else math.ceil
        return sum(round_(n / self.batch_size) for n in ns)

    def _epoch_cap(self, epoch: int) -> int | None:
        """Batches every rank can deliver (min over ranks) when DDP needs equal step counts."""
        if self.world_size == 1 or not self.drop_last:
            return None
        per_rank = [self._rank_batches(epoch, r) for r in range(self.world_size)]
        return None if any(b is None for b in per_rank) else min(per_rank)

    def __len__(self) -> int:
        """Batches in a full epoch for this rank (from manifest counts; corrupt samples make it an upper bound)."""
        cap = self._epoch_cap(self.epoch)
        n = cap if cap is not None else self._rank_batches(self.epoch, self.rank)
        if n is None:
            raise TypeError("ShardLoader length unknown: shards have no manifest / _stats.json counts")
        return n

    # ---- position ----
    def _reset_position(self) -> None:
        self._consumed = [0] * self.n_workers
        self._batches = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a different epoch restarts from its beginning, the same one keeps the position."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._reset_position()

    @property
    def n_corrupt(self) -> int:
        return len(self.corrupt)

    def state_dict(self) -> dict:
        """Plain-python position (safe for ``torch.load(weights_only=True)``)."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.n_workers,
            "n_urls": len(self.urls),
            "consumed": list(self._consumed),
            "batches": self._batches,
            "corrupt": [list(c) for c in self.corrupt],
            "corrupt_pos": [list(p) for p in self._corrupt_pos],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by ``state_dict``; the split layout must be the one it was saved with."""
        for k, mine in (
            ("seed", self.seed),
            ("world_size", self.world_size),
            ("num_workers", self.n_workers),
            ("n_urls", len(self.urls)),
        ):
            if state.get(k) != mine:
                raise ValueError(
                    f"loader state has {k}={state.get(k)!r} but this loader has {mine!r}: "
                    "the saved position does not map onto this split"
                )
        if state.get("rank") != self.rank:
            log.warning("loading loader state of rank %s on rank %s", state.get("rank"), self.rank)
        self.epoch = int(state["epoch"])
        self._consumed = [int(c) for c in state["consumed"]]
        self._batches = int(state["batches"])
        self.corrupt = [tuple(c) for c in state["corrupt"]]
        self._corrupt_pos = [tuple(p) for p in state["corrupt_pos"]]

    # ---- iteration ----
    def _items(self, epoch: int) -> Iterator[tuple]:
        ds = _SlotStream(self, epoch, list(self._consumed))
        if self.num_workers == 0:
            return iter(ds)
        dl = DataLoader(
            ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity, persistent_workers=False
        )
        return iter(dl)

    def __iter__(self) -> Iterator[Any]:
        """Yield the remaining batches of the current epoch, then advance to the next epoch."""
        epoch = self.epoch
        cap = self._epoch_cap(epoch)
        items = self._items(epoch)
        try:
            while cap is None or self._batches < cap:
                try:
                    worker, end, corrupt, batch = next(items)
                except StopIteration:
                    break
                for index, url, key, err in corrupt:
                    if self.on_corrupt == "skip":
                        log.warning("skipping corrupt sample %r in shard %r: %s", key, url, err)
                    self.corrupt.append((url, key, err))
                    self._corrupt_pos.append((epoch, worker, index))
                self._consumed[worker] = end
                if batch is None:
                    continue  # end-of-stream marker: position/corrupt bookkeeping only
                self._batches += 1
                yield batch
        finally:
            del items  # shuts DataLoader workers down when the consumer stops early
        if self.epoch == epoch:
            self.epoch = epoch + 1
            self._reset_position()


class TensorLoader:
    """Resumable batches over in-memory tensors (e.g. cached features), same API as ``ShardLoader``.

    ``tensors``: dict of tensors sharing the first dim N; batches are dicts of ``[batch_size, ...]`` slices. Each
    epoch uses ``randperm(N)`` seeded by ``make_seed(seed, epoch)`` (the same on every rank); rank r takes
    positions ``r, r + world_size, ...`` (truncated to equal length across ranks when ``drop_last``).
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        sizes = {k: t.shape[0] for k, t in tensors.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"tensors must be a non-empty dict with equal first dims, got {sizes}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.tensors, self.batch_size, self.seed, self.shuffle = tensors, batch_size, seed, shuffle
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.n = next(iter(sizes.values()))
        self.epoch, self._batches = 0, 0
        self.corrupt: list[
            tuple[str, str, str]
        ] = []  # in-memory tensors cannot be corrupt; kept for API parity

    n_corrupt = 0

    def _indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``: LongTensor [n_rank]."""
        if self.shuffle:
            g = torch.Generator().manual_seed(make_seed(self.seed, epoch))
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        stop = (self.n // self.world_size) * self.world_size if self.drop_last else self.n
        return perm[self.rank : stop : self.world_size]

    def __len__(self) -> int:
        n = len(self._indices(self.epoch))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._batches = epoch, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self._batches,
            "seed": self.seed,
            "n": self.n,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for k, mine in (
            ("seed", self.seed),
            ("n", self.n),
            ("world_size", self.world_size),
            ("batch_size", self.batch_size),
        ):
            if state.get(k) != mine:
                raise ValueError(f"loader state has {k}={state.get(k)!r} but this loader has {mine!r}")
        self.epoch, self._batches = int(state["epoch"]), int(state["batches"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        idx = self._indices(epoch)
        for b in range(self._batches, len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            self._batches = b + 1
            yield {k: t[sel] for k, t in self.tensors.items()}
        if self.epoch == epoch:
            self.epoch, self._batches = epoch + 1, 0
