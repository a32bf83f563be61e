"""``vfmkit export``: reparameterised image and text towers as ONNX graphs, with their configs and a manifest."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a CLIP model's towers for deployment (ONNX, optional int8)")
    p.add_argument(
        "source",
        metavar="RUN_OR_MODEL",
        help="a model spec: a vfmkit run dir (config.json + model.safetensors), "
        "openclip:NAME:TAG_OR_CHECKPOINT[@SIZE], or NAME[@SIZE] (random weights)",
    )
    p.add_argument(
        "--out", required=True, help="export directory (image.onnx, text.onnx, manifest.json, ...)"
    )
    p.add_argument(
        "--format",
        default="onnx",
        help="onnx (default), or onnx,pte to also write ExecuTorch programs (needs the executorch extra)",
    )
    p.add_argument(
        "--quantize", default=None, choices=["int8"], help="also write int8 dynamic-quantised graphs"
    )
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's own)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument(
        "--parity",
        action="store_true",
        help="after exporting, compare the graphs with PyTorch eager on the embedded data (parity.json)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vfmkit.models.export import ExportError, export_model
    from vfmkit.models.spec import ModelSpecError

    try:
        m, par = export_model(
            args.source,
            args.out,
            image_size=args.image_size,
            quantize=args.quantize,
            fmt=args.format,
            opset=args.opset,
            check_parity=args.parity,
        )
    except (ExportError, ModelSpecError) as e:
        print(f"vfmkit export: error: {e}")
        return 2
    sizes = ", ".join(
        f"{k} {v['bytes'] / 2**20:.1f} MiB" for k, v in m["files"].items() if k.endswith((".onnx", ".pte"))
    )
    print(
        f"exported {m['model']} ({m['reparameterized_modules']} modules reparameterised, embed dim "
        f"{m['embed_dim']}, opset {m['opset']}) to {args.out}: {sizes}"
    )
    if par is not None:
        print(json.dumps(par, indent=1))
    return 0
