"""vfmkit's ShardLoader against a plain webdataset pipeline, same shards, decode, batch and machine.

Data: real Flickr8k TRAIN-split photos (160 px; first ``--n`` of the sorted split, all 6,091 with ``--n 0``)
imported into shards of 250 by ``vfmkit.data.importer``. Both sides run with ``torch.set_num_threads(1)``: on this
shared 2-core machine the main process's collate (torch.stack) with 2 intra-op threads ran ~10x slower under load.
  - throughput: peer = the canonical webdataset pipeline (SimpleShardList -> split_by_worker ->
    tarfile_to_samples -> shuffle(1000) -> map(decode) -> batched(64)) in a torch DataLoader; vfmkit = ShardLoader
    with the same decode/batch/shuffle buffer. Rounds alternate; median samples/s per side. Floor: >= 0.9x
    (the resumable position and corrupt accounting may cost at most 10%).
  - resume: reaching batch k = 90% of an epoch after a restart; peer = replaying (decoding) the first k batches,
    which is what a loader without a skip-before-decode position has to do; vfmkit = load_state_dict + next().
    Floor: >= 3x faster.

    PYTHONPATH=src python3 benchmarks/data_loader.py [--data /work/shared/data] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from vfmkit.data.importer import import_captions
from vfmkit.data.loader import ShardLoader
from vfmkit.data.shards import list_shards

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (for _record)
from _record import machine, now, record  # noqa: E402

BATCH = 64


def decode(raw: dict) -> dict:
    """JPEG -> uint8 [3, 128, 128] centre crop; caption str."""
    im = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")
    w, h = im.size
    im = im.crop(((w - 128) // 2, (h - 128) // 2, (w - 128) // 2 + 128, (h - 128) // 2 + 128))
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(128, 128, 3).permute(2, 0, 1)
    return {"image": x.contiguous(), "txt": raw["txt"].decode()}


def peer_loader(urls: list[str], workers: int):
    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls, seed=0),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.shuffle(1000, initial=1000),
        wds.map(decode),
        wds.batched(BATCH, collation_fn=default_collate, partial=False),
    )
    return pipe if workers == 0 else DataLoader(pipe, batch_size=None, num_workers=workers)


def rate(loader) -> tuple[float, int]:
    """(samples/s, samples) for one full pass."""
    t, n = time.perf_counter(), 0
    for b in loader:
        n += len(b["txt"])
    return n / (time.perf_counter() - t), n


def bench_throughput(urls: list[str], workers: int, rounds: int) -> dict:
    peer, ours = [], []
    for _ in range(rounds):  # alternate so both sides share the machine's noise
        peer.append(rate(peer_loader(urls, workers))[0])
        ours.append(rate(ShardLoader(urls, decode, BATCH, shuffle_buffer=1000, num_workers=workers))[0])
    p, o = statistics.median(peer), statistics.median(ours)
    return {"workers": workers, "webdataset_samples_per_s": p, "vfmkit_samples_per_s": o, "ratio": o / p}


def bench_resume(urls: list[str]) -> dict:
    ref = ShardLoader(urls, decode, BATCH)
    k = int(0.9 * len(ref))
    it = iter(ref)
    t = time.perf_counter()
    for _ in range(k):  # the replay a restart costs without a resumable position
        next(it)
    replay_s = time.perf_counter() - t
    state = ref.state_dict()
    target = next(it)
    del it
    t = time.perf_counter()
    resumed = ShardLoader(urls, decode, BATCH)
    resumed.load_state_dict(state)
    first = next(iter(resumed))
    ff_s = time.perf_counter() - t
    assert first["txt"] == target["txt"], "resumed loader did not continue at the saved batch"
    return {"batches_skipped": k, "replay_s": replay_s, "fast_forward_s": ff_s, "ratio": replay_s / ff_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="images of the train split (0: all)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    fk = a.data / "flickr8k"
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        names = sorted(json.loads((fk / "splits.json").read_text())["train"])
        m = import_captions(fk / "images.tar", fk / "captions.csv", tmp, 250, names=names[: a.n or None])
        print(f"imported {m['count']} images", flush=True)
        import_s = time.perf_counter() - t
        urls = list_shards(tmp)
        rows = []
        for w in (0, 2):
            rows.append(bench_throughput(urls, w, a.rounds))
            print(rows[-1], flush=True)
        resume = bench_resume(urls)
    floor_tp, floor_resume = 0.9, 3.0
    worst = min(r["ratio"] for r in rows)
    tp = "; ".join(
        f"{r['workers']} workers: vfmkit {r['vfmkit_samples_per_s']:.0f} vs webdataset "
        f"{r['webdataset_samples_per_s']:.0f} samples/s = {r['ratio']:.2f}x"
        for r in rows
    )
    res = {
        "headline": f"ShardLoader vs plain webdataset pipeline, Flickr8k train ({m['count']} imgs, b{BATCH}): "
        f"{tp}; resume at 90% of epoch {resume['ratio']:.1f}x faster than replay",
        "floor": {"throughput_ratio": floor_tp, "resume_ratio": floor_resume},
        "floor_met": bool(worst >= floor_tp and resume["ratio"] >= floor_resume),
        "throughput": rows,
        "resume": resume,
        "import": {"images": m["count"], "seconds": import_s, "images_per_s": m["count"] / import_s},
        "date": now(),
        "machine": machine(),
    }
    text = "\n".join(
        [
            res["headline"],
            f"import: {m['count']} images in {import_s:.1f}s ({m['count'] / import_s:.0f}/s)",
            f"resume: replay {resume['replay_s']:.2f}s vs fast-forward {resume['fast_forward_s']:.2f}s",
            f"floor throughput>={floor_tp}x, resume>={floor_resume}x met: {res['floor_met']}",
            f"date {res['date']}, machine {res['machine']}",
        ]
    )
    print(text)
    record("data_loader", res, text)


if __name__ == "__main__":
    main()
