"""Integration tests of kdnb.parallel: worker processes on one study store give the results of a sequential run,
train each teacher once before its students, and survive a worker killed with SIGKILL (its spec is taken over and
every spec is done exactly once), while `kdnb list --all` reads the store from another process."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest

from kdnb.spec import Spec, grid
from kdnb.store import Store, results
from kdnb.runner import run_grid
from kdnb.progress import progress

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
BASE = dict(model="tiny-xlmr", dataset="demo-intent", train_languages=("de", "en"), test_languages=("de", "en", "fr"),
            train_sample=40, eval_subset=20, batch_size=8, max_length=32, trim=True, max_steps=6, eval_steps=3, seed=0)


@pytest.fixture(scope="module", autouse=True)
def _data():
    from kdnb.loader import load_benchmark
    try: load_benchmark("demo-intent", languages=["en"])
    except Exception as e: pytest.skip(f"the built-in demo data cannot be loaded: {e}")


def test_two_workers_match_one(tmp_path):
    import torch
    torch.set_num_threads(1)
    specs = grid(**BASE, init=["teacher", "from-teacher", "from-scratch"], kd=[False, True]) + \
            grid(**{**BASE, "seed": 1}, init="from-teacher", kd=True)          # 6 specs, 2 teachers (+1 below)
    longest = Spec(**{**BASE, "max_steps": 12, "eval_steps": 4}, init="from-scratch", kd=False)   # twice the steps, no teacher
    specs.append(longest)   # last in the grid: the scheduler starts it first (longest first)
    one = run_grid(specs, tmp_path/"one", progress=False, workers=1)
    two = run_grid(specs, tmp_path/"two", progress=False, workers=2)
    cols = ["spec_id", "label", "dev_f1", "test_f1", "best_step", "status"]
    assert list(two.spec_id) == [s.spec_id for s in specs] and set(two.status) == {"done"}
    assert one[cols].round(4).equals(two[cols].round(4))                   # same metrics to the printed precision
    assert [d == e for d, e in zip(one.test_f1_by_language, two.test_f1_by_language)] == [True] * len(specs)
    st = Store(tmp_path/"two")
    rows = st.rows()
    assert len({r["owner"] for r in rows}) == 1 and all(r["attempts"] == 1 for r in rows)   # owner cleared when done
    teachers = {t["teacher_key"]: t for t in st.rows("teachers")}
    assert len(teachers) == 2 and all(t["trainings"] == 1 for t in teachers.values())      # each teacher trained once
    for s, r in zip(specs, results(tmp_path/"two").itertuples()):
        if s.uses_teacher:   # a student (and the teacher's own spec) starts only once its teacher is trained
            assert r.started_at.timestamp() >= teachers[s.teacher_key]["finished_at"] - 1e-3
    assert st.integrity() == "ok"
    started = sorted(rows, key=lambda r: r["started_at"])
    assert started[0]["spec_id"] == longest.spec_id, [json.loads(r["spec"]).get("init") for r in started]


SLOW = """
import os, time
LOG = {log!r}
def runner(spec, study_dir, progress=False):
    with open(LOG, "a") as f: f.write(f"start {{spec.spec_id}} {{os.getpid()}}\\n")
    time.sleep(60 if spec.seed == 0 and not os.path.exists(LOG + ".killed") else 0.3)
    with open(LOG, "a") as f: f.write(f"done {{spec.spec_id}} {{os.getpid()}}\\n")
    return dict(dev_f1=0.5, test_f1_by_language={{"en": 0.25 + spec.seed / 100}}, best_step=1)
