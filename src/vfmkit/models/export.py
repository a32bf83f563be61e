"""Export a CLIP model for deployment: reparameterised towers as ONNX graphs, their configs, a checked manifest.

Layout of an export directory (``export_clip``)::

    image.onnx          image tower: pixel_values [batch, 3, H, W] float32 -> image_embeds [batch, D]
    text.onnx           text tower: input_ids [batch, L] int64 -> text_embeds [batch, D]
    image.int8.onnx     (--quantize int8) onnxruntime dynamic int8 quantisation of image.onnx
    text.int8.onnx      (--quantize int8) the same for text.onnx
    preprocess.json     how to turn an image into pixel_values (open_clip's eval transform, its parameters)
    tokenizer.json      how to turn a caption into input_ids (+ the BPE vocabulary file it names)
    manifest.json       model, input spec, embedding dim, logit scale, opset, exporter, sha256 + size of each file

The embeddings are the towers' raw outputs (``encode_image`` / ``encode_text``, not L2-normalised), so they
compare one to one with PyTorch eager. Multi-branch MobileOne / FastViT / MCi blocks are folded into single
convolutions first with timm's ``reparameterize_model`` (the deploy form; open_clip builds MCi towers from timm).

``load_export(dir)`` checks every file it uses against the manifest's size and sha256 and refuses a corrupt or
truncated one by name (``ExportIntegrityError``) before onnxruntime sees it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vfmkit.data.io import atomic_write_bytes, atomic_write_json
from vfmkit.data.shards import sha256_file

FORMAT = "vfmkit-export/1"
DEFAULT_OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"  # torch.export-based exporter (the TorchScript one is deprecated)
IMAGE_INPUT, IMAGE_OUTPUT = "pixel_values", "image_embeds"
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeds"
TOWERS = ("image", "text")
FORMATS = ("onnx", "pte")
PTE_MAX_BATCH = 32


class ExportError(RuntimeError):
    """An export could not be written or read (names the model or file)."""


class ExportIntegrityError(ExportError):
    """A file of an export is missing, truncated or corrupt (its size or sha256 disagrees with the manifest)."""


# ---------------------------------------------------------------------------------------------------------------
# Reparameterisation


def _reparam_sites(model: nn.Module) -> int:
    """Modules timm's reparameterize_model will fold (MobileOneBlock, ReparamLargeKernelConv, RepMixer, RepCPE,
    ...): those with a fold method whose single deploy conv (``reparam_conv``) is not built yet."""
    n = 0
    for m in model.modules():
        if hasattr(m, "fuse") or hasattr(m, "reparameterize") or hasattr(m, "switch_to_deploy"):
            n += getattr(m, "reparam_conv", None) is None
    return n


def reparameterize(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, int]:
    """The inference (deploy) form of ``model`` and how many multi-branch modules were folded.

    timm's ``reparameterize_model`` (MobileOne, FastViT and MobileCLIP's MCi blocks: train-time conv + BN + scale
    + identity branches become one conv; RepMixer / RepCPE residuals are folded into their depthwise conv). A
    model with nothing to fold (a ViT, a plain transformer text tower) comes back unchanged, count 0. The result
    is in eval mode; it computes the same function as ``model.eval()`` up to float rounding.
    """
    from timm.utils.model import reparameterize_model

    n = _reparam_sites(model)
    model.eval()
    out = reparameterize_model(model, inplace=inplace) if n else (model if inplace else _deepcopy(model))
    return out.eval(), n


def _deepcopy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


# ---------------------------------------------------------------------------------------------------------------
# Towers and ONNX export


class ImageTower(nn.Module):
    """``pixel_values -> model.encode_image(pixel_values)`` (the graph exported as image.onnx)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextTower(nn.Module):
    """``input_ids -> model.encode_text(input_ids)`` (the graph exported as text.onnx)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    input_name: str,
    output_name: str,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module(example)`` to one self-contained ONNX file with a dynamic batch axis (written atomically).

    Uses torch's torch.export-based exporter (``dynamo=True``); weights are stored inside the file (no external
    data), so the file and its sha256 are the whole graph. ``example`` must have batch >= 2 (torch.export
    specialises a batch of 1).
    """
    if example.shape[0] < 2:
        raise ValueError(f"export example for {path}: batch must be >= 2 to keep the batch axis dynamic")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with torch.no_grad():
            torch.onnx.export(
                module.eval(),
                (example,),
                str(tmp),
                dynamo=True,
                external_data=False,
                input_names=[input_name],
                output_names=[output_name],
                opset_version=opset,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def export_pte(module: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """ExecuTorch program (``.pte``): torch.export with a dynamic batch (1..PTE_MAX_BATCH; ExecuTorch plans
    memory for the largest), lowered to the XNNPACK delegate, written atomically."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as e:
        raise ExportError(
            f"{path}: --format pte needs the executorch package (pip install 'vfmkit[executorch]')"
        ) from e
    batch = torch.export.Dim("batch", min=1, max=PTE_MAX_BATCH)
    with torch.no_grad():
        ep = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    atomic_write_bytes(path, prog.buffer)
    return Path(path)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """onnxruntime dynamic int8 quantisation (weights int8, activations quantised at run time), atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and tokenizer configs


def preprocess_config(model: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float]) -> dict:
    """open_clip's eval transform as data: resize (shortest side, bicubic), centre crop, RGB, /255, normalise."""
    pp = dict(getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {})
    return {
        "transform": "open_clip.image_transform(is_train=False)",
        "image_size": int(image_size),
        "mode": pp.get("mode", "RGB"),
        "resize_mode": pp.get("resize_mode", "shortest"),
        "interpolation": pp.get("interpolation", "bicubic"),
        "fill_color": int(pp.get("fill_color", 0)),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "layout": "NCHW float32, RGB, values (x/255 - mean) / std",
    }


def tokenizer_config(tokenizer: Any) -> tuple[dict, Path | None]:
    """(tokenizer.json contents, the vocabulary file to ship beside it or None)."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer, default_bpe

    ctx = int(getattr(tokenizer, "context_length", 77))
    if isinstance(tokenizer, SimpleTokenizer):
        bpe = Path(default_bpe())
        return {
            "type": "open_clip.SimpleTokenizer",
            "context_length": ctx,
            "vocab_size": int(tokenizer.vocab_size),
            "sot_token_id": int(tokenizer.sot_token_id),
            "eot_token_id": int(tokenizer.eot_token_id),
            "pad_token_id": 0,
            "clean": "lower",
            "bpe_file": bpe.name,
            "truncate": "to context_length, last token forced to eot",
        }, bpe
    if isinstance(tokenizer, HFTokenizer):
        name = getattr(getattr(tokenizer, "tokenizer", None), "name_or_path", None)
        return {"type": "open_clip.HFTokenizer", "name": name, "context_length": ctx}, None
    return {"type": type(tokenizer).__name__, "context_length": ctx}, None


def build_tokenizer(export_dir: str | os.PathLike, cfg: dict) -> Callable:
    """The tokenizer an export describes (``SimpleTokenizer`` from the shipped BPE file)."""
    from open_clip.tokenizer import SimpleTokenizer

    if cfg.get("type") != "open_clip.SimpleTokenizer":
        raise ExportError(
            f"{Path(export_dir) / 'tokenizer.json'}: tokenizer type {cfg.get('type')!r} is not "
            "rebuilt from the export (only open_clip.SimpleTokenizer ships its vocabulary)"
        )
    return SimpleTokenizer(
        bpe_path=str(Path(export_dir) / cfg["bpe_file"]), context_length=cfg["context_length"]
    )


def build_preprocess(cfg: dict) -> Callable:
    """The eval transform a preprocess.json describes (open_clip's ``image_transform``)."""
    from open_clip import image_transform

    return image_transform(
        cfg["image_size"],
        is_train=False,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        resize_mode=cfg["resize_mode"],
        interpolation=cfg["interpolation"],
        fill_color=cfg["fill_color"],
    )


# ---------------------------------------------------------------------------------------------------------------
# Export


def _file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def export_clip(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    name: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    source: dict | None = None,
    towers: Sequence[str] = TOWERS,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    reparam: bool = True,
    sample_texts: Sequence[str] = ("a photo of a dog", "a photo of a cat"),
    formats: Sequence[str] = ("onnx",),
) -> dict:
    """Export ``model``'s towers to ``out_dir``; returns the manifest (also written to ``manifest.json``).

    ``towers``: any of ``"image"``, ``"text"``. ``quantize``: None or ``"int8"`` (dynamic, onnxruntime).
    ``formats``: ``"onnx"`` (always written: variants fp32 and int8) and optionally ``"pte"`` (ExecuTorch with
    the XNNPACK delegate, fp32, batch 1..PTE_MAX_BATCH; variant ``pte``; needs the ``executorch`` package).
    ``reparam``: fold multi-branch blocks first (a copy; ``model`` itself is left as it is). Each file is written
    to a temporary name and renamed; the manifest goes last, so a directory whose manifest exists is complete.
    """
    bad_fmt = [f for f in formats if f not in FORMATS]
    if bad_fmt:
        raise ExportError(f"unknown format(s) {bad_fmt!r} (choices: {', '.join(FORMATS)})")
    if quantize not in (None, "int8"):
        raise ExportError(f"unknown quantisation {quantize!r} (choices: int8)")
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise ExportError(f"unknown tower(s) {bad or towers!r} (choices: {', '.join(TOWERS)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        (out / "manifest.json").unlink()  # an old manifest must not vouch for files being replaced
    model.eval()
    if reparam:
        deploy, n_reparam = reparameterize(model)
    else:
        deploy, n_reparam = model, 0
    embed_dim = None
    files: dict[str, Path] = {}
    spec: dict[str, Any] = {}
    variants: dict[str, dict[str, str]] = {"fp32": {}}
    if "image" in towers:
        ex = torch.randn(2, 3, image_size, image_size)
        with torch.no_grad():
            embed_dim = int(deploy.encode_image(ex).shape[-1])
        files["image.onnx"] = export_onnx(
            ImageTower(deploy), ex, out / "image.onnx", IMAGE_INPUT, IMAGE_OUTPUT, opset
        )
        spec["image"] = {
            "input": {"name": IMAGE_INPUT, "shape": ["batch", 3, image_size, image_size], "dtype": "float32"},
            "output": {"name": IMAGE_OUTPUT, "shape": ["batch", embed_dim], "dtype": "float32"},
        }
        variants["fp32"]["image"] = "image.onnx"
    tok_cfg, vocab = tokenizer_config(tokenizer)
    if "text" in towers:
        ids = tokenizer(list(sample_texts)).long()
        with torch.no_grad():
            d = int(deploy.encode_text(ids).shape[-1])
        if embed_dim is not None and d != embed_dim:
            raise ExportError(f"{name}: image embedding dim {embed_dim} != text embedding dim {d}")
        embed_dim = d
        files["text.onnx"] = export_onnx(
            TextTower(deploy), ids, out / "text.onnx", TEXT_INPUT, TEXT_OUTPUT, opset
        )
        spec["text"] = {
            "input": {"name": TEXT_INPUT, "shape": ["batch", int(ids.shape[1])], "dtype": "int64"},
            "output": {"name": TEXT_OUTPUT, "shape": ["batch", embed_dim], "dtype": "float32"},
        }
        variants["fp32"]["text"] = "text.onnx"
        atomic_write_json(out / "tokenizer.json", tok_cfg)
        files["tokenizer.json"] = out / "tokenizer.json"
        if vocab is not None:
            atomic_write_bytes(out / vocab.name, vocab.read_bytes())
            files[vocab.name] = out / vocab.name
    atomic_write_json(out / "preprocess.json", preprocess_config(model, image_size, mean, std))
    files["preprocess.json"] = out / "preprocess.json"
    if quantize == "int8":
        variants["int8"] = {}
        for tower, fname in variants["fp32"].items():
            q = fname.replace(".onnx", ".int8.onnx")
            files[q] = quantize_int8(out / fname, out / q)
            variants["int8"][tower] = q
    if "pte" in formats:
        variants["pte"] = {}
        if "image" in towers:
            files["image.pte"] = export_pte(ImageTower(deploy), ex, out / "image.pte")
            variants["pte"]["image"] = "image.pte"
        if "text" in towers:
            files["text.pte"] = export_pte(TextTower(deploy), ids, out / "text.pte")
            variants["pte"]["text"] = "text.pte"
    scale = getattr(model, "logit_scale", None)
    bias = getattr(model, "logit_bias", None)
    import onnx
    import onnxruntime

    manifest = {
        "format": FORMAT,
        "model": name,
        "source": source or {},
        "exporter": EXPORTER,
        "opset": opset,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "reparameterized_modules": n_reparam,
        "embed_dim": embed_dim,
        "embeddings_normalized": False,
        "logit_scale": float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else None,
        "logit_bias": float(bias.detach()) if isinstance(bias, torch.Tensor) else None,
        "image_size": int(image_size),
        "inputs": spec,
        "variants": variants,
        "preprocess": "preprocess.json",
        "tokenizer": "tokenizer.json" if "text" in towers else None,
        "files": {k: _file_entry(p) for k, p in sorted(files.items())},
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Loading (checked)


def read_manifest(export_dir: str | os.PathLike) -> dict:
    p = Path(export_dir) / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: no manifest.json (not a vfmkit export, or an export that did not finish)"
        )
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportIntegrityError(f"{p}: manifest is not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ExportIntegrityError(f"{p}: format {got!r}, expected {FORMAT!r}")
    return m


def verify_file(export_dir: str | os.PathLike, manifest: dict, name: str) -> Path:
    """Check one file against the manifest (exists, size, sha256); raise ExportIntegrityError naming it."""
    p = Path(export_dir) / name
    entry = manifest.get("files", {}).get(name)
    if entry is None:
        raise ExportIntegrityError(
            f"{p}: not listed in manifest.json (files: {', '.join(manifest.get('files', {}))})"
        )
    if not p.is_file():
        raise ExportIntegrityError(f"{p}: missing (manifest.json lists it)")
    size = p.stat().st_size
    if size != entry["bytes"]:
        raise ExportIntegrityError(
            f"{p}: {size} bytes, manifest says {entry['bytes']} (truncated or corrupt)"
        )
    digest = sha256_file(p)
    if digest != entry["sha256"]:
        raise ExportIntegrityError(
            f"{p}: sha256 {digest} does not match the manifest's {entry['sha256']} (corrupt)"
        )
    return p


def verify_export(export_dir: str | os.PathLike) -> dict:
    """Check every file the manifest lists; returns the manifest."""
    m = read_manifest(export_dir)
    for name in m["files"]:
        verify_file(export_dir, m, name)
    return m


class PteTower:
    """One checked ExecuTorch program in the ExecuTorch runtime: ``tower(batch) -> torch.Tensor``."""

    def __init__(self, path: Path):
        try:
            from executorch.runtime import Runtime
        except ImportError as e:
            raise ExportError(f"{path}: loading a .pte needs the executorch package") from e
        try:
            self.method = Runtime.get().load_program(str(path)).load_method("forward")
        except Exception as e:
            raise ExportIntegrityError(
                f"{path}: the ExecuTorch runtime cannot load it ({type(e).__name__}: {e})"
            ) from e
        self.path = path

    def run(self, x: np.ndarray) -> np.ndarray:
        return self(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(x).contiguous()
        if x.shape[0] > PTE_MAX_BATCH:  # the program's memory is planned for at most PTE_MAX_BATCH
            return torch.cat([self(c) for c in x.split(PTE_MAX_BATCH)])
        return self.method.execute([x])[0]


class OnnxTower:
    """One checked ONNX graph in an onnxruntime session: ``tower(batch) -> torch.Tensor``."""

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / ... types
            raise ExportIntegrityError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from e
        self.path = path
        self.input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return torch.from_numpy(self.run(x))


@dataclass
class ExportedClip:
    """A loaded export with the CLIP interface vfmkit's evaluators use (``encode_image``, ``encode_text``,
    ``logit_scale``), so ``eval.zeroshot`` and ``eval.features`` run on it unchanged."""

    export_dir: Path
    manifest: dict
    variant: str
    image: OnnxTower | None
    text: OnnxTower | None
    preprocess: Callable | None
    tokenizer: Callable | None

    @property
    def logit_scale(self) -> torch.Tensor:
        s = self.manifest.get("logit_scale")
        return torch.tensor(math.log(s if s else 100.0))

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.image is None:
            raise ExportError(f"{self.export_dir}: this export has no image tower")
        f = self.image(pixel_values.float())
        return nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.text is None:
            raise ExportError(f"{self.export_dir}: this export has no text tower")
        f = self.text(input_ids.long())
        return nn.functional.normalize(f, dim=-1) if normalize else f

    def eval(self) -> ExportedClip:  # the evaluators call model.eval().to(device)
        return self

    def to(self, device: Any) -> ExportedClip:
        if str(device) != "cpu":
            raise ExportError(f"{self.export_dir}: the exported graphs run on CPU here (asked for {device})")
        return self


def load_export(export_dir: str | os.PathLike, variant: str = "fp32", threads: int = 1) -> ExportedClip:
    """Load an export, checking each file it uses (graphs, configs, vocabulary) against the manifest first."""
    d = Path(export_dir)
    m = read_manifest(d)
    if variant not in m["variants"]:
        raise ExportError(f"{d}: no {variant!r} variant (has: {', '.join(m['variants'])})")
    towers = {}
    for t in TOWERS:
        f = m["variants"][variant].get(t)
        if f:
            p = verify_file(d, m, f)
            towers[t] = PteTower(p) if p.suffix == ".pte" else OnnxTower(p, threads)
        else:
            towers[t] = None
    pre = build_preprocess(json.loads(verify_file(d, m, m["preprocess"]).read_text()))
    tok = None
    if m.get("tokenizer"):
        cfg = json.loads(verify_file(d, m, m["tokenizer"]).read_text())
        if cfg.get("bpe_file"):
            verify_file(d, m, cfg["bpe_file"])
        tok = build_tokenizer(d, cfg)
    return ExportedClip(d, m, variant, towers["image"], towers["text"], pre, tok)


# ---------------------------------------------------------------------------------------------------------------
# Where a model comes from: a vfmkit run dir, an open_clip name (+ tag), or a checkpoint file


def load_source(spec: str, image_size: int | None = None):
    """``(ClipBundle, name, source dict)`` for ``vfmkit export``'s RUN_OR_MODEL, a model spec
    (``vfmkit.models.spec``):

    - a directory: a vfmkit run (``config.json`` + ``model.safetensors``): the run's model name, kwargs and image
      size, its weights;
    - ``openclip:NAME:SOURCE[@SIZE]``: an open_clip / vfmkit model with ``SOURCE`` an open_clip tag or a local
      checkpoint file (safetensors or a ``weights_only`` torch file);
    - ``NAME[@SIZE]`` (or ``openclip:NAME``): random weights (latency runs).

    ``image_size`` (``--image-size``) and ``@SIZE`` both set the input side; given both, they must agree.
    """
    from vfmkit.config import ModelConfig, parse_section
    from vfmkit.models.factory import create_clip
    from vfmkit.models.spec import parse_model_spec

    ms = parse_model_spec(spec).require("path", "openclip", "name", what="export source")
    if ms.size is not None and image_size is not None and ms.size != image_size:
        raise ExportError(f"{spec!r}: @{ms.size} disagrees with --image-size {image_size}")
    size = image_size or ms.size
    if ms.kind == "path":
        p = Path(ms.name)
        cfg_path, weights = p / "config.json", p / "model.safetensors"
        for f in (cfg_path, weights):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f}: a vfmkit run directory needs config.json and model.safetensors"
                )
        # Only the sections that say which model this is are read (strictly): the model section and the image
        # size. The rest (optimiser, train, method args) does not shape the weights, and a run saved by an
        # older vfmkit whose train keys have since moved must still export.
        raw = json.loads(cfg_path.read_text())
        mcfg = parse_section(ModelConfig, raw.get("model"), "model")
        run_size = (raw.get("data") or {}).get("image_size")
        if run_size is not None and not isinstance(run_size, int):
            raise ExportError(f"{cfg_path}: data.image_size must be an int, got {run_size!r}")
        bundle = create_clip(mcfg.name, str(weights), image_size=size or run_size, **mcfg.kwargs)
        return (
            bundle,
            mcfg.name,
            {
                "kind": "run",
                "run": str(p.resolve()),
                "weights": "model.safetensors",
                "weights_sha256": sha256_file(weights),
            },
        )
    if ms.kind == "name" and Path(ms.name).suffix in (".safetensors", ".pt", ".pth", ".bin"):
        raise ExportError(f"{spec!r}: a checkpoint file needs its architecture: openclip:NAME:{ms.name}")
    src = ms.source
    if src and Path(src).is_file():
        bundle = create_clip(ms.name, src, image_size=size)
        return (
            bundle,
            ms.name,
            {
                "kind": "checkpoint",
                "checkpoint": str(Path(src).resolve()),
                "weights_sha256": sha256_file(src),
            },
        )
    bundle = create_clip(ms.name, src, image_size=size)
    return bundle, ms.name, {"kind": "open_clip", "pretrained": src, "weights": "tag" if src else "random"}


def export_model(
    spec: str,
    out_dir: str | os.PathLike,
    *,
    image_size: int | None = None,
    quantize: str | None = None,
    fmt: str = "onnx",
    opset: int = DEFAULT_OPSET,
    check_parity: bool = False,
) -> tuple[dict, dict | None]:
    """``vfmkit export``: resolve the model, export both towers -> (manifest, parity or None).

    ``check_parity``: compare every variant with PyTorch eager on the embedded data (``parity``) and write the
    result to ``parity.json`` beside the manifest (not part of the checked file set).
    """
    formats = ("onnx", *[f for f in fmt.split(",") if f and f != "onnx"])
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(
            f"format {','.join(bad)!r} is not supported (choices: {', '.join(FORMATS)}; Core ML: "
            "see docs/export.md)"
        )
    torch.manual_seed(0)  # random-weight exports (latency runs) are reproducible
    bundle, name, source = load_source(spec, image_size)
    m = export_clip(
        bundle.model,
        bundle.tokenizer,
        out_dir,
        name=name,
        image_size=bundle.image_size,
        mean=bundle.mean,
        std=bundle.std,
        source=source,
        quantize=quantize,
        opset=opset,
        formats=formats,
    )
    if not check_parity:
        return m, None
    par = {
        v: parity(load_export(out_dir, v), bundle.model, bundle.tokenizer, bundle.preprocess_val)
        for v in m["variants"]
    }
    atomic_write_json(Path(out_dir) / "parity.json", par)
    return m, par


# ---------------------------------------------------------------------------------------------------------------
# Parity: exported graphs vs PyTorch eager on real data


def _emb_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    cos = nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }


@torch.no_grad()
def parity(
    exported: ExportedClip,
    model: nn.Module,
    tokenizer: Callable,
    preprocess: Callable,
    *,
    retrieval_data: str = "builtin:flickr8k/heldout",
    zeroshot_data: str = "builtin:imagenette/val",
    classes: str | os.PathLike | None = None,
    templates: Sequence[Callable[[str], str]] | None = None,
    max_captions: int = 5,
) -> dict:
    """Eager ``model`` (with its own preprocess and tokenizer) vs the export (with the preprocess and tokenizer
    it ships) on real images and captions: max |diff| and cosine of the L2-normalised embeddings (the vectors
    retrieval and zero-shot compare), retrieval R@1 and zero-shot top-1 before and after. ``retrieval_data`` / ``zeroshot_data`` may be None to skip that part."""
    from vfmkit.data.builtin import builtin_path
    from vfmkit.eval.features import encode_image_text
    from vfmkit.eval.retrieval import retrieval_metrics
    from vfmkit.eval.zeroshot import class_names_from_json, zeroshot_eval

    model.eval()
    res: dict[str, Any] = {"model": exported.manifest["model"], "variant": exported.variant}
    if retrieval_data:
        ie, te, idx = encode_image_text(
            model, tokenizer, preprocess, retrieval_data, max_captions=max_captions
        )
        ix, tx, idx2 = encode_image_text(
            exported, exported.tokenizer, exported.preprocess, retrieval_data, max_captions=max_captions
        )
        if not torch.equal(idx, idx2):
            raise ExportError("retrieval sets differ between eager and exported runs")
        res["n_images"], res["n_captions"] = int(ie.shape[0]), int(te.shape[0])
        res["image_embeddings"] = _emb_diff(ie, ix)
        res["text_embeddings"] = _emb_diff(te, tx)
        r0 = retrieval_metrics(_unit(ie), _unit(te), idx)
        r1 = retrieval_metrics(_unit(ix), _unit(tx), idx)
        res["retrieval"] = {
            k: {"eager": r0[k], "export": r1[k], "delta": r1[k] - r0[k]} for k in ("i2t_R@1", "t2i_R@1")
        }
    if zeroshot_data:
        names = class_names_from_json(classes or builtin_path("imagenette") / "classes.json")
        z0 = zeroshot_eval(model, tokenizer, preprocess, zeroshot_data, names, templates)
        z1 = zeroshot_eval(exported, exported.tokenizer, exported.preprocess, zeroshot_data, names, templates)
        res["zeroshot"] = {k: {"eager": z0[k], "export": z1[k], "delta": z1[k] - z0[k]} for k in ("top1",)}
    return res


def _unit(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x.float(), dim=-1)
