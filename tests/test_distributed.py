"""Real multi-process runs: torchrun with 2 CPU processes on gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def torchrun(script: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.dist
def test_distributed_clip_loss_and_grads_equal_single_process(tmp_path):
    out = tmp_path / "report.json"
    torchrun(HERE / "dist" / "clip_loss_equiv.py", str(out), "clip")
    rep = json.loads(out.read_text())
    assert rep["world_size"] == 2
    assert rep["n_grads"] == rep["n_ref_grads"] > 10
    assert abs(rep["dist_loss"] - rep["ref_loss"]) < 1e-5, rep
    assert rep["max_grad_diff"] < 1e-5, rep


@pytest.mark.dist
@pytest.mark.parametrize("avg_after", ["0", "1"])
def test_distributed_distill_loss_equals_single_process(tmp_path, avg_after):
    out = tmp_path / "report.json"
    torchrun(HERE / "dist" / "distill_loss_equiv.py", str(out), avg_after)
    rep = json.loads(out.read_text())
    assert rep["n_grads"] == rep["n_ref_grads"] > 10
    assert rep["ref_loss"] > 0.01  # a real, non-trivial loss
    assert abs(rep["dist_loss"] - rep["ref_loss"]) < 1e-5, rep
    assert rep["max_grad_diff"] < 1e-5, rep
