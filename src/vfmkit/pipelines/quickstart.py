"""The quickstart job: the main MobileCLIP chain end to end on the embedded data, in minutes on a laptop CPU.

1. load the teacher (the shipped offline EfficientNet-Lite0 + MiniLM teacher, or ``openclip:NAME:TAG``);
2. leave the offline teacher's own training images out, write the caption pool, reinforce the training shards
   into ``OUT/reinforced`` (``vfmkit.pipelines.reinforce``: stored augmentations + teacher embeddings;
   resumable, finished shards are skipped on a rerun);
3. train the same tiny student plain (method ``clip``) and reinforced (method ``mobileclip``) for the same steps,
   seed and recipe through ``registry.run_job`` (the one engine), evaluating held-out retrieval every few steps;
4. evaluate the untrained, plain and reinforced students (and the teacher) on held-out retrieval (R@1, R@5, R@10,
   each the mean of I->T and T->I) and Imagenette zero-shot (``vfmkit.eval.clip``); report the step at which the
   reinforced student first reaches plain's final held-out R@1 (from the held-out evaluations both students make
   every ``eval_every`` steps) and each arm's training CPU and wall seconds; write ``OUT/report.md``,
   ``OUT/curves.png`` and ``OUT/results.json``.

Every stage resumes: a finished student run (``history.json`` for the same config) is reused.
``vfmkit quickstart`` (``commands/quickstart.py``) parses the flags into :class:`QuickstartOptions`, calls
:func:`run_quickstart` and prints the table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfmkit.eval.clip import R1, evaluate_clip, retrieval_eval, teacher_retrieval

DEFAULT_RECIPE = "mobileclip_tiny"


@dataclass
class QuickstartOptions:
    out: Path = Path("runs/quickstart")
    steps: int | None = None  # training steps per student (None: the recipe's)
    teachers: list[str] | None = None  # None: ["offline"]
    recipe: str = DEFAULT_RECIPE
    overrides: list[str] = field(default_factory=list)
    data: str = "builtin:flickr8k/train"
    val_data: str = "builtin:flickr8k/heldout"
    zeroshot_data: str = "builtin:imagenette/val"
    n_aug: int = 3
    eval_points: int = 6
    seed: int = 0
    aug: str = "rrc"
    aug_scale: float = 0.9
    keep_teacher_images: bool = False


def aug_recipe(opts: Any) -> dict:
    """The stored-augmentation recipe from ``aug`` / ``aug_scale`` (generation size 224)."""
    return {"name": opts.aug, "size": 224, **({"scale": [opts.aug_scale, 1.0]} if opts.aug_scale else {})}


class Stages:
    """Wall time per stage, printed as it goes (the job must stay within minutes: measure every part)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}  # process CPU time: what a stage costs on an unshared machine

    def __call__(self, name: str, fn, *a: Any, **kw: Any) -> Any:
        print(f"[quickstart] {name} ...", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*a, **kw)
        self.seconds[name] = time.perf_counter() - t0
        self.cpu_seconds[name] = time.process_time() - c0
        print(
            f"[quickstart] {name}: {self.seconds[name]:.1f}s wall, {self.cpu_seconds[name]:.1f}s CPU",
            flush=True,
        )
        return out


# ------------------------------------------------------------------------------------------ data + teacher


def write_caption_pool(data: str, path: Path) -> int:
    """uid -> the sample's other human captions (json ``captions`` minus the first) as a caption JSONL.

    Why: a reinforced record stores the real caption (row 0) plus a list of extra captions; filling that list with
    the other four Flickr8k captions gives the reinforced student the same text the plain student samples from
    (``caption: random`` over all five). A captioner (``vfmkit reinforce clip --captions``) can fill it instead.
    Returns the number of extra captions per image (the minimum over the data).
    """
    from vfmkit.data.shards import iter_shard, list_shards
    from vfmkit.methods.captions import write_captions_jsonl

    table: dict[str, list[str]] = {}
    for url in list_shards(data):
        for s in iter_shard(url):
            meta = json.loads(s["json"]) if "json" in s else {}
            table[str(meta.get("uid", s["__key__"]))] = list(meta.get("captions") or [])[1:]
    n = min((len(c) for c in table.values()), default=0)
    if not path.is_file():
        write_captions_jsonl(path, table)
    return n


# ------------------------------------------------------------------------------------------ students


