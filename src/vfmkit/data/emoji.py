"""Import the Noto emoji stream (images Apache-2.0, metadata MIT) as a time-stamped image-text stream.

Source layout (``/work/shared/data/emoji`` and the embedded subset ``vfmkit/assets/emoji``): ``images.tar`` with
64x64 RGBA PNGs and ``emoji.csv`` with ``image,name,short_names,category,subcategory,added_in,year,skin_tone``.

Each emoji becomes one sample: the PNG composited on white (RGB, stored as PNG), the text ``"<name>"`` plus its
short names (space-separated in the CSV, ``_`` read as a space: ``"hash key (hash)"``) and, for a skin-tone variant, ``", <tone> skin tone"`` (the variants
share their base emoji's name, so without it their captions would be identical), json with ``uid`` (the image
file name), ``year``, ``group`` (the base emoji's name: all skin-tone variants are one group, so they are always
on the same side of a train/eval split), ``label``/``class`` (the category, for zero-shot classification).

Grouping of the release years 2010-2024 into 5 steps (cuts 2015, 2016, 2017, 2020), chosen so every step has
600-860 emoji (full data: 2010-2014: 858, 2015: 776, 2016: 755, 2017-2019: 794, 2020-2024: 603): 2014 (139) is
too small alone and joins the Unicode 6.0 set of 2010, and 2020-2024 are five small releases (8-334).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image

from vfmkit.data.importer import ImageSource
from vfmkit.data.shards import ShardWriter
from vfmkit.data.stream import tag_stream

EMOJI_CUTS = (2015, 2016, 2017, 2020)
SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
COLUMNS = ("image", "name", "short_names", "category", "year", "skin_tone")


def emoji_text(row: dict) -> str:
    """Caption from name + short names (+ the skin tone(s) of a variant)."""
    shorts = [s.replace("_", " ") for s in row["short_names"].split()]
    shorts = [s for s in dict.fromkeys(shorts) if s != row["name"]]
    text = row["name"] + (f" ({', '.join(shorts)})" if shorts else "")
    tones = [SKIN_TONES.get(c.upper(), c) for c in row.get("skin_tone", "").split("-") if c]
    if tones:
        text += f", {' and '.join(dict.fromkeys(tones))} skin tone"
    return text


def _rgb_png(data: bytes) -> bytes:
    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    buf = io.BytesIO()
    Image.alpha_composite(white, img).convert("RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def read_emoji_csv(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not set(COLUMNS) <= set(rows[0]):
        raise ValueError(f"{path}: expected columns {','.join(COLUMNS)}")
    return rows


def import_emoji(
    root: str | Path,
    out_dir: str | Path,
    *,
    cuts: tuple = EMOJI_CUTS,
    eval_frac: float = 0.2,
    shard_size: int = 1000,
) -> dict:
    """``root`` (``images.tar`` + ``emoji.csv``) -> ``out_dir/source`` shards + the time-step stream in ``out_dir``.

    Returns the ``stream.json`` dict (``vfmkit.data.stream.tag_stream``). An image that is missing or does not
    decode is skipped, named in ``out_dir/source/manifest.json`` (``skipped``) and counted (``n_skipped``).
    """
    root, out = Path(root), Path(out_dir)
    rows = sorted(read_emoji_csv(root / "emoji.csv"), key=lambda r: r["image"])
    images = ImageSource(root / "images.tar")
    classes = sorted({r["category"] for r in rows})
    src = out / "source"
    if not (src / "manifest.json").is_file():
        skipped = []
        with ShardWriter(src, prefix="emoji", max_count=shard_size) as w:
            for i, r in enumerate(rows):
                data = images.read(r["image"])
                try:
                    if data is None:
                        raise FileNotFoundError("not in images.tar")
                    png = _rgb_png(data)
                except Exception as e:  # a corrupt image is reported by name and counted
                    skipped.append({"uid": r["image"], "reason": f"{type(e).__name__}: {e}"})
                    continue
                text = emoji_text(r)
                w.write(
                    {
                        "__key__": f"{i:09d}",
                        "png": png,
                        "txt": text,
                        "json": {
                            "uid": r["image"],
                            "year": int(r["year"]),
                            "group": r["name"],
                            "name": r["name"],
                            "category": r["category"],
                            "class": r["category"],
                            "label": classes.index(r["category"]),
                            "added_in": r.get("added_in", ""),
                            "skin_tone": r.get("skin_tone", ""),
                            "captions": [text],
                        },
                    }
                )
            w.extra.update(skipped=skipped, n_skipped=len(skipped))
    return tag_stream(
        src,
        out,
        boundaries=list(cuts),
        eval_frac=eval_frac,
        shard_size=shard_size,
        extra={"dataset": "emoji", "cuts": list(cuts), "classnames": classes},
    )


def build_subset(root: str | Path, out_dir: str | Path, per_step: int = 60, cuts: tuple = EMOJI_CUTS) -> int:
    """Write a small emoji source (``images.tar`` with the original PNGs + ``emoji.csv``) to ``out_dir``.

    Per step (``cuts``), whole groups (base emoji with all their skin-tone variants) are taken in the order of a
    hash of the group name until the step has ``per_step`` images, so the subset is deterministic. This is how
    ``vfmkit/assets/emoji`` was built. Returns the number of images written.
    """
    import tarfile

    from vfmkit.data.io import atomic_write_bytes, atomic_write_text
    from vfmkit.data.rng import seed_of

    root, out = Path(root), Path(out_dir)
    rows = read_emoji_csv(root / "emoji.csv")
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        step = sum(int(r["year"]) >= c for c in cuts)
        groups.setdefault((step, r["name"]), []).append(r)
    keep: list[dict] = []
    for step in range(len(cuts) + 1):
        names = sorted((n for s, n in groups if s == step), key=lambda n: seed_of("emoji-subset", n))
        n_step = 0
        for n in names:
            if n_step >= per_step:
                break
            keep.extend(groups[step, n])
            n_step += len(groups[step, n])
    keep.sort(key=lambda r: r["image"])
    images = ImageSource(root / "images.tar")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for r in keep:
            data = images.read(r["image"])
            info = tarfile.TarInfo(r["image"])
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))
    atomic_write_bytes(out / "images.tar", buf.getvalue())
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(keep)
    atomic_write_text(out / "emoji.csv", text.getvalue())
    return len(keep)
