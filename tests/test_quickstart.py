"""``vfmkit quickstart`` end to end, reduced: 160 embedded Flickr8k images (71 after the teacher's own are left out) reinforced by the offline
teacher, a few student steps each arm, held-out retrieval + zero-shot, report + curves written, rerun resumes."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import read_builtin_samples  # tests/ is on sys.path (rootdir conftest)

from vfmkit.cli import main
from vfmkit.data.shards import ShardWriter

TRAIN_START = 200


def read_builtin_samples_from(path) -> list[dict]:
    import webdataset as wds

    from vfmkit.data.shards import list_shards

    return list(wds.DataPipeline(wds.SimpleShardList(list_shards(str(path))), wds.tarfile_to_samples()))


def _subset(out, name: str, n: int, start: int = 0):
    """Samples ``start:start + n`` of an embedded Flickr8k subset as one shard (real JPEGs, 5 captions each)."""
    with ShardWriter(out, max_count=1000) as w:
        for s in read_builtin_samples(name, start + n)[start:]:
            w.write({k: v for k, v in s.items() if k in ("__key__", "jpg", "txt", "json")})
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """(train: 160 embedded train pairs, val: 64 embedded held-out pairs), kept small so the test is quick.

    The train slice starts at 200 so that it mixes images the offline teacher was aligned on (the first 289 of
    the embedded set, which quickstart leaves out) with images it never saw."""
    root = tmp_path_factory.mktemp("qs_data")
    return (
        _subset(root / "train", "flickr8k/train", 160, start=TRAIN_START),
        _subset(root / "val", "flickr8k/heldout", 64),
    )


def _run(out, data, capsys) -> str:
    train, val = data
    rc = main(
        [
            "quickstart",
            "--out",
            str(out),
            "--data",
            str(train),
            "--val-data",
            str(val),
            "--steps",
            "12",
            "--n-aug",
            "2",
            "--eval-points",
            "3",
            "--set",
            "data.batch_size=32",
            "--set",
            "optim.warmup_steps=2",
        ]
    )
    assert rc == 0
    return capsys.readouterr().out


def _printed_table(printed: str) -> dict[str, dict[str, str]]:
    """The printed Markdown table as {model: {column header: cell}}."""
    lines = [ln for ln in printed.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(head[1:], cells[1:], strict=True))
        for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:])
    }


def test_quickstart_reduced_writes_report_table_and_curves(tmp_path, small_data, capsys):
    out = tmp_path / "qs"
    printed = _run(out, small_data, capsys)
    for row in ("untrained student", "plain CLIP student", "reinforced student", "teacher (reference)"):
        assert re.search(rf"\| {re.escape(row)} \| \d+\.\d\d \|", printed), (row, printed)
    _check_recalls_reach_and_cost(out, printed)
    report = (out / "report.md").read_text()
    assert f"Retrieval evaluation: `{small_data[1]}`" in report
    assert "| reinforced student |" in report and "curves.png" in report
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    res = json.loads((out / "results.json").read_text())
    for row in res["rows"].values():
        for v in row.values():
            assert math.isfinite(v) and 0.0 <= v <= 100.0
    # the two students really trained: each logged its losses and 3 held-out evaluations, ending at step 12
    for arm in ("plain", "reinforced"):
        hist = res["history"][arm]
        assert [h["step"] for h in hist if "eval/R@1" in h] == [4, 8, 12]
        assert all(math.isfinite(h["loss"]) for h in hist if "loss" in h)
    # the offline teacher's own training images are left out of the transfer set (both students train without them)
    from vfmkit.models.offline_teacher import teacher_train_images

    sub = [json.loads(s["json"])["uid"] for s in read_builtin_samples("flickr8k/train", TRAIN_START + 160)]
    sub = sub[TRAIN_START:]
    seen = teacher_train_images()
    assert res["excluded_teacher_images"] == len(set(sub) & seen) > 0
    assert res["data"] == str(out / "data") and "were the offline teacher's own training images" in printed
    kept = [json.loads(s["json"])["uid"] for s in read_builtin_samples_from(out / "data")]
    assert kept == [u for u in sub if u not in seen]
    assert (
        res["n_aug"] == 2 and res["n_syn"] == 4
    )  # the other four human captions fill the extra-caption slots
    assert res["rows"]["teacher (reference)"]["retrieval/R@1"] > 5 * 100 / 64  # well above chance (1.6%)
    assert res["history"]["plain"] != res["history"]["reinforced"]
    # a rerun resumes: the reinforced shards and both finished students are reused, the table is the same
    again = _run(out, small_data, capsys)
    assert "1 already done, 0 to go" in again and again.count("reusing finished run") == 2
    res2 = json.loads((out / "results.json").read_text())
    assert res2["rows"]["reinforced student"] == pytest.approx(res["rows"]["reinforced student"])
    # the reused runs report what their training cost when it ran, not the seconds it took to load them
    for arm in ("plain", "reinforced"):
        first, second = res["train_cost"][arm], res2["train_cost"][arm]
        assert second == {**first, "reused": True} and first["reused"] is False
    assert "plain and reinforced: a reused finished run" in again
    assert res2["reach_step"] == res["reach_step"]


def _check_recalls_reach_and_cost(out, printed: str) -> None:
    """The table gives held-out R@1/5/10 (each the mean of I->T and T->I) for every row and each student's
    training CPU and wall seconds; the summary gives the step at which reinforced first reaches plain's final
    held-out R@1 (an evaluation step, or never), all as results.json has them from the run."""
    res = json.loads((out / "results.json").read_text())
    table = _printed_table(printed)
    assert list(table) == list(res["rows"])
    for name, row in res["rows"].items():
        for k in (1, 5, 10):
            mean = 0.5 * (row[f"retrieval/i2t_R@{k}"] + row[f"retrieval/t2i_R@{k}"])
            assert row[f"retrieval/R@{k}"] == pytest.approx(mean)
            assert table[name][f"held-out R@{k}"] == f"{mean:.2f}", (name, k)
        assert row["retrieval/R@1"] <= row["retrieval/R@5"] <= row["retrieval/R@10"]
    for name in ("untrained student", "teacher (reference)"):
        assert table[name]["training CPU s"] == table[name]["training wall s"] == "-"
    for arm, name in (("plain", "plain CLIP student"), ("reinforced", "reinforced student")):
        cost = res["train_cost"][arm]
        assert cost["cpu_seconds"] > 0 and cost["wall_seconds"] > 0 and cost["reused"] is False
        assert cost["cpu_seconds"] == res["stage_cpu_seconds"][f"train {arm}"]
        assert table[name]["training CPU s"] == f"{cost['cpu_seconds']:.1f}"
        assert table[name]["training wall s"] == f"{cost['wall_seconds']:.1f}"
        assert f"{arm} {cost['cpu_seconds']:.1f} CPU s / {cost['wall_seconds']:.1f} s wall" in printed
    # plain's final held-out R@1 is its last evaluation during training (step 12) and the table's number
    plain_evals = [h for h in res["history"]["plain"] if "eval/R@1" in h]
    target = res["rows"]["plain CLIP student"]["retrieval/R@1"]
    assert plain_evals[-1]["step"] == 12 and plain_evals[-1]["eval/R@1"] == pytest.approx(target)
    assert res["reach_target_R@1"] == target and res["eval_every"] == 4
    reinf_evals = [(h["step"], h["eval/R@1"]) for h in res["history"]["reinforced"] if "eval/R@1" in h]
    first = [step for step, r1 in reinf_evals if r1 >= target]
    assert res["reach_step"] == (first[0] if first else "never")
    assert res["reach_step"] in [4, 8, 12, "never"]
    line = next(ln for ln in printed.splitlines() if ln.startswith("Reinforced first reaches"))
    if first:
        assert f"({target:.2f}) at step {first[0]} of 12 " in line, line
    else:
        assert f"({target:.2f}): never" in line, line
    gains = res["rows"]["reinforced student"], res["rows"]["plain CLIP student"]
    for k in (1, 5, 10):
        assert res[f"gain_R@{k}"] == pytest.approx(
            gains[0][f"retrieval/R@{k}"] - gains[1][f"retrieval/R@{k}"]
        )
    report = (out / "report.md").read_text()
    assert line in report and "| model | held-out R@1 | held-out R@5 | held-out R@10 |" in report


def test_reinforced_student_beats_plain_on_held_out_retrieval(tmp_path, capsys):
    """The issue's end-to-end claim on real data: the default quickstart data (the 711 embedded Flickr8k train
    images the offline teacher never saw), 100 steps of batch 64 for each student from the same initialisation,
    evaluated on the 200 embedded held-out images (1,000 captions). Retrieval this low is noisy at R@1, so the
    comparison is on the mean of R@1 and R@5 over both directions (4 numbers, 2,400 queries). When written (1
    thread, 2026-12-01): untrained 1.97, plain 5.43, reinforced 8.07 (each of the 4 numbers higher: I->T R@1
    4.0 vs 1.5, T->I R@1 2.7 vs 2.1, I->T R@5 13.0 vs 7.5, T->I R@5 12.6 vs 10.6); teacher 34.3."""
    out = tmp_path / "qs"
    rc = main(["quickstart", "--out", str(out), "--steps", "100", "--n-aug", "1", "--eval-points", "1"])
    assert rc == 0
    capsys.readouterr()
    rows = json.loads((out / "results.json").read_text())["rows"]

    def score(row: dict) -> float:
        return sum(row[f"retrieval/{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5)) / 4

    plain, reinf, untrained = (
        score(rows[k]) for k in ("plain CLIP student", "reinforced student", "untrained student")
    )
    assert plain > untrained + 1.0, (plain, untrained)  # the plain student learnt something real too
    assert reinf > plain + 0.5, f"reinforced {reinf:.2f} vs plain {plain:.2f} (untrained {untrained:.2f})"
