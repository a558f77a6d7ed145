"""What a process pays before it does anything: the seconds and the heavy packages each of kdnb's entry points imports.
A demo batch starts about a dozen Python processes that only read (the `kdnb` command, two notebook-render workers,
seven notebook kernels); each used to load torch, transformers and datasets, 5-9 s of CPU apiece.

    python bench/bench_imports.py                      # every entry point, 3 fresh processes each (median)
    python bench/bench_imports.py --repeat 1 --json    # one JSON line (what the tests run)

Each entry point runs in a fresh `python -c` (the OS file cache warm after the first); the time is the child's wall
time from start to exit, `heavy` lists which of torch, transformers, datasets, scikit-learn it left in `sys.modules`.
The training worker is the reference: it needs the whole stack.
"""
from __future__ import annotations
import argparse, json, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets", "sklearn")
ENTRY_POINTS = {   # name -> code a process of that kind runs before its own work
    "kdnb --help": "from kdnb.cli import main, parser; parser().format_help()",
    "notebook kernel (report + run_section)": "from kdnb import report as R; from kdnb.runner import run_section",
    "batch render worker": "from kdnb.batch import _render",
    "training worker (reference)": "from kdnb.runner import run_spec; from kdnb.train import distill",
}


def measure(code: str, repeat: int = 3) -> dict:
    "Median wall seconds of `repeat` fresh processes running `code`, and the heavy packages it imported."
    probe = code + f"; import sys, json; print('HEAVY ' + json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    times, heavy = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if p.returncode != 0: raise RuntimeError(f"{code!r} failed:\n{p.stderr[-2000:]}")
        heavy = json.loads(p.stdout.split("HEAVY ")[-1])
    return dict(seconds=round(statistics.median(times), 2), heavy=heavy)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per entry point (median)")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    a = ap.parse_args()
    res = {name: measure(code, a.repeat) for name, code in ENTRY_POINTS.items()}
    if a.json: print(json.dumps(res)); return
    print("| entry point | seconds (median) | heavy packages imported |\n|---|---|---|")
    for name, r in res.items(): print(f"| {name} | {r['seconds']:.2f} | {', '.join(r['heavy']) or 'none'} |")


if __name__ == "__main__":
    main()
