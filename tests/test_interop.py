"""Issue 18: vfmkit plays with the tools users already have (open_clip, open_clip_train, timm, img2dataset
folders), names its model-name readings, reads zero-shot class names from the shards, refuses a random
subclone parent, inspects every shard layout ``train`` reads, has a Python API, and logs plain lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vfmkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
TINY_CLIP = [
    "train.steps=3",
    "train.log_every=1",
    "data.batch_size=8",
    "data.image_size=32",
    "train.ckpt_every=0",
    "train.tensorboard=false",
    "train.progress=false",
    "optim.warmup_steps=1",
]


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 3-step vfm-tiny-vit CLIP run on the embedded Flickr8k subset (through ``vfmkit train``)."""
    out = tmp_path_factory.mktemp("interop") / "run"
    rc = main(["train", "clip_tiny", *_sets(f"out_dir={out}", *TINY_CLIP)])
    assert rc == 0
    return out


def _embed_script(name: str, pretrained: str | None = None) -> str:
    return f"""
import json, sys, torch, open_clip
torch.set_num_threads(1)
from PIL import Image
import io
m, _, pre = open_clip.create_model_and_transforms({name!r}, pretrained={pretrained!r})
tok = open_clip.get_tokenizer({name!r})
m.eval()
img = Image.open(io.BytesIO(open(sys.argv[1], 'rb').read())).convert('RGB')
with torch.no_grad():
    e_i = m.encode_image(pre(img)[None])
    e_t = m.encode_text(tok(['a dog runs on the grass', 'two children play']))
json.dump({{'image': e_i.tolist(), 'text': e_t.tolist()}}, sys.stdout)
"""


def _sample_jpg(tmp: Path) -> Path:
    from vfmkit.data.shards import iter_shard, list_shards

    s = next(iter(iter_shard(list_shards("builtin:flickr8k/heldout")[0])))
    p = tmp / "x.jpg"
    p.write_bytes(s["jpg"])
    return p


