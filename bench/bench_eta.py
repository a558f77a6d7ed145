"""How good is the run bar's ETA: a recorded grid replayed, the time left as each estimate would have said it against
the time that was really left. Run on demand; results go to BENCHMARKS.md by hand.

    python bench/bench_eta.py --study studies/demo --save bench/results/demo-batch-native-avx2-2/timeline.json
    python bench/bench_eta.py --timeline bench/results/demo-batch-native-avx2-2/timeline.json

`--study` reads a finished study's store (every run's and teacher's spec, start and end), `--save` keeps that
timeline (a few dozen KB) so that it can be replayed without the study. At moments spread over the grid the replay
builds what `kdnb.progress.progress` would have read then and compares two estimates of the seconds left:
- by count: the runs still to finish at the average rate runs finished since the watch began (tqdm's ETA with no
  smoothing; the bar used it before `watch` weighed work);
- by work: `kdnb.progress.seconds_left` of the share of `work_costs` done (what `watch(..., specs=...)` shows).
The watch is taken to start `--lead` seconds before the first run (3 s in the demo batch of the timeline above).
"""
from __future__ import annotations
import argparse, json, sqlite3, statistics, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kdnb.spec import Spec
from kdnb.progress import Progress, work_costs, work_done, seconds_left


def read_timeline(study:Path) -> list[dict]:
    "Every finished run and teacher of a study's store: kind, key, spec (JSON), started and finished (epoch seconds)."
    con = sqlite3.connect(f"file:{Path(study)/'results.sqlite'}?mode=ro", uri=True)
    q = "SELECT {k}, spec, started_at, finished_at FROM {t} WHERE status='done' ORDER BY started_at"
    out = [dict(kind=kind, key=k, spec=s, started=a, finished=b)
           for kind, t, key in (("run", "runs", "spec_id"), ("teacher", "teachers", "teacher_key"))
           for k, s, a, b in con.execute(q.format(k=key, t=t))]
    con.close()
    return sorted(out, key=lambda r: r["started"])


def status_at(items:list[dict], t:float) -> Progress:
    "What the store said at time `t`: each item done, running or pending."
    p = Progress()
    for r in items:
        st = "done" if r["finished"] <= t else "running" if r["started"] <= t else "pending"
        p.status[r["key"]] = st
        if r["kind"] == "run": setattr(p, st, getattr(p, st) + 1)
    return p


def replay(items:list[dict], lead:float=3.0, moments:int=19) -> list[dict]:
    "At `moments` times spread over the grid: the seconds left by count, by work, and really."
    specs = {r["key"]: Spec.from_json(r["spec"]) for r in items if r["kind"] == "run"}
    costs = work_costs(list(specs.values()))
    if costs is None: raise SystemExit("the timeline's specs cannot be costed here (their data or model config is missing)")
    t0, end = min(r["started"] for r in items) - lead, max(r["finished"] for r in items)
    p0, rows = status_at(items, t0), []
    for i in range(1, moments + 1):
        t = t0 + (end - t0) * i / (moments + 1)
        p = status_at(items, t)
        n = p.done
        by_count = (p.total - n) * (t - t0) / n if n else None
        by_work = seconds_left(work_done(p0, costs), work_done(p, costs), t - t0)
        rows.append(dict(elapsed=round(t - t0), runs_done=n, runs=p.total, left=round(end - t),
                         by_count=None if by_count is None else round(by_count),
                         by_work=None if by_work is None else round(by_work)))
    return rows


def error(est, left): return None if est is None else 100 * (est - left) / left


def report(rows:list[dict]) -> str:
    "A markdown table of the replay and the median absolute error of each estimate."
    pct = lambda v: "-" if v is None else f"{v:+.0f}%"
    lines = ["| elapsed s | runs done | really left s | by count s (error) | by work s (error) |", "|---|---|---|---|---|"]
    for r in rows:
        c, w = error(r["by_count"], r["left"]), error(r["by_work"], r["left"])
        lines.append(f"| {r['elapsed']} | {r['runs_done']}/{r['runs']} | {r['left']} | "
                     f"{r['by_count'] if r['by_count'] is not None else '-'} ({pct(c)}) | {r['by_work'] if r['by_work'] is not None else '-'} ({pct(w)}) |")
    med = lambda k: statistics.median(abs(e) for r in rows if (e := error(r[k], r["left"])) is not None)
    lines.append(f"\nmedian absolute error: by count {med('by_count'):.0f}%, by work {med('by_work'):.0f}%")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", type=Path, help="a finished study folder (its results.sqlite)")
    src.add_argument("--timeline", type=Path, help="a timeline saved with --save")
    ap.add_argument("--save", type=Path, help="write the study's timeline here (JSON)")
    ap.add_argument("--lead", type=float, default=3.0, help="seconds the watch ran before the first run started")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    a = ap.parse_args(argv)
    items = read_timeline(a.study) if a.study else json.loads(a.timeline.read_text())
    if a.save: a.save.write_text(json.dumps(items, indent=0))
    rows = replay(items, a.lead)
    print(json.dumps(rows) if a.json else report(rows))


if __name__ == "__main__":
    main()
