"""Run under torchrun (2 CPU processes, gloo): the distributed CLIP loss + DDP gradients equal the
single-process loss and gradients on the same global batch. Rank 0 writes a JSON report to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

from vfmkit.config import load_config
from vfmkit.engine import init_distributed
from vfmkit.methods.clip import make_clip_loss_fn, make_contrastive_loss
from vfmkit.models.factory import create_clip


def global_batch(n: int, bundle):
    """Real images and captions from the embedded Flickr8k shards, in shard order."""
    from vfmkit.eval.features import ordered_loader
    from vfmkit.methods.clip import make_clip_decoder

    loader = ordered_loader(
        "builtin:flickr8k/train",
        make_clip_decoder(bundle.preprocess_val, bundle.tokenizer, "first"),
        batch_size=n,
    )
    return next(iter(loader))


def main(out: str, loss_kind: str) -> None:
    info = init_distributed("cpu")
    torch.manual_seed(0)
    bundle = create_clip("vfm-tiny-vit")
    model = bundle.model
    batch = global_batch(16, bundle)
    cfg = load_config({"method_args": {"local_loss": True, "gather_with_grad": True}})

    # single process reference (every rank computes it; rank 0 reports)
    ref_model = create_clip("vfm-tiny-vit").model
    ref_model.load_state_dict(model.state_dict())
    ref_loss_fn = make_clip_loss_fn(make_contrastive_loss(loss_kind, cfg, type(info)()))
    ref_loss, _ = ref_loss_fn(ref_model, batch, 0)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.grad is not None}

    # distributed: each rank its half of the global batch, DDP averages gradients
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = 16 // info.world_size
    local = {k: v[info.rank * half : (info.rank + 1) * half] for k, v in batch.items()}
    loss_fn = make_clip_loss_fn(make_contrastive_loss(loss_kind, cfg, info))
    loss, _ = loss_fn(ddp, local, 0)
    loss.backward()
    # The reported loss is the mean of the per-rank local losses, which is the global loss.
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= info.world_size
    max_diff = max(
        (p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters() if p.grad is not None
    )
    n_grads = sum(1 for p in model.parameters() if p.grad is not None)
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "world_size": info.world_size,
                    "ref_loss": ref_loss.item(),
                    "dist_loss": mean_loss.item(),
                    "max_grad_diff": max_diff,
                    "n_grads": n_grads,
                    "n_ref_grads": len(ref_grads),
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "clip")
