"""Export for deployment (issue 19): reparameterisation keeps the function, exported ONNX towers match eager on
real images and captions, and a corrupt, truncated or unlisted exported file is refused by name."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from vfmkit.config import load_config, to_dict  # noqa: E402
from vfmkit.data.shards import iter_shard, list_shards  # noqa: E402
from vfmkit.models import export as ex  # noqa: E402
from vfmkit.models.factory import create_clip  # noqa: E402

DATA = Path(__file__).parent / "data"


def _real_images(n: int) -> tuple[list, list[str]]:
    """The two test JPEGs plus the first real Flickr8k images of the embedded held-out shard, with captions."""
    from PIL import Image

    imgs = [
        Image.open(p).convert("RGB")
        for p in sorted(DATA.glob("*.*"))
        if p.suffix.lower() in (".jpg", ".jpeg")
    ]
    caps: list[str] = []
    for s in iter_shard(list_shards("builtin:flickr8k/heldout")[0]):
        imgs.append(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        caps.extend(json.loads(s["json"])["captions"][:2])
        if len(imgs) >= n:
            break
    return imgs, caps


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the multi-branch blocks what training gives them: BN statistics and affine terms away from their
    init, layer scales of order 0.1-1 (FastViT inits them at 1e-5, where every residual branch is ~0 and a
    wrong fold would go unseen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(0.1 + 0.4 * torch.rand(p.shape, generator=g))
    return model.eval()


def _branchy(model: torch.nn.Module) -> int:
    """Train-time branches still present (MobileOne conv/scale branches, RepMixer mixer/norm, RepCPE pe)."""
    return sum(1 for n, _ in model.named_modules() if n.endswith((".conv_kxk", ".conv_scale", ".small_conv")))


def _check_reparam(model: torch.nn.Module, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        before = model.encode_image(pixels)
    deploy, n = ex.reparameterize(model)
    assert n > 20 and _branchy(model) > 0 and _branchy(deploy) == 0
    with torch.no_grad():
        after = deploy.encode_image(pixels)
        again = model.encode_image(pixels)  # the original is left as it was
    assert torch.equal(before, again)
    assert before.abs().mean() > 1e-2  # the features are not ~0 (a vacuous comparison)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    # the tolerance is meaningful: dropping one folded branch's contribution moves the output far past it
    blk = next(m for m in deploy.modules() if type(m).__name__ == "MobileOneBlock")
    with torch.no_grad():
        w = blk.reparam_conv.weight.clone()
        blk.reparam_conv.weight.mul_(0.5)
        broken = deploy.encode_image(pixels)
        blk.reparam_conv.weight.copy_(w)
    assert (broken - before).abs().max() > 1e-2


def test_reparameterize_tiny_mci_on_real_images():
    torch.manual_seed(0)
    b = create_clip("vfm-tiny-mci")
    imgs, _ = _real_images(6)
    _check_reparam(_trained_like(b.model), torch.stack([b.preprocess_val(i) for i in imgs]))


def test_reparameterize_mobileclip_s2_mci2_at_small_resolution():
    """MobileCLIP-S2's image tower (MCi2: 4/12/24/4 blocks, RepCPE + attention in the last stage) at 64 px."""
    torch.manual_seed(0)
    b = create_clip("MobileCLIP-S2", image_size=64)
    assert type(b.model.visual.trunk).__name__ == "FastVit" and b.image_size == 64
    imgs, _ = _real_images(3)
    _check_reparam(_trained_like(b.model), torch.stack([b.preprocess_val(i) for i in imgs]))


def test_reparameterize_leaves_a_vit_alone():
    b = create_clip("vfm-tiny-vit")
    deploy, n = ex.reparameterize(b.model)
    assert n == 0 and deploy is not b.model
    x = torch.randn(2, 3, b.image_size, b.image_size)
    with torch.no_grad():
        assert torch.equal(deploy.encode_image(x), b.model.eval().encode_image(x))


# ----------------------------------------------------------------------------------------------------------------
# One export of a tiny MCi vfmkit run through the command line, shared by the tests below


