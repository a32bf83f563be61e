"""Issue 17: nothing trained on that should not be, nothing overwritten, every error a sentence.

Two parts. (1) One test per defect of the issue (each fails on the code before the fix). (2) A fault-injection
suite for ``train``, ``reinforce clip``, ``reinforce classify`` and ``data import``: deterministic kill -9 points
(a function wrapped in a subprocess to SIGKILL itself on its Nth call: mid-step, mid-checkpoint write, between
the checkpoint's rename and its ``latest`` pointer, mid-shard, between shards), then the same command resumes and
every output is compared with an uninterrupted run's (bytes, and the uids / per-batch sample fingerprints, so
no sample is lost or duplicated); a full disk (ENOSPC raised by the writer) leaves the previous state intact.
Everything is real: the embedded Flickr8k / Imagenette samples, the real tiny models, the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vfmkit.cli import main
from vfmkit.data.shards import ShardWriter, iter_shard, list_shards

# ------------------------------------------------------------------------------------------------ fault driver
# The same code runs in a subprocess (as ``python -c DRIVER argv...``, faults in $VFMKIT_TEST_FAULTS) and in this
# process (exec'd; faults installed with monkeypatch). A fault wraps ``module:attr.path`` and fires on the Nth call.
DRIVER = r"""
import errno, hashlib, importlib, json, os, signal, sys


def _resolve(target):
    mod, attr = target.split(":")
    owner = importlib.import_module(mod)
    parts = attr.split(".")
    for p in parts[:-1]:
        owner = getattr(owner, p)
    return owner, parts[-1]


def _fire(f):
    if f["do"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, "No space left on device", f.get("path", "<test disk>"))


def _wrap(orig, f):
    n = [0]

    def wrapper(*a, **k):
        n[0] += 1
        hit = n[0] == f["at"]
        if hit and f["when"] == "before":
            _fire(f)
        r = orig(*a, **k)
        if hit and f["when"] == "after":
            _fire(f)
        return r

    return wrapper


def _fingerprints(batch):
    import torch

    x = batch["image"] if isinstance(batch, dict) else batch
    if not isinstance(x, torch.Tensor):
        return []
    return [hashlib.sha256(r.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16] for r in x]


def install(faults, fp_file=None, set_attr=setattr):
    for f in faults:
        owner, name = _resolve(f["target"])
        set_attr(owner, name, _wrap(getattr(owner, name), f))
    if fp_file:  # every batch the engine trains on, in order: one JSON line of per-sample fingerprints
        import vfmkit.engine.trainer as tr

        orig = tr._Run.next_batch

        def next_batch(self):
            out = orig(self)
            with open(fp_file, "a") as fh:
                fh.write(json.dumps(_fingerprints(out)) + "\n")
            return out

        set_attr(tr._Run, "next_batch", next_batch)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    install(json.loads(os.environ.get("VFMKIT_TEST_FAULTS", "[]")), os.environ.get("VFMKIT_TEST_FP"))
    from vfmkit.cli import main

    sys.exit(main(sys.argv[1:]))
"""
_drv: dict = {"__name__": "faults_driver"}
exec(compile(DRIVER, "faults_driver", "exec"), _drv)

COUNTS = {"faults": 0, "runs_compared": 0, "samples_checked": 0}


def _env() -> dict:
    src = str(Path(__import__("vfmkit").__file__).parents[1])
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }


def killed_run(
    argv: list[str], faults: list[dict], fp_file: Path | None = None, *, fresh: bool = False
) -> None:
    """Run ``vfmkit ARGV`` in a child process that SIGKILLs itself at the fault; assert that it died there.

    The child is forked from this process (the kill is a real SIGKILL of a separate process; forking skips the
    seconds of importing torch again); ``fresh=True`` starts a new interpreter (``python -c DRIVER``) instead."""
    if fresh:
        env = {**_env(), "VFMKIT_TEST_FAULTS": json.dumps(faults)}
        if fp_file is not None:
            env["VFMKIT_TEST_FP"] = str(fp_file)
        r = subprocess.run(
            [sys.executable, "-c", DRIVER, *argv], env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == -9, (
            f"the run was not killed at {faults}: rc {r.returncode}\n{r.stderr[-2000:]}"
        )
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            rc = 3
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                _drv["install"](faults, str(fp_file) if fp_file else None)
                rc = main(argv)
            finally:
                os._exit(rc if isinstance(rc, int) else 4)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9, (
            f"the run was not killed at {faults}: status {status}"
        )
    COUNTS["faults"] += 1


def in_process(monkeypatch, argv: list[str], faults: list[dict] = (), fp_file: Path | None = None) -> int:
    with monkeypatch.context() as m:
        _drv["install"](list(faults), str(fp_file) if fp_file else None, m.setattr)
        return main(argv)


def same_tree(a: Path, b: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Relative paths of files in ``a``; asserts ``b`` holds the same files with the same bytes."""

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in skip)

    fa, fb = files(a), files(b)
    assert fa == fb, f"different files: {sorted(set(fa) ^ set(fb))}"
    for f in fa:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    COUNTS["runs_compared"] += 1
    return fa


