"""``vfmkit quickstart``: the main job end to end on the embedded data, in minutes on a laptop CPU.

    vfmkit quickstart [--out DIR] [--steps N] [--teacher SPEC ...] [--val-data SHARDS]

1. load the teacher (the shipped offline EfficientNet-Lite0 + MiniLM teacher, or ``--teacher openclip:NAME:TAG``);
2. reinforce ``builtin:flickr8k/train`` into ``OUT/reinforced`` (``vfmkit reinforce clip``: stored augmentations +
   teacher embeddings; resumable, finished shards are skipped on a rerun);
3. train the same tiny student plain (CLIP) and reinforced (MobileCLIP distillation) for the same steps, seed and
   recipe, through the method registry and the one engine, evaluating held-out retrieval every few steps;
4. evaluate the untrained, plain and reinforced students (and the teacher) on held-out retrieval and Imagenette
   zero-shot, print a table, write ``OUT/report.md``, ``OUT/curves.png`` and ``OUT/results.json``.

The embedded ``builtin:flickr8k/heldout`` (200 Flickr8k train-split photos never used for training) stands in for
Flickr8k val; ``--val-data`` points at real val shards (``vfmkit data import ... --split val``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DEFAULT_RECIPE = "mobileclip_tiny"
R1 = "R@1"  # mean of image->text and text->image R@1, the headline retrieval number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="teacher -> reinforce -> plain vs reinforced student -> eval + report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder (reruns resume)")
    p.add_argument("--steps", type=int, default=None, help="training steps per student (default: the recipe's)")
    p.add_argument("--teacher", action="append", dest="teachers", metavar="SPEC",
                   help="teacher spec, repeatable: 'offline' (default, shipped) or openclip:NAME:TAG_OR_FILE")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="student recipe (method mobileclip)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for both students, e.g. --set data.batch_size=32")
    p.add_argument("--data", default="builtin:flickr8k/train", help="image-text training shards")
    p.add_argument("--val-data", default="builtin:flickr8k/heldout", help="retrieval evaluation shards")
    p.add_argument("--zeroshot-data", default="builtin:imagenette/val", help="zero-shot classification shards")
    p.add_argument("--n-aug", type=int, default=3, help="augmentations stored per image (3 keeps the default run under 10 minutes on 2 cores)")
    p.add_argument("--eval-points", type=int, default=6, help="held-out evaluations during training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aug", default="rrc", help="stored augmentation recipe (rrc: crop only, as plain CLIP's)")
    p.add_argument("--aug-scale", type=float, default=0.9,
                   help="RandomResizedCrop min scale of the stored augmentations (0.9: open_clip's plain default)")
    p.add_argument("--keep-teacher-images", action="store_true",
                   help="also distil on the images the offline teacher was aligned on (excluded by default)")
    p.set_defaults(func=run)


def aug_recipe(args: argparse.Namespace) -> dict:
    """The stored-augmentation recipe from ``--aug`` / ``--aug-scale`` (generation size 224)."""
    return {"name": args.aug, "size": 224, **({"scale": [args.aug_scale, 1.0]} if args.aug_scale else {})}


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
        print(f"[quickstart] {name}: {self.seconds[name]:.1f}s wall, {self.cpu_seconds[name]:.1f}s CPU", flush=True)
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


def student_configs(args: argparse.Namespace, reinforced: Path):
    """(plain, reinforced) RunConfigs: one recipe, the method (and its own args) the only difference."""
    from vfmkit.config import load_config

    over = [f"seed={args.seed}", f"data.train={args.data}", *args.overrides]
    if args.steps is not None:
        over.append(f"train.steps={args.steps}")
    reinf = load_config(args.recipe, [*over, f"method_args.reinforced={reinforced}"])
    if reinf.method != "mobileclip":
        raise ValueError(f"recipe {args.recipe!r} has method {reinf.method!r}; quickstart needs 'mobileclip'")
    reinf.out_dir = str(args.out / "reinforced_student")
    plain = load_config(args.recipe, over)
    plain.method, plain.method_args, plain.out_dir = "clip", {"loss": "clip", "caption": "random"}, str(
        args.out / "plain_student")
    every = max(1, reinf.train.steps // max(1, args.eval_points))
    for c in (plain, reinf):
        c.train.eval_every = every
        c.train.log_every = max(1, min(c.train.log_every, c.train.steps // 30))  # enough points for the curve
    return plain, reinf


def retrieval_eval(bundle, spec: str) -> dict[str, float]:
    """Student retrieval on ``spec``: R@1/5/10 both ways plus ``R@1`` (their mean at K=1), in percent."""
    from vfmkit.eval.features import encode_image_text
    from vfmkit.eval.retrieval import retrieval_metrics

    img, txt, idx = encode_image_text(bundle.model, bundle.tokenizer, bundle.preprocess_val, spec)
    m = retrieval_metrics(img, txt, idx)
    return {**m, R1: 0.5 * (m["i2t_R@1"] + m["t2i_R@1"])}


def train_student(cfg, val_data: str) -> tuple[Any, list[dict]]:
    """Build the method's job from the registry and train it with held-out retrieval as ``eval_fn``.

    Returns (bundle with the trained model, history). A finished run (``history.json`` for the same config) is
    reused, so rerunning quickstart only redoes what is missing.
    """
    from vfmkit.config import to_dict
    from vfmkit.engine import init_distributed, train
    from vfmkit.methods.registry import build_job
    from vfmkit.models.factory import create_clip

    out = Path(cfg.out_dir)
    done = out / "history.json"
    if done.is_file() and (out / "model.safetensors").is_file():
        saved = json.loads(done.read_text())
        if saved.get("config") == to_dict(cfg):
            print(f"[quickstart] reusing finished run {out}", flush=True)
            return create_clip(cfg.model.name, str(out), image_size=cfg.data.image_size), saved["history"]
    dist_info = init_distributed()
    job = build_job(cfg, dist_info)
    bundle = job.extra["bundle"]
    res = train(cfg, job.model, job.loss_fn, job.loader, out_dir=out,
                eval_fn=lambda model, step: retrieval_eval(bundle, val_data), after_step=job.after_step,
                find_unused_parameters=job.find_unused_parameters, dist_info=dist_info)
    from vfmkit.data.shards import atomic_write_json

    atomic_write_json(done, {"config": to_dict(cfg), "history": res.history})
    return bundle, res.history


# ------------------------------------------------------------------------------------------ evaluation


def final_eval(bundle, val_data: str, zeroshot_data: str) -> dict[str, float]:
    """Held-out retrieval + Imagenette zero-shot top-1 (percent)."""
    from vfmkit.commands.eval import evaluate_clip

    res = evaluate_clip(bundle, ["zeroshot"], val_data, zeroshot_data, "", None)
    return {**{f"retrieval/{k}": v for k, v in retrieval_eval(bundle, val_data).items()}, **res}


def teacher_eval(ensemble, val_data: str) -> dict[str, float]:
    """The teacher ensemble's own retrieval on ``val_data`` (per-teacher blocks concatenated, then normalised)."""
    import torch
    import torch.nn.functional as F

    from vfmkit.eval.features import ordered_loader
    from vfmkit.eval.retrieval import retrieval_metrics
    from vfmkit.methods.clip import decode_image
    from vfmkit.models.teachers import resize_center_crop

    size = max(ensemble.image_sizes)

    def decode(raw):
        from torchvision.transforms.functional import pil_to_tensor

        img = pil_to_tensor(decode_image(raw)).float().div(255)[None]
        return {"image": resize_center_crop(img, size)[0], "captions": json.dumps(json.loads(raw["json"])["captions"])}

    imgs, caps = [], []
    for batch in ordered_loader(val_data, decode, batch_size=64):
        imgs.append(ensemble.encode_image(batch["image"]))
        caps += [json.loads(c) for c in batch["captions"]]
    flat = [c for cs in caps for c in cs]
    owner = torch.tensor([i for i, cs in enumerate(caps) for _ in cs])
    txt = torch.cat([ensemble.encode_text(flat[s:s + 256]) for s in range(0, len(flat), 256)])
    m = retrieval_metrics(F.normalize(torch.cat(imgs), dim=-1), F.normalize(txt, dim=-1), owner)
    return {f"retrieval/{k}": v for k, v in {**m, R1: 0.5 * (m["i2t_R@1"] + m["t2i_R@1"])}.items()}