def student_configs(opts: QuickstartOptions, data: str, reinforced: Path):
    """(plain, reinforced) RunConfigs: one recipe, the method (and its own args) the only difference.

    Both are derived from the recipe as dicts and validated once (a validated config is never edited)."""
    from vfmkit.config import load_config, to_dict

    over = [f"seed={opts.seed}", f"data.train={data}", *opts.overrides]
    if opts.steps is not None:
        over.append(f"train.steps={opts.steps}")
    reinf = to_dict(load_config(opts.recipe, [*over, f"method_args.reinforced={reinforced}"]))
    if reinf["method"] != "mobileclip":
        raise ValueError(
            f"recipe {opts.recipe!r} has method {reinf['method']!r}; quickstart needs 'mobileclip'"
        )
    plain = to_dict(load_config(opts.recipe, over))
    every = max(1, reinf["train"]["steps"] // max(1, opts.eval_points))
    reinf["out_dir"] = str(opts.out / "reinforced_student")
    plain.update(
        method="clip",
        method_args={"loss": "clip", "caption": "random"},
        out_dir=str(opts.out / "plain_student"),
    )
    for c in (plain, reinf):
        c["train"]["eval_every"] = every
        c["train"]["log_every"] = max(
            1, min(c["train"]["log_every"], c["train"]["steps"] // 30)
        )  # curve points
    return load_config(plain), load_config(reinf)


def train_student(cfg, val_data: str) -> tuple[Any, list[dict], dict | None]:
    """Train the method of ``cfg`` with ``registry.run_job``, held-out retrieval as ``eval_fn``.

    Returns (bundle with the trained model, history, the training cost recorded with a reused run, ``{}`` if it
    has none, or None when it trained now). A finished run (``history.json`` for the same config) is reused, so rerunning quickstart only
    redoes what is missing.
    """
    from vfmkit.config import to_dict
    from vfmkit.data.io import atomic_write_json
    from vfmkit.methods.registry import run_job
    from vfmkit.models.factory import create_clip

    out = Path(cfg.out_dir)
    done = out / "history.json"
    if done.is_file() and (out / "model.safetensors").is_file():
        saved = json.loads(done.read_text())
        if saved.get("config") == to_dict(cfg):
            print(f"[quickstart] reusing finished run {out}", flush=True)
            bundle = create_clip(cfg.model.name, str(out), image_size=cfg.data.image_size)
            return bundle, saved["history"], saved.get("train_cost", {})  # {}: from before costs were kept

    def eval_for(job):
        bundle = job.extra["bundle"]
        return lambda model, step: retrieval_eval(bundle, val_data)

    job, res = run_job(cfg, eval_for=eval_for)
    atomic_write_json(done, {"config": to_dict(cfg), "history": res.history})
    return job.extra["bundle"], res.history, None


def train_arm(st: Stages, name: str, cfg, val_data: str) -> tuple[Any, list[dict], dict]:
    """:func:`train_student` as the stage ``name`` -> (bundle, history, training cost).

    The cost is that stage's wall and process CPU seconds (:class:`Stages`; it includes the held-out evaluations
    made during training). It is stored in the run's ``history.json``, so a rerun that reuses the finished run
    reports what the training cost when it ran (``reused``: true), not the seconds it took to load it."""
    from vfmkit.data.io import atomic_write_json

    bundle, hist, saved = st(name, train_student, cfg, val_data)
    if saved is not None:
        return bundle, hist, {**saved, "reused": True}
    cost = {"wall_seconds": st.seconds[name], "cpu_seconds": st.cpu_seconds[name]}
    done = Path(cfg.out_dir) / "history.json"
    atomic_write_json(done, {**json.loads(done.read_text()), "train_cost": cost})
    return bundle, hist, {**cost, "reused": False}


# ------------------------------------------------------------------------------------------ evaluation


KS = (1, 5, 10)


def mean_recalls(row: dict[str, float]) -> dict[str, float]:
    """``row`` plus ``retrieval/R@K`` for K in ``KS``: the mean of its I->T and T->I recall at K."""
    return {
        **row,
        **{f"retrieval/R@{k}": 0.5 * (row[f"retrieval/i2t_R@{k}"] + row[f"retrieval/t2i_R@{k}"]) for k in KS},
    }


def final_eval(bundle, val_data: str, zeroshot_data: str) -> dict[str, float]:
    """Held-out retrieval (R@1/5/10 each way and their means) + Imagenette zero-shot top-1 (percent)."""
    res = evaluate_clip(bundle, ["zeroshot"], val_data, zeroshot_data, "", None)
    return mean_recalls({**{f"retrieval/{k}": v for k, v in retrieval_eval(bundle, val_data).items()}, **res})


def reach_step(history: list[dict], target: float) -> int | str:
    """The first held-out evaluation step of ``history`` whose R@1 is at least ``target``; "never" if none is."""
    key = f"eval/{R1}"
    return next((h["step"] for h in history if key in h and h[key] >= target), "never")


# ------------------------------------------------------------------------------------------ report


TABLE_COLS = [
    ("retrieval/R@1", "held-out R@1"),
    ("retrieval/R@5", "held-out R@5"),
    ("retrieval/R@10", "held-out R@10"),
    ("retrieval/i2t_R@1", "I->T R@1"),
    ("retrieval/t2i_R@1", "T->I R@1"),
    ("zeroshot/top1", "Imagenette zero-shot top-1"),
]
COST_COLS = [("cpu_seconds", "training CPU s"), ("wall_seconds", "training wall s")]


def results_table(rows: dict[str, dict[str, float]], costs: dict[str, dict] | None = None) -> str:
    """Markdown table, one row per model: the metrics of ``TABLE_COLS`` (percent) and, for the rows in ``costs``,
    the training seconds of ``COST_COLS`` ('-' where not measured or not trained)."""
    cols = [t for _, t in TABLE_COLS + COST_COLS]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        c = (costs or {}).get(name, {})
        cells = [f"{r[k]:.2f}" if k in r else "-" for k, _ in TABLE_COLS]
        cells += [f"{c[k]:.1f}" if k in c else "-" for k, _ in COST_COLS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(info: dict) -> str:
    """The lines under the table: the gains, the step at which reinforced first reaches plain's final held-out
    R@1, and each arm's training cost."""
    steps, every, at = info["steps"], info["eval_every"], info["reach_step"]
    target = info["reach_target_R@1"]
    gains = " / ".join(f"{info[f'gain_R@{k}']:+.2f}" for k in KS)
    if at == "never":
        reach = (
            f"Reinforced first reaches plain's final held-out R@1 ({target:.2f}): never (at none of its "
            f"held-out evaluations, every {every} of {steps} steps)."
        )
    else:
        reach = (
            f"Reinforced first reaches plain's final held-out R@1 ({target:.2f}) at step {at} of {steps} "
            f"({steps / at:.1f}x fewer steps than plain's {steps}; held-out evaluation every {every} steps)."
        )
    tc = info["train_cost"]
    known = all("cpu_seconds" in c for c in tc.values())
    arms = ", ".join(
        f"{arm} {c['cpu_seconds']:.1f} CPU s / {c['wall_seconds']:.1f} s wall"
        if "cpu_seconds" in c
        else f"{arm} not recorded (a reused run from before costs were kept)"
        for arm, c in tc.items()
    )
    ratio = (
        f"; reinforced/plain CPU {tc['reinforced']['cpu_seconds'] / max(tc['plain']['cpu_seconds'], 1e-9):.2f}x"
        if known
        else ""
    )
    again = [arm for arm, c in tc.items() if c["reused"]]
    reused = f" ({' and '.join(again)}: a reused finished run, seconds from when it trained)" if again else ""
    workers = (
        f"; the {info['num_workers']} loader worker processes' CPU time is not counted"
        if info.get("num_workers")
        else "; data loading runs in the process and is counted"
    )
    cost = (
        f"Training cost per arm, {steps} steps (process CPU seconds over all threads, and wall seconds, held-out "
        f"evaluations during training included{workers}): {arms}{ratio}{reused}."
    )
    return f"Reinforced minus plain, held-out R@1 / R@5 / R@10: {gains} points.\n{reach}\n{cost}"


def plot_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Training loss and held-out R@1 against steps for each student, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in histories.items():
        tr = [h for h in hist if "loss" in h]
        ev = [h for h in hist if f"eval/{R1}" in h]
        ax_l.plot([h["step"] for h in tr], [h["loss"] for h in tr], label=name)
        ax_r.plot([h["step"] for h in ev], [h[f"eval/{R1}"] for h in ev], marker="o", label=name)
    ax_l.set(xlabel="step", ylabel="training loss", title="training loss (each student's own objective)")
    ax_r.set(xlabel="step", ylabel="R@1 (%)", title="held-out retrieval R@1 (mean of I->T, T->I)")
    for ax in (ax_l, ax_r):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(out: Path, table: str, info: dict) -> Path:
    """``report.md`` (the table, what ran, stage times) and ``results.json``, both written atomically."""
    from vfmkit.data.io import atomic_write_bytes, atomic_write_json

    val_note = (
        "`builtin:flickr8k/heldout`: 200 Flickr8k train-split photos never trained on, the embedded "
        "stand-in for Flickr8k val (pass `--val-data` for real val shards)"
        if info["val_data"] == "builtin:flickr8k/heldout"
        else f"`{info['val_data']}`"
    )
    excl = (
        f" ({info['excluded_teacher_images']} images the offline teacher was aligned on were left out: on them "
        "its targets are nearly one-hot, so there is little to distil)"
        if info.get("excluded_teacher_images")
        else ""
    )
    cpu = info["stage_cpu_seconds"]
    times = "\n".join(f"| {k} | {v:.1f} | {cpu.get(k, 0.0):.1f} |" for k, v in info["stage_seconds"].items())
    notes = "\n\n".join(summary(info).splitlines())
    md = f"""# vfmkit quickstart report

Teacher: {", ".join(f"`{t}`" for t in info["teachers"])}. Student: `{info["model"]}`, {info["steps"]} steps of
batch {info["batch_size"]} for both arms (same recipe `{info["recipe"]}`, seed {info["seed"]}).
Training images: `{info["data"]}`{excl}.
Reinforced data: {info["n_aug"]} stored augmentations per image, {info["n_syn"]} extra captions per image,
teacher logit scale(s) {info["teacher_scales"]}, lambda {info["lam"]}.

Retrieval evaluation: {val_note}; held-out R@K is the mean of I->T and T->I recall at K.
Zero-shot: `{info["zeroshot_data"]}` (10 classes, OpenAI templates). Metrics are percent; training seconds are each
student's training stage (process CPU time over all threads, and wall time).

{table}

{notes}

![learning curves](curves.png)

| stage | wall seconds | CPU seconds (all threads) |
|---|---|---|
{times}
"""
    atomic_write_bytes(out / "report.md", md.encode("utf-8"))
    atomic_write_json(out / "results.json", info)
    return out / "report.md"


# ------------------------------------------------------------------------------------------ the job


def untrained_student(cfg):
    """The students' shared step-0 model: built after ``torch.manual_seed(cfg.seed)`` exactly as the methods
    build theirs (without the seed it depended on torch's per-process random default seed, so the untrained
    row changed from run to run)."""
    import torch

    from vfmkit.models.factory import create_clip

    torch.manual_seed(cfg.seed)
    return create_clip(
        cfg.model.name, cfg.model.pretrained, image_size=cfg.data.image_size, **cfg.model.kwargs
    )


def run_quickstart(opts: QuickstartOptions) -> tuple[str, str, Path, float]:
    """Run every stage (each resumes) -> (results table in Markdown, the summary lines under it (:func:`summary`),
    report path, total wall seconds)."""
    from vfmkit.data.reinforced import read_metadata
    from vfmkit.data.shards import exclude_uids
    from vfmkit.models.teachers import load_ensemble

    t0, c0 = time.perf_counter(), time.process_time()
    out, st = Path(opts.out), Stages()
    student_configs(
        opts, opts.data, out / "reinforced"
    )  # a value that cannot work fails now, not after the teacher
    out.mkdir(parents=True, exist_ok=True)
    teachers = opts.teachers or ["offline"]
    data = opts.data
    ens = st("load teacher", load_ensemble, teachers)
    seen, excluded = teacher_seen(teachers), 0
    if seen and not opts.keep_teacher_images:
        m = st("exclude the teacher's own images", exclude_uids, data, out / "data", seen)
        if m["kept"] == 0:
            raise ValueError(
                f"all {m['dropped']} images of {data} are the offline teacher's own training "
                "images; give other data or --keep-teacher-images"
            )
        print(
            f"[quickstart] {m['dropped']} of {m['kept'] + m['dropped']} training images were the offline "
            f"teacher's own training images (its targets on them are nearly one-hot): both students train on "
            f"the other {m['kept']}",
            flush=True,
        )
        data, excluded = str(out / "data"), m["dropped"]
    n_syn = st("caption pool", write_caption_pool, data, out / "captions.jsonl")
    rdir = out / "reinforced"
    st("reinforce", reinforce_with, ens, opts, data, rdir, out / "captions.jsonl" if n_syn else None, n_syn)
    plain_cfg, reinf_cfg = student_configs(opts, data, rdir)
    torch_seed_bundle = st("untrained student", untrained_student, reinf_cfg)
    rows = {
        "untrained student": st(
            "eval untrained", final_eval, torch_seed_bundle, opts.val_data, opts.zeroshot_data
        )
    }
    plain, h_plain, cost_plain = train_arm(st, "train plain", plain_cfg, opts.val_data)
    reinf, h_reinf, cost_reinf = train_arm(st, "train reinforced", reinf_cfg, opts.val_data)
    rows["plain CLIP student"] = st("eval plain", final_eval, plain, opts.val_data, opts.zeroshot_data)
    rows["reinforced student"] = st("eval reinforced", final_eval, reinf, opts.val_data, opts.zeroshot_data)
    rows["teacher (reference)"] = mean_recalls(st("eval teacher", teacher_retrieval, ens, opts.val_data))
    table = results_table(rows, {"plain CLIP student": cost_plain, "reinforced student": cost_reinf})
    target = rows["plain CLIP student"][f"retrieval/{R1}"]
    # Both students start from the same initialisation (same seed): the untrained eval is their step-0 point.
    start = [{"step": 0, f"eval/{R1}": rows["untrained student"][f"retrieval/{R1}"]}]
    st("curves", plot_curves, {"plain": start + h_plain, "reinforced": start + h_reinf}, out / "curves.png")
    meta = read_metadata(rdir / "reinforced.json")
    st.seconds["total"] = time.perf_counter() - t0
    st.cpu_seconds["total"] = time.process_time() - c0
    info = {
        "teachers": teachers,
        "model": reinf_cfg.model.name,
        "steps": reinf_cfg.train.steps,
        "batch_size": reinf_cfg.data.batch_size,
        "recipe": opts.recipe,
        "seed": opts.seed,
        "n_aug": meta.n_aug,
        "n_syn": meta.n_syn,
        "teacher_scales": [t.logit_scale for t in meta.teachers],
        "lam": reinf_cfg.method_args.get("lam"),
        "val_data": opts.val_data,
        "data": data,
        "excluded_teacher_images": excluded,
        "aug": aug_recipe(opts),
        "zeroshot_data": opts.zeroshot_data,
        "rows": rows,
        "stage_seconds": st.seconds,
        "stage_cpu_seconds": st.cpu_seconds,
        **{
            f"gain_R@{k}": rows["reinforced student"][f"retrieval/R@{k}"]
            - rows["plain CLIP student"][f"retrieval/R@{k}"]
            for k in KS
        },
        "eval_every": reinf_cfg.train.eval_every,
        "num_workers": reinf_cfg.data.num_workers,
        "reach_target_R@1": target,
        "reach_step": reach_step(h_reinf, target),
        "train_cost": {"plain": cost_plain, "reinforced": cost_reinf},
        "history": {"plain": h_plain, "reinforced": h_reinf},
    }
    report = write_report(out, table, info)
    return table, summary(info), report, st.seconds["total"]


def teacher_seen(teachers: list[str]) -> frozenset[str]:
    """Images the ensemble's offline teachers (the shipped one, ``offline``, or a saved offline-teacher
    directory) were aligned on: the union over them (empty when none is an offline teacher).

    Why: on the images its small heads were trained on for many epochs, the offline teacher's image-text
    similarities are nearly one-hot (they equal the labels), so distilling on them transfers almost nothing;
    a real large teacher does not memorise its training set this way."""
    from vfmkit.models.offline_teacher import teacher_train_images

    seen: set[str] = set()
    for spec in teachers:
        if spec == "offline":
            seen |= teacher_train_images()
        elif (Path(spec) / "teacher.json").is_file():
            seen |= teacher_train_images(spec)
    return frozenset(seen)


def reinforce_with(
    ens, opts: QuickstartOptions, data: str, rdir: Path, captions: Path | None, n_syn: int
) -> dict:
    """Reinforce with the already-loaded teacher ensemble (it is loaded once for reinforcement and evaluation)."""
    from vfmkit.pipelines.reinforce import ReinforceArgs, Reinforcer, reinforce

    ra = ReinforceArgs(
        mode="clip",
        teachers=list(opts.teachers or ["offline"]),
        n_aug=opts.n_aug,
        recipe=aug_recipe(opts),
        seed=opts.seed,
        images=True,
        captions=str(captions) if captions else None,
        n_syn=n_syn,
    )
    res = reinforce(data, rdir, ra, progress=False, reinforcer=Reinforcer(ra, teachers=ens))
    if res["manifest"] is None:
        raise RuntimeError(f"reinforcement of {data} into {rdir} is incomplete")
    return res
