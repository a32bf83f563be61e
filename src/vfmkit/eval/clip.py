"""Evaluate a CLIP model bundle (``models.factory.ClipBundle``) or a teacher ensemble on held-out data.

- :func:`evaluate_clip`: any of ``retrieval`` / ``zeroshot`` / ``probe`` -> ``{"<task>/<metric>": value}``;
- :func:`retrieval_eval`: R@1/5/10 both ways plus ``R@1`` (the mean of I->T and T->I R@1), percent;
- :func:`teacher_retrieval`: the same retrieval for a frozen teacher ensemble (per-teacher blocks concatenated).

Moved here from ``commands/eval.py`` and ``commands/quickstart.py`` (a command held the evaluators).
"""

from __future__ import annotations

import json

R1 = "R@1"  # mean of image->text and text->image R@1, the headline retrieval number
CLIP_TASKS = ("zeroshot", "retrieval", "probe")


def check_tasks(tasks: list[str], also: tuple[str, ...] = ()) -> list[str]:
    """``tasks`` when each is known (``CLIP_TASKS`` + ``also``); otherwise a ValueError naming the unknown ones,
    raised before any model is built or data read."""
    known = CLIP_TASKS + tuple(also)
    bad = [t for t in tasks if t not in known]
    if bad or not tasks:
        raise ValueError(
            f"unknown eval task(s) {', '.join(map(repr, bad)) or '(none given)'}: "
            f"choose from {', '.join(known)} (comma-separated)"
        )
    return tasks


def evaluate_clip(
    bundle, tasks: list[str], retrieval_data: str, zeroshot_data: str, probe_train: str, classes: str | None
) -> dict[str, float]:
    from vfmkit.eval.features import encode_image_text, encode_images_labels
    from vfmkit.eval.probe import linear_probe
    from vfmkit.eval.retrieval import retrieval_metrics
    from vfmkit.eval.zeroshot import class_names_for, zeroshot_eval

    check_tasks(tasks)
    m, res = bundle.model, {}
    if "retrieval" in tasks:
        i, t, idx = encode_image_text(m, bundle.tokenizer, bundle.preprocess_val, retrieval_data)
        res.update({f"retrieval/{k}": v for k, v in retrieval_metrics(i, t, idx).items()})
    if "zeroshot" in tasks:
        names = class_names_for(zeroshot_data, classes)  # from the shards' json 'class', checked
        r = zeroshot_eval(m, bundle.tokenizer, bundle.preprocess_val, zeroshot_data, names)
        res.update({f"zeroshot/{k}": v for k, v in r.items()})
    if "probe" in tasks:
        tx, ty = encode_images_labels(m.encode_image, bundle.preprocess_val, probe_train)
        vx, vy = encode_images_labels(m.encode_image, bundle.preprocess_val, zeroshot_data)
        res.update({f"probe/{k}": v for k, v in linear_probe(tx, ty, vx, vy).items()})
    return res


def retrieval_eval(bundle, spec: str) -> dict[str, float]:
    """Student retrieval on ``spec``: R@1/5/10 both ways plus ``R@1`` (their mean at K=1), in percent."""
    from vfmkit.eval.features import encode_image_text
    from vfmkit.eval.retrieval import retrieval_metrics

    img, txt, idx = encode_image_text(bundle.model, bundle.tokenizer, bundle.preprocess_val, spec)
    m = retrieval_metrics(img, txt, idx)
    return {**m, R1: 0.5 * (m["i2t_R@1"] + m["t2i_R@1"])}


def teacher_retrieval(ensemble, val_data: str) -> dict[str, float]:
    """The teacher ensemble's own retrieval on ``val_data`` (per-teacher blocks concatenated, then normalised)."""
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.functional import pil_to_tensor

    from vfmkit.data.decode import decode_image
    from vfmkit.eval.features import ordered_loader
    from vfmkit.eval.retrieval import retrieval_metrics
    from vfmkit.models.teachers import resize_center_crop

    size = max(ensemble.image_sizes)

    def decode(raw):
        img = pil_to_tensor(decode_image(raw)).float().div(255)[None]
        return {
            "image": resize_center_crop(img, size)[0],
            "captions": json.dumps(json.loads(raw["json"])["captions"]),
        }

    imgs, caps = [], []
    for batch in ordered_loader(val_data, decode, batch_size=64):
        imgs.append(ensemble.encode_image(batch["image"]))
        caps += [json.loads(c) for c in batch["captions"]]
    flat = [c for cs in caps for c in cs]
    owner = torch.tensor([i for i, cs in enumerate(caps) for _ in cs])
    txt = torch.cat([ensemble.encode_text(flat[s : s + 256]) for s in range(0, len(flat), 256)])
    m = retrieval_metrics(F.normalize(torch.cat(imgs), dim=-1), F.normalize(txt, dim=-1), owner)
    return {f"retrieval/{k}": v for k, v in {**m, R1: 0.5 * (m["i2t_R@1"] + m["t2i_R@1"])}.items()}
