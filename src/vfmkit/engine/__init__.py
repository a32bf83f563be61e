"""The one engine: ``train(cfg, model, loss_fn, loader, out_dir=...)``."""

from vfmkit.engine.distributed import DistInfo, init_distributed
from vfmkit.engine.trainer import TrainResult, train

__all__ = ["DistInfo", "TrainResult", "init_distributed", "train"]
