"""The benchmarks run (smoke mode: tiny models, one repeat); no timing is asserted, only that every figure is produced
and that the cross-checks inside them hold (kdnb's loss = TextBrewer's on the same batch, trimming leaves logits equal)."""
import json, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def test_bench_kd_smoke(tmp_path):
    pytest.importorskip("textbrewer", reason="TextBrewer is not installed: pip install -e '.[bench]'")
    out = tmp_path / "kd"
    p = subprocess.run([sys.executable, "bench/bench_kd.py", "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "kd.json").read_text())
    assert set(r["kd"]) == {"2 layers, width 64", "2 layers, width 32"}   # same width (no W) and half width (W)
    for s in r["kd"].values():
        assert {"floor", "kdnb", "textbrewer"} <= set(s["median"]) and all(v > 0 for v in s["median"].values())
        m = s["median"]   # the ratios are of these medians
        assert s["kdnb_over_floor"] == pytest.approx(m["kdnb"] / m["floor"])
        assert s["kdnb_over_textbrewer"] == pytest.approx(m["kdnb"] / m["textbrewer"])
        lc = s["loss_check"]   # same loss definition, same W: the two libraries agree to float precision
        assert lc["kdnb"] == pytest.approx(lc["textbrewer"], rel=1e-5) and lc["kdnb"] > 0
        assert {"floor", "kdnb", "textbrewer"} <= set(s["memory"])
    for t in r["trim"].values():
        assert t["vocab"]["trimmed"] < t["vocab"]["full"] and t["params"]["trimmed"] < t["params"]["full"]
        assert t["max_abs_logit_diff"] <= 1e-5 and set(t["speedup"]) == {"kdnb", "foreach"}
    inf = r["inference"]
    assert inf["params"]["student"] < inf["params"]["teacher"]
    assert inf["student_over_teacher"] == pytest.approx(inf["median"]["student"] / inf["median"]["teacher"])
    md = (out / "kd.md").read_text()
    for head in ("kdnb / TextBrewer", "Peak memory", "Vocabulary trimming", "Student / teacher latency", "Machine:"):
        assert head in md

def test_bench_loss_runs():
    p = subprocess.run([sys.executable, "bench/bench_loss.py", "--repeats", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [l for l in p.stdout.splitlines() if "same loss" in l]
    assert len(lines) == 3 and all(l.endswith("same loss: True") for l in lines), p.stdout

def test_bench_grid_smoke(tmp_path):
    "The grid-throughput benchmark runs both splits (1 worker x 2 threads, 2 workers x 1 thread) of 4 tiny runs, measures the process tree, and the splits agree on every metric."
    out = tmp_path / "grid"
    p = subprocess.run([sys.executable, "bench/bench_grid.py", "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "grid.json").read_text())
    assert [(s["workers"], s["threads"]) for s in r["splits"]] == [(1, 2), (2, 1)]
    for s in r["splits"]:
        assert s["runs"] == 4 and len(s["metrics"]) == 4
        assert s["runs_per_hour"] == pytest.approx(4 / s["wall_seconds"] * 3600, rel=0.01)
        assert 0 < s["cpu_seconds"] and s["utilisation"] == pytest.approx(s["cpu_seconds"] / (s["wall_seconds"] * r["cores"]), rel=0.02)
    two = r["splits"][1]
    # the process tree is measured: with workers, the top process (the scheduler) is only part of the CPU time
    assert two["cpu_seconds"] > two["top_cpu_seconds"] + 1 and r["splits"][0]["cpu_seconds"] >= r["splits"][0]["top_cpu_seconds"]
    assert r["same_metrics"] is True and r["splits"][0]["metrics"] == two["metrics"]
    assert r["differ"] == 0 and r["same_threads_agree"] is True
    for s in r["splits"]:   # the store's timeline covers the grid: seconds with 0, 1, 2 runs going
        t = s["timeline"]
        assert len(t["going"]) == s["workers"] + 1 and sum(t["going"]) == pytest.approx(s["grid_seconds"], abs=0.1)
        assert 0 <= t["first_start"] < s["grid_seconds"] and 0 <= t["last_finish"] < s["grid_seconds"]
    assert two["timeline"]["going"][2] > 0, two["timeline"]   # two workers trained at once
    md = (out / "grid.md").read_text()
    assert "runs/hour" in md and "| 2 x 1 |" in md and "Same metrics in every split (4 decimals): True" in md

def test_bench_grid_compares_metrics_by_threads():
    "A different worker count must leave every metric as it was (else exit 1); a different thread count may change some."
    sys.path.insert(0, str(ROOT / "bench"))
    try: import bench_grid
    finally: sys.path.remove(str(ROOT / "bench"))
    split = lambda w, t, m: dict(workers=w, threads=t, metrics=m)
    a, b = {"r1": [0.5, 0.4], "r2": [0.7, 0.6]}, {"r1": [0.5, 0.4], "r2": [0.7, 0.65]}
    assert bench_grid.compare_metrics([split(1, 2, a), split(2, 1, a)]) == dict(same_metrics=True, differ=0, same_threads_agree=True)
    assert bench_grid.compare_metrics([split(1, 2, a), split(2, 1, b)]) == dict(same_metrics=False, differ=1, same_threads_agree=True)
    r = bench_grid.compare_metrics([split(1, 4, a), split(4, 1, a), split(2, 1, b)])   # 4 x 1 and 2 x 1: same threads, other metrics
    assert r == dict(same_metrics=False, differ=1, same_threads_agree=False)
    assert bench_grid.compare_metrics([split(2, 1, a), split(2, 1, dict(a, r3=[0.1, 0.1]))])["same_threads_agree"] is False
    r = dict(grid="g", machine="m", cores=2, python="3", splits=[dict(split(2, 1, b), runs=2, wall_seconds=1., runs_per_hour=7200.,
             cpu_seconds=2., utilisation=1., timeline=dict(going=[0, 0, 1]), load_before=0.)], same_metrics=False, differ=1,
             same_threads_agree=True)
    assert "(1 runs differ; splits with the same threads per run agree: True)" in bench_grid.report(r)

def test_bench_grid_all_is_the_batch_grid():
    "`--section all` times the grid `kdnb batch` runs: every section's specs of the preset, as the batch registers them."
    sys.path.insert(0, str(ROOT / "bench"))
    try: import bench_grid
    finally: sys.path.remove(str(ROOT / "bench"))
    from kdnb.batch import NOTEBOOKS
    from kdnb.parallel import batch_specs
    from kdnb.paper import section_grid
    everything = bench_grid.grid_specs("all", "demo")
    assert [s.spec_id for s in everything] == [s.spec_id for s in batch_specs(NOTEBOOKS, "demo")]
    assert {s.spec_id for s in section_grid("4.1", "demo")} < {s.spec_id for s in everything}
    assert [s.spec_id for s in bench_grid.grid_specs("4.1", "tiny")] == [s.spec_id for s in section_grid("4.1", "tiny")]

def test_cpu_probe_reads_the_machine():
    "The probe recorded beside timed runs prints its readings as one JSON line."
    p = subprocess.run([sys.executable, "bench/cpu_probe.py", "--seconds", "0.2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["shape"] == [512, 384, 1536] and r["cores"] >= 1 and r["alone"] > 0 and r["all_cores"] > 0


def test_bench_imports_reading_entry_points_are_light():
    "The import benchmark runs, and every entry point that only reads a study loads none of the training stack (the training worker does)."
    p = subprocess.run([sys.executable, "bench/bench_imports.py", "--repeat", "1", "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(r["training worker (reference)"]["heavy"]) >= {"torch", "transformers"}
    for name, v in r.items():
        assert v["seconds"] > 0
        if "reference" not in name: assert v["heavy"] == [], (name, v)

def _eta(*args):
    p = subprocess.run([sys.executable, "bench/bench_eta.py", *args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)

def test_bench_eta_replays_the_recorded_demo():
    "On the recorded demo grid the ETA weighed by work beats the count of runs at every moment both give one."
    rows = _eta("--timeline", "bench/results/demo-batch-native-avx2-2/timeline.json")
    assert len(rows) == 19 and [r["left"] for r in rows] == sorted((r["left"] for r in rows), reverse=True)
    assert all(r["by_count"] is None for r in rows if r["runs_done"] == 0)   # no run finished: a count knows nothing
    assert all(r["by_work"] is not None for r in rows)                        # the teachers' training already counts
    err = lambda est, r: abs(est - r["left"]) / r["left"]
    assert all(err(r["by_work"], r) < err(r["by_count"], r) for r in rows if r["by_count"] is not None)
    import statistics   # 17% in BENCHMARKS.md; every run and teacher weighed alike (no run_cost) gives 194%
    assert statistics.median(err(r["by_work"], r) for r in rows) < 0.25

def test_bench_eta_reads_a_store(tmp_path):
    "`--study` reads a store's finished runs into a timeline that `--timeline` replays alike."
    sys.path.insert(0, str(ROOT))
    from kdnb.spec import Spec
    from kdnb.store import Store
    specs = [Spec(model="tiny-xlmr", dataset="demo-intent", init="from-scratch", kd=False, seed=i, max_steps=2 * (i + 1),
                  train_sample=8, eval_steps=1, batch_size=4, max_length=16) for i in range(3)]
    st = Store(tmp_path/"study"); st.register(specs)
    for s in specs: st.claim(s.spec_id); st.finish(s.spec_id, {"dev_f1": 0.5})
    rows = _eta("--study", str(tmp_path/"study"), "--save", str(tmp_path/"t.json"), "--lead", "0.1")
    saved = json.loads((tmp_path/"t.json").read_text())
    assert [r["key"] for r in saved] == [s.spec_id for s in specs] and all(r["kind"] == "run" for r in saved)
    assert _eta("--timeline", str(tmp_path/"t.json"), "--lead", "0.1") == rows and rows[-1]["runs"] == 3