# --- 1. a run opens in plain open_clip -----------------------------------------------------------------------
def test_run_dir_opens_in_plain_open_clip(tiny_run: Path, tmp_path: Path):
    """``open_clip.create_model_and_transforms('local-dir:RUN')`` in a fresh process (no vfmkit import, no
    add_model_config) gives the same embeddings as vfmkit's loader on a real image and captions."""
    from PIL import Image

    from vfmkit.models.factory import create_clip

    assert (tiny_run / "open_clip_config.json").is_file()
    jpg = _sample_jpg(tmp_path)
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # plain open_clip: vfmkit not on the path
    r = subprocess.run(
        [sys.executable, "-c", _embed_script(f"local-dir:{tiny_run}"), str(jpg)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads(r.stdout)
    b = create_clip(str(tiny_run))  # a run dir is a model name (local-dir: reading)
    b.model.eval()
    with torch.no_grad():
        e_i = b.model.encode_image(b.preprocess_val(Image.open(jpg).convert("RGB"))[None])
        e_t = b.model.encode_text(b.tokenizer(["a dog runs on the grass", "two children play"]))
    assert torch.equal(torch.tensor(theirs["image"]), e_i)
    # vfmkit's text tower skips the padding after EOT (models/text_fast.py): equal up to float rounding
    torch.testing.assert_close(torch.tensor(theirs["text"]), e_t, rtol=1e-5, atol=1e-6)
    # the trained weights, not a fresh init: they equal the run's model.safetensors and differ from step 0
    from safetensors.torch import load_file

    sd = load_file(str(tiny_run / "model.safetensors"))
    assert all(torch.equal(sd[k], v) for k, v in b.model.state_dict().items())
    assert b.image_size == 32


# --- 2. open_clip_train on vfmkit's shards; vfmkit eval reads its checkpoint ---------------------------------
def test_open_clip_train_on_vfmkit_shards_and_vfmkit_eval_reads_its_checkpoint(
    tiny_run: Path, tmp_path: Path
):
    """open_clip_train (open_clip_torch[training], in this environment: the webdataset pin allows it) trains on
    the embedded Flickr8k shards, its sample count read from vfmkit's sizes.json (no --train-num-samples),
    starting from the vfmkit run (local-dir:); ``vfmkit eval`` then reads open_clip_train's epoch checkpoint."""
    import webdataset

    from vfmkit.data.builtin import builtin_path
    from vfmkit.data.shards import read_manifest

    d = builtin_path("flickr8k/heldout")
    sizes = json.loads((d / "sizes.json").read_text())
    assert sizes == {s["name"]: s["count"] for s in read_manifest(d)["shards"]}  # never stale
    assert webdataset.__version__ == "0.2.86", (
        "pyproject pins webdataset==0.2.86 (open_clip_train needs <=0.2.86)"
    )
    logs = tmp_path / "logs"
    cmd = [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--train-data",
        f"{d}/shard-{{000000..000000}}.tar.gz",
        "--dataset-type",
        "webdataset",
        "--model",
        f"local-dir:{tiny_run}",
        "--batch-size",
        "25",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--lr",
        "1e-4",
        "--warmup",
        "1",
        "--logs",
        str(logs),
        "--name",
        "oc",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--report-to",
        "",
        "--seed",
        "0",
        "--log-every-n-steps",
        "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    out_log = (logs / "oc" / "out.log").read_text() if (logs / "oc" / "out.log").is_file() else ""
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "[100/100 (100%)]" in out_log  # 100 samples: the count came from sizes.json
    ckpt = logs / "oc" / "checkpoints" / "epoch_1.pt"
    assert ckpt.is_file()

    from vfmkit.models.factory import create_clip, load_state_dict

    b = create_clip(f"local-dir:{tiny_run}", str(ckpt))
    trained = load_state_dict(ckpt)
    assert all(torch.equal(trained[k], v) for k, v in b.model.state_dict().items())
    from safetensors.torch import load_file

    before = load_file(str(tiny_run / "model.safetensors"))
    assert any(
        not torch.equal(before[k], trained[k]) for k in before
    )  # open_clip_train did change the weights
    rc = main(
        [
            "eval",
            "--model",
            f"local-dir:{tiny_run}",
            "--pretrained",
            str(ckpt),
            "--tasks",
            "retrieval",
            "--retrieval-data",
            f"{d}/shard-000001.tar.gz",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    from vfmkit.eval.clip import evaluate_clip

    direct = evaluate_clip(b, ["retrieval"], f"{d}/shard-000001.tar.gz", "", "", None)
    assert res == direct and "retrieval/i2t_R@1" in res  # the CLI evaluated open_clip_train's weights


# --- 3. model.name takes what open_clip takes, plus a timm tower ---------------------------------------------
def test_model_name_readings(tiny_run: Path, tmp_path: Path, monkeypatch):
    from vfmkit.models.factory import ModelNameError, create_clip

    cfg = json.loads((tiny_run / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "my_tower.json").write_text(json.dumps(cfg))
    b = create_clip(str(tmp_path / "my_tower.json"))  # a config JSON path: the same architecture, fresh init
    assert b.image_size == 32 and b.model_cfg == cfg
    t = create_clip("timm:test_resnet.r160_in1k", image_size=32, text_cfg="vfm-tiny-vit", embed_dim=64)
    assert t.model_cfg["vision_cfg"]["timm_model_name"] == "test_resnet.r160_in1k"
    with torch.no_grad():
        x = t.model.encode_image(torch.zeros(2, 3, 32, 32))
        y = t.model.encode_text(t.tokenizer(["a dog", "a cat"]))
    assert x.shape == y.shape == (2, 64)
    with pytest.raises(ModelNameError) as e:
        create_clip("my-own-tower")
    msg = str(e.value)
    for reading in ("local-dir:", "hf-hub:", ".json", "timm:", "open_clip.list_models()"):
        assert reading in msg
    with pytest.raises(ModelNameError, match="open_clip_config.json"):
        create_clip(f"local-dir:{tmp_path}")  # a directory with no config says what it lacks
    with pytest.raises(ModelNameError, match="not a timm model"):
        create_clip("timm:no_such_net")
    import huggingface_hub.constants

    # hf-hub: goes to open_clip's hub loader (offline here, so its error; no network retries)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF Hub nobody/no-such-clip"):
        create_clip("hf-hub:nobody/no-such-clip")
    # a recipe puts its own tower in: vfmkit train with model.name = timm:..., and the run opens in open_clip
    out = tmp_path / "timm_run"
    rc = main(
        [
            "train",
            "clip_tiny",
            *_sets(f"out_dir={out}", *TINY_CLIP, "train.steps=1", "model.name=timm:test_resnet.r160_in1k"),
        ]
    )
    assert rc == 0
    import open_clip

    m, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    from safetensors.torch import load_file

    sd = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


# --- 4. zero-shot class names come from the shards -----------------------------------------------------------
def _class_shards(tmp_path: Path, names: list[str], with_class: bool = True) -> Path:
    """Real Imagenette images under other class names (a 3-class set whose labels are not Imagenette's)."""
    from vfmkit.data.shards import ShardWriter, iter_shard, list_shards

    out = tmp_path / ("cls" if with_class else "nocls")
    picked: dict[int, list[bytes]] = {}
    for u in list_shards("builtin:imagenette/val"):
        for s in iter_shard(u):
            lab = json.loads(s["json"])["label"]
            if lab < len(names) and len(picked.setdefault(lab, [])) < 4:
                picked[lab].append(s["jpg"])
    with ShardWriter(out) as w:
        for lab, jpgs in sorted(picked.items()):
            for i, jpg in enumerate(jpgs):
                meta = {"label": lab, **({"class": names[lab]} if with_class else {})}
                w.write({"__key__": f"{lab}_{i}", "jpg": jpg, "json": meta})
    return out


def test_zeroshot_class_names_from_shards(tiny_run: Path, tmp_path: Path, capsys):
    from vfmkit.eval.zeroshot import ClassNamesError, class_names_for

    assert class_names_for("builtin:imagenette/val")[:2] == ["tench", "English springer"]  # its classes.json
    names = ["golden_retriever", "fire_truck", "teapot"]
    shards = _class_shards(tmp_path, names)
    assert class_names_for(str(shards)) == ["golden retriever", "fire truck", "teapot"]
    imagenette = str(Path(__file__).resolve().parents[1] / "src/vfmkit/assets/imagenette/classes.json")
    with pytest.raises(ClassNamesError, match="does not match"):
        class_names_for(str(shards), imagenette)  # another dataset's names are refused, not used
    nocls = _class_shards(tmp_path, names, with_class=False)
    with pytest.raises(ClassNamesError, match="no class names"):
        class_names_for(str(nocls))
    (tmp_path / "names.txt").write_text("\n".join(names))
    assert class_names_for(str(shards), tmp_path / "names.txt") == names
    # through the CLI, as the issue ran it: no --classes, the shards' own names; a mismatch is an error line
    rc = main(["eval", "--model", str(tiny_run), "--tasks", "zeroshot", "--zeroshot-data", str(shards)])
    assert rc == 0 and "zeroshot/top1" in capsys.readouterr().out
    rc = main(
        [
            "eval",
            "--model",
            str(tiny_run),
            "--tasks",
            "zeroshot",
            "--zeroshot-data",
            str(shards),
            "--classes",
            imagenette,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "does not match" in err and len(err.strip().splitlines()) == 1
    rc = main(["eval", "--model", str(tiny_run), "--tasks", "zeroshot", "--zeroshot-data", str(nocls)])
    assert rc == 2 and "no class names" in capsys.readouterr().err


# --- 6. data info reads everything train reads ---------------------------------------------------------------
def test_data_info_every_layout(tmp_path: Path, capsys):
    from vfmkit.data.builtin import builtin_path

    d = builtin_path("flickr8k/heldout")
    rc = main(["data", "info", str(d / "shard-000000.tar.gz")])  # a single tar (it has a manifest beside it)
    out = capsys.readouterr().out
    assert rc == 0 and "100 samples in 1 shards" in out
    rc = main(["data", "info", f"{d}/shard-{{000000..000001}}.tar.gz", "--verify"])  # a brace pattern
    out = capsys.readouterr().out
    assert rc == 0 and "200 samples in 2 shards" in out and "all shards match" in out
    # an img2dataset folder: tars + *_stats.json + parquet-free, no manifest
    i2d = tmp_path / "i2d"
    i2d.mkdir()
    import shutil

    for i in range(2):
        shutil.copy(d / f"shard-00000{i}.tar.gz", i2d / f"0000{i}.tar")
        (i2d / f"0000{i}_stats.json").write_text(
            json.dumps({"successes": 100, "failed_to_download": 3 + i, "failed_to_resize": 0})
        )
    rc = main(["data", "info", str(i2d)])
    out = capsys.readouterr().out
    assert rc == 0 and "200 samples in 2 shards" in out and "img2dataset stats" in out
    assert "failed_to_download 7" in out
    (i2d / "00001_stats.json").write_text(json.dumps({"successes": 99}))  # stats that disagree with the tar
    rc = main(["data", "info", str(i2d), "--verify"])
    out = capsys.readouterr().out
    assert rc == 1 and "100 samples read, img2dataset stats says 99" in out
    # a plain hand-made tar with no counts anywhere: counted; a truncated one is named by --verify
    plain = tmp_path / "plain"
    plain.mkdir()
    raw = (i2d / "00000.tar").read_bytes()
    (plain / "a.tar").write_bytes(raw)
    (plain / "b.tar").write_bytes(raw[: len(raw) // 3])
    rc = main(["data", "info", str(plain / "a.tar")])
    out = capsys.readouterr().out
    assert rc == 0 and "100 samples" in out and "counted" in out
    rc = main(["data", "info", str(plain), "--verify"])
    out = capsys.readouterr().out
    assert rc == 1 and "b.tar" in out and "corrupt" in out


# --- 5. subclone refuses a random parent; --pretrained takes tags and files ------------------------------------
def test_subclone_random_parent_refused_or_warned(tmp_path: Path, capsys, monkeypatch):
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a hub tag fails at once, offline
    base = [
        "--num-classes",
        "10",
        "--model-arg",
        "img_size=32",
        "--layers",
        "1",
        "--width",
        "64",
        "--n-calib",
        "8",
        "--n-heldout",
        "8",
    ]
    rc = main(["subclone", "run", "test_vit", "--out", str(tmp_path / "a"), *base])
    err = capsys.readouterr().err
    assert rc == 2 and "no pretrained weights" in err and "--allow-random-parent" in err
    assert not (tmp_path / "a").exists()
    rc = main(["subclone", "run", "test_vit", "--out", str(tmp_path / "b"), "--allow-random-parent", *base])
    err = capsys.readouterr().err
    assert rc == 0 and "RANDOMLY INITIALISED" in err
    arch = json.loads((tmp_path / "b" / "arch.json").read_text())
    assert arch["subclone"]["parent_weights"].startswith("random")
    # a timm tag is tried as NAME.TAG (offline here, so it names what it tried); a file through the spec grammar
    rc = main(
        ["subclone", "run", "test_vit", "--pretrained", "augreg_in21k", "--out", str(tmp_path / "c"), *base]
    )
    assert rc == 2 and "test_vit.augreg_in21k" in capsys.readouterr().err
    torch.manual_seed(0)
    w = tmp_path / "parent.safetensors"
    save_model(timm.create_model("test_vit", num_classes=10, img_size=32), str(w))
    rc = main(["subclone", "run", f"timm:test_vit:{w}", "--out", str(tmp_path / "d"), *base])
    captured = capsys.readouterr()
    assert rc == 0 and "RANDOMLY" not in captured.err
    assert json.loads((tmp_path / "d" / "arch.json").read_text())["subclone"]["parent_weights"] == str(w)


# --- 8. plain log lines when stderr is not a terminal; a finished run says so -----------------------------------
def test_plain_log_lines_and_finished_rerun(tmp_path: Path, capsys):
    import re

    out = tmp_path / "run"
    args = [
        "train",
        "clip_tiny",
        *_sets(f"out_dir={out}", *TINY_CLIP, "train.steps=4", "train.log_every=2", "train.progress=true"),
    ]
    assert main(args) == 0  # under pytest stderr is a pipe, as in CI / nohup / a cluster job
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("train clip step")]
    assert "\r" not in err and len(lines) == 2
    pat = r"train clip step (\d+)/4 loss (\d+\.\d+) samples/s (\d+\.\d) eta (\S+)"
    got = [re.fullmatch(pat, ln) for ln in lines]
    assert all(got) and [int(m.group(1)) for m in got] == [2, 4] and got[1].group(4) == "0s"
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [f"{r['loss']:.4f}" for r in logged if "loss" in r] == [m.group(2) for m in got]
    assert main(args) == 0  # rerun of the finished run
    err = capsys.readouterr().err
    assert "already complete (step 4/4)" in err and str(out / "model.safetensors") in err
    assert "train clip step" not in err


# --- 7. the public Python API, as the docs show it --------------------------------------------------------------
def _python_blocks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [
        b.split("```", 1)[0]
        for b in text.split("```python\n")[1:]
        if "import vfmkit\n" in b.split("```", 1)[0]
    ]


def test_import_vfmkit_is_cheap_and_exposes_the_api():
    code = (
        "import sys, vfmkit; heavy = [m for m in ('torch', 'open_clip', 'timm', 'numpy') if m in sys.modules];"
        "print(heavy, sorted(vfmkit.__all__))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    heavy, names = r.stdout.strip().split("] ")
    assert heavy == "["
    for name in ("train", "evaluate", "reinforce", "load_model", "load_config", "derive", "export"):
        assert repr(name) in names


@pytest.mark.parametrize("doc", ["README.md", "docs/ARCHITECTURE.md"])
def test_docs_python_api_examples_run(doc: str, tmp_path: Path, monkeypatch, capsys):
    """The ``import vfmkit`` examples in README and ARCHITECTURE run as written (in a scratch folder: runs/)."""
    blocks = _python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no 'import vfmkit' example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        ns: dict = {}
        exec(compile(code, f"{doc}:example", "exec"), ns)  # noqa: S102  the docs' own example, run as a user would
        assert ns["res"].step == 2 and (tmp_path / "runs" / "api" / "open_clip_config.json").is_file()
        from safetensors.torch import load_file

        sd = load_file(str(tmp_path / "runs" / "api" / "model.safetensors"))
        assert all(torch.equal(sd[k], v) for k, v in ns["bundle"].model.state_dict().items())
    assert "i2t_R@1" in capsys.readouterr().out or doc == "README.md"


def test_a_clip_run_folder_is_a_dense_tower(tiny_run):
    """`vfmkit eval --tasks seg --model local-dir:RUN` probes that run's image tower (it used to build the
    spec 'openclip:local-dir:RUN', which names no tower)."""
    from vfmkit.eval.dense import OpenClipTower, load_tower, seg_tower_spec
    from vfmkit.models.factory import create_clip

    for name in (str(tiny_run), f"local-dir:{tiny_run}"):
        assert seg_tower_spec(name) == str(tiny_run)
    assert seg_tower_spec("vfm-tiny-vit", "w.safetensors") == "openclip:vfm-tiny-vit:w.safetensors"
    tower = load_tower(seg_tower_spec(f"local-dir:{tiny_run}"))
    assert isinstance(tower, OpenClipTower)
    trained = create_clip(f"local-dir:{tiny_run}").model.visual.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in tower.visual.state_dict().items())