def shard_uids(folder: Path) -> list[str]:
    return [json.loads(s["json"])["uid"] for u in list_shards(str(folder)) for s in iter_shard(u)]


def reshard(src: str, out: Path, n: int, per_shard: int) -> list[dict]:
    samples = []
    for url in list_shards(src):
        for s in iter_shard(url):
            samples.append({k: v for k, v in s.items() if k != "__url__"})
            if len(samples) == n:
                break
        if len(samples) == n:
            break
    with ShardWriter(out, max_count=per_shard) as w:
        for s in samples:
            w.write(s)
    return samples


def one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, f"exit code {rc}, stderr {err}"
    line = [x for x in err if ": error: " in x]
    assert len(line) == 1, err
    assert "Traceback" not in "\n".join(err)
    for n in needles:
        assert n in line[0], (n, line[0])
    return line[0]


# ------------------------------------------------------------------------------------------------ train setup
STEPS, CKPT_EVERY, BATCH = 8, 2, 4


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    sets = [
        f"data.train={data}",
        f"train.steps={STEPS}",
        f"train.ckpt_every={CKPT_EVERY}",
        f"data.batch_size={BATCH}",
        "data.shuffle_buffer=8",
        "train.progress=false",
        "train.tensorboard=false",
        "train.log_every=2",
        "optim.warmup_steps=2",
        *extra,
    ]
    return ["train", "clip_tiny", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_train")
    reshard(
        "builtin:flickr8k/train", root / "data", 20, 8
    )  # 20 samples, 5 per epoch at batch 4: 8 steps cross one
    return root / "data"


@pytest.fixture(scope="module")
def train_ref(train_data, tmp_path_factory):
    """The uninterrupted run, with the fingerprint of every sample of every batch it trained on."""
    root = tmp_path_factory.mktemp("faults_ref")
    mp = pytest.MonkeyPatch()
    try:
        assert in_process(mp, train_argv(train_data, root / "ref"), fp_file=root / "fp.jsonl") == 0
    finally:
        mp.undo()
    fps = [json.loads(x) for x in (root / "fp.jsonl").read_text().splitlines()]
    assert len(fps) == STEPS and all(len(b) == BATCH for b in fps)
    return root / "ref", fps


def final_equal(ref: Path, out: Path) -> None:
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ from the ref"
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    COUNTS["runs_compared"] += 1


def batches_equal(ref_fps: list, killed_fp: Path, resumed_fp: Path, resumed_from: int) -> None:
    """The batches trained on = the killed run's up to its checkpoint + the resumed run's: exactly the ref's."""
    killed = [json.loads(x) for x in killed_fp.read_text().splitlines()][:resumed_from]
    resumed = [json.loads(x) for x in resumed_fp.read_text().splitlines()]
    assert killed + resumed == ref_fps, "a sample was lost, duplicated or reordered by the kill + resume"
    COUNTS["samples_checked"] += sum(map(len, ref_fps))


def latest_step(out: Path) -> int:
    return int((out / "checkpoints" / "latest").read_text().split("-")[1])


# ------------------------------------------------------------------------------------------------ train faults
def test_train_kill_mid_step_then_truncated_checkpoint_falls_back(
    train_data, train_ref, tmp_path, monkeypatch, capsys
):
    """kill -9 in step 6 (last checkpoint: step 4); then step 4's model.safetensors is truncated: the resume names
    it, falls back to step 2, and ends with the uninterrupted run's weights and batches."""
    ref, ref_fps = train_ref
    out = tmp_path / "run"
    killed_run(
        train_argv(train_data, out),
        [{"target": "vfmkit.engine.trainer:_Run.train_step", "at": 6, "when": "before", "do": "kill"}],
        tmp_path / "fp_killed",
    )
    assert latest_step(out) == 4 and not (out / "model.safetensors").exists()
    bad = out / "checkpoints" / "step-000000004" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vfmkit").addHandler(handler)
    try:
        assert in_process(monkeypatch, train_argv(train_data, out), fp_file=tmp_path / "fp_resumed") == 0
    finally:
        logging.getLogger("vfmkit").removeHandler(handler)
    assert any(str(bad) in r.getMessage() for r in records), [r.getMessage() for r in records]
    final_equal(ref, out)

    # log.jsonl: each step once, with the uninterrupted run's values (the killed run's step-4 line is not doubled)
    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]

    assert losses(out) == losses(ref)
    batches_equal(ref_fps, tmp_path / "fp_killed", tmp_path / "fp_resumed", 2)


