"""Grid throughput: one grid run with 1 worker x N threads, N workers x 1 thread (and other splits of the cores on
larger machines), as runs per hour and CPU utilisation of the process tree. Run on demand; results go to
BENCHMARKS.md by hand.

    python bench/bench_grid.py --out bench/results             # the tiny grid (section 4.1, preset tiny: 13 runs)
    python bench/bench_grid.py --demo --out bench/results      # the demo grid (section 4.1, preset demo) (~25 min on 2 cores)
    python bench/bench_grid.py --smoke --out /tmp/grid-smoke   # 4 tiny runs, 1x2 and 2x1: checks the benchmark runs
    python bench/bench_grid.py --demo --section all --splits 2x1 1x2 --out bench/results   # the whole grid of `kdnb batch --preset demo` (~35 min)

Each split runs the whole grid, teachers included, into a fresh study folder in a child process: with W > 1 workers
that is `kdnb.parallel.run_parallel` (a scheduler and W worker processes of T threads), with W = 1 the sequential
`run_grid` in one process of T threads (what kdnb does for workers=1). The CPU time of the whole process tree is the
RUSAGE_CHILDREN of this process (a child's count includes the workers it waited for); utilisation is CPU seconds /
(wall seconds x cores). Splits run one after the other, so a shared machine's load shifts them all; the load
average is recorded. The metrics of the splits are compared (to 4 decimals): splits with the same threads per run must
agree (the number of workers changes the speed, not the results; exit code 1 if not), while one thread against two may
change a run's sums and so its metrics (counted and reported). Writes `grid.json` and `grid.md` to `--out`.
"""
from __future__ import annotations
import argparse, json, os, platform, resource, subprocess, sys, tempfile, textwrap, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kdnb.paper import section_grid
from kdnb.parallel import batch_specs, cpu_cores
from kdnb.batch import NOTEBOOKS

CHILD = """
import json, os, resource, sys, time
import torch
torch.set_num_threads({threads})
from kdnb.spec import Spec
from kdnb.runner import run_grid
from kdnb.parallel import run_parallel
specs = [Spec.from_json(s) for s in json.load(open({specs!r}))]
t0 = time.time()
if {workers} == 1: df = run_grid(specs, {study!r}, progress=False, workers=1)
else: df = run_parallel(specs, {study!r}, workers={workers}, threads={threads}, progress=False)
me = resource.getrusage(resource.RUSAGE_SELF)
print("RESULT " + json.dumps(dict(seconds=time.time() - t0, t0=t0, t1=time.time(), status=sorted(set(df.status)), own_cpu=me.ru_utime + me.ru_stime,
      metrics={{r.spec_id: [round(r.dev_f1, 4), round(r.test_f1, 4), int(r.best_step)] for r in df.itertuples()}})))
"""


def _cpu_children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _machine() -> str:
    "The CPU's name, family and model, the vector extensions torch uses, and the ISA limits set in the environment."
    info = {}
    if Path("/proc/cpuinfo").exists():
        for l in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = l.partition(":")
            info.setdefault(k.strip(), v.strip())
    import torch
    isa = torch.backends.cpu.get_cpu_capability()
    limits = ", ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ)
    return (f"{info.get('model name', platform.processor())} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}"
            f"{', AVX-512' if 'avx512f' in info.get('flags', '') else ''}); torch CPU capability {isa}" + (f" ({limits})" if limits else ""))


def timeline(study:Path, t0:float, t1:float, workers:int) -> dict:
    "Seconds of the grid (from `t0` to `t1`) with 0, 1, ... `workers` runs going, read from the store's start and finish times."
    import sqlite3
    con = sqlite3.connect(study/"results.sqlite")
    iv = [r for t in ("teachers", "runs") for r in con.execute(f"SELECT started_at, finished_at FROM {t}") if None not in r]
    con.close()
    going, n, last = [0.0] * (workers + 1), 0, t0
    for t, d in sorted([(a, 1) for a, _ in iv] + [(b, -1) for _, b in iv]):
        going[min(n, workers)] += t - last   # a teacher trained inside its first student's run (1 worker) counts once
        n, last = n + d, t
    going[0] += t1 - last
    return dict(first_start=round(min(a for a, _ in iv) - t0, 2), last_finish=round(t1 - max(b for _, b in iv), 2),
                going=[round(g, 2) for g in going])


def run_split(specs, workers:int, threads:int, tmp:Path) -> dict:
    "Run `specs` with `workers` x `threads` in a child process tree; wall time, CPU time and the metrics."
    study = tmp/f"study-{workers}x{threads}"
    sp = tmp/"specs.json"
    sp.write_text(json.dumps([s.to_json() for s in specs]))
    code = textwrap.dedent(CHILD.format(threads=threads, workers=workers, specs=str(sp), study=str(study)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if hasattr(os, "sync"): os.sync()   # the previous split's writes (a model per run, GBs) go to disk now, not during this one
    load, cpu0, t0 = os.getloadavg()[0], _cpu_children(), time.time()
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    wall, cpu = time.time() - t0, _cpu_children() - cpu0
    if p.returncode != 0: raise RuntimeError(f"split {workers}x{threads} failed:\n{p.stderr[-3000:]}")
    res = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))[7:])
    if res["status"] != ["done"]: raise RuntimeError(f"split {workers}x{threads}: not every run finished ({res['status']})")
    cores = cpu_cores()
    return dict(workers=workers, threads=threads, runs=len(specs), wall_seconds=round(wall, 2), grid_seconds=round(res["seconds"], 2),
                runs_per_hour=round(len(specs) / wall * 3600, 1), cpu_seconds=round(cpu, 2), top_cpu_seconds=round(res["own_cpu"], 2),
                utilisation=round(cpu / (wall * cores), 3), load_before=round(load, 2), metrics=res["metrics"],
                timeline=timeline(study, res["t0"], res["t1"], workers))


