"""The engine on real data: exact resume after kill -9, and training that really learns."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TRAIN_ARGS = [
    "--set",
    "train.steps=30",
    "--set",
    "train.ckpt_every=5",
    "--set",
    "data.batch_size=16",
    "--set",
    "train.progress=false",
    "--set",
    "train.log_every=5",
    "--set",
    "optim.warmup_steps=5",
    "--set",
    "data.shuffle_buffer=64",
]


def _train_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "vfmkit.cli", "train", "clip_tiny", "--out", str(out), *TRAIN_ARGS]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_kill_and_resume_gives_the_uninterrupted_weights(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_train_cmd(ref), check=True, env=_env(), capture_output=True, timeout=600)

    proc = subprocess.Popen(
        _train_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    killed_at = int(latest.read_text().split("-")[1])
    assert 5 <= killed_at < 30
    # the weights at the kill, read now: the resumed run keeps only its newest checkpoints
    at_kill = load_file(str(killed / "checkpoints" / f"step-{killed_at:09d}" / "model.safetensors"))

    r = subprocess.run(_train_cmd(killed), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-6, f"resumed weights differ by {diff}"
    # the resumed run really trained on from the checkpoint it started from (so equality is not trivial)
    assert at_kill.keys() == b.keys()
    assert any((at_kill[k] - b[k]).abs().max() > 0 for k in b)


@pytest.mark.slow
def test_training_raises_heldout_retrieval(tmp_path):
    from vfmkit.commands.eval import evaluate_clip
    from vfmkit.config import load_config
    from vfmkit.methods.registry import run
    from vfmkit.models.factory import create_clip

    torch.manual_seed(0)
    untrained = create_clip("vfm-tiny-vit")
    before = evaluate_clip(untrained, ["retrieval"], "builtin:flickr8k/heldout", "", "", None)
    out = tmp_path / "run"
    cfg = load_config(
        "clip_tiny",
        [
            f"out_dir={out}",
            "train.progress=false",
            "train.steps=100",
            "train.ckpt_every=0",
            "train.resume=false",
        ],
    )
    run(cfg)
    trained = create_clip("vfm-tiny-vit", str(out / "model.safetensors"))
    after = evaluate_clip(trained, ["retrieval"], "builtin:flickr8k/heldout", "", "", None)
    # 200 held-out images, 1,000 captions: chance R@10 is 5% (the untrained model measured 4.9 / 5.0); its
    # seed-to-seed spread is ~1.5 points, so a 6-point gain in both directions is far outside chance.
    # Measured: 100 steps gave t2i R@10 14.2 and i2t R@10 14.0.
    assert after["retrieval/t2i_R@10"] > before["retrieval/t2i_R@10"] + 6.0, (before, after)
    assert after["retrieval/i2t_R@10"] > before["retrieval/i2t_R@10"] + 6.0, (before, after)
