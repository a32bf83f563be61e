"""FastFill: hand-computed retrieval metrics, backfilling curves, the loss, h, feature caches, the CLI end to end.

Real features come from the embedded Imagenette subset (``builtin:imagenette/*``) through two fixed random-init
timm networks at small sizes; h and the probe head train with the engine for a few hundred tiny steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from vfmkit.config import ConfigError, load_config
from vfmkit.eval.backfill import (
    backfill_curve,
    default_fractions,
    order_by_uncertainty,
    order_oracle,
    order_random,
    rank_correlation,
    retrieval_scores,
)
from vfmkit.methods.fastfill import (
    Transformation,
    _save_features,
    _TrainWrapper,
    fastfill_loss,
    load_features,
    load_transformation,
    parse_args,
    save_transformation,
)

# 1-D gallery: positions 0, 1, 3, 10 with labels 0, 0, 1, 1.
G = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
GY = torch.tensor([0, 0, 1, 1])


def _brute_force(q, qy, g, gy, exclude_self):
    """Reference metrics by plain Python sorting, one query at a time."""
    top1 = top5 = ap_sum = n_ap = 0
    for i in range(q.shape[0]):
        items = [
            (float(((q[i] - g[j]) ** 2).sum()), j) for j in range(g.shape[0]) if not (exclude_self and j == i)
        ]
        rel = [int(gy[j] == qy[i]) for _, j in sorted(items)]
        top1 += rel[0]
        top5 += int(any(rel[:5]))
        if sum(rel):
            hits = [k + 1 for k, r in enumerate(rel) if r]
            ap_sum += sum((n + 1) / r for n, r in enumerate(hits)) / len(hits)
            n_ap += 1
    n = q.shape[0]
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "mAP": 100 * ap_sum / n_ap}


def test_metrics_hand_computed_single_query():
    # query 0.9 (label 1): ranking 1 (d .01, lab 0), 0 (.81, 0), 2 (4.41, 1), 3 (82.8, 1) -> hits at 3, 4
    r = retrieval_scores(torch.tensor([[0.9]]), torch.tensor([1]), G, GY, topk=(1, 3))
    assert r["top1"] == 0.0 and r["top3"] == 100.0
    assert r["mAP"] == pytest.approx(100 * (1 / 3 + 2 / 4) / 2)


def test_metrics_hand_computed_self_exclusion():
    # gallery == queries; without self: q0 -> 1 hit@1; q1 -> 0 hit@1; q2(3) -> 1(4),0(9),3(49): hit@3; q3 -> 2 hit@1
    r = retrieval_scores(G, GY, G, GY, exclude_self=True, topk=(1,))
    assert r["top1"] == 75.0
    assert r["mAP"] == pytest.approx(100 * (1 + 1 + 1 / 3 + 1) / 4)
    # without exclusion every query finds itself first: perfect top-1
    assert retrieval_scores(G, GY, G, GY, topk=(1,))["top1"] == 100.0


@pytest.mark.parametrize("exclude_self", [False, True])
def test_blocked_metrics_match_brute_force(exclude_self):
    g = torch.randn(37, 5, generator=torch.Generator().manual_seed(0))
    gy = torch.randint(0, 4, (37,), generator=torch.Generator().manual_seed(1))
    ref = _brute_force(g, gy, g, gy, exclude_self)
    for bs in (1, 7, 1024):  # batch size 1 works; the block size changes nothing
        r = retrieval_scores(g, gy, g, gy, exclude_self=exclude_self, block_size=bs)
        assert r == pytest.approx(ref)


def test_backfill_curve_mixes_galleries_in_order():
    # New gallery = G; old gallery shifted far away except for the label; queries at the new positions.
    old = G + 100.0
    order = torch.tensor([3, 2, 1, 0])
    c = backfill_curve(G, GY, G, old, GY, order, fractions=[0.0, 0.5, 1.0], exclude_self=True, topk=(1,))
    full = retrieval_scores(G, GY, G, GY, exclude_self=True, topk=(1,))
    assert c["top1"][2] == full["top1"] and c["mAP"][2] == pytest.approx(full["mAP"])
    # beta = 0.5: items 3 and 2 (labels 1, 1) are new; 1 and 0 are at 101 and 100.
    # q0 -> 2(9), 3(100), 1(10201): hit@3 (AP 1/3); q1 -> 2(4), 3(81), 0(9801): hit@3 (AP 1/3)
    # q2 -> 3(49), 1, 0: hit@1 (AP 1); q3 -> 2(49): hit@1 (AP 1)
    assert c["top1"][1] == 50.0
    assert c["mAP"][1] == pytest.approx(100 * (1 / 3 + 1 / 3 + 1 + 1) / 4)
    assert c["auc"]["mAP"] == pytest.approx(sum(c["mAP"]) / 3)


def test_incompatible_old_items_are_never_retrieved_but_count_as_positives():
    order = torch.tensor([0, 2, 1, 3])  # beta 0.5 -> items 0 and 2 searchable
    c = backfill_curve(G, GY, G, None, GY, order, fractions=[0.0, 0.5])
    assert c["top1"] == [0.0, 100.0] and c["mAP"][0] == 0.0
    # q0: ranking 0 (self, d 0, hit), 2 -> AP = 1/2 (one of two positives found); q1: 0 (hit) -> 1/2
    # q2: 2 (self, hit) -> 1/2; q3: 2 (hit @1) -> 1/2
    assert c["mAP"][1] == pytest.approx(50.0)


def test_orders():
    s = torch.tensor([0.1, 2.0, -1.0, 0.5])
    assert order_by_uncertainty(s).tolist() == [1, 3, 0, 2]  # highest sigma first
    new = torch.zeros(4, 2)
    tr = torch.tensor([[0.0, 1], [3, 0], [0, 0], [1, 1]])
    assert order_oracle(new, tr).tolist() == [1, 3, 0, 2]
    assert sorted(order_random(50, 3).tolist()) == list(range(50))
    assert torch.equal(order_random(50, 3), order_random(50, 3)) and not torch.equal(
        order_random(50, 3), order_random(50, 4)
    )
    with pytest.raises(ValueError, match="permutation"):
        backfill_curve(G, GY, G, G, GY, torch.tensor([0, 0, 1, 2]))
    assert len(default_fractions()) == 22


def test_fastfill_loss_values():
    z, new = torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 2.0, 0]])  # align = 1, 4
    loss, logs = fastfill_loss(z, new, None, None, None)
    assert loss.item() == pytest.approx(2.5) and logs["align"] == pytest.approx(2.5)
    s = torch.tensor([0.0, math.log(4.0)])  # 1/2 e^-s L + 0.5 s = [0.5, 0.5 + 0.5 log 4]
    loss, _ = fastfill_loss(z, new, s, None, None, mu_unc=0.5)
    assert loss.item() == pytest.approx((0.5 + 0.5 + 0.5 * math.log(4.0)) / 2)
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1, reduction="none")
    loss, _ = fastfill_loss(z, new, None, logits, y, mu_disc=2.0)
    assert loss.item() == pytest.approx((torch.tensor([1.0, 4.0]) + 2 * ce).mean().item(), rel=1e-6)


@pytest.mark.parametrize("unc", ["hidden", "hidden_detached", "output", None])
def test_transformation_batch_size_one_and_roundtrip(tmp_path, unc):
    torch.manual_seed(0)
    h = Transformation(6, 4, hidden=8, depth=2, uncertainty=unc)
    z, s = h(torch.randn(1, 6))
    assert z.shape == (1, 4) and (s is None if unc is None else s.shape == (1,))
    (z.sum() + (0 if s is None else s.sum())).backward()
    save_transformation(h, tmp_path / "h.safetensors")
    h2 = load_transformation(tmp_path / "h.safetensors")
    x = torch.randn(3, 6)
    assert torch.equal(h.eval()(x)[0], h2(x)[0])


def test_detached_uncertainty_head_leaves_h_alone():
    torch.manual_seed(0)
    h = Transformation(6, 4, hidden=8, uncertainty="hidden_detached")
    _, s = h(torch.randn(5, 6))
    s.sum().backward()
    assert all(p.grad is None for p in h.body.parameters()) and h.unc_head[0].weight.grad is not None


def test_alignment_and_head_see_the_normalised_transformed_feature():
    """Retrieval compares unit vectors, so the loss must too (else ||h(old)|| absorbs the error sigma learns)."""
    torch.manual_seed(0)
    h = Transformation(6, 4, hidden=8, uncertainty="hidden_detached")
    w, b = torch.randn(3, 4), torch.randn(3)
    z, s, logits = _TrainWrapper(h, w, b, normalize=True)(torch.randn(5, 6))
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-6)
    assert torch.allclose(logits, z @ w.T + b, atol=1e-6) and s.shape == (5,)
    raw, _, _ = _TrainWrapper(h, None, None, normalize=False)(torch.randn(5, 6))
    assert not torch.allclose(raw.norm(dim=1), torch.ones(5), atol=1e-3)


def test_rank_correlation_hand_computed():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(a, 10 * a + 3) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    # ranks [0,1,2,3] vs [0,2,1,3]: 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert rank_correlation(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        rank_correlation(a, a[:3])


def test_feature_cache_roundtrip_and_corrupt_file_named(tmp_path):
    p = tmp_path / "f.safetensors"
    _save_features(p, torch.randn(3, 4), torch.tensor([0, 1, 2]), ["a", "b", "c"], {"encoder": "x"})
    d = load_features(p)
    assert d["keys"] == ["a", "b", "c"] and d["meta"]["encoder"] == "x" and d["features"].shape == (3, 4)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_features(bad)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method_args.mu_simm"):
        parse_args(load_config({"method_args": {"mu_simm": 1.0}}))
    with pytest.raises(ConfigError, match="only fastfill predicts sigma"):
        parse_args(load_config({"method_args": {"curves": ["fct/sigma"]}}))
    assert parse_args(load_config("fastfill_imagenette")).new_encoder.startswith("efficientnet-lite0")


# ------------------------------------------------------------------ real features, engine, CLI (one pipeline run)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """``vfmkit backfill`` on the embedded Imagenette subset with two random-init tiny timm encoders."""
    from vfmkit.cli import main

    out = tmp_path_factory.mktemp("backfill")
    sets = {
        # real ImageNet EfficientNet-Lite0 features: old at 32 px (weak), new at 64 px with its own head rows
        "method_args.old_encoder": "efficientnet-lite0@32",
        "method_args.new_encoder": "efficientnet-lite0@64",
        "method_args.hidden_dim": 256,
        "train.steps": 250,
        "train.progress": False,
        "train.tensorboard": False,
        "optim.lr": 2e-3,
        "optim.warmup_steps": 10,
    }
    argv = ["backfill", "--out", str(out)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    torch.set_num_threads(1)  # tiny models on a shared CPU: one thread is fastest
    assert main(argv) == 0
    (out / "argv.json").write_text(json.dumps(argv))
    return out


def test_cli_writes_report_and_plot(pipeline):
    rep = json.loads((pipeline / "report.json").read_text())
    assert set(rep["auc"]) == {
        "none/random",
        "fct/random",
        "fastfill/random",
        "fastfill/sigma",
        "fastfill/oracle",
    }
    assert (pipeline / "backfill.png").stat().st_size > 5000
    curves = json.loads((pipeline / "curves.json").read_text())["curves"]
    new_new = rep["references"]["new/new"]
    for c in curves.values():
        assert len(c["fraction"]) == 22
        # fully backfilled, every policy searches the same new-model gallery
        assert c["mAP"][-1] == pytest.approx(new_new["mAP"]) and c["top1"][-1] == pytest.approx(
            new_new["top1"]
        )
    # resumable: a second run reuses every cached output and gives the same numbers
    from vfmkit.cli import main

    argv = json.loads((pipeline / "argv.json").read_text())
    assert main(argv + ["--steps", "simulate,report"]) == 0
    assert json.loads((pipeline / "report.json").read_text())["auc"] == rep["auc"]


def test_transformation_lifts_old_to_new_retrieval(pipeline):
    rep = json.loads((pipeline / "report.json").read_text())
    refs, curves = rep["references"], rep["curves"]
    direct = curves["none/random"]["mAP"][0]  # old gallery compared directly with new queries (same 1280-d)
    for obj in ("fct", "fastfill"):
        mapped = refs[f"{obj}(old)/new"]
        assert mapped["mAP"] > direct + 4.0, (obj, mapped, direct)
        assert mapped["mAP"] > refs["old/old"]["mAP"] + 4.0, (obj, mapped, refs["old/old"])


def test_uncertainty_order_follows_predicted_sigma(pipeline):
    """The fastfill/sigma curve is the curve of the predicted-sigma order (highest first), and order matters."""
    from vfmkit.methods.fastfill import _gallery_query, apply_transformation, parse_args

    rep = json.loads((pipeline / "report.json").read_text())
    a = parse_args(load_config(rep["config"]))
    g = _gallery_query(a, pipeline)
    z, s = apply_transformation(load_transformation(pipeline / "h_fastfill.safetensors"), g["old_g"])
    order = order_by_uncertainty(s)
    assert torch.all(s[order][:-1] >= s[order][1:])
    z = torch.nn.functional.normalize(z, dim=1)
    c = backfill_curve(g["new_q"], g["y_q"], g["new_g"], z, g["y_g"], order)
    assert c["mAP"] == pytest.approx(rep["curves"]["fastfill/sigma"]["mAP"])
    assert c["top1"] == pytest.approx(rep["curves"]["fastfill/sigma"]["top1"])
    rev = backfill_curve(g["new_q"], g["y_q"], g["new_g"], z, g["y_g"], order.flip(0))
    assert rev["mAP"][1:-1] != pytest.approx(c["mAP"][1:-1])  # the order changes the partial galleries


def test_sigma_predicts_the_real_error_on_unseen_gallery_items(pipeline):
    """s is trained on the train split; on the gallery (the val split here) it must rank the true error."""
    from vfmkit.methods.fastfill import _gallery_query, apply_transformation, parse_args

    rep = json.loads((pipeline / "report.json").read_text())
    a = parse_args(load_config(rep["config"]))
    g = _gallery_query(a, pipeline)
    z, s = apply_transformation(load_transformation(pipeline / "h_fastfill.safetensors"), g["old_g"])
    err = (g["new_g"] - torch.nn.functional.normalize(z, dim=1)).pow(2).sum(1)
    rho = rank_correlation(s, err)
    assert rho == pytest.approx(rep["sigma_error_spearman"]["fastfill"])
    assert rho > 0.2, rho