@pytest.fixture(scope="module")
def run_export(tmp_path_factory):
    """A vfmkit run dir (config.json + model.safetensors) of vfm-tiny-mci with trained-like statistics,
    exported by ``vfmkit export RUN --out DIR --quantize int8``."""
    from safetensors.torch import save_file

    from vfmkit.cli import main

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(1)
    b = create_clip("vfm-tiny-mci")
    model = _trained_like(b.model, seed=1)
    run = root / "run"
    run.mkdir()
    cfg = load_config({"method": "clip", "model": {"name": "vfm-tiny-mci"}})
    saved = to_dict(cfg)
    saved["train"]["gather_with_grad"] = (
        True  # a run saved by an older vfmkit (key since moved) still exports
    )
    (run / "config.json").write_text(json.dumps(saved))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    out = root / "out"
    assert main(["export", str(run), "--out", str(out), "--quantize", "int8"]) == 0
    return run, out, b


def test_manifest_describes_the_export(run_export):
    run, out, b = run_export
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"] == "vfm-tiny-mci" and m["source"]["kind"] == "run"
    assert (
        m["exporter"] == ex.EXPORTER and m["opset"] == ex.DEFAULT_OPSET and m["reparameterized_modules"] > 20
    )
    assert m["embed_dim"] == 256 and m["image_size"] == 96
    assert m["logit_scale"] == pytest.approx(float(b.model.logit_scale.detach().exp()), rel=1e-6)
    assert m["inputs"]["image"]["input"]["shape"] == ["batch", 3, 96, 96]
    assert m["inputs"]["text"]["input"]["shape"] == ["batch", 32]
    assert m["variants"] == {
        "fp32": {"image": "image.onnx", "text": "text.onnx"},
        "int8": {"image": "image.int8.onnx", "text": "text.int8.onnx"},
    }
    listed = set(m["files"])
    assert listed == {p.name for p in out.iterdir() if p.name != "manifest.json"}
    for name, e in m["files"].items():
        assert e["bytes"] == (out / name).stat().st_size and len(e["sha256"]) == 64
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["image_size"] == 96 and pre["mean"] == pytest.approx(list(b.mean))
    assert json.loads((out / "tokenizer.json").read_text())["context_length"] == 32


def test_exported_towers_match_eager_on_real_images_and_captions(run_export):
    run, out, _ = run_export
    ref = create_clip("vfm-tiny-mci", str(run / "model.safetensors")).model.eval()
    b = create_clip("vfm-tiny-mci")
    e = ex.load_export(out)
    imgs, caps = _real_images(7)
    # the export's own preprocess.json / tokenizer.json reproduce open_clip's exactly
    pix = torch.stack([e.preprocess(i) for i in imgs])
    assert torch.equal(pix, torch.stack([b.preprocess_val(i) for i in imgs]))
    ids = e.tokenizer(caps)
    assert torch.equal(ids, b.tokenizer(caps))
    with torch.no_grad():
        for n in (len(imgs), 1):  # a dynamic batch axis: the graph was traced at batch 2
            torch.testing.assert_close(
                e.encode_image(pix[:n]), ref.encode_image(pix[:n]), atol=1e-4, rtol=1e-4
            )
        for n in (len(caps), 1):
            torch.testing.assert_close(e.encode_text(ids[:n]), ref.encode_text(ids[:n]), atol=1e-4, rtol=1e-4)
        q = ex.load_export(out, "int8")
        cos_i = torch.nn.functional.cosine_similarity(q.encode_image(pix), ref.encode_image(pix))
        cos_t = torch.nn.functional.cosine_similarity(q.encode_text(ids), ref.encode_text(ids))
    assert cos_i.min() > 0.98 and cos_t.min() > 0.98, (cos_i, cos_t)
    assert (q.encode_image(pix) - ref.encode_image(pix)).abs().max() > 1e-6  # int8 is a different graph