@pytest.mark.parametrize(
    "fault, resumes_from",
    [  # killed inside the step-4 checkpoint write: model.safetensors is in the tmp folder, state.pt is not
        ({"target": "vfmkit.engine.checkpoint:torch.save", "at": 2, "when": "before", "do": "kill"}, 2),
        # killed after the step-4 folder was renamed into place, before `latest` names it
        (
            {"target": "vfmkit.engine.checkpoint:atomic_write_text", "at": 2, "when": "before", "do": "kill"},
            2,
        ),
    ],
    ids=["during-checkpoint-write", "before-latest-pointer"],
)
def test_train_kill_in_checkpoint_write_resumes_from_last_complete(
    train_data, train_ref, tmp_path, monkeypatch, fault, resumes_from
):
    ref, ref_fps = train_ref
    out = tmp_path / "run"
    # one of the kills in a fresh interpreter (as a user's process), the others forked
    killed_run(
        train_argv(train_data, out),
        [fault],
        tmp_path / "fp_killed",
        fresh=fault["at"] == 2 and fault["target"].endswith("torch.save"),
    )
    assert latest_step(out) == resumes_from
    assert in_process(monkeypatch, train_argv(train_data, out), fp_file=tmp_path / "fp_resumed") == 0
    final_equal(ref, out)
    batches_equal(ref_fps, tmp_path / "fp_killed", tmp_path / "fp_resumed", resumes_from)
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the killed run's partial folder is gone
    logged = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert logged[-1] == STEPS


def test_train_full_disk_at_a_checkpoint_leaves_the_previous_one(
    train_data, train_ref, tmp_path, monkeypatch, capsys
):
    """ENOSPC while the step-4 checkpoint is written: one error line, exit 2; step 2's checkpoint and `latest`
    untouched, no partial folder left to fill the disk further; the same command then finishes as the ref."""
    ref, ref_fps = train_ref
    out = tmp_path / "run"
    fault = {
        "target": "vfmkit.engine.checkpoint:save_model",
        "at": 2,
        "when": "before",
        "do": "enospc",
        "path": str(out / "checkpoints"),
    }
    rc = in_process(monkeypatch, train_argv(train_data, out), [fault], tmp_path / "fp_failed")
    one_line_error(capsys, rc, "No space left on device", str(out / "checkpoints"))
    COUNTS["faults"] += 1
    ck = out / "checkpoints"
    assert latest_step(out) == 2 and sorted(p.name for p in ck.iterdir()) == ["latest", "step-000000002"]
    before = {p.name: p.read_bytes() for p in (ck / "step-000000002").iterdir()}
    assert in_process(monkeypatch, train_argv(train_data, out), fp_file=tmp_path / "fp_resumed") == 0
    final_equal(ref, out)
    batches_equal(ref_fps, tmp_path / "fp_failed", tmp_path / "fp_resumed", 2)
    assert before.keys() == {"model.safetensors", "state.pt"}