def grid_specs(section:str, preset:str) -> list:
    "The specs of a section's grid, or with `all` those `kdnb batch --preset` runs (every section's)."
    return batch_specs(NOTEBOOKS, preset) if section == "all" else section_grid(section, preset)


def splits_for(cores:int) -> list[tuple[int, int]]:
    "1 worker x all cores, all cores x 1 thread, and halves in between on larger machines."
    out = [(1, cores), (max(2, cores), 1)]
    w = cores // 2
    while w >= 2:
        if cores % w == 0 and (w, cores // w) not in out: out.append((w, cores // w))
        w //= 2
    return out


def report(r:dict) -> str:
    rows = "\n".join(f"| {s['workers']} x {s['threads']} | {s['runs']} | {s['wall_seconds']:.1f} | {s['runs_per_hour']:.0f} | "
                     f"{s['cpu_seconds']:.1f} | {100 * s['utilisation']:.0f}% | {' / '.join(f'{g:.0f}' for g in s['timeline']['going'])} | "
                     f"{s['load_before']:.2f} |" for s in r["splits"])
    best = max(r["splits"], key=lambda s: s["runs_per_hour"])
    return (f"# Grid throughput: {r['grid']}\n\nMachine: {r['machine']} ({r['cores']} usable cores), Python {r['python']}.\n\n"
            "| workers x threads | runs | wall s | runs/hour | CPU s (process tree) | CPU utilisation | s with 0 / 1 / ... runs going | load before |\n"
            "|---|---|---|---|---|---|---|---|\n" + rows +
            f"\n\nFastest: {best['workers']} x {best['threads']}. Same metrics in every split (4 decimals): {r['same_metrics']}"
            + ("" if r["same_metrics"] else f" ({r['differ']} runs differ; splits with the same threads per run agree: "
               f"{r['same_threads_agree']})") + ".\n")


def compare_metrics(splits:list) -> dict:
    "Which runs' metrics differ between splits: a different worker count must not change them; a different thread count may."
    differ = sorted({k for s in splits for k in s["metrics"] if any(o["metrics"].get(k) != s["metrics"][k] for o in splits)})
    same_threads = [(a, b) for i, a in enumerate(splits) for b in splits[i + 1:] if a["threads"] == b["threads"]]
    return dict(same_metrics=not differ, differ=len(differ),   # torch's CPU kernels split their sums by thread
                same_threads_agree=all(a["metrics"] == b["metrics"] for a, b in same_threads))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="4 runs of the tiny grid, splits 1x2 and 2x1: checks the benchmark runs")
    ap.add_argument("--demo", action="store_true", help="the demo preset's grid instead of the tiny one (long)")
    ap.add_argument("--section", default="4.1", help="the paper section whose grid is run (default: 4.1), or `all`: the grid of "
                    "`kdnb batch` for the preset, every section's runs")
    ap.add_argument("--splits", nargs="+", default=None, metavar="WxT", help="splits to run, e.g. 1x2 2x1 (default: from the cores)")
    ap.add_argument("--out", default="bench/results", help="folder for grid.json and grid.md")
    a = ap.parse_args(argv)
    preset = "demo" if a.demo else "tiny"
    specs = grid_specs(a.section, preset)
    if a.smoke: specs = specs[:4]
    cores = cpu_cores()
    splits = ([tuple(map(int, s.lower().split("x"))) for s in a.splits] if a.splits else
              [(1, 2), (2, 1)] if a.smoke else splits_for(cores))
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = []
        for w, t in splits:
            print(f"{w} worker(s) x {t} thread(s): {len(specs)} runs ...", flush=True)
            done.append(run_split(specs, w, t, Path(tmp)))
            print(f"  {done[-1]['wall_seconds']:.1f} s, {done[-1]['runs_per_hour']:.0f} runs/hour, "
                  f"CPU utilisation {100 * done[-1]['utilisation']:.0f}%", flush=True)
    cpu = _machine()
    r = dict(grid=("every section (the batch's grid)" if a.section == "all" else f"section {a.section}") + f", preset {preset}" + (" (first 4 runs)" if a.smoke else ""), cores=cores, machine=cpu,
             python=platform.python_version(), splits=done, **compare_metrics(done))
    (out/"grid.json").write_text(json.dumps(r, indent=1))
    (out/"grid.md").write_text(report(r))
    print(report(r))
    if not r["same_threads_agree"]:
        print("bench_grid: splits with the same threads per run gave different metrics: the number of workers changed "
              "the results", file=sys.stderr); return 1
    if r["differ"]: print(f"bench_grid: {r['differ']} of {len(specs)} runs differ between splits with different threads per "
                          "run (torch's CPU kernels split their sums by thread; each thread count is reproducible)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