"""


def test_killed_worker_spec_is_taken_over(tmp_path):
    study, log = tmp_path/"study", tmp_path/"log.txt"
    (tmp_path/"slow_runner.py").write_text(SLOW.format(log=str(log)))
    specs = [Spec(**{**BASE, "init": "from-scratch", "kd": False, "seed": i}) for i in range(5)]
    slow = specs[0]
    script = tmp_path/"grid.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        from slow_runner import runner
        from kdnb.spec import Spec
        from kdnb.runner import run_grid
        specs = [Spec.from_json(s) for s in {[s.to_json() for s in specs]!r}]
        df = run_grid(specs, {str(study)!r}, runner=runner, progress=False, workers=2, poll=0.2)
        assert (df.status == "done").all() and len(df) == len(specs), df
        """))
    p = subprocess.Popen([sys.executable, str(script)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, victim = time.time() + 240, None
    while victim is None:
        assert p.poll() is None, f"the grid ended before a worker could be killed: {p.stderr.read()[-3000:]}"
        assert time.time() < deadline, "the slow spec never started"
        r = Store(study).row(slow.spec_id) if (study/"results.sqlite").exists() else None
        if r and r["status"] == "running" and log.exists() and f"start {slow.spec_id}" in log.read_text():
            victim = int(r["owner"].split(":")[1])
        time.sleep(0.05)
    assert victim != p.pid                                   # the spec runs in a worker process, not the scheduler
    pr = progress(study)
    assert pr.running >= 1 and pr.total == len(specs)
    Path(str(log) + ".killed").write_text("")
    os.kill(victim, signal.SIGKILL)
    lst = subprocess.run([sys.executable, "-c", "import sys; from kdnb.cli import main; sys.exit(main())", "list", str(study),
                          "--all"], env=ENV, capture_output=True, text=True, timeout=120)   # another shell, mid-run
    assert lst.returncode == 0 and f"{len(specs)} rows" in lst.stdout, lst.stdout + lst.stderr
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    assert "a worker died (exit code -9)" in err and "another worker takes it over" in err
    lines = [l.split() for l in log.read_text().splitlines()]
    done = [k for what, k, _ in lines if what == "done"]
    assert sorted(done) == sorted(s.spec_id for s in specs)                      # every spec done exactly once
    starts = [pid for what, k, pid in lines if what == "start" and k == slow.spec_id]
    assert len(starts) == 2 and int(starts[0]) == victim and int(starts[1]) != victim   # taken over by another worker
    st = Store(study)
    rows = {r["spec_id"]: r for r in st.rows()}
    assert all(r["status"] == "done" for r in rows.values()) and rows[slow.spec_id]["attempts"] == 2
    assert all(r["attempts"] == 1 for k, r in rows.items() if k != slow.spec_id)
    assert (progress(study).done, progress(study).pending, progress(study).running) == (len(specs), 0, 0)
    assert st.integrity() == "ok"


def test_killed_scheduler_leaves_no_worker_behind(tmp_path):
    "A scheduler killed with SIGKILL (a papermill kernel stopped, a Ctrl-C'd batch) takes its workers with it."
    study, log = tmp_path/"study", tmp_path/"log.txt"
    (tmp_path/"slow_runner.py").write_text(SLOW.format(log=str(log)))
    specs = [Spec(**{**BASE, "init": "from-scratch", "kd": False, "seed": i}) for i in range(2)]
    script = tmp_path/"grid.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        from slow_runner import runner
        from kdnb.spec import Spec
        from kdnb.runner import run_grid
        run_grid([Spec.from_json(s) for s in {[s.to_json() for s in specs]!r}], {str(study)!r}, runner=runner,
                 progress=False, workers=2, poll=0.2)
        """))
    p = subprocess.Popen([sys.executable, str(script)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (log.exists() and f"start {specs[0].spec_id}" in log.read_text()):
        assert p.poll() is None and time.time() < deadline, "the slow spec never started"
        time.sleep(0.05)
    worker = int(next(l.split()[2] for l in log.read_text().splitlines() if l.startswith(f"start {specs[0].spec_id}")))
    assert worker != p.pid
    os.kill(p.pid, signal.SIGKILL); p.wait()
    def alive(pid):
        try: os.kill(pid, 0)
        except ProcessLookupError: return False
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    deadline = time.time() + 15
    while alive(worker) and time.time() < deadline: time.sleep(0.1)
    still = alive(worker)
    if still: os.kill(worker, signal.SIGKILL)
    assert not still, "the worker kept running after its scheduler was killed"
    assert f"done {specs[0].spec_id}" not in log.read_text()    # it did not finish the 60 s spec as an orphan


def test_batch_log_output_streams_the_notebooks_output(tmp_path):
    "`kdnb batch --log-output` shows what the notebooks print while they run; without it, it does not."
    import nbformat
    src = tmp_path/"src"; src.mkdir()
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("preset = 'demo'\nstudy_dir = None\nout_dir = None"); p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("import os\nprint('hello from the notebook, workers', os.environ['KDNB_WORKERS'])")]
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    nbformat.write(nb, str(src/"report.ipynb"))
    cmd = [sys.executable, "-c", "import sys; from kdnb.cli import main; sys.exit(main())", "batch", "--preset", "tiny", "--only",
           "report", "--notebooks-dir", str(src), "--study-dir", str(tmp_path/"study"), "--workers", "3"]
    r = subprocess.run(cmd + ["--folder", str(tmp_path/"a"), "--log-output"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hello from the notebook, workers 3" in r.stdout + r.stderr
    r = subprocess.run(cmd + ["--folder", str(tmp_path/"b")], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "hello from the notebook" not in r.stdout + r.stderr, r.stderr[-3000:]