# -------------------------------------------------------------------------------------------- reinforce faults
@pytest.fixture(scope="module")
def rdata(tmp_path_factory):
    """Input shards (3 x 4 real samples each) for clip (Flickr8k) and classify (Imagenette), a tiny CLIP teacher,
    and each mode's uninterrupted reference output (images stored, as the README's example)."""
    root = tmp_path_factory.mktemp("faults_reinforce")
    reshard("builtin:flickr8k/train", root / "clip_src", 12, 4)
    reshard("builtin:imagenette/train", root / "classify_src", 12, 4)
    torch.manual_seed(0)
    from vfmkit.data.io import atomic_save_safetensors
    from vfmkit.models.factory import create_clip

    atomic_save_safetensors(root / "tiny.safetensors", create_clip("vfm-tiny-vit").model)
    d = {"root": root, "clip_teacher": f"openclip:vfm-tiny-vit:{root}/tiny.safetensors"}
    mp = pytest.MonkeyPatch()
    try:
        for mode in ("clip", "classify"):
            assert in_process(mp, reinforce_argv(d, mode, root / f"{mode}_ref")) == 0
    finally:
        mp.undo()
    return d


def reinforce_argv(d: dict, mode: str, out: Path) -> list[str]:
    common = [
        "--out",
        str(out),
        "--n-aug",
        "2",
        "--size",
        "64",
        "--chunk",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
        "--images",
        "--no-prefetch",
    ]
    if mode == "clip":
        return ["reinforce", "clip", str(d["root"] / "clip_src"), "--teacher", d["clip_teacher"], *common]
    return [
        "reinforce",
        "classify",
        str(d["root"] / "classify_src"),
        "--teacher",
        "efficientnet-lite0@64",
        "--class-index",
        "imagenette",
        "--topk",
        "3",
        *common,
    ]


REINFORCE_KILLS = {  # after shard 0 (tar + done marker) is complete; inside shard 1 (its 2nd sample)
    "between-shards": {
        "target": "vfmkit.pipelines.reinforce:Reinforcer.run_shard",
        "at": 1,
        "when": "after",
        "do": "kill",
    },
    "mid-shard": {"target": "vfmkit.data.shards:ShardWriter.write", "at": 6, "when": "before", "do": "kill"},
}


@pytest.mark.parametrize("mode", ["clip", "classify"])
@pytest.mark.parametrize("point", sorted(REINFORCE_KILLS))
def test_reinforce_kill_then_rerun_equals_uninterrupted(rdata, tmp_path, monkeypatch, mode, point):
    out = tmp_path / "out"
    killed_run(reinforce_argv(rdata, mode, out), [REINFORCE_KILLS[point]])
    done = sorted(p.name for p in out.glob("*.done.json"))
    assert len(done) == 1 and not (out / "manifest.json").exists(), (
        done
    )  # killed after shard 0, before shard 1's end
    assert in_process(monkeypatch, reinforce_argv(rdata, mode, out)) == 0
    same_tree(rdata["root"] / f"{mode}_ref", out)  # every file byte for byte; no .work-* or tmp leftovers
    uids = shard_uids(out)
    assert uids == shard_uids(rdata["root"] / f"{mode}_src") and len(set(uids)) == 12  # none lost, none twice
    COUNTS["samples_checked"] += len(uids)


def test_reinforce_full_disk_keeps_finished_shards(rdata, tmp_path, monkeypatch, capsys):
    out, ref = tmp_path / "out", rdata["root"] / "clip_ref"
    fault = {"target": "vfmkit.data.shards:ShardWriter.write", "at": 6, "when": "before", "do": "enospc"}
    rc = in_process(monkeypatch, reinforce_argv(rdata, "clip", out), [fault])
    one_line_error(capsys, rc, "No space left on device")
    COUNTS["faults"] += 1
    left = sorted(p.name for p in out.iterdir())
    assert left == [".lock", "reinforced.json", "shard-000000.tar", "shard-000000.tar.done.json"], left
    for name in left:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert in_process(monkeypatch, reinforce_argv(rdata, "clip", out)) == 0
    same_tree(ref, out)


# ------------------------------------------------------------------------------------------------ import faults
@pytest.fixture(scope="module")
def import_src(tmp_path_factory, monkeypatch_module=None):
    """12 real Flickr8k images as files + their captions CSV, and the uninterrupted import of them."""
    import csv

    root = tmp_path_factory.mktemp("faults_import")
    (root / "images").mkdir()
    rows = []
    for s in reshard("builtin:flickr8k/heldout", root / "unused", 12, 12):
        meta = json.loads(s["json"])
        (root / "images" / meta["uid"]).write_bytes(s["jpg"])
        rows += [(meta["uid"], c) for c in meta["captions"][:2]]
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    mp = pytest.MonkeyPatch()
    try:
        assert in_process(mp, import_argv(root, root / "ref")) == 0
    finally:
        mp.undo()
    return root


