"""Reinforcement generation throughput vs the bare teacher forward on the same batches.

    python benchmarks/reinforce_generation.py [--n 300] [--n-aug 2] [--rounds 2] [--data /work/shared/data/flickr8k]

~300 real Flickr8k TRAIN photos (160 px) are sharded (3 shards); one run of ``vfmkit.pipelines.reinforce``
(read tar, decode, draw + render the augmentations at the teacher's size, teacher image + text forwards, encode
npz, write tar + sha256 + done marker) is timed against the teacher alone (``encode_image`` on exactly the
rendered batches the generator feeds it, ``encode_text`` on the same caption batches). Synthetic captions come
from a JSONL (the other real captions), so captioner cost is in neither. Teacher: ``load_teacher("offline")``
(EfficientNet-Lite0 + MiniLM); while its trained heads are not shipped, the same towers with untrained heads
(identical compute). Rounds are interleaved and the best time of each kind is kept (shared, noisy CPU).
overhead = 1 - generation samples/s / bare samples/s; floor: overhead <= 15%.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from vfmkit.data.shards import ShardWriter, list_shards
from vfmkit.methods.captions import write_captions_jsonl
from vfmkit.models.teachers import TeacherEnsemble, load_teacher
from vfmkit.pipelines.reinforce import ReinforceArgs, Reinforcer, iter_shard, reinforce

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (for _record)
from _record import machine, now, record  # noqa: E402

FLOOR = 0.15


def build_shards(data: Path, n: int, out: Path) -> dict[str, list[str]]:
    """First ``n`` TRAIN photos (never val) + their captions -> 3 vfmkit shards; returns {uid: captions}."""
    train = json.loads((data / "splits.json").read_text())["train"][:n]
    caps: dict[str, list[str]] = {}
    with open(data / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            caps.setdefault(row["image"], []).append(row["caption"])
    wanted, jpgs = set(train), {}
    with tarfile.open(data / "images.tar") as tar:
        for m in tar:
            name = Path(m.name).name
            if m.isfile() and name in wanted:
                jpgs[name] = tar.extractfile(m).read()
    with ShardWriter(out, max_count=-(-n // 3)) as w:
        for i, name in enumerate(train):
            w.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": jpgs[name],
                    "txt": caps[name][0],
                    "json": {"uid": name, "captions": caps[name]},
                }
            )
    return {name: caps[name] for name in train}


def make_teacher():
    try:
        return load_teacher("offline"), "offline (shipped)"
    except (FileNotFoundError, ValueError, OSError):
        from vfmkit.models.offline_teacher import OfflineHeads, OfflineTeacher

        torch.manual_seed(0)
        return OfflineTeacher(
            OfflineHeads(256), 224, 100.0, name="offline-untrained-heads"
        ), "offline towers (EfficientNet-Lite0 224 + MiniLM) with untrained heads: shipped heads not found"


def bare_pass(gen: Reinforcer, batches: list[tuple[torch.Tensor, list[str]]]) -> float:
    t0 = time.perf_counter()
    for renders, texts in batches:
        for t in gen.teachers.teachers:
            gen._batched(t.encode_image, renders, renders.shape[0])
        gen._batched(gen.teachers.encode_text, texts, len(texts))
    return time.perf_counter() - t0


def gen_pass(gen: Reinforcer, src: Path, out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = reinforce(str(src), out, gen.args, progress=False, reinforcer=gen)
    return time.perf_counter() - t0, res["samples"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/flickr8k"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--n-aug", type=int, default=2)
    ap.add_argument("--n-syn", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (teacher) in both measurements"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_reinforce_"))
    try:
        caps = build_shards(a.data, a.n, tmp / "src")
        write_captions_jsonl(tmp / "syn.jsonl", {u: c[1 : 1 + a.n_syn] for u, c in caps.items()})
        teacher, teacher_note = make_teacher()
        args = ReinforceArgs(
            mode="clip",
            teachers=[teacher.name],
            n_aug=a.n_aug,
            recipe={"name": "rrc_ra", "size": teacher.image_size},
            captions=str(tmp / "syn.jsonl"),
            n_syn=a.n_syn,
            batch_size=64,
            chunk=32,
        )
        gen = Reinforcer(args, teachers=TeacherEnsemble([teacher]))
        batches = []  # exactly what the generator feeds the teacher: rendered augmentations + caption batches
        for url in list_shards(str(tmp / "src")):
            for i, raws in enumerate(gen._chunks(url)):
                c = gen.prepare(raws, i)
                syn = gen.captions(c.uids, c.images, 0)
                batches.append(
                    (
                        c.renders[teacher.image_size],
                        [t for k in range(len(c.keys)) for t in [c.texts[k], *syn[k]]],
                    )
                )
        n = sum(len(list(iter_shard(u))) for u in list_shards(str(tmp / "src")))
        bare_pass(gen, batches[:1])  # warm-up (allocator, oneDNN kernels)
        bare_t, gen_t = [], []
        for r in range(a.rounds):
            bare_t.append(bare_pass(gen, batches))
            t, count = gen_pass(gen, tmp / "src", tmp / f"out{r}")
            assert count == n, (count, n)
            gen_t.append(t)
            print(
                f"round {r}: bare {n / bare_t[-1]:.2f} samples/s, generation {n / gen_t[-1]:.2f} samples/s",
                flush=True,
            )
        report(a, n, teacher, teacher_note, bare_t, gen_t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(a, n: int, teacher, note: str, bare_t: list[float], gen_t: list[float]) -> None:
    bare_sps, gen_sps = n / min(bare_t), n / min(gen_t)
    overhead = 1.0 - gen_sps / bare_sps
    headline = (
        f"reinforce generation vs bare teacher forward ({teacher.name}, {n} Flickr8k train photos, "
        f"n_aug {a.n_aug}, n_syn {a.n_syn}, {teacher.image_size} px, CPU): {gen_sps:.2f} vs {bare_sps:.2f} "
        f"samples/s, ratio {gen_sps / bare_sps:.3f}, overhead {overhead * 100:.1f}% (floor <= {FLOOR * 100:.0f}%)"
    )
    out = {
        "headline": headline,
        "floor": FLOOR,
        "floor_met": bool(overhead <= FLOOR),
        "overhead": overhead,
        "ratio": gen_sps / bare_sps,
        "generation_samples_per_s": gen_sps,
        "bare_samples_per_s": bare_sps,
        "bare_seconds": bare_t,
        "generation_seconds": gen_t,
        "n": n,
        "n_aug": a.n_aug,
        "n_syn": a.n_syn,
        "teacher": teacher.name,
        "teacher_note": note,
        "rounds": a.rounds,
        "date": now(),
        "machine": machine(),
    }
    text = "\n".join(
        [headline, json.dumps({k: out[k] for k in ("floor", "floor_met", "teacher_note", "date", "machine")})]
    )
    print(text)
    record("reinforce_generation", out, text)


if __name__ == "__main__":
    main()
