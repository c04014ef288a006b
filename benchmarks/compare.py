"""Compare two benchmark runs: ``python benchmarks/compare.py OLD.json NEW.json [--markdown]``.

Prints one line per row (matched on bench, subject, metric and number of producers): the old
and new medians, ``new/old``, whether that is better or worse (by the unit: rates are better
higher, times, sizes and CPU lower), and the old and new paired ratios to the row's
reference; then the targets of both runs side by side. Rows found in one run only show "-"
on the other side. Also ``run.py --compare OLD.json NEW.json``.

Both runs should be of the same kind (quick or full) on the same machine; on a shared
machine absolute numbers move by tens of percent from run to run, so a change within
``--same`` (default 10 %) is shown as "same". The paired ratios (to ``dict``,
``redis_pipeline``, ``sqlite_wal_batch``) were taken within each run and move less.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import fmt, render

HIGHER_IS_BETTER = {"hooks/s", "records/s"}
"""Units of rates; every other unit (ns/call, ms, s, B/job, s/M hooks, %...) is a cost."""

Key = tuple[str, str, str, int | None]


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    if "rows" not in doc:
        raise SystemExit(f"{path}: not a benchmark result (no 'rows')")
    return doc


def key(row: dict[str, Any]) -> Key:
    return row["bench"], row["subject"], row["metric"], row.get("producers")


def verdict(old: float | None, new: float | None, unit: str, same: float) -> str:
    if old is None or new is None or old == 0:
        return ""
    change = new / old
    if abs(change - 1) <= same:
        return "same"
    better = change > 1 if unit in HIGHER_IS_BETTER else change < 1
    return "better" if better else "WORSE"


def ratio_text(row: dict[str, Any] | None) -> str:
    if row is None or row.get("ratio") is None:
        return ""
    text = f"{fmt(row['ratio'])}x {row['reference']}"
    for ref, r in row.get("ratios_vs", {}).items():
        text += f", {fmt(r['ratio'])}x {ref}"
    return text


def describe(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    kind = "quick" if doc.get("quick") else "full"
    only = f" (only {', '.join(doc['only'])})" if doc.get("only") else ""
    load_avg = m.get("load_avg_at_start", "?")
    return (
        f"{kind} run{only} of {doc.get('date', '?')}, commit {m.get('git_commit', '?')}, "
        f"load at start {load_avg}"
    )


def merged_order(old: list[Key], new: list[Key]) -> list[Key]:
    """The new run's rows in its order; a row only the old run has goes after the row
    it followed there (so it stays within its benchmark)."""
    keys = list(new)
    seen = set(new)
    for i, k in enumerate(old):
        if k in seen:
            continue
        pos = 0
        for prev in reversed(old[:i]):
            if prev in seen:
                pos = keys.index(prev) + 1
                break
        keys.insert(pos, k)
        seen.add(k)
    return keys


def compare_rows(old: dict[str, Any], new: dict[str, Any], same: float) -> list[list[str]]:
    old_rows = {key(r): r for r in old["rows"]}
    new_rows = {key(r): r for r in new["rows"]}
    keys = merged_order(list(old_rows), list(new_rows))
    cells = [
        [
            "bench",
            "subject",
            "N",
            "metric",
            "unit",
            "old",
            "new",
            "new/old",
            "",
            "old ratio (ref)",
            "new ratio (ref)",
        ]
    ]
    for k in keys:
        o, n = old_rows.get(k), new_rows.get(k)
        row = o if o is not None else n
        assert row is not None
        ov = None if o is None else o.get("value")
        nv = None if n is None else n.get("value")
        change = f"{nv / ov:.2f}" if ov and nv is not None else ""
        cells.append(
            [
                k[0],
                k[1],
                "" if k[3] is None else str(k[3]),
                k[2],
                row["unit"],
                _value(o),
                _value(n),
                change,
                verdict(ov, nv, row["unit"], same),
                ratio_text(o),
                ratio_text(n),
            ]
        )
    return cells


def _value(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row.get("skipped") is not None:
        return "skipped"
    return fmt(row.get("value"))


def compare_targets(old: dict[str, Any], new: dict[str, Any]) -> list[list[str]]:
    old_t = {t["target"]: t for t in old.get("targets", [])}
    new_t = {t["target"]: t for t in new.get("targets", [])}
    texts = list(old_t) + [t for t in new_t if t not in old_t]
    cells = [["target", "old", "new"]]
    for text in texts:
        cells.append([text, _status(old_t.get(text)), _status(new_t.get(text))])
    return cells


def _status(t: dict[str, Any] | None) -> str:
    if t is None:
        return "-"
    return t["status"] if t["value"] is None else f"{t['status']} ({fmt(t['value'])})"


def report(old_path: Path, new_path: Path, *, markdown: bool = False, same: float = 0.10) -> str:
    old, new = load(old_path), load(new_path)
    lines = [
        f"old: {old_path}: {describe(old)}",
        f"new: {new_path}: {describe(new)}",
    ]
    if bool(old.get("quick")) != bool(new.get("quick")):
        lines.append("warning: one run is quick, the other full: their sizes differ")
    lines += ["", render(compare_rows(old, new, same), markdown=markdown), ""]
    lines += [render(compare_targets(old, new), markdown=markdown)]
    for label, doc in (("old", old), ("new", new)):
        for f in doc.get("failures", []):
            lines.append(f"{label} run FAILED {f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the earlier run's JSON (e.g. results/latest.json)")
    parser.add_argument("new", type=Path, help="the later run's JSON")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    parser.add_argument(
        "--same",
        type=float,
        default=0.10,
        help="a relative change up to this is shown as 'same' (default 0.10)",
    )
    args = parser.parse_args(argv)
    sys.stdout.write(report(args.old, args.new, markdown=args.markdown, same=args.same))
    return 0


if __name__ == "__main__":
    sys.exit(main())
