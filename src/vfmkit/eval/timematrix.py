"""The TiC-CLIP time matrix: E[i][j] = score of the model after step i on step j's held-out set.

In-domain = mean of the diagonal, backward transfer = mean below it (i > j: old steps, after training on newer
data), forward transfer = mean above it (i < j: steps not seen yet), final mean = mean of the last row (the final
model over every step). ``evaluate_steps`` scores one model on every step's eval split: image->text and
text->image R@1 (``eval.retrieval``) and zero-shot classification of the class in json ``label`` (``eval.zeroshot``;
for the emoji stream, the category, prompted by its name).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vfmkit.data.io import atomic_write_bytes
from vfmkit.data.stream import read_stream, step_split

METRICS = ("retrieval_R@1", "i2t_R@1", "t2i_R@1", "zeroshot_top1")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def transfer_metrics(E: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """``in_domain`` (diagonal), ``backward`` (below), ``forward`` (above) means and ``final_mean`` (last row)."""
    n = len(E)
    if n == 0 or any(len(r) != n for r in E):
        raise ValueError(f"the time matrix must be square, got rows of lengths {[len(r) for r in E]}")
    return {
        "in_domain": _mean([E[i][i] for i in range(n)]),
        "backward": _mean([E[i][j] for i in range(n) for j in range(i)]),
        "forward": _mean([E[i][j] for i in range(n) for j in range(i + 1, n)]),
        "final_mean": _mean(list(E[-1])),
    }


@torch.no_grad()
def evaluate_steps(
    model,
    tokenizer: Callable,
    preprocess: Callable,
    stream_dir: str | Path,
    device: str | torch.device = "cpu",
) -> list[dict[str, float]]:
    """Scores of ``model`` on each step's eval split (``METRICS``; zero-shot only when the stream has classes)."""
    from vfmkit.eval.features import encode_image_text
    from vfmkit.eval.retrieval import retrieval_metrics
    from vfmkit.eval.zeroshot import zeroshot_eval

    s = read_stream(stream_dir)
    classnames = s.get("classnames") or []
    out = []
    was_training = model.training
    for st in s["steps"]:
        spec = str(step_split(stream_dir, st["index"], "eval"))
        img, txt, idx = encode_image_text(model, tokenizer, preprocess, spec, device=device, max_captions=1)
        r = retrieval_metrics(img, txt, idx, ks=(1, 5))
        m = {
            "i2t_R@1": r["i2t_R@1"],
            "t2i_R@1": r["t2i_R@1"],
            "retrieval_R@1": 0.5 * (r["i2t_R@1"] + r["t2i_R@1"]),
            "i2t_R@5": r["i2t_R@5"],
            "t2i_R@5": r["t2i_R@5"],
        }
        if classnames:
            z = zeroshot_eval(
                model,
                tokenizer,
                preprocess,
                spec,
                classnames,
                templates=[lambda c: f"an emoji of {c.lower()}."],
                device=str(device),
            )
            m["zeroshot_top1"] = z["top1"]
        out.append(m)
    model.train(was_training)
    return out


def _save_fig(fig, path: str | Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def heatmap_png(
    E: Sequence[Sequence[float]], labels: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """Heatmap of E (rows: model after step i; columns: eval step j), values printed in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(E)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2, 1.0 * n + 1.5))
    im = ax.imshow(E, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{E[i][j]:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("evaluated on step j")
    ax.set_ylabel("model after step i")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    _save_fig(fig, path)


def compute_plot_png(rows: dict[str, dict], path: str | Path, metric: str = "final_mean") -> None:
    """Cumulative training FLOPs (x, log) against ``metric`` per strategy; ``rows[name]`` holds ``compute_flops``
    and ``metric`` (optionally ``<metric>_std`` and ``compute_flops_std`` for error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows.items():
        ax.errorbar(r["compute_flops"], r[metric], yerr=r.get(f"{metric}_std"), fmt="o", capsize=3)
        ax.annotate(
            name, (r["compute_flops"], r[metric]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training compute (FLOPs, measured)")
    ax.set_ylabel(metric.replace("_", " ") + " (retrieval R@1, %)")
    ax.grid(alpha=0.3)
    _save_fig(fig, path)
