"""The one model-spec grammar: every place that names a model (teacher, encoder, parent, student) parses here.

Grammar (a spec is one string; spaces are not allowed)::

    SPEC  := PATH                                 an existing directory: a saved model (offline teacher,
                                                  subclone run with arch.json, Hugging Face folder)
           | "offline"                            the shipped offline CLIP-like teacher
           | "efficientnet-lite0" ["@" SIZE]      ImageNet EfficientNet-Lite0 (offline weights)
           | KIND ":" NAME [":" SOURCE] ["@" SIZE]
           | NAME ["@" SIZE]                      a bare library name (open_clip or timm), e.g. a subclone parent
    KIND  := "openclip" | "clip" | "timm"         ("clip" is an alias of "openclip")
    SOURCE:= a hub tag, a local weights file, or for timm "random" (seeded init) / "pretrained" (timm hub)
    SIZE  := digits: the square input side the model is fed at

``SOURCE`` is everything after the second ``:`` (so a path may hold colons); ``@SIZE`` is split off the end
only when what follows the last ``@`` is all digits. Examples, all in use in recipes, README, tests and
benchmarks: ``openclip:ViT-L-14:datacomp_xl_s13b_b90k``, ``openclip:vfm-tiny-vit:/w/tiny.safetensors``,
``clip:vfm-tiny-vit:CKPT``, ``timm:test_byobnet:random@64``, ``timm:NAME:CKPT@SIZE``, ``timm:resnet18``,
``efficientnet-lite0``, ``efficientnet-lite0@128``, ``offline``, ``runs/teacher`` (a directory),
``vfm-tiny-vit`` / ``test_vit`` (bare names).

Which kinds a loader takes is the loader's business (:func:`ModelSpec.require` names the spec and the kinds it
accepts); the grammar itself is the same everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelSpec", "ModelSpecError", "parse_model_spec", "KINDS"]

KINDS = ("openclip", "timm", "efficientnet-lite0", "offline", "path", "name")
_PREFIXES = {"openclip": "openclip", "clip": "openclip", "timm": "timm"}


class ModelSpecError(ValueError):
    """A model spec that does not parse, or names a kind the caller cannot load; the message quotes the spec."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec. ``kind`` is one of :data:`KINDS`; ``name`` the model (or the directory for ``path``);
    ``source`` the weights (tag, file, ``random``/``pretrained``) or None; ``size`` the input side or None;
    ``text`` the spec as written."""

    kind: str
    name: str
    source: str | None = None
    size: int | None = None
    text: str = ""

    def require(self, *kinds: str, what: str = "model", size: bool = True) -> ModelSpec:
        """``self`` if its kind is in ``kinds`` (and ``@SIZE`` is allowed when given), else ModelSpecError."""
        if self.kind not in kinds:
            raise ModelSpecError(
                f"{what} spec {self.text!r} is a {self.kind} spec; expected one of: {', '.join(kinds)}"
            )
        if not size and self.size is not None:
            raise ModelSpecError(f"{what} spec {self.text!r}: @SIZE is not supported here")
        return self


def _split_size(text: str) -> tuple[str, int | None]:
    base, at, size = text.rpartition("@")
    return (base, int(size)) if at and size.isdigit() and base else (text, None)


def parse_model_spec(text: str | os.PathLike) -> ModelSpec:
    """Parse ``text`` by the grammar in the module docstring; ModelSpecError naming it when it cannot."""
    text = os.fspath(text)
    if not isinstance(text, str) or not text or text != text.strip():
        raise ModelSpecError(f"model spec {text!r}: empty or padded with spaces")
    if Path(text).expanduser().is_dir():
        return ModelSpec("path", str(Path(text).expanduser()), None, None, text)
    base, size = _split_size(text)
    if base == "offline":
        if size is not None:
            raise ModelSpecError(f"model spec {text!r}: 'offline' takes no @SIZE")
        return ModelSpec("offline", "offline", None, None, text)
    if base == "efficientnet-lite0":
        return ModelSpec("efficientnet-lite0", base, None, size, text)
    prefix, colon, rest = base.partition(":")
    if colon and prefix in _PREFIXES:
        name, _, source = rest.partition(":")
        if not name:
            raise ModelSpecError(f"model spec {text!r}: expected {prefix}:NAME[:SOURCE][@SIZE]")
        return ModelSpec(_PREFIXES[prefix], name, source or None, size, text)
    return ModelSpec("name", base, None, size, text)