def _copy(out: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(out, d)
    return d


def test_truncated_graph_is_refused_by_name(run_export, tmp_path):
    d = _copy(run_export[1], tmp_path)
    data = (d / "image.onnx").read_bytes()
    (d / "image.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ex.ExportIntegrityError, match=r"image\.onnx: .* bytes, manifest says .*truncated"):
        ex.load_export(d)
    ex.load_export(d, "int8")  # the int8 variant does not use image.onnx and still loads


def test_corrupt_file_is_refused_by_name_via_the_manifest_sha256(run_export, tmp_path):
    d = _copy(run_export[1], tmp_path)
    raw = bytearray((d / "text.onnx").read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # same size, one flipped byte
    (d / "text.onnx").write_bytes(bytes(raw))
    with pytest.raises(ex.ExportIntegrityError, match=r"text\.onnx: sha256 [0-9a-f]{64} does not match"):
        ex.load_export(d)
    with pytest.raises(ex.ExportIntegrityError, match=r"text\.onnx"):
        ex.verify_export(d)
    # the configs and vocabulary are checked too
    d2 = _copy(run_export[1], tmp_path / "b")
    (d2 / "preprocess.json").write_text((d2 / "preprocess.json").read_text().replace("bicubic", "bilinear"))
    with pytest.raises(ex.ExportIntegrityError, match=r"preprocess\.json"):
        ex.load_export(d2)


def test_manifest_sha256_is_what_is_checked(run_export, tmp_path):
    d = _copy(run_export[1], tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["image.onnx"]["sha256"] = "0" * 64  # the graph is intact; the manifest vouches for another
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        ex.ExportIntegrityError, match=r"image\.onnx: sha256 .* does not match the manifest's 0{64}"
    ):
        ex.load_export(d)
    # a garbage graph whose manifest entry was rewritten to match still fails, named, in onnxruntime
    (d / "image.onnx").write_bytes(b"not an onnx graph" * 100)
    m["files"]["image.onnx"] = ex._file_entry(d / "image.onnx")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ex.ExportIntegrityError, match=r"image\.onnx: onnxruntime cannot load it"):
        ex.load_export(d)
    (d / "manifest.json").write_text("{")
    with pytest.raises(ex.ExportIntegrityError, match=r"manifest\.json: manifest is not valid JSON"):
        ex.load_export(d)
    (d / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        ex.load_export(d)


def test_export_command_errors_are_named(tmp_path, capsys):
    from vfmkit.cli import main

    (tmp_path / "w.safetensors").write_bytes(b"")
    assert main(["export", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "needs its architecture: openclip:NAME:" in capsys.readouterr().out
    assert main(["export", "vfm-tiny-mci@64", "--image-size", "96", "--out", str(tmp_path / "o")]) == 2
    assert "@64 disagrees with --image-size 96" in capsys.readouterr().out
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(["export", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_checkpoint_source_via_the_model_spec(run_export):
    """``openclip:NAME:CKPT@SIZE`` resolves to that architecture with those weights at that size."""
    run, _, _ = run_export
    ckpt = run / "model.safetensors"
    bundle, name, src = ex.load_source(f"openclip:vfm-tiny-mci:{ckpt}@64")
    assert name == "vfm-tiny-mci" and bundle.image_size == 64 and src["kind"] == "checkpoint"
    ref = create_clip("vfm-tiny-mci", str(ckpt)).model
    assert torch.equal(bundle.model.logit_scale, ref.logit_scale)
    assert all(
        torch.equal(a, b) for a, b in zip(bundle.model.text.parameters(), ref.text.parameters(), strict=True)
    )


def test_executorch_program_matches_eager_when_executorch_is_installed(tmp_path):
    """ExecuTorch (.pte, XNNPACK) image tower of the tiny MCi: loads in the ExecuTorch runtime, matches eager on
    real images at batch 1 and 5, and is checked by sha256 like the ONNX graphs. Skipped where the optional
    ``executorch`` extra is not installed (it is not in the test extra: lowering alone takes ~1-2 min)."""
    pytest.importorskip("executorch.runtime")
    torch.manual_seed(2)
    b = create_clip("vfm-tiny-mci")
    model = _trained_like(b.model, seed=2)
    m = ex.export_clip(
        model,
        b.tokenizer,
        tmp_path,
        name="vfm-tiny-mci",
        image_size=b.image_size,
        mean=b.mean,
        std=b.std,
        towers=("image",),
        formats=("onnx", "pte"),
    )
    assert m["variants"]["pte"] == {"image": "image.pte"} and "image.pte" in m["files"]
    e = ex.load_export(tmp_path, "pte")
    imgs, _ = _real_images(5)
    pix = torch.stack([e.preprocess(i) for i in imgs])
    with torch.no_grad():
        for n in (5, 1):
            torch.testing.assert_close(
                e.encode_image(pix[:n]), model.encode_image(pix[:n]), atol=1e-4, rtol=1e-4
            )
    data = (tmp_path / "image.pte").read_bytes()
    (tmp_path / "image.pte").write_bytes(data[:-10])
    with pytest.raises(ex.ExportIntegrityError, match=r"image\.pte: .*truncated"):
        ex.load_export(tmp_path, "pte")
