"""Run the qdash_mp benchmark suite: ``python benchmarks/run.py [--quick] [--only NAME...]``.

``run.py --compare OLD.json NEW.json`` runs nothing and prints two runs side by side.

Progress goes to stderr; the table (median, min-max over repeats, paired ratio to the
reference row) and the targets (met / not met) go to stdout; the rows go to
``benchmarks/results/latest.json`` and a dated copy. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_durable_failed
import bench_filter
import bench_hook
import bench_hub
import bench_hub_failed
import bench_hub_view
import bench_ingest
import bench_integrations
import bench_memory
import bench_scale
import bench_sse
from _common import BENCH_DIR, Config, Row, Target, machine_info, progress

BENCHES = {
    "hook": bench_hook.run,
    "ingest": bench_ingest.run,
    "durable_failed": bench_durable_failed.run,
    "scale": bench_scale.run,
    "memory": bench_memory.run,
    "integrations": bench_integrations.run,
    "sse": bench_sse.run,
    "hub": bench_hub.run,
    "hub_view": bench_hub_view.run,
    "hub_failed": bench_hub_failed.run,
    "filter": bench_filter.run,
}

TARGETS = [
    *[
        Target("filter", "qdash_mp", m, "<=", 50.0, f"filter: {m} page <= 50 ms at 1M")
        for m in ("unfiltered", "queue", "name", "text_common", "text_rare", "combined")
    ],
    Target(
        "hub",
        "qdash_mp_10k",
        "redis_commands_per_s",
        "<=",
        2.0,
        "hub: <= 2 Redis commands/s per collector at 10k jobs/s",
    ),
    Target(
        "hub",
        "qdash_mp_1M",
        "redis_commands_per_s",
        "<=",
        2.0,
        "hub: <= 2 Redis commands/s per collector at 1M jobs/s (the same as at 10k)",
    ),
    Target("hook", "qdash_mp", "ns/call", "<=", 2.0, "hook: qdash_mp <= 2x dict", field="ratio"),
    Target(
        "hook",
        "qdash_mp_no_collector",
        "ns/call",
        "<=",
        2.0,
        "hook, no collector: qdash_mp <= 2x dict",
        field="ratio",
    ),
    Target(
        "hook",
        "qdash_mp_spool",
        "ns/call",
        "<=",
        2.0,
        "hook, no collector, spooling: qdash_mp <= 2x dict",
        field="ratio",
    ),
    Target(
        "ingest",
        "qdash_mp",
        "hooks/s",
        ">=",
        10e6,
        "ingest, 4 producers: >= 10M hooks/s exact",
        producers=4,
    ),
    Target(
        "ingest",
        "qdash_mp",
        "hooks/s",
        ">=",
        50.0,
        "ingest, 4 producers: >= 50x redis_pipeline",
        field="ratio",
        producers=4,
    ),
    Target(
        "ingest",
        "qdash_mp",
        "collector_core_pct",
        "<=",
        5.0,
        "ingest, 4 producers: collector <= 5% of a core per 10M hooks/s",
        producers=4,
    ),
    Target(
        "durable_failed",
        "qdash_mp",
        "records/s",
        ">=",
        300e3,
        "durable_failed: >= 300k records/s",
        producers=4,
    ),
    Target(
        "durable_failed",
        "qdash_mp",
        "records/s",
        ">=",
        1.5,
        "durable_failed: >= 1.5x sqlite_wal_full (fsync at every commit)",
        field="ratio",
        producers=4,
        reference="sqlite_wal_full",
    ),
    Target(
        "durable_failed",
        "qdash_mp",
        "records/s",
        ">=",
        1.0,
        "durable_failed: >= 1.0x sqlite_wal_batch (synchronous=NORMAL)",
        field="ratio",
        producers=4,
    ),
    Target(
        "durable_failed",
        "qdash_mp",
        "ack_p99",
        "<=",
        5.0,
        "durable_failed: ack p99 <= 5 ms at 10k/s",
        producers=4,
    ),
    Target("scale", "qdash_mp", "page_first_api", "<=", 20.0, "scale: first page <= 20 ms"),
    Target("scale", "qdash_mp", "page_deep_api", "<=", 20.0, "scale: deep page <= 20 ms"),
    Target("scale", "qdash_mp", "page_first_html", "<=", 20.0, "scale: first page (HTML) <= 20 ms"),
    Target("scale", "qdash_mp", "page_deep_html", "<=", 20.0, "scale: deep page (HTML) <= 20 ms"),
    Target(
        "scale",
        "qdash_mp",
        "recovery_collector",
        "<=",
        5.0,
        "scale: recovery (start->ready) <= 5 s",
    ),
    Target("scale", "qdash_mp", "index_bytes_per_job", "<=", 200.0, "scale: <= 200 B/job"),
    Target(
        "scale",
        "qdash_mp",
        "api_stats_1000q",
        "<=",
        2.0,
        "scale: /api/stats <= 2 ms at 1,000 queues",
    ),
    Target(
        "scale",
        "qdash_mp",
        "overview_1000q",
        "<=",
        20.0,
        "scale: overview (HTML) <= 20 ms at 1,000 queues",
    ),
    # issue 9: job lifecycle data
    Target(
        "hook",
        "qdash_mp_runtime",
        "ns/call",
        "<=",
        2.0,
        "hook: on_processed(q, runtime=) <= 2x dict",
        field="ratio",
    ),
    Target(
        "hook", "qdash_mp", "ns/call", "<=", 1.5, "hook: plain hook <= 1.5x dict", field="ratio"
    ),
    Target(
        "ingest",
        "qdash_mp_runtime",
        "hooks/s",
        ">=",
        10e6,
        "ingest with runtimes, 4 producers: >= 10M hooks/s exact",
        producers=4,
    ),
    # issue 10: one SSE stream for every viewer
    Target(
        "sse",
        "sse_fanout",
        "collector_core_pct",
        "<=",
        10.0,
        "sse: 1,000 viewers at 1 update/s <= 10% of a core",
        producers=1000,
    ),
    Target(
        "sse",
        "polling",
        "collector_core_pct",
        ">=",
        1.0,
        "sse: polling /api/stats costs more than the SSE fan-out",
        field="ratio",
        producers=1000,
    ),
    # issue 12: adapters cost <= 5% of the library's own per-task cost
    Target(
        "integrations",
        "celery_qdash",
        "per_task",
        "<=",
        1.05,
        "integrations: celery with the adapter <= 1.05x without",
        field="ratio",
    ),
    Target(
        "integrations",
        "rq_qdash",
        "per_task",
        "<=",
        1.05,
        "integrations: rq with the adapter <= 1.05x without",
        field="ratio",
    ),
    Target(
        "integrations",
        "dramatiq_qdash",
        "per_task",
        "<=",
        1.05,
        "integrations: dramatiq with the adapter <= 1.05x without",
        field="ratio",
    ),
    Target(
        "integrations",
        "arq_qdash",
        "per_task",
        "<=",
        1.05,
        "integrations: arq with the adapter <= 1.05x without",
        field="ratio",
    ),
    Target(
        "integrations",
        "huey_qdash",
        "per_task",
        "<=",
        1.05,
        "integrations: huey with the adapter <= 1.05x without",
        field="ratio",
    ),
    Target(
        "integrations",
        "taskiq_qdash",
        "per_task",
        "<=",
        1.05,
        "integrations: taskiq with the adapter <= 1.05x without",
        field="ratio",
    ),
    Target(
        "integrations",
        "celery_qdash",
        "per_task",
        "<=",
        1.0,
        "integrations: celery adapter costs no more than celery -E events",
        field="ratio",
        reference="celery_events",
    ),
    # issue 13: the Redis hub (dashboard side)
    *[
        Target(
            "hub_failed",
            subject,
            "api_failed_ms",
            "<=",
            50.0,
            f"hub: a failed page with {what} <= 50 ms at 100k failed jobs",
            producers=100_000,
        )
        for subject, what in (
            ("hub_failed_queue", "queue="),
            ("hub_failed_text", "q="),
            ("hub_failed_host_queue", "host= and queue="),
            ("hub_failed_live", "queue= while the host publishes"),
        )
    ],
    Target(
        "hub_view",
        "hub_stats_live",
        "api_stats_ms",
        "<=",
        5.0,
        "hub: /queues/api/stats at 10 hosts x 100 queues <= 5 ms while all publish",
        producers=1000,
    ),
    Target(
        "hub_view",
        "hub_stats_static",
        "api_stats_ms",
        "<=",
        5.0,
        "hub: /queues/api/stats at 10 hosts x 100 queues <= 5 ms",
        producers=1000,
    ),
    Target(
        "hub_view",
        "qdash_mp",
        "redis_ops_per_s",
        "<=",
        0.05,
        "hub: Redis ops/s <= 1/20 of Sidekiq-style per-job HINCRBY",
        field="ratio",
    ),
    Target(
        "hub_view",
        "qdash_mp",
        "worker_cpu_pct",
        "<=",
        1.0,
        "hub: worker CPU no more than Sidekiq-style per-job HINCRBY",
        field="ratio",
    ),
]


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    ax = abs(x)
    if ax >= 1e9:
        return f"{x / 1e9:.2f}G"
    if ax >= 1e6:
        return f"{x / 1e6:.2f}M"
    if ax >= 1e4:
        return f"{x / 1e3:.0f}k"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if 0 < ax < 0.1:
        return f"{x:.2g}"  # e.g. CPU seconds per million hooks: 0.0028
    return f"{x:.2f}"


def table(rows: list[Row]) -> list[list[str]]:
    out = [["bench", "subject", "N", "metric", "median", "min-max", "unit", "ratio (ref)", "n"]]
    for r in rows:
        if r.skipped is not None:
            out.append([r.bench, r.subject, _n(r), r.metric, "skipped", r.skipped, "", "", ""])
            continue
        lo, hi = (min(r.samples), max(r.samples)) if r.samples else (None, None)
        ratio = "" if r.ratio is None else f"{fmt(r.ratio)}x ({r.reference})"
        for ref in r.more_ratios:
            ratio += f", {fmt(r.ratio_to(ref))}x ({ref})"
        out.append(
            [
                r.bench,
                r.subject,
                _n(r),
                r.metric,
                fmt(r.value),
                f"{fmt(lo)}-{fmt(hi)}",
                r.unit,
                ratio,
                str(len(r.samples)),
            ]
        )
    return out


def _n(r: Row) -> str:
    return "" if r.producers is None else str(r.producers)


def render(cells: list[list[str]], markdown: bool = False) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for k, row in enumerate(cells):
        if markdown:
            lines.append(
                "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
            )
            if k == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def target_lines(rows: list[Row], selected: list[str]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        if t.bench not in selected:
            continue
        status, got = t.check(rows)
        out.append({"target": t.text, "status": status, "value": got})
    return out


def markdown_report(doc: dict[str, Any], cells: list[list[str]]) -> str:
    """The run as markdown: when, on what, the table and the targets (for the README)."""
    m = doc["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    lines = [
        f"{'Quick' if doc['quick'] else 'Full'} run of {doc['date']} "
        f"({doc['elapsed_s']:.0f} s), commit {m.get('git_commit', '?')}.",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cpus')} CPUs, {m.get('memory_mb', '?')} MB, "
        f"{m['platform']}, Python {m['python']}; load average at start "
        f"{m['load_avg_at_start']}. Versions: {versions}.",
        "",
        render(cells, markdown=True),
        "",
        "Targets:",
        "",
    ]
    for t in doc["targets"]:
        shown = "" if t["value"] is None else f" (got {fmt(t['value'])})"
        lines.append(f"- **{t['status']}**: {t['target']}{shown}")
    for f in doc["failures"]:
        lines.append(f"- FAILED {f}")
    return "\n".join(lines) + "\n"


README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def update_readme(path: Path, report: str) -> None:
    text = path.read_text()
    head, sep, rest = text.partition(README_START)
    _, sep2, tail = rest.partition(README_END)
    if not sep or not sep2:
        raise SystemExit(f"{path} lacks the {README_START} / {README_END} markers")
    path.write_text(f"{head}{README_START}\n{report}{README_END}{tail}")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds every ExitStack: servers, workers, temp dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (< 60 s in all)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), metavar="NAME")
    parser.add_argument("--keep", action="store_true", help="keep temp dirs (debugging)")
    parser.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results", help="where the JSON results go"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as markdown (for the README)"
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="put this run's table into benchmarks/README.md (between the results markers)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("OLD", "NEW"),
        help="run nothing: print two result JSONs side by side (see compare.py)",
    )
    args = parser.parse_args(argv)
    if args.compare:
        import compare

        return compare.main([*map(str, args.compare), *(["--markdown"] if args.markdown else [])])
    signal.signal(signal.SIGTERM, _terminate)
    cfg = Config(quick=args.quick, keep=args.keep)
    selected = args.only or list(BENCHES)
    started = datetime.now(UTC)
    machine = machine_info()
    progress(
        f"benchmarks {'(quick) ' if cfg.quick else ''}{', '.join(selected)} on "
        f"{machine.get('cpu', '?')} x{machine.get('cpus')}, load {machine['load_avg_at_start']}"
    )
    rows: list[Row] = []
    failures: list[str] = []
    t0 = time.monotonic()
    for name in selected:
        progress(f"== {name}")
        t = time.monotonic()
        try:
            rows += BENCHES[name](cfg)
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            progress(f"!! {name} FAILED: {type(exc).__name__}: {exc}")
        progress(f"== {name} took {time.monotonic() - t:.1f}s")
    elapsed = time.monotonic() - t0
    targets = target_lines(rows, selected)
    cells = table(rows)
    print(render(cells, markdown=args.markdown))
    print()
    print("targets:")
    for line in targets:
        shown = "" if line["value"] is None else f" (got {fmt(line['value'])})"
        print(f"  [{line['status']}] {line['target']}{shown}")
    for f in failures:
        print(f"FAILED {f}")
    print(f"\n{'quick' if cfg.quick else 'full'} run took {elapsed:.0f}s")

    doc = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine,
        "quick": cfg.quick,
        "only": args.only,
        "elapsed_s": round(elapsed, 1),
        "rows": [r.to_json() for r in rows],
        "targets": targets,
        "failures": failures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1) + "\n"
    (args.out / "latest.json").write_text(text)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"{stamp}{'-quick' if cfg.quick else ''}.json").write_text(text)
    report = markdown_report(doc, cells)
    (args.out / "latest.md").write_text(report)
    progress(f"wrote {args.out / 'latest.json'} and latest.md")
    if args.update_readme:
        update_readme(BENCH_DIR / "README.md", report)
        progress("updated benchmarks/README.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