def import_argv(root: Path, out: Path) -> list[str]:
    return [
        "data",
        "import",
        "--captions",
        str(root / "captions.csv"),
        "--images",
        str(root / "images"),
        "--out",
        str(out),
        "--shard-size",
        "4",
    ]


@pytest.mark.parametrize(
    "fault",
    [
        {"target": "vfmkit.data.shards:ShardWriter.write", "at": 6, "when": "before", "do": "kill"},
        {"target": "vfmkit.data.shards:ShardWriter._finish_shard", "at": 1, "when": "after", "do": "kill"},
    ],
    ids=["mid-shard", "between-shards"],
)
def test_import_kill_then_rerun_equals_uninterrupted(import_src, tmp_path, monkeypatch, fault):
    out = tmp_path / "out"
    killed_run(import_argv(import_src, out), [fault])
    assert (out / "shard-000000.tar").is_file() and not (out / "manifest.json").exists()
    assert in_process(monkeypatch, import_argv(import_src, out)) == 0
    same_tree(import_src / "ref", out)
    uids = shard_uids(out)
    assert sorted(uids) == sorted(p.name for p in (import_src / "images").iterdir()) and len(set(uids)) == 12
    COUNTS["samples_checked"] += len(uids)


def test_import_full_disk_leaves_no_half_written_set(import_src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    fault = {"target": "vfmkit.data.shards:ShardWriter.write", "at": 6, "when": "before", "do": "enospc"}
    rc = in_process(monkeypatch, import_argv(import_src, out), [fault])
    one_line_error(capsys, rc, "No space left on device")
    COUNTS["faults"] += 1
    assert sorted(p.name for p in out.iterdir()) == [".lock", "shard-000000.tar"]  # no manifest, no tmp shard
    assert in_process(monkeypatch, import_argv(import_src, out)) == 0
    same_tree(import_src / "ref", out)


# ================================================================================ the defects, one by one
# 1. tampered reinforced data stored with its images
def _tamper(src: Path, dst: Path) -> list[str]:
    """Copy a reinforced set; in shard 0 change sample 0's json sha256 and give sample 1 sample 2's jpg."""
    shutil.copytree(src, dst)
    tar = dst / "shard-000000.tar"
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_shard(str(tar))]
    info0 = json.loads(samples[0]["json"])
    samples[0]["json"] = json.dumps({**info0, "sha256": "0" * 64}).encode()
    samples[1]["jpg"] = samples[2]["jpg"]
    with ShardWriter(dst / "rewrite", max_count=100) as w:
        for s in samples:
            w.write(s)
    os.replace(dst / "rewrite" / "shard-000000.tar", tar)
    shutil.rmtree(dst / "rewrite")
    return [info0["uid"], json.loads(samples[1]["json"])["uid"]]


