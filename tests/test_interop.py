"""Issue 18: vfmkit plays with the tools users already have (open_clip, open_clip_train, timm, img2dataset
folders), names its model-name readings, reads zero-shot class names from the shards, refuses a random
subclone parent, inspects every shard layout ``train`` reads, has a Python API, and logs plain lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from vfmkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
TINY_CLIP = ["train.steps=3", "train.log_every=1", "data.batch_size=8", "data.image_size=32", "train.ckpt_every=0",
             "train.tensorboard=false", "train.progress=false", "optim.warmup_steps=1"]


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 3-step vfm-tiny-vit CLIP run on the embedded Flickr8k subset (through ``vfmkit train``)."""
    out = tmp_path_factory.mktemp("interop") / "run"
    rc = main(["train", "clip_tiny", *_sets(f"out_dir={out}", *TINY_CLIP)])
    assert rc == 0
    return out


def _embed_script(name: str, pretrained: str | None = None) -> str:
    return f"""
import json, sys, torch, open_clip
torch.set_num_threads(1)
from PIL import Image
import io
m, _, pre = open_clip.create_model_and_transforms({name!r}, pretrained={pretrained!r})
tok = open_clip.get_tokenizer({name!r})
m.eval()
img = Image.open(io.BytesIO(open(sys.argv[1], 'rb').read())).convert('RGB')
with torch.no_grad():
    e_i = m.encode_image(pre(img)[None])
    e_t = m.encode_text(tok(['a dog runs on the grass', 'two children play']))
json.dump({{'image': e_i.tolist(), 'text': e_t.tolist()}}, sys.stdout)
"""


def _sample_jpg(tmp: Path) -> Path:
    from vfmkit.data.shards import iter_shard, list_shards

    s = next(iter(iter_shard(list_shards("builtin:flickr8k/heldout")[0])))
    p = tmp / "x.jpg"
    p.write_bytes(s["jpg"])
    return p


# --- 1. a run opens in plain open_clip -----------------------------------------------------------------------
def test_run_dir_opens_in_plain_open_clip(tiny_run: Path, tmp_path: Path):
    """``open_clip.create_model_and_transforms('local-dir:RUN')`` in a fresh process (no vfmkit import, no
    add_model_config) gives the same embeddings as vfmkit's loader on a real image and captions."""
    from PIL import Image

    from vfmkit.models.factory import create_clip

    assert (tiny_run / "open_clip_config.json").is_file()
    jpg = _sample_jpg(tmp_path)
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # plain open_clip: vfmkit not on the path
    r = subprocess.run([sys.executable, "-c", _embed_script(f"local-dir:{tiny_run}"), str(jpg)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads(r.stdout)
    b = create_clip(str(tiny_run))  # a run dir is a model name (local-dir: reading)
    b.model.eval()
    with torch.no_grad():
        e_i = b.model.encode_image(b.preprocess_val(Image.open(jpg).convert("RGB"))[None])
        e_t = b.model.encode_text(b.tokenizer(["a dog runs on the grass", "two children play"]))
    assert torch.equal(torch.tensor(theirs["image"]), e_i)
    assert torch.equal(torch.tensor(theirs["text"]), e_t)
    # the trained weights, not a fresh init: they equal the run's model.safetensors and differ from step 0
    from safetensors.torch import load_file

    sd = load_file(str(tiny_run / "model.safetensors"))
    assert all(torch.equal(sd[k], v) for k, v in b.model.state_dict().items())
    assert b.image_size == 32
