"""Run under torchrun (2 CPU processes, gloo): MobileCLIP's distillation loss (2 teachers, real + synthetic
captions, lambda < 1 so the CLIP term is in too) and its DDP gradients equal one process on the same global
batch. Teacher embeddings are real: two random-projection views of the student-independent features would
be artificial, so we use the embedded images' pixels through two fixed, different random conv encoders."""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vfmkit.engine import init_distributed
from vfmkit.methods.mobileclip import DistillClipLoss, MobileClipArgs, make_loss_fn
from vfmkit.models.factory import create_clip


def global_batch(n: int, bundle):
    from vfmkit.eval.features import ordered_loader
    from vfmkit.methods.clip import decode_image

    def decode(raw):
        import json as js

        caps = js.loads(raw["json"])["captions"]
        toks = bundle.tokenizer([caps[0], caps[1]])
        return {"image": bundle.preprocess_val(decode_image(raw)), "text": toks[0], "syn_text": toks[1]}

    batch = next(iter(ordered_loader("builtin:flickr8k/train", decode, batch_size=n)))
    g = torch.Generator().manual_seed(1)
    enc = [torch.nn.Conv2d(3, d, 8, 8) for d in (24, 16)]
    for e in enc:
        torch.nn.init.normal_(e.weight, generator=g)
    with torch.no_grad():
        t_img = torch.cat([F.normalize(e(batch["image"]).mean((2, 3)), dim=-1) for e in enc], -1)
        emb = [torch.randn(49408, d, generator=g) for d in (24, 16)]
        t_txt = torch.cat([F.normalize(E[batch["text"]].mean(1), dim=-1) for E in emb], -1)
        t_syn = torch.cat([F.normalize(E[batch["syn_text"]].mean(1), dim=-1) for E in emb], -1)
    return {**batch, "t_img": t_img, "t_txt": t_txt, "t_syn": t_syn}


def main(out: str, avg_after: str) -> None:
    info = init_distributed("cpu")
    torch.manual_seed(0)
    bundle = create_clip("vfm-tiny-vit")
    batch = global_batch(16, bundle)
    args = MobileClipArgs(lam=0.75, average_after_softmax=avg_after == "1")

    def loss_fn(rank=0, world_size=1):
        return make_loss_fn(
            DistillClipLoss(
                [24, 16], [70.0, 60.0], args.lam, args.average_after_softmax, rank=rank, world_size=world_size
            ),
            args,
        )

    ref = create_clip("vfm-tiny-vit").model
    ref.load_state_dict(bundle.model.state_dict())
    ref_loss, _ = loss_fn()(ref, batch, 0)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}

    ddp = torch.nn.parallel.DistributedDataParallel(bundle.model)
    half = 16 // info.world_size
    local = {k: v[info.rank * half : (info.rank + 1) * half] for k, v in batch.items()}
    loss, _ = loss_fn(info.rank, info.world_size)(ddp, local, 0)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= info.world_size
    diffs = [
        (p.grad - ref_grads[n]).abs().max().item()
        for n, p in bundle.model.named_parameters()
        if p.grad is not None
    ]
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "ref_loss": ref_loss.item(),
                    "dist_loss": mean_loss.item(),
                    "max_grad_diff": max(diffs),
                    "n_grads": len(diffs),
                    "n_ref_grads": len(ref_grads),
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