# ------------------------------------------------------------------------------------------ report


TABLE_COLS = [("retrieval/R@1", "held-out R@1"), ("retrieval/i2t_R@1", "I->T R@1"),
              ("retrieval/t2i_R@1", "T->I R@1"), ("retrieval/i2t_R@5", "I->T R@5"),
              ("retrieval/t2i_R@5", "T->I R@5"), ("zeroshot/top1", "Imagenette zero-shot top-1")]


def results_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table, one row per model, the columns of ``TABLE_COLS`` (percent; '-' where not measured)."""
    lines = ["| model | " + " | ".join(t for _, t in TABLE_COLS) + " |", "|---" * (len(TABLE_COLS) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.2f}" if k in r else "-" for k, _ in TABLE_COLS) + " |")
    return "\n".join(lines)


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
    from vfmkit.data.shards import atomic_write_bytes, atomic_write_json

    val_note = ("`builtin:flickr8k/heldout`: 200 Flickr8k train-split photos never trained on, the embedded "
                "stand-in for Flickr8k val (pass `--val-data` for real val shards)"
                if info["val_data"] == "builtin:flickr8k/heldout" else f"`{info['val_data']}`")
    excl = (f" ({info['excluded_teacher_images']} images the offline teacher was aligned on were left out: on them "
            "its targets are nearly one-hot, so there is little to distil)" if info.get("excluded_teacher_images")
            else "")
    cpu = info["stage_cpu_seconds"]
    times = "\n".join(f"| {k} | {v:.1f} | {cpu.get(k, 0.0):.1f} |" for k, v in info["stage_seconds"].items())
    md = f"""# vfmkit quickstart report

