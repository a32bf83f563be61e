"""Train the tiny CoCa captioner (method ``coca`` through ``registry.run_job``) and save it as a captioner."""

from __future__ import annotations

from pathlib import Path

from vfmkit.config import RunConfig, derive
from vfmkit.methods.captions import Captioner, save_captioner
from vfmkit.methods.registry import run_job


def train_captioner(
    cfg: RunConfig, out_dir: str | Path | None = None, stop_after: int | None = None
) -> Captioner:
    """Train the tiny CoCa of ``cfg`` (e.g. ``load_config("coca_tiny")``) on ``cfg.data.train`` and save it in
    ``<out_dir>/captioner`` (``out_dir`` defaults to ``cfg.out_dir``). An interrupted run (``stop_after``) saves
    nothing: rerunning resumes from its checkpoint. Returns the (trained) captioner."""
    out = Path(out_dir or cfg.out_dir)
    cfg = derive(cfg, {"out_dir": str(out)})
    job, res = run_job(cfg, stop_after=stop_after)
    captioner = job.extra["captioner"]
    captioner.model.cpu().eval()
    if res.step >= cfg.train.steps:
        save_captioner(captioner, out / "captioner")
    return captioner
