"""TiC-CLIP: the stream layer, replay buffer, data mixes, time matrix, LwF loss and a resumable multi-step run,
on a tiny stream cut from the embedded emoji subset (``vfmkit/assets/emoji``: real Noto emoji, 311 images)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vfmkit.config import ConfigError, load_config
from vfmkit.data.builtin import assets_root
from vfmkit.data.emoji import emoji_text, import_emoji, read_emoji_csv
from vfmkit.data.shards import ShardWriter, iter_shard, list_shards, read_manifest
from vfmkit.data.stream import (
    StreamError,
    build_mix,
    mix_counts,
    mix_order,
    read_stream,
    replay_subset,
    split_uids,
    step_split,
    tag_stream,
)
from vfmkit.eval.timematrix import transfer_metrics

CUTS = (2015, 2017)  # 3 steps: 2010-2014, 2015-2016, 2017-2024


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tic") / "stream"
    import_emoji(assets_root() / "emoji", out, cuts=CUTS, eval_frac=0.25)
    return out


def _metas(path: Path) -> list[dict]:
    return [json.loads(r["json"]) for u in list_shards(path) for r in iter_shard(u)]


def test_emoji_stream_steps_and_groups_never_split(stream):
    s = read_stream(stream)
    rows = read_emoji_csv(assets_root() / "emoji" / "emoji.csv")
    assert len(s["steps"]) == 3 and s["n_skipped"] == 0
    assert [st["label"] for st in s["steps"]] == ["2010-2014", "2015-2016", "2017-2024"]
    sides: dict[str, set] = {}
    n = 0
    for st in s["steps"]:
        assert st["n_train"] > 0 and st["n_eval"] > 0
        for split in ("train", "eval"):
            metas = _metas(step_split(stream, st["index"], split))
            assert len(metas) == st[f"n_{split}"]
            for m in metas:
                lo, hi = [(None, 2015), (2015, 2017), (2017, None)][st["index"]]
                assert (lo is None or m["year"] >= lo) and (hi is None or m["year"] < hi), m
                sides.setdefault(m["group"], set()).add(split)
                n += 1
    assert n == len(rows)
    # every skin-tone variant of an emoji is on the same side of the split, in every step
    assert all(len(v) == 1 for v in sides.values()), [g for g, v in sides.items() if len(v) > 1]
    multi = {r["name"] for r in rows if r["skin_tone"]}
    assert multi and any("eval" in sides[g] for g in multi) and any("train" in sides[g] for g in multi)
    assert s["classnames"] == sorted({r["category"] for r in rows})


def test_emoji_text_from_name_short_names_and_tone():
    assert (
        emoji_text({"name": "keycap: *", "short_names": "keycap_star", "skin_tone": ""})
        == "keycap: * (keycap star)"
    )
    t = emoji_text({"name": "waving hand", "short_names": "wave", "skin_tone": "1F3FD"})
    assert t == "waving hand (wave), medium skin tone"


def test_user_stream_csv_timestamps_by_month_and_bad_time(tmp_path, stream):
    raws = [r for u in list_shards(step_split(stream, 1, "train")) for r in iter_shard(u)][:12]
    src = tmp_path / "src"
    times = {}
    with ShardWriter(src) as w:
        for i, r in enumerate(raws):
            meta = json.loads(r["json"])
            del meta["year"]
            if i < 11:
                times[meta["uid"]] = f"2021-{1 + i % 3:02d}-15T10:00:00Z"
            w.write({"__key__": r["__key__"], "png": r["png"], "txt": r["txt"], "json": meta})
    csv_path = tmp_path / "times.csv"
    with open(csv_path, "w", newline="") as f:
        cw = csv.writer(f)
        cw.writerow(["uid", "timestamp"])
        cw.writerows(times.items())
    s = tag_stream(src, tmp_path / "by_month", by="month", timestamps_csv=csv_path, eval_frac=0.3)
    assert [st["label"] for st in s["steps"]] == ["2021-01", "2021-02", "2021-03"]
    assert sum(st["n_train"] + st["n_eval"] for st in s["steps"]) == 11
    assert s["n_skipped"] == 1 and "not in" in s["skipped"][0]["reason"]  # the sample with no time, by name
    assert s["skipped"][0]["key"] == raws[11]["__key__"]
    # a sample's own json timestamp (unix seconds) and custom boundaries
    src2 = tmp_path / "src2"
    with ShardWriter(src2) as w:
        for i, r in enumerate(raws):
            meta = json.loads(r["json"])
            meta["timestamp"] = (
                1.6e9 + i * 1e7
            )  # 2020-09-13 + i * 115.7 days: 5 before 2022, 3 in 2022, 4 after
            w.write({"__key__": r["__key__"], "png": r["png"], "txt": r["txt"], "json": meta})
    s2 = tag_stream(src2, tmp_path / "cuts", boundaries=["2022-01-01", 2023])
    assert [st["n_train"] + st["n_eval"] for st in s2["steps"]] == [5, 3, 4]
    with pytest.raises(StreamError, match="ascending"):
        tag_stream(src2, tmp_path / "bad", boundaries=[2023, 2022])


def test_replay_subset_deterministic_nested_and_within_budget(stream):
    uids = split_uids(stream, 1)
    a, b = replay_subset(uids, 30), replay_subset(list(reversed(uids)), 30)
    assert a == b and len(a) == 30 and set(a) <= set(uids)
    assert set(replay_subset(uids, 10)) <= set(a)  # a smaller buffer keeps a subset (nested)
    assert replay_subset(uids, 30, salt="other") != a
    sizes = [100, 80, 60, 40]
    for kind in ("exp", "equal"):
        for budget in (0, 7, 40, 1000):
            c = mix_counts(sizes, 3, kind, budget)
            assert c[3] == 40 and sum(c[:3]) <= budget and all(0 <= c[j] <= sizes[j] for j in range(3))
    assert mix_counts(sizes, 3, "exp", 70) == [10, 20, 40, 40]  # shares halve with age: 1/7, 2/7, 4/7
    assert mix_counts(sizes, 3, "equal", 60) == [20, 20, 20, 40]
    assert mix_counts(sizes, 3, "exp") == [5, 11, 22, 40]  # default budget: the size of the new step
    assert mix_counts(sizes, 2, "new") == [0, 0, 60] and mix_counts(sizes, 2, "all") == [100, 80, 60]


def test_mixes_sequential_new_only_cumulative_all(stream, tmp_path):
    steps = [set(split_uids(stream, j)) for j in range(3)]
    seq = build_mix(stream, 2, "new", tmp_path / "new")
    assert {
        json.loads(r["json"])["uid"] for u in list_shards(tmp_path / "new") for r in iter_shard(u)
    } == steps[2]
    allm = build_mix(stream, 2, "all", tmp_path / "all")
    got = [json.loads(r["json"]) for u in list_shards(tmp_path / "all") for r in iter_shard(u)]
    assert {m["uid"] for m in got} == steps[0] | steps[1] | steps[2] and len(got) == allm["count"]
    assert seq["count"] == len(steps[2])
    eq = build_mix(stream, 2, "equal", tmp_path / "eq", budget=20)
    u = eq["tic_mix"]["uids"]
    assert len(u["0"]) == len(u["1"]) == 10 and set(u["2"]) == steps[2]
    assert set(u["0"]) == set(replay_subset(steps[0], 10)) and set(u["1"]) == set(replay_subset(steps[1], 10))
    again = build_mix(stream, 2, "equal", tmp_path / "eq2", budget=20)
    assert again["tic_mix"]["uids"] == u and again["shards"][0]["sha256"] == eq["shards"][0]["sha256"]
    assert build_mix(stream, 2, "equal", tmp_path / "eq", budget=20) == read_manifest(
        tmp_path / "eq"
    )  # reused


def test_mix_interleaved_every_prefix_holds_each_steps_share_and_rerun_identical(stream, tmp_path):
    """The written mix is not in time-step order: any first K samples (what a run seeing less than one pass reads)
    hold each step's configured share, so the mix trained on does not depend on the loader's shuffle buffer."""
    m = build_mix(stream, 2, "exp", tmp_path / "exp", budget=40, shard_size=25)
    counts = m["tic_mix"]["tag"]["counts"]
    step_of = {u: int(j) for j, us in m["tic_mix"]["uids"].items() for u in us}
    metas = _metas(tmp_path / "exp")
    got = [step_of[x["uid"]] for x in metas]
    assert len(got) == sum(counts) == m["count"] and len(m["shards"]) > 3
    assert [sum(g == j for g in got) for j in range(3)] == counts
    N = sum(counts)
    for K in range(1, N + 1):
        for j in range(3):  # within 1.5 samples of the share, for every prefix
            assert abs(sum(g == j for g in got[:K]) - K * counts[j] / N) <= 1.5, (K, j)
    assert got != sorted(got)  # (a time-ordered mix fails the prefix test: the first K would be step 0 only)
    for i in range(
        0, N, 25
    ):  # each shard alone holds every step (the loader reads shards in a shuffled order)
        assert set(got[i : i + 25]) == {0, 1, 2}, i
    # within a step, the samples are in uid-hash order (not the stream's order), the same on a rerun
    again = build_mix(stream, 2, "exp", tmp_path / "exp2", budget=40, shard_size=25)
    assert [s_["sha256"] for s_ in again["shards"]] == [s_["sha256"] for s_ in m["shards"]]
    assert [x["uid"] for x in _metas(tmp_path / "exp2")] == [x["uid"] for x in metas]
    assert not list(tmp_path.glob(".*staging*"))  # the staging buckets are removed
    # the pure order: group j's m-th sample at (m + 1/2) / n_j, so a 6:2 split is a a b a a a b a
    order = mix_order([[f"a{i}" for i in range(6)], [f"b{i}" for i in range(2)]])
    assert [j for j, _ in order] == [0, 0, 1, 0, 0, 0, 1, 0]
    assert sorted(u for _, u in order) == sorted([f"a{i}" for i in range(6)] + ["b0", "b1"])


def test_time_matrix_transfer_metrics_hand_computed():
    E = [[50.0, 10.0, 4.0],
         [40.0, 60.0, 8.0],
         [30.0, 45.0, 70.0]]  # fmt: skip
    m = transfer_metrics(E)
    assert m["in_domain"] == pytest.approx((50 + 60 + 70) / 3)
    assert m["backward"] == pytest.approx((40 + 30 + 45) / 3)
    assert m["forward"] == pytest.approx((10 + 4 + 8) / 3)
    assert m["final_mean"] == pytest.approx((30 + 45 + 70) / 3)
    with pytest.raises(ValueError, match="square"):
        transfer_metrics([[1.0, 2.0], [3.0]])


def test_lwf_kl_zero_for_same_model_positive_otherwise():
    from vfmkit.methods.tic import lwf_kl

    g = torch.Generator().manual_seed(0)
    f = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    st = {
        "image_features": f(8, 16).requires_grad_(),
        "text_features": f(8, 16),
        "logit_scale": torch.tensor(10.0),
    }
    assert float(lwf_kl(st, {k: v.detach() for k, v in st.items()}).detach()) == pytest.approx(0.0, abs=1e-6)
    te = {"image_features": f(8, 16), "text_features": f(8, 16), "logit_scale": torch.tensor(10.0)}
    kl = lwf_kl(st, te)
    assert float(kl.detach()) > 0.01
    kl.backward()
    assert st["image_features"].grad.abs().sum() > 0


def _lrs(run_dir: Path) -> list[float]:
    return [r["lr"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "lr" in r]


# the uninterrupted reference run (Cumulative-All, C = 4, a checkpoint every step) and the CLI flags giving the same
# config as _cfg: `vfmkit tic run --stream S --strategy cumulative-all --seeds 0 --out OUT` + these
RUN_SETS = ["train.steps=4", "data.batch_size=16", "data.image_size=32", "data.shuffle_buffer=64",
            "optim.warmup_steps=2", "train.ckpt_every=1", "train.log_every=1", "train.keep_ckpts=1"]  # fmt: skip


def _cfg(stream: Path, **over) -> object:
    sets = [f"method_args.stream={stream}", *RUN_SETS]
    return load_config("tic_emoji", sets + [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def ref_run(stream, tmp_path_factory) -> tuple[Path, dict]:
    from vfmkit.pipelines.tic import run_strategy

    out = tmp_path_factory.mktemp("tic_ref") / "ref"
    return out, run_strategy(_cfg(stream), "cumulative-all", out)


def _same_step_weights(a_out: Path, b_out: Path, n: int = 3) -> None:
    from safetensors.torch import load_file

    for t in range(n):
        a = load_file(str(a_out / f"cumulative-all/seed-0/step-{t:02d}/model.safetensors"))
        b = load_file(str(b_out / f"cumulative-all/seed-0/step-{t:02d}/model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), t


def test_run_resumes_after_interruption_in_step_2_with_same_weights(stream, ref_run, tmp_path):
    from vfmkit.pipelines.tic import run_strategy

    cfg = _cfg(stream)
    ref_out, ref = ref_run
    cut = run_strategy(cfg, "cumulative-all", tmp_path / "cut", stop_at=(1, 2))  # stop 2 steps into step 2
    assert cut == {"interrupted": {"strategy": "cumulative-all", "t": 1, "step": 2, "of": 4}}
    assert not (tmp_path / "cut/cumulative-all/seed-0/step-01/done.json").exists()
    res = run_strategy(cfg, "cumulative-all", tmp_path / "cut")
    _same_step_weights(ref_out, tmp_path / "cut")
    assert res["matrix"] == ref["matrix"] and res["compute_steps"] == 12
    assert [s["resumed_from"] for s in res["steps"]] == [None, 2, None]
    assert [s["resumed_from"] for s in ref["steps"]] == [None, None, None]
    # warm start from the previous step, a fresh warm-up + cosine schedule at every step
    steps = res["steps"]
    assert steps[0]["warm_start"] is None
    assert steps[1]["warm_start"].endswith("step-00/model.safetensors")
    assert steps[2]["warm_start"].endswith("step-01/model.safetensors")
    lr0 = _lrs(ref_out / "step0/seed-0")
    # the engine logs the lr for the next step: warm-up 2 steps, then cosine over the remaining 2, down to 0
    assert lr0 == [
        pytest.approx(1e-3),
        pytest.approx(1e-3),
        pytest.approx(5e-4),
        pytest.approx(0.0, abs=1e-12),
    ]
    assert _lrs(ref_out / "cumulative-all/seed-0/step-01/train") == lr0
    assert _lrs(ref_out / "cumulative-all/seed-0/step-02/train") == lr0
    # Cumulative-All trained on every sample so far, and compute is counted from measured FLOPs
    sizes = [st["n_train"] for st in read_stream(stream)["steps"]]
    assert [s["mix_counts"] for s in steps] == [sizes[:1], sizes[:2], sizes[:3]]
    assert steps[1]["flops_per_sample"] > 1e6 and res["compute_flops"] == pytest.approx(
        sum(s["steps_run"] * 16 * s["flops_per_sample"] for s in steps)
    )
    E = res["matrix"]["retrieval_R@1"]
    assert len(E) == 3 and all(len(r) == 3 and all(0 <= x <= 100 for x in r) for r in E)
    assert (ref_out / "cumulative-all/seed-0/heatmap.png").stat().st_size > 1000


def test_cli_run_sigkilled_in_step_2_resumes_to_the_uninterrupted_weights(stream, ref_run, tmp_path):
    """A real kill: `vfmkit tic run` in its own process, SIGKILLed once step 2's engine run has written a
    checkpoint (mid-training), then the same command again; every step's weights equal the uninterrupted run's."""
    from safetensors.torch import load_file

    ref_out, ref = ref_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vfmkit.cli", "tic", "run", "--stream", str(stream), "--strategy",
           "cumulative-all", "--seeds", "0", "--out", str(out)]  # fmt: skip
    for kv in RUN_SETS:
        cmd += ["--set", kv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    step1 = out / "cumulative-all/seed-0/step-01"
    latest = step1 / "train/checkpoints/latest"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (out / "cumulative-all/seed-0/step-00/done.json").is_file()  # step 1 was finished
    assert not (step1 / "done.json").exists()
    killed_at = int(latest.read_text().split("-")[1])
    assert 1 <= killed_at < 4, f"the kill did not land mid-training of step 2 (checkpoint {killed_at} of 4)"
    at_kill = load_file(str(step1 / f"train/checkpoints/step-{killed_at:09d}/model.safetensors"))

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_step_weights(ref_out, out)
    res = json.loads((out / "cumulative-all/seed-0/result.json").read_text())
    assert res["matrix"] == ref["matrix"] and res["compute_steps"] == 12
    # it resumed from the killed run's checkpoint (not a retrain from scratch, which would give the same weights)
    assert [s["resumed_from"] for s in res["steps"]] == [None, killed_at, None]
    final1 = load_file(str(step1 / "model.safetensors"))
    assert any(not torch.equal(at_kill[k], final1[k]) for k in final1)  # and trained on from it
    # the steps the killed process logged after its checkpoint are not logged twice
    assert [json.loads(x)["step"] for x in (step1 / "train/log.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
    assert not list(out.rglob("*.tmp")) and not (step1 / "train/checkpoints").exists()


def test_sequential_lwf_patching_oracle_step_plans(stream, tmp_path):
    from safetensors.torch import load_file

    from vfmkit.pipelines.tic import run_strategy, summarize

    cfg = _cfg(stream, **{"train.steps": 2, "optim.warmup_steps": 1})
    seq = run_strategy(cfg, "sequential", tmp_path)
    sizes = [st["n_train"] for st in read_stream(stream)["steps"]]
    assert [s["mix_counts"] for s in seq["steps"]] == [sizes[:1], [0, sizes[1]], [0, 0, sizes[2]]]
    lwf = run_strategy(cfg, "lwf", tmp_path)
    assert lwf["steps"][2]["lwf_teacher"].endswith("lwf/seed-0/step-01/model.safetensors")
    assert (
        lwf["steps"][2]["flops_per_sample"] > seq["steps"][2]["flops_per_sample"]
    )  # + the teacher's forward
    pat = run_strategy(cfg, "patching", tmp_path)
    # step 1 of Patching trains exactly Sequential's step 1 (same start, data, seed), then averages with step 0
    w0 = load_file(str(tmp_path / "patching/seed-0/step-00/model.safetensors"))
    ws = load_file(str(tmp_path / "sequential/seed-0/step-01/model.safetensors"))
    wp = load_file(str(tmp_path / "patching/seed-0/step-01/model.safetensors"))
    k = "visual.conv1.weight"
    assert torch.allclose(wp[k], 0.5 * (w0[k] + ws[k]), atol=1e-6) and not torch.equal(wp[k], ws[k])
    assert pat["steps"][1]["patched"] and not pat["steps"][0]["patched"]
    orc = run_strategy(cfg, "oracle", tmp_path)
    assert [s["steps_run"] for s in orc["steps"]] == [2, 4, 6] and orc["steps"][1]["warm_start"] is None
    rows = summarize([seq, lwf, pat, orc])
    assert rows["oracle"]["compute_flops"] == pytest.approx(orc["compute_flops"])
    assert rows["oracle"]["compute_steps"] == 12 and rows["sequential"]["compute_steps"] == 6
    from vfmkit.pipelines.tic import format_table, report

    summary = report(tmp_path)  # every result.json under the run folder: summary.json + the compute plot
    assert set(summary["strategies"]) == {"sequential", "lwf", "patching", "oracle"}
    assert (tmp_path / "compute_vs_accuracy.png").stat().st_size > 1000
    table = format_table(summary["strategies"]).splitlines()
    by = {line.split()[0]: line.split() for line in table[1:]}
    assert len(table) == 5 and by["oracle"][-1] == "1.000" and 0 < float(by["sequential"][-1]) < 1
    with pytest.raises(ConfigError, match="unknown TiC strategy"):
        run_strategy(cfg, "replay-everything", tmp_path)
    with pytest.raises(ConfigError, match="data.batch_size"):
        run_strategy(_cfg(stream, **{"data.batch_size": 1000}), "sequential", tmp_path / "big")
    with pytest.raises(ConfigError, match="method_args.lwf_wieght"):
        run_strategy(_cfg(stream, **{"method_args.lwf_wieght": 2}), "lwf", tmp_path)


def test_cli_prepare_and_report(stream, tmp_path, capsys):
    from vfmkit.cli import main

    assert main(["tic", "prepare", "--out", str(tmp_path / "s"), "--boundaries", "2015,2017"]) == 0
    assert "step 2 2017-2024" in capsys.readouterr().out
    s = read_stream(tmp_path / "s")
    assert [st["label"] for st in s["steps"]] == [st["label"] for st in read_stream(stream)["steps"]]
    assert sum(st["n_train"] + st["n_eval"] for st in s["steps"]) == 311
    assert main(["tic", "report", str(tmp_path / "nothing")]) == 2
