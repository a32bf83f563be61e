"""Task experts for CLIPTeX-style pseudo-labelling: image in, dense map out, with a declared output type.

An :class:`Expert` takes one image (``uint8 [3, H, W]``, RGB) and returns a dense map at the image's own size:

- ``kind="classes"``: int64 class ids ``[H, W]`` (``num_classes``, optional ``void``), stored as an 8-bit PNG;
- ``kind="prob"``: float probabilities in ``[0, 1]`` ``[H, W]``, stored quantised to uint8 (PNG);
- ``kind="depth"``: float depth ``> 0`` ``[H, W]``, stored as fp16 (``.npy``, no pickle).

``crop=True`` declares an expert that expects the training crop rather than the whole image: the generator hands
it the region of each stored augmentation (``vfmkit.pipelines.pseudolabel``). Any user model fits by subclassing
:class:`Expert` (or wrapping a callable with :class:`FunctionExpert`). Shipped experts:

- :class:`PersonExpert`: MediaPipe selfie (person) segmentation, the ``.tflite`` file shipped in
  ``vfmkit/assets/experts`` (Apache-2.0, licence beside it), run with the LiteRT interpreter (``ai-edge-litert``):
  input ``1x256x256x3`` float RGB in ``[0, 1]``, output ``1x256x256x1`` person probability.
- :class:`SegRunExpert`: a ``seg`` run directory (e.g. the CamVid teacher) through ``eval.dense.load_dense_model``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("classes", "prob", "depth")
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "experts"
PERSON_MODEL = ASSETS / "selfie_segmentation.tflite"


class Expert:
    """Base class: ``name`` (a key of the stored labels), ``kind`` (one of :data:`KINDS`), ``num_classes`` /
    ``void`` for class masks, ``crop`` (expects the training crop). Subclasses implement :meth:`predict`."""

    name: str = "expert"
    kind: str = "prob"
    num_classes: int | None = None
    void: int | None = None
    crop: bool = False

    def predict(self, image: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """What identifies this expert's outputs (stored in the metadata; a rerun with another expert is refused)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "num_classes": self.num_classes,
            "void": self.void,
            "crop": self.crop,
            "id": self.identity(),
        }

    def identity(self) -> str:
        return type(self).__name__

    def __call__(self, image: Tensor) -> Tensor:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"expert {self.name!r}: expects a uint8 [3, H, W] RGB image, got "
                f"{tuple(image.shape)} {image.dtype}"
            )
        out = self.predict(image)
        if tuple(out.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"expert {self.name!r}: output {tuple(out.shape)} is not the image size "
                f"{tuple(image.shape[-2:])}"
            )
        return out


def check_expert(e: Expert) -> Expert:
    if e.kind not in KINDS:
        raise ValueError(f"expert {e.name!r}: kind must be one of {KINDS}, got {e.kind!r}")
    if e.kind == "classes" and not e.num_classes:
        raise ValueError(f"expert {e.name!r}: a class-id expert declares num_classes")
    if not e.name or not e.name.replace("_", "").isalnum():
        raise ValueError(f"expert name must be alphanumeric/underscore (a shard member name), got {e.name!r}")
    return e


