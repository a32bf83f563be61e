"""Shared test fixtures: small real samples taken from the embedded assets (no /work/shared needed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

from vfmkit.data.shards import list_shards


def read_builtin_samples(name: str, n: int) -> list[dict]:
    """First ``n`` raw samples (bytes per extension, ``__key__``) of an embedded dataset, in shard order."""
    pipe = wds.DataPipeline(wds.SimpleShardList(list_shards(f"builtin:{name}")), wds.tarfile_to_samples())
    out = []
    for s in pipe:
        out.append(s)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="session")
def flickr_samples() -> list[dict]:
    """16 real Flickr8k samples (112 px JPEG, 5 captions) from the embedded ``flickr8k/heldout``."""
    return read_builtin_samples("flickr8k/heldout", 16)


@pytest.fixture
def caption_folder(tmp_path: Path, flickr_samples: list[dict]) -> tuple[Path, Path, dict[str, list[str]]]:
    """A folder of 12 real JPEGs named by Flickr id plus an ``image,caption`` CSV (5 rows per image).

    Returns (images_dir, captions_csv, {image name: captions}).
    """
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    caps: dict[str, list[str]] = {}
    for s in flickr_samples[:12]:
        meta = json.loads(s["json"])
        (img_dir / meta["uid"]).write_bytes(s["jpg"])
        caps[meta["uid"]] = meta["captions"]
    csv_path = tmp_path / "captions.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name, cs in caps.items():
            for c in cs:
                w.writerow([name, c])
    return img_dir, csv_path, caps


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """Tests run tiny models: one intra-op thread is as fast as two there, and on a shared, oversubscribed CPU
    spinning OpenMP threads ran ~10x slower. Multi-process tests set OMP_NUM_THREADS=1 themselves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
