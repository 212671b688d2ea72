"""Per-method micro-benchmarks: the speed of one method's own tensor functions on a large batch.

Every other file in this folder holds one method's cases: ``METHOD`` (the method's name; its plugin
module ``grpo_plugin_<METHOD>`` must be installed, else the file is skipped) and
``benchmark_cases(quick) -> list[dict]``, each case a dict with ``case`` (label), ``size`` (what the
inputs are), ``run`` (a callable timed as is), and optionally ``repeats`` (overrides ``--repeats``,
for slow reference solvers) and ``note`` (a correctness or workload figure shown next to the time).
Adding a method's benchmark is adding one file here.

    python benchmarks/methods/run.py                    # every method, full sizes, 1 torch thread
    python benchmarks/methods/run.py --quick            # small sizes, for a smoke run
    python benchmarks/methods/run.py --methods gtpo     # one method

Each case runs once to warm up, then ``repeats`` times; reported are the best wall time and the best
process CPU time (with one torch thread that is single-core CPU time, stable on a shared machine).
Writes ``benchmarks/results/methods.json`` and ``methods.md`` (``methods.quick.*`` with ``--quick``)
and prints the headline as one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"


def case_files() -> list[Path]:
    """The method files of this folder (every ``*.py`` but this runner), sorted by name."""
    return sorted(path for path in HERE.glob("*.py") if path.name != Path(__file__).name and not path.name.startswith("_"))


def load_cases(path: Path, quick: bool) -> tuple[str, list[dict]] | None:
    """``(method, cases)`` of one file, or None when the method's plugin is not installed."""
    spec = importlib.util.spec_from_file_location(f"method_benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("grpo_plugin_"):
            print(f"skipped {path.name}: {error.name} is not installed")
            return None
        raise
    return module.METHOD, module.benchmark_cases(quick)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best wall and best process-CPU milliseconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return min(wall) * 1e3, min(cpu) * 1e3


def run(quick: bool, repeats: int, methods: list[str] | None) -> dict:
    results = []
    for path in case_files():
        if methods and path.stem not in methods:
            continue
        loaded = load_cases(path, quick)
        if loaded is None:
            continue
        method, cases = loaded
        for case in cases:
            case_repeats = case.get("repeats", repeats)
            wall_ms, cpu_ms = timed(case["run"], case_repeats)
            row = {"method": method, "case": case["case"], "size": case["size"], "wall_ms": wall_ms, "cpu_ms": cpu_ms,
                   "repeats": case_repeats, "note": case.get("note", "")}
            print(f"{method:12s} {case['case']:48s} wall {wall_ms:9.2f} ms  cpu {cpu_ms:9.2f} ms  {row['note']}", flush=True)
            results.append(row)
    return {
        "benchmark": "methods",
        "mode": "quick" if quick else "full",
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": "cpu"},
        "command": "python benchmarks/methods/run.py" + (" --quick" if quick else "")
        + ("" if torch.get_num_threads() == 1 else f" --threads {torch.get_num_threads()}"),
        "repeats": repeats,
        "results": results,
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Per-method micro-benchmarks",
        "",
        f"`{report['command']}` on {m['device']} ({m['processor']}), torch {m['torch']}, torch threads: {m['threads']}; "
        f"best of {report['repeats']} runs after a warm-up (fewer where the repeats column says so). "
        "Each method's cases are in `benchmarks/methods/<method>.py`.",
        "",
        "| method | case | size | wall ms | CPU ms | repeats | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['method']} | {r['case']} | {r['size']} | {r['wall_ms']:.2f} | {r['cpu_ms']:.2f} | "
                     f"{r['repeats']} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and 2 repeats, for a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5, 2 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a shared machine)")
    parser.add_argument("--methods", nargs="+", help="only these methods (file names in benchmarks/methods/)")
    args, _ = parser.parse_known_args()  # run_all.py passes the same options to every benchmark
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    report = run(args.quick, repeats, args.methods)
    stem = "methods.quick" if args.quick else "methods"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    slowest = max(report["results"], key=lambda r: r["cpu_ms"], default=None)
    headline = {"benchmark": "methods", "mode": report["mode"], "cases": len(report["results"]),
                "methods": sorted({r["method"] for r in report["results"]}),
                "slowest": None if slowest is None else f"{slowest['method']}: {slowest['case']} ({slowest['cpu_ms']:.1f} ms CPU)"}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