class FunctionExpert(Expert):
    """Any callable ``uint8 [3, H, W] -> [H, W]`` as an expert (e.g. a model from another library)."""

    def __init__(
        self,
        name: str,
        kind: str,
        fn: Callable[[Tensor], Tensor],
        *,
        num_classes: int | None = None,
        void: int | None = None,
        crop: bool = False,
        identity: str | None = None,
    ) -> None:
        self.name, self.kind, self.fn = name, kind, fn
        self.num_classes, self.void, self.crop = num_classes, void, crop
        self._identity = identity or getattr(fn, "__qualname__", "function")
        check_expert(self)

    def identity(self) -> str:
        return self._identity

    def predict(self, image: Tensor) -> Tensor:
        return self.fn(image)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class PersonExpert(Expert):
    """MediaPipe person segmentation (``selfie_segmentation.tflite``) in the LiteRT interpreter, one thread.

    The image is resized (bilinear, antialiased) to 256x256, scaled to ``[0, 1]``; the probability map is resized
    back to the image size (bilinear) and clamped to ``[0, 1]``."""

    kind = "prob"

    def __init__(
        self, model_path: str | Path = PERSON_MODEL, name: str = "person", num_threads: int = 1
    ) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the person expert needs the LiteRT interpreter: pip install 'vfmkit[experts]' "
                "(ai-edge-litert)"
            ) from e
        self.name, self.model_path = name, Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"person expert: no model file {str(self.model_path)!r}")
        self._it = Interpreter(model_path=str(self.model_path), num_threads=num_threads)
        self._it.allocate_tensors()
        inp, out = self._it.get_input_details()[0], self._it.get_output_details()[0]
        self._in, self._out = inp["index"], out["index"]
        self.size = tuple(int(v) for v in inp["shape"][1:3])
        check_expert(self)

    def identity(self) -> str:
        return f"litert:{self.model_path.name}:{_file_sha256(self.model_path)[:16]}"

    def predict(self, image: Tensor) -> Tensor:
        H, W = image.shape[-2:]
        x = F.interpolate(
            image[None].float() / 255.0, size=self.size, mode="bilinear", align_corners=False, antialias=True
        )
        arr = np.ascontiguousarray(x[0].permute(1, 2, 0).numpy()[None], dtype=np.float32)
        self._it.set_tensor(self._in, arr)
        self._it.invoke()
        p = torch.from_numpy(self._it.get_tensor(self._out)[0, :, :, 0].copy())
        p = F.interpolate(p[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
        return p.clamp(0, 1)


class SegRunExpert(Expert):
    """A trained ``seg`` run (``dense.json`` + ``model.safetensors``) as a class-id expert (argmax of its logits)."""

    kind = "classes"

    def __init__(self, run_dir: str | Path, name: str = "camvid", crop: bool = False) -> None:
        from vfmkit.eval.dense import load_dense_model

        self.run_dir = Path(run_dir)
        self.model = load_dense_model(self.run_dir)
        meta = self.model.meta
        self.name, self.crop = name, crop
        self.num_classes = int(meta["num_classes"])
        self.void = meta.get("void")
        check_expert(self)

    def identity(self) -> str:
        return f"seg:{_file_sha256(self.run_dir / 'model.safetensors')[:16]}"

    @torch.no_grad()
    def predict(self, image: Tensor) -> Tensor:
        return self.model(image[None]).argmax(1)[0]


def load_expert(spec: str) -> Expert:
    """``person`` (the shipped MediaPipe model), ``person:FILE.tflite``, or ``NAME=RUN_DIR`` / ``RUN_DIR`` (a seg run)."""
    if spec == "person":
        return PersonExpert()
    if spec.startswith("person:"):
        return PersonExpert(spec[len("person:") :])
    name, _, path = spec.rpartition("=")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"expert {spec!r}: not 'person', 'person:FILE.tflite' or a seg run directory")
    return SegRunExpert(path, name=name or Path(path).name.replace("-", "_"))


# ------------------------------------------------------------------------------------------------ storage


def label_ext(e: Expert, aug: int | None = None) -> str:
    """Shard member extension of an expert's stored output (``person.png``, ``camvid.2.png``, ``depth.npy``)."""
    suffix = "npy" if e.kind == "depth" else "png"
    return f"{e.name}.{suffix}" if aug is None else f"{e.name}.{aug}.{suffix}"


def encode_output(kind: str, out: Tensor) -> bytes:
    """Class ids -> 8-bit PNG; probabilities -> uint8 PNG (``round(255 p)``); depth -> fp16 ``.npy`` (no pickle)."""
    import io

    from vfmkit.data.dense import encode_mask

    if kind == "classes":
        return encode_mask(out.to(torch.uint8))
    if kind == "prob":
        return encode_mask(torch.round(out.float().clamp(0, 1) * 255).to(torch.uint8))
    if kind == "depth":
        buf = io.BytesIO()
        np.save(buf, out.float().numpy().astype(np.float16), allow_pickle=False)
        return buf.getvalue()
    raise ValueError(f"unknown expert output kind {kind!r} ({KINDS})")


def decode_output(kind: str, data: bytes) -> Tensor:
    """The inverse of :func:`encode_output`: class ids int64, probabilities float in [0, 1], depth float32."""
    import io

    from vfmkit.data.dense import decode_mask

    if kind == "classes":
        return torch.from_numpy(decode_mask(data).astype(np.int64))
    if kind == "prob":
        return torch.from_numpy(decode_mask(data).astype(np.float32)) / 255.0
    if kind == "depth":
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))
    raise ValueError(f"unknown expert output kind {kind!r} ({KINDS})")