def test_tampered_images_in_reinforced_shards_are_not_trained_on(
    rdata, tmp_path, monkeypatch, capsys, caplog
):
    """README's path (reinforce clip --images, then train mobileclip): a wrong json sha256 and a swapped jpg are
    corrupt samples, named and counted in the summary line and log.jsonl, and never reach a batch."""
    bad = _tamper(rdata["root"] / "clip_ref", tmp_path / "rdata")
    out = tmp_path / "run"
    argv = ["train", "mobileclip_tiny", "--out", str(out)]
    for s in [
        f"method_args.reinforced={tmp_path / 'rdata'}",
        "train.steps=2",
        "data.batch_size=4",
        "data.shuffle_buffer=0",
        "train.log_every=1",
        "optim.warmup_steps=1",
    ]:
        argv += ["--set", s]
    assert in_process(monkeypatch, argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_corrupt"] == 2, summary
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["n_corrupt"] == 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(u in warned for u in bad) and "sha256" in warned


def test_classification_replay_checks_stored_images(rdata):
    from vfmkit.data.reinforced import ImageMismatchError, read_metadata
    from vfmkit.data.replay import ClassificationReplay

    ref = rdata["root"] / "classify_ref"
    meta = read_metadata(ref / "reinforced.json")
    raws = list(iter_shard(str(ref / "shard-000000.tar")))
    decode = ClassificationReplay(meta, 32)
    assert decode(raws[0])["image"].shape == (3, 32, 32)
    with pytest.raises(ImageMismatchError, match=json.loads(raws[0]["json"])["uid"]):
        decode({**raws[0], "jpg": raws[1]["jpg"]})


# 2. one writer per output folder; a resume must not change what is trained
@pytest.fixture
def held_folder(tmp_path):
    """A folder whose OUT/.lock another live process holds (forked; SIGKILLed after the test)."""
    import signal

    from vfmkit.data.lock import FolderLock

    out = tmp_path / "busy"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            FolderLock(out, "vfmkit train clip").acquire()
            os.write(w, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    yield out
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    FolderLock(out).acquire().release()  # a killed holder leaves no stale lock


def test_second_job_on_a_busy_folder_fails_at_once(
    held_folder, train_data, rdata, import_src, monkeypatch, capsys
):
    before = sorted(p.name for p in held_folder.iterdir())
    for argv in (
        train_argv(train_data, held_folder),
        reinforce_argv(rdata, "clip", held_folder),
        import_argv(import_src, held_folder),
    ):
        rc = in_process(monkeypatch, argv)
        one_line_error(capsys, rc, str(held_folder), "in use by vfmkit train clip (pid")
    assert sorted(p.name for p in held_folder.iterdir()) == before  # nothing written beside the other job


def test_resume_with_another_config_is_refused_by_key(train_ref, tmp_path, monkeypatch, capsys, train_data):
    ref, _ = train_ref
    out = tmp_path / "run"
    (out / "checkpoints" / "step-000000002").mkdir(parents=True)
    shutil.copy(ref / "config.json", out / "config.json")
    rc = in_process(monkeypatch, train_argv(train_data, out, "optim.lr=0.01", "seed=3"))
    one_line_error(capsys, rc, "optim.lr: 0.001 -> 0.01", "seed: 0 -> 3", "train.resume=false")
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()


# 3. values that cannot work
@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=-5", "train.steps"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("train.log_every=0", "train.log_every"),
        ("data.batch_size=0", "data.batch_size"),
        ("optim.lr=-1", "optim.lr"),
        ("data.num_workers=-1", "data.num_workers"),
        ("train.precision=fp16", "train.precision"),
        ("train.parallel=zero3", "train.parallel"),
        ("data.on_corrupt=ignore", "data.on_corrupt"),
        ("optim.beta2=1.5", "optim.beta2"),
        ("train.keep_ckpts=0", "train.keep_ckpts"),
        ("optim.lr=[1e-3", "optim.lr"),  # a YAML syntax error in --set
    ],
)
def test_bad_values_are_refused_before_anything_is_built(tmp_path, capsys, monkeypatch, override, key):
    import vfmkit.methods.registry as registry

    monkeypatch.setattr(
        registry, "build_job", lambda *a, **k: pytest.fail("built before the config was checked")
    )
    rc = main(["train", "clip_tiny", "--out", str(tmp_path / "out"), "--set", override])
    one_line_error(capsys, rc, f"'{key}'")
    assert not (tmp_path / "out").exists()


