"""Assemble benchmarks/RESULTS.md: a summary table from results/*.json, then each benchmark's recorded runs.

Each benchmark script writes its latest figures to results/<name>.json; each benchmark's printed output, date and
machine are kept in RESULTS.<name>.md (appended per run). This script only gathers them; it computes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    rows = []
    for p in sorted((HERE / "results").glob("*.json")):
        r = json.loads(p.read_text())
        met = r.get("floor_met")
        rows.append(
            f"| `{p.stem}` | {r.get('headline', '')} | {r.get('floor', '')} | "
            f"{'met' if met is True else 'MISSED' if met is False else '-'} | {r.get('date', '')} | "
            f"{r.get('machine', '')} |"
        )
    parts = [
        "# Benchmark results",
        "",
        "Every benchmark measures its peer in the same run and prints the ratio. Timings on the 2-core CPU "
        "machines are noisy (the machine was shared with other jobs while most of these ran): compare only "
        "within a run. `floor_met` is computed by each script.",
        "",
        "| benchmark | headline | floor | floor | date | machine |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    for p in sorted(HERE.glob("RESULTS.*.md")):
        parts += [f"## {p.stem.removeprefix('RESULTS.')}", "", p.read_text().strip(), ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'} ({len(rows)} benchmarks)")


if __name__ == "__main__":
    main()