Teacher: {", ".join(f"`{t}`" for t in info["teachers"])}. Student: `{info["model"]}`, {info["steps"]} steps of
batch {info["batch_size"]} for both arms (same recipe `{info["recipe"]}`, seed {info["seed"]}).
Training images: `{info["data"]}`{excl}.
Reinforced data: {info["n_aug"]} stored augmentations per image, {info["n_syn"]} extra captions per image,
teacher logit scale(s) {info["teacher_scales"]}, lambda {info["lam"]}.

Retrieval evaluation: {val_note}. Zero-shot: `{info["zeroshot_data"]}` (10 classes, OpenAI templates).
Numbers are percent.

{table}

Reinforced minus plain, held-out R@1: {info["gain_R@1"]:+.2f} points.

![learning curves](curves.png)

| stage | wall seconds | CPU seconds (all threads) |
|---|---|---|
{times}
"""
    atomic_write_bytes(out / "report.md", md.encode("utf-8"))
    atomic_write_json(out / "results.json", info)
    return out / "report.md"


# ------------------------------------------------------------------------------------------ the job


def run(args: argparse.Namespace) -> int:
    from vfmkit.data.reinforced import read_metadata
    from vfmkit.data.shards import exclude_uids
    from vfmkit.models.factory import create_clip
    from vfmkit.models.teachers import load_ensemble

    t0, c0 = time.perf_counter(), time.process_time()
    out, st = Path(args.out), Stages()
    out.mkdir(parents=True, exist_ok=True)
    teachers = args.teachers or ["offline"]
    ens = st("load teacher", load_ensemble, teachers)
    seen, excluded = teacher_seen(teachers), 0
    if seen and not args.keep_teacher_images:
        m = st("exclude the teacher's own images", exclude_uids, args.data, out / "data", seen)
        if m["kept"] == 0:
            raise ValueError(f"all {m['dropped']} images of {args.data} are the offline teacher's own training "
                             "images; give other data or --keep-teacher-images")
        print(f"[quickstart] {m['dropped']} of {m['kept'] + m['dropped']} training images were the offline "
              f"teacher's own training images (its targets on them are nearly one-hot): both students train on "
              f"the other {m['kept']}", flush=True)
        args.data, excluded = str(out / "data"), m["dropped"]
    n_syn = st("caption pool", write_caption_pool, args.data, out / "captions.jsonl")
    rdir = out / "reinforced"
    st("reinforce", _reinforce_with, ens, args, rdir, out / "captions.jsonl" if n_syn else None, n_syn)
    plain_cfg, reinf_cfg = student_configs(args, rdir)
    torch_seed_bundle = st("untrained student", create_clip, reinf_cfg.model.name,
                           image_size=reinf_cfg.data.image_size)
    rows = {"untrained student": st("eval untrained", final_eval, torch_seed_bundle, args.val_data,
                                    args.zeroshot_data)}
    plain, h_plain = st("train plain", train_student, plain_cfg, args.val_data)
    reinf, h_reinf = st("train reinforced", train_student, reinf_cfg, args.val_data)
    rows["plain CLIP student"] = st("eval plain", final_eval, plain, args.val_data, args.zeroshot_data)
    rows["reinforced student"] = st("eval reinforced", final_eval, reinf, args.val_data, args.zeroshot_data)
    rows["teacher (reference)"] = st("eval teacher", teacher_eval, ens, args.val_data)
    table = results_table(rows)
    # Both students start from the same initialisation (same seed): the untrained eval is their step-0 point.
    start = [{"step": 0, f"eval/{R1}": rows["untrained student"][f"retrieval/{R1}"]}]
    st("curves", plot_curves, {"plain": start + h_plain, "reinforced": start + h_reinf}, out / "curves.png")
    meta = read_metadata(rdir / "reinforced.json")
    st.seconds["total"] = time.perf_counter() - t0
    st.cpu_seconds["total"] = time.process_time() - c0
    info = {"teachers": teachers, "model": reinf_cfg.model.name, "steps": reinf_cfg.train.steps,
            "batch_size": reinf_cfg.data.batch_size, "recipe": args.recipe, "seed": args.seed,
            "n_aug": meta.n_aug, "n_syn": meta.n_syn, "teacher_scales": [t.logit_scale for t in meta.teachers],
            "lam": reinf_cfg.method_args.get("lam"), "val_data": args.val_data, "data": args.data,
            "excluded_teacher_images": excluded, "aug": aug_recipe(args),
            "zeroshot_data": args.zeroshot_data, "rows": rows, "stage_seconds": st.seconds,
        "stage_cpu_seconds": st.cpu_seconds,
            "gain_R@1": rows["reinforced student"]["retrieval/R@1"] - rows["plain CLIP student"]["retrieval/R@1"],
            "history": {"plain": h_plain, "reinforced": h_reinf}}
    report = write_report(out, table, info)
    print(table)
    print(f"report: {report}  curves: {out / 'curves.png'}  total {st.seconds['total']:.0f}s")
    return 0


def teacher_seen(teachers: list[str]) -> frozenset[str]:
    """Images the shipped offline teacher was aligned on (empty for any other teacher ensemble).

    Why: on the images its small heads were trained on for many epochs, the offline teacher's image-text
    similarities are nearly one-hot (they equal the labels), so distilling on them transfers almost nothing;
    a real large teacher does not memorise its training set this way."""
    from vfmkit.models.offline_teacher import teacher_train_images

    return teacher_train_images() if list(teachers) == ["offline"] else frozenset()


def _reinforce_with(ens, args: argparse.Namespace, rdir: Path, captions: Path | None, n_syn: int) -> dict:
    """Reinforce with the already-loaded teacher ensemble (it is loaded once for reinforcement and evaluation)."""
    from vfmkit.pipelines.reinforce import ReinforceArgs, Reinforcer, reinforce

    ra = ReinforceArgs(mode="clip", teachers=list(args.teachers or ["offline"]), n_aug=args.n_aug,
                       recipe=aug_recipe(args), seed=args.seed, images=True,
                       captions=str(captions) if captions else None, n_syn=n_syn)
    res = reinforce(args.data, rdir, ra, progress=False, reinforcer=Reinforcer(ra, teachers=ens))
    if res["manifest"] is None:
        raise RuntimeError(f"reinforcement of {args.data} into {rdir} is incomplete")
    return res