# 4. an empty caption is a counted, named skip; 6. a non-UTF-8 CSV names the file
def test_import_counts_an_empty_caption_and_names_a_non_utf8_csv(import_src, tmp_path, capsys):
    names = sorted(p.name for p in (import_src / "images").iterdir())
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text(
        "image,caption\n" + f"{names[0]},a dog runs\n{names[1]},\n{names[2]},   \n", encoding="utf-8"
    )
    assert (
        main(
            [
                "data",
                "import",
                "--captions",
                str(csv_path),
                "--images",
                str(import_src / "images"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["count"] == 1 and m["n_skipped"] == 2
    assert {s["uid"]: s["reason"] for s in m["skipped"]} == {
        names[1]: "empty caption",
        names[2]: "empty caption",
    }
    assert f"skipped {names[1]}" in out
    csv_path.write_bytes(b"image,caption\n" + names[0].encode() + b",caf\xe9 au lait\n")
    rc = main(
        [
            "data",
            "import",
            "--captions",
            str(csv_path),
            "--images",
            str(import_src / "images"),
            "--out",
            str(tmp_path / "out2"),
        ]
    )
    one_line_error(capsys, rc, str(csv_path), "not UTF-8", "line 2")


# 5. errors are one line naming the file / key / sample, exit code 2; --debug shows the traceback
@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults_bad")
    samples = reshard("builtin:flickr8k/train", root / "good", 8, 8)
    with ShardWriter(root / "corrupt", max_count=8) as w:
        for i, s in enumerate(samples):
            w.write({**s, "jpg": b"\xff\xd8 not a jpeg"} if i == 1 else s)
    (root / "truncated").mkdir()
    data = (root / "good" / "shard-000000.tar").read_bytes()
    (root / "truncated" / "shard-000000.tar").write_bytes(data[: len(data) // 3])
    return {"root": root, "corrupt_key": samples[1]["__key__"]}


def short_train(data: Path | str, out: Path, *extra: str) -> list[str]:
    sets = [
        f"data.train={data}",
        "train.steps=1",
        "data.batch_size=4",
        "data.shuffle_buffer=0",
        "train.progress=false",
        "train.tensorboard=false",
        "train.log_every=1",
        *extra,
    ]
    return ["train", "clip_tiny", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


def test_corrupt_sample_raise_is_one_line_and_skip_is_counted_where_seen(bad_data, tmp_path, capsys):
    corrupt = bad_data["root"] / "corrupt"
    rc = main(short_train(corrupt, tmp_path / "a", "data.on_corrupt=raise"))
    one_line_error(capsys, rc, bad_data["corrupt_key"], "shard-000000.tar")
    assert main(short_train(corrupt, tmp_path / "b")) == 0  # skip: named as it occurs, totalled at the end
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_corrupt"] == 1
    assert json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])["n_corrupt"] == 1


def test_truncated_shard_is_one_line(bad_data, tmp_path, capsys):
    rc = main(short_train(bad_data["root"] / "truncated" / "shard-000000.tar", tmp_path / "a"))
    one_line_error(capsys, rc, "shard-000000.tar")


def test_debug_shows_the_traceback(bad_data, tmp_path, monkeypatch):
    from vfmkit.data.loader import CorruptSampleError

    argv = short_train(bad_data["root"] / "corrupt", tmp_path / "a", "data.on_corrupt=raise")
    with pytest.raises(CorruptSampleError):
        main(["--debug", *argv])
    monkeypatch.setenv("VFMKIT_DEBUG", "1")
    with pytest.raises(CorruptSampleError):
        main(argv)


def _checkpoint_dir(ref: Path, out: Path, step: int) -> Path:
    ck = out / "checkpoints" / f"step-{step:09d}"
    ck.mkdir(parents=True)
    shutil.copy(ref / "config.json", out / "config.json")
    (out / "checkpoints" / "latest").write_text(ck.name)
    return ck


def test_pickle_bearing_state_is_not_a_vfmkit_checkpoint(
    train_ref, train_data, tmp_path, capsys, monkeypatch
):
    ref, _ = train_ref
    out = tmp_path / "run"
    ck = _checkpoint_dir(ref, out, 2)
    shutil.copy(ref / "checkpoints" / "step-000000008" / "model.safetensors", ck / "model.safetensors")
    torch.save({"step": 2, "payload": print}, ck / "state.pt")  # a pickled callable: code, not data
    rc = in_process(monkeypatch, train_argv(train_data, out))
    line = one_line_error(capsys, rc, str(ck / "state.pt"), "not a vfmkit checkpoint")
    assert "weights_only" not in line and "False" not in line


def test_no_complete_checkpoint_is_named(train_ref, train_data, tmp_path, capsys, monkeypatch):
    ref, _ = train_ref
    out = tmp_path / "run"
    ck = _checkpoint_dir(ref, out, 2)
    for name in ("model.safetensors", "state.pt"):
        data = (ref / "checkpoints" / "step-000000008" / name).read_bytes()
        (ck / name).write_bytes(data[: len(data) // 2] if name == "model.safetensors" else data)
    rc = in_process(monkeypatch, train_argv(train_data, out))
    one_line_error(capsys, rc, str(ck / "model.safetensors"), "truncated", "train.resume=false")


def test_unwritable_outputs_are_found_before_the_work(train_data, tmp_path, capsys, monkeypatch):
    import vfmkit.methods.registry as registry

    rc = main(train_argv(train_data, Path("/sys/vfmkit-test/run")))  # EPERM even for root
    one_line_error(capsys, rc, "/sys/vfmkit-test/run", "not writable")
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoint folder goes")
    steps = []
    real = registry.build_job

    def build_job(*a, **k):
        job = real(*a, **k)
        loss_fn = job.loss_fn
        job.loss_fn = lambda *x: (steps.append(1), loss_fn(*x))[1]
        return job

    monkeypatch.setattr(registry, "build_job", build_job)
    rc = main(train_argv(train_data, out))
    one_line_error(capsys, rc, "checkpoint folder", str(out / "checkpoints"), "not writable")
    assert (
        steps == [] and not (out / "log.jsonl").exists()
    )  # refused before the first step, not after the work


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "clip_tiny", "--set", "model.name=no-such-model"], ["no-such-model"]),
        (["eval", "--tasks", "bogus"], ["'bogus'", "zeroshot"]),
        (["eval", "--tasks", "zeroshot", "--pretrained", "no-such-tag"], ["no-such-tag"]),
        (
            ["reinforce", "clip", "builtin:flickr8k/heldout", "--teacher", "no-such-teacher", "--n-aug", "1"],
            ["no-such-teacher"],
        ),
        (["train", "no_such_recipe"], ["no_such_recipe"]),
        (["data", "import", "--class-folders", "/nonexistent/folder"], ["/nonexistent/folder"]),
        (["quickstart", "--steps", "-1"], ["'train.steps'"]),  # before the teacher and the reinforcement
    ],
    ids=["model", "task", "pretrained-tag", "teacher", "recipe", "import-source", "quickstart-steps"],
)
def test_user_errors_are_one_line(tmp_path, capsys, argv, needles):
    argv = [*argv, "--out", str(tmp_path / "out")]
    rc = main(argv)
    one_line_error(capsys, rc, *needles)
    assert not (tmp_path / "out").exists()  # nothing written


def test_reinforce_rerun_with_other_settings_is_one_line(rdata, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(rdata["root"] / "clip_ref", out)
    argv = reinforce_argv(rdata, "clip", out)
    argv[argv.index("--n-aug") + 1] = "3"
    rc = in_process(monkeypatch, argv)
    one_line_error(capsys, rc, str(out / "reinforced.json"), "other settings")
    same_tree(rdata["root"] / "clip_ref", out)  # nothing rewritten


def test_report_counts():
    """Prints the suite's counts for the closing note (the fault tests above add to them when they run)."""
    print(
        f"\nfault suite: {COUNTS['faults']} faults injected, {COUNTS['runs_compared']} runs compared with an "
        f"uninterrupted one, {COUNTS['samples_checked']} samples (uids / batch fingerprints) checked"
    )
    assert all(v >= 0 for v in COUNTS.values())


def test_resume_false_starts_over_without_the_old_runs_checkpoints(bad_data, tmp_path, capsys):
    out = tmp_path / "run"
    old = out / "checkpoints" / "step-000000100"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"an old run's checkpoint")
    (out / "checkpoints" / "latest").write_text(old.name)
    assert main(short_train(bad_data["root"] / "good", out, "train.resume=false", "train.keep_ckpts=1")) == 0
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [
        "latest",
        "step-000000001",
    ]  # the new run's, named by latest
    assert (ck / (ck / "latest").read_text() / "state.pt").is_file()


@pytest.mark.parametrize(
    "argv",
    [["eval", "--tasks", "retrieval"], ["export", "vfm-tiny-vit"], ["quickstart"], ["catlip", "vocab"]],
)
def test_every_command_probes_its_out_before_the_work(argv, capsys, monkeypatch):
    import vfmkit.models.factory as factory

    monkeypatch.setattr(
        factory, "create_clip", lambda *a, **k: pytest.fail("work started before --out was probed")
    )
    rc = main([*argv, "--out", "/sys/vfmkit-test/out"])
    one_line_error(capsys, rc, "/sys/vfmkit-test/out", "not writable")


def test_out_that_is_a_file_and_a_bad_split_file_are_named(tmp_path, capsys, import_src):
    f = tmp_path / "taken"
    f.write_text("a file")
    rc = main(["train", "clip_tiny", "--out", str(f / "run")])
    one_line_error(capsys, rc, str(f / "run"), "not writable")
    (tmp_path / "split.json").write_text('{"train": [')
    rc = main(
        [
            *import_argv(import_src, tmp_path / "out"),
            "--split-file",
            str(tmp_path / "split.json"),
            "--split",
            "train",
        ]
    )
    one_line_error(capsys, rc, str(tmp_path / "split.json"), "not valid")
