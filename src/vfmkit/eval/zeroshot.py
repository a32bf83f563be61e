"""Zero-shot classification with prompt templates (open_clip's builder and template lists)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vfmkit.eval.classification import classification_metrics
from vfmkit.eval.features import encode_images_labels


class ClassNamesError(ValueError):
    """Zero-shot class names that are missing from the shards or do not match them; the message says which."""


def class_names_from_json(path: str | Path) -> list[str]:
    """classes.json (wnid -> {imagenet_index, name}) -> names in sorted-wnid order (the label order)."""
    return [name for _, name in _read_classes(Path(path))]


def _read_classes(path: Path) -> list[tuple[str, str]]:
    """A classes file -> [(class id, name)] in label order: classes.json ``{id: {"name": ...}}`` (sorted ids),
    a JSON list of names, or a text file with one name per line (the id is the name)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ClassNamesError(f"classes file {str(path)!r}: {e.strerror or e}") from e
    if path.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ClassNamesError(f"classes file {str(path)!r} is not valid JSON: {e}") from e
        if isinstance(d, dict) and all(isinstance(v, dict) and "name" in v for v in d.values()):
            return [(k, d[k]["name"]) for k in sorted(d)]
        if isinstance(d, dict) and isinstance(d.get("classes"), list):
            d = d["classes"]
        if isinstance(d, list) and all(isinstance(v, str) for v in d):
            return [(v, v) for v in d]
        raise ClassNamesError(
            f"classes file {str(path)!r}: expected {{id: {{name: ...}}}}, a list of names or {{classes: [...]}}"
        )
    return [(line.strip(), line.strip()) for line in text.splitlines() if line.strip()]


def shard_classes(spec: str) -> dict[int, str]:
    """``{label: class}`` from the json ``label`` and ``class`` of every sample of ``spec`` (only the json
    members are read). ClassNamesError when a sample has a label but no ``class``, or one label has two."""
    from vfmkit.data.shards import iter_shard, list_shards

    seen: dict[int, str] = {}
    for url in list_shards(spec):
        for s in iter_shard(url):
            meta = json.loads(s["json"]) if "json" in s else {}
            if "label" not in meta:
                raise ClassNamesError(
                    f"{url}: sample {s['__key__']!r} has no json 'label' (not class shards)"
                )
            if "class" not in meta:
                raise ClassNamesError(
                    f"zero-shot shards {spec!r} carry no class names (sample {s['__key__']!r} in {url} has no "
                    "json 'class'): pass --classes (classes.json, a JSON list or a text file, in label order)"
                )
            label, cls = int(meta["label"]), str(meta["class"])
            if seen.setdefault(label, cls) != cls:
                raise ClassNamesError(
                    f"{url}: label {label} is class {seen[label]!r} and {cls!r} (sample {s['__key__']!r})"
                )
    return seen


def class_names_for(spec: str, classes: str | Path | None = None) -> list[str]:
    """The zero-shot class names of class shards ``spec``, in label order, checked against the shards.

    ``classes`` (a classes file) or, when not given, a ``classes.json`` beside the shard directory or one level
    up (as the embedded Imagenette has) names the classes; every shard ``class`` must be the file's id or name
    at its label. No file: the shards' own ``class`` strings (``_`` read as a space). A mismatch, or shards with
    no ``class``, is a ClassNamesError: never another dataset's names."""
    from vfmkit.data.shards import list_shards

    found = shard_classes(spec)
    path = Path(classes) if classes else None
    if path is None:
        d = Path(list_shards(spec)[0]).parent
        path = next((c for c in (d / "classes.json", d.parent / "classes.json") if c.is_file()), None)
    if path is None:
        n = max(found) + 1 if found else 0
        missing = [i for i in range(n) if i not in found]
        if missing:
            raise ClassNamesError(
                f"zero-shot shards {spec!r}: labels {missing[:5]} never occur, so their class names are unknown: "
                "pass --classes"
            )
        return [found[i].replace("_", " ") for i in range(n)]
    table = _read_classes(path)
    for label, cls in sorted(found.items()):
        if label >= len(table):
            raise ClassNamesError(
                f"classes file {str(path)!r} names {len(table)} classes but shards {spec!r} have label {label} "
                f"({cls!r})"
            )
        if cls not in table[label]:
            raise ClassNamesError(
                f"classes file {str(path)!r} does not match shards {spec!r}: label {label} is {cls!r} in the "
                f"shards but {table[label][0]!r} in the file"
            )
    return [name for _, name in table]


@torch.no_grad()
def zeroshot_eval(
    model,
    tokenizer: Callable,
    preprocess: Callable,
    spec: str,
    classnames: Sequence[str],
    templates: Sequence[Callable[[str], str]] | None = None,
    device: str = "cpu",
    batch_size: int = 128,
) -> dict[str, float]:
    """Top-1/top-5 (percent), ECE and NLL of the zero-shot classifier on class-labelled shards."""
    from open_clip import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    model.eval().to(device)
    templates = templates or OPENAI_IMAGENET_TEMPLATES
    clf = build_zero_shot_classifier(
        model, tokenizer, classnames, templates, num_classes_per_batch=10, device=device, use_tqdm=False
    )  # [D, C]
    feats, labels = encode_images_labels(model.encode_image, preprocess, spec, batch_size, device)
    scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
    return classification_metrics(scale * feats @ clf.cpu(), labels)


class _Texts(list):
    """Prompts passed through open_clip's classifier builder untokenised (it calls ``tokenizer(texts).to(dev)``)."""

    def to(self, device) -> _Texts:
        return self


class EncoderPair:
    """A model given as two encoders of the teacher interface (``encode_image(float images)``, ``encode_text(list
    of strings)``) in the shape :func:`zeroshot_eval` takes: e.g. a merged model's Head_A with teacher A's text
    tower. ``logit_scale`` is the (exp'd) scale of the logits (only NLL and ECE depend on it)."""

    def __init__(self, encode_image: Callable, encode_text: Callable, logit_scale: float = 100.0) -> None:
        import math

        self._image, self._text = encode_image, encode_text
        self.logit_scale = torch.tensor(math.log(logit_scale))

    def eval(self) -> EncoderPair:
        return self

    def to(self, device) -> EncoderPair:
        return self

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self._image(x)

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        e = self._text(list(texts)).float()
        return F.normalize(e, dim=-1) if normalize else e


def zeroshot_eval_encoders(
    encode_image: Callable,
    encode_text: Callable,
    spec: str,
    classnames: Sequence[str],
    image_size: int,
    logit_scale: float = 100.0,
    templates: Sequence[Callable[[str], str]] | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """:func:`zeroshot_eval` for two encoders of the teacher interface: images resized (short side) and
    centre-cropped to ``image_size``, float in [0, 1] (the teachers' retrieval view), open_clip's ImageNet
    templates unless ``templates``."""
    from torchvision.transforms.functional import pil_to_tensor

    from vfmkit.data.decode import resize_center_crop

    def preprocess(img):
        return resize_center_crop(pil_to_tensor(img.convert("RGB")), image_size)

    model = EncoderPair(encode_image, encode_text, logit_scale)
    return zeroshot_eval(model, _Texts, preprocess, spec, classnames, templates, batch_size=batch_size)
