"""Integration tests of kdnb.runner (with kdnb.spec, kdnb.store) and the `kdnb` CLI: a tiny grid end to end, SIGKILL-resume, two processes on
one store, invalid specs, a missing teacher checkpoint, and `kdnb run` / `kdnb list` as subprocesses.

Runs use tiny random models (`tiny-xlmr`) with the embedded multilingual tokenizer and a trimmed vocabulary, on the
built-in demo data (or tsm from ../shared/data when the demo data cannot be loaded)."""
import json, os, shutil, signal, sqlite3, subprocess, sys, textwrap, time, warnings
from pathlib import Path
import pytest

from kdnb.initialize import INITIALIZATIONS
from kdnb.spec import Spec, SpecError, grid
from kdnb.store import Store, results, results_by_language, results_by_step
from kdnb.runner import GridFailed, run_grid, run_dir, teacher_dir, load_specs

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _dataset():
    "A classification dataset the tests can load: the built-in demo data, else tsm from the data folder."
    from kdnb.data import data_available
    from kdnb.loader import load_benchmark
    try:
        load_benchmark("demo-intent", languages=["en"])
        return "demo-intent", ("de", "en"), ("de", "en", "fr")
    except Exception as e:
        if data_available("tsm"): return "tsm", ("english", "german"), ("english", "french", "german")
        pytest.skip(f"neither the demo data ({e}) nor tsm in ../shared/data is available")


@pytest.fixture(scope="module")
def base():
    import torch
    torch.set_num_threads(1)
    ds, train, test = _dataset()
    return dict(model="tiny-xlmr", dataset=ds, train_languages=train, test_languages=test, train_sample=40,
                eval_subset=20, batch_size=8, max_length=32, trim=True, max_steps=6, eval_steps=3, seed=0)


def _script(tmp_path, name, body):
    p = tmp_path/name
    p.write_text("import torch; torch.set_num_threads(1)\n" + textwrap.dedent(body))
    return p


def test_tiny_grid_end_to_end(tmp_path, base):
    specs = grid(**base, init=["teacher", *INITIALIZATIONS, "copy-only"], kd=[False, True])
    assert len(specs) == 8  # one teacher, 3 inits x KD, one copy-only
    df = run_grid(specs, tmp_path, progress=False)
    assert list(df.spec_id) == [s.spec_id for s in specs] and set(df.status) == {"done"}
    teachers = Store(tmp_path).rows("teachers")
    assert len(teachers) == 1 and teachers[0]["trainings"] == 1  # the teacher was trained once, for everyone
    assert df.test_f1.between(0, 1).all() and df.dev_f1.between(0, 1).all()
    langs = set(base["test_languages"])
    assert all(set(d) == langs for d in df.test_f1_by_language)
    t = df.set_index("label")
    assert t.loc["teacher", "layers"] == 4 and (df[df.init != "teacher"].layers == 2).all()
    assert t.loc["teacher", "params"] > t.loc["from-teacher + KD", "params"]
    assert t.loc["copy-only (from-teacher)", "curve"] == [] and len(t.loc["from-base + KD", "curve"]) > 0
    assert {"att", "hid", "embd", "pred", "clf"} <= set().union(*t.loc["from-scratch + KD", "curve"])
    assert len(results_by_language(tmp_path)) == 8 * len(langs)
    assert len(results_by_step(tmp_path)) > 0
    assert all((run_dir(s, tmp_path)/"best"/"config.json").exists() for s in specs if s.init in INITIALIZATIONS)
    assert not any((run_dir(s, tmp_path)/"checkpoints").exists() for s in specs)
    from kdnb.stats import PREDICTIONS, read_predictions, replicates
    for s, f1 in zip(specs, df.test_f1):   # every run keeps its per-example test predictions, and they give its test F1
        p = read_predictions(run_dir(s, tmp_path)/PREDICTIONS)
        assert set(p.language) == langs and len(p) > 0
        assert abs(replicates(p, "classification", n_boot=10)[0] - f1) < 1e-9
    # the students' best folders load without kdnb
    from transformers import AutoModelForSequenceClassification
    AutoModelForSequenceClassification.from_pretrained(run_dir(specs[2], tmp_path)/"best")
    # a re-run skips every finished spec
    before = Store(tmp_path).rows()
    t0 = time.time()
    df2 = run_grid(specs, tmp_path, progress=False)
    assert time.time() - t0 < 20
    assert Store(tmp_path).rows() == before and df2.equals(df)
    assert Store(tmp_path).rows("teachers")[0]["trainings"] == 1
    assert Store(tmp_path).integrity() == "ok"


def test_sigkill_resume(tmp_path, base, monkeypatch):
    monkeypatch.setenv("KDNB_CHECKPOINT_EVERY", "0")   # a checkpoint at every evaluation, so there is one to kill after
    study = tmp_path/"study"
    quick = Spec(**{**base, "init": "from-scratch", "kd": False})
    slow = Spec(**{**base, "init": "from-scratch", "kd": False, "max_steps": 400, "eval_steps": 20, "seed": 1})
    script = _script(tmp_path, "grid.py", f"""
        from kdnb.spec import Spec
        from kdnb.runner import run_grid
        run_grid([Spec.from_json({quick.to_json()!r}), Spec.from_json({slow.to_json()!r})], {str(study)!r}, progress=False)
        """)
    p = subprocess.Popen([sys.executable, str(script)], env={**ENV, "KDNB_CHECKPOINT_EVERY": "0"}, stderr=subprocess.PIPE)
    ckpts = run_dir(slow, study)/"checkpoints"
    deadline = time.time() + 180
    def complete(c):   # trainer_state.json is the checkpoint's last file: present *and* whole (not mid-write)
        try: return json.loads((c/"trainer_state.json").read_text()) is not None
        except (OSError, ValueError): return False
    while not any(complete(c) for c in ckpts.glob("checkpoint-*")):
        assert p.poll() is None, f"the grid ended before it could be killed: {p.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no checkpoint appeared in time"
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    st = Store(study)
    killed, done_before = st.row(slow.spec_id), st.row(quick.spec_id)
    assert killed["status"] == "running" and done_before["status"] == "done"   # a dead process's claim is left behind
    df = run_grid([quick, slow], study, progress=False)
    after = st.row(slow.spec_id)
    assert after["status"] == "done" and after["attempts"] == 2
    assert after["resumed_from"] > 0                      # continued from the Trainer checkpoint, not from step 0
    assert st.row(quick.spec_id) == done_before            # the finished row is untouched
    assert len(st.rows()) == 2 and list(df.status) == ["done", "done"]
    assert st.integrity() == "ok"


FAKE = """
import os, time
from pathlib import Path
import torch
from safetensors.torch import save_file
from kdnb.runner import ensure_teacher
LOG = {log!r}
def log(what):
    with open(LOG, "a") as f: f.write(f"{{what}} {{os.getpid()}}\\n")
def teacher(tspec, out, progress=False):
    log("teacher-" + tspec.teacher_key); time.sleep(0.5)
    (out/"best").mkdir(parents=True, exist_ok=True)
    (out/"best"/"config.json").write_text("{{}}")
    save_file({{"w": torch.zeros(1)}}, out/"best"/"model.safetensors")   # a loadable (tiny) weights file
    return {{"dev_f1": 0.9}}
def runner(spec, study_dir, progress=False):
    if spec.uses_teacher: ensure_teacher(spec, study_dir, trainer=teacher, poll=0.05)
    log(spec.spec_id); time.sleep(0.15)
    return dict(dev_f1=0.5, test_f1_by_language={{"en": 0.5, "de": 0.7}}, best_step=1)
"""


def test_two_processes_one_store(tmp_path, base):
    study, log = tmp_path/"study", tmp_path/"log.txt"
    (tmp_path/"fake_runner.py").write_text(FAKE.format(log=str(log)))
    specs = grid(**{**base, "seed": [0, 1, 2]}, init=list(INITIALIZATIONS), kd=[False, True])   # 18 specs, 3 teachers
    script = _script(tmp_path, "two.py", f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        from fake_runner import runner
        from kdnb.spec import Spec
        from kdnb.runner import run_grid
        specs = [Spec.from_json(s) for s in {[s.to_json() for s in specs]!r}]
        df = run_grid(specs, {str(study)!r}, runner=runner, progress=False, poll=0.05)
        assert (df.status == "done").all() and len(df) == len(specs), df
        """)
    procs = [subprocess.Popen([sys.executable, str(script)], env=ENV, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-3000:]
    lines = [l.split() for l in log.read_text().splitlines()]
    ran = [k for k, _ in lines if not k.startswith("teacher-")]
    assert sorted(ran) == sorted(s.spec_id for s in specs)          # every spec ran exactly once
    trained = [k for k, _ in lines if k.startswith("teacher-")]
    assert sorted(trained) == sorted({"teacher-" + s.teacher_key for s in specs if s.uses_teacher})  # each teacher once
    assert len({pid for _, pid in lines}) == 2                       # both processes did work
    st = Store(study)
    assert st.integrity() == "ok"
    rows = st.rows()
    assert len(rows) == len(specs) and all(r["status"] == "done" and r["attempts"] == 1 for r in rows)
    con = sqlite3.connect(st.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_invalid_specs(tmp_path, base):
    with pytest.raises(SpecError, match=r"Spec\.init='from-techer' is invalid: allowed values are 'from-teacher', "
                                        r"'from-base', 'from-scratch', 'teacher', 'copy-only'"):
        Spec(**{**base, "init": "from-techer"})
    with pytest.raises(SpecError, match=r"Spec\.dataset='massiv' is invalid: allowed values are 'massive'"):
        Spec(dataset="massiv")
    with pytest.raises(SpecError, match=r"Spec\.train_languages=\['xx'\] is invalid: .*Unknown language code"):
        Spec(**{**base, "train_languages": ("xx",)})
    with pytest.raises(SpecError, match=r"Spec\.subset=2\.5 is invalid: allowed values are None"):
        Spec(subset=2.5)
    with pytest.raises(SpecError, match=r"Spec\.copy_from='scratch' is invalid: allowed values are 'from-teacher', 'from-base'"):
        Spec(init="copy-only", copy_from="scratch")
    with pytest.raises(SpecError, match=r"Unknown spec field\(s\) 'lr'"):
        load_specs({"model": "tiny-xlmr", "lr": 1e-3})
    # rejected before any training: the runner never runs, no store is created
    calls = []
    with pytest.raises(SpecError, match=r"Spec\.kd='no'"):
        run_grid([{**base, "init": "from-teacher"}, {**base, "kd": "no"}], tmp_path/"s", runner=lambda *a, **k: calls.append(a))
    assert calls == [] and not (tmp_path/"s").exists()
    with pytest.raises(SpecError, match=r"Spec\.max_length=256 is invalid for the tiny model"):
        run_grid([Spec(**{**base, "max_length": 256})], tmp_path/"s2")
    assert not (tmp_path/"s2"/"results.sqlite").exists()


def test_failed_spec_is_recorded(tmp_path, base):
    def runner(spec, study_dir, progress=False):
        if spec.seed == 1: raise RuntimeError("Training diverged: the loss is nan at step 3")
        return dict(dev_f1=0.5, test_f1_by_language={"en": 0.5})
    specs = grid(**{**base, "seed": [0, 1, 2]})
    with pytest.raises(GridFailed, match="1 of 3 specs failed:\n.*Training diverged"):
        run_grid(specs, tmp_path, runner=runner, progress=False)
    df = results(tmp_path, status=None).set_index("seed")
    assert list(df.status) == ["done", "failed", "done"] and "diverged" in df.loc[1, "error"]
    with pytest.warns(UserWarning, match="1 of 3 specs failed"):
        run_grid(specs, tmp_path, runner=runner, progress=False, errors="warn")   # retried (and failing again)
    assert results(tmp_path, status=None).set_index("seed").loc[1, "attempts"] == 2


def test_missing_teacher_is_rebuilt(tmp_path, base):
    first = Spec(**{**base, "init": "from-teacher", "kd": True})
    run_grid([first], tmp_path, progress=False)
    best = teacher_dir(first, tmp_path)/"best"
    assert (best/"config.json").exists()
    shutil.rmtree(best)
    second = Spec(**{**base, "init": "from-base", "kd": True})          # needs the same teacher (as KD target)
    with pytest.warns(UserWarning, match="no checkpoint .* retraining it"):
        df = run_grid([second], tmp_path, progress=False)
    assert df.status.iloc[0] == "done" and (best/"config.json").exists()
    t = Store(tmp_path).row(first.teacher_key, "teachers")
    assert t["trainings"] == 2 and t["status"] == "done"
    assert Store(tmp_path).rows("teachers")[0]["teacher_key"] == first.teacher_key and len(Store(tmp_path).rows("teachers")) == 1


def _kdnb(*args):
    exe = Path(sys.executable).parent/"kdnb"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from kdnb.cli import main; sys.exit(main())"]
    return subprocess.run(cmd + [str(a) for a in args], env=ENV, capture_output=True, text=True, timeout=300)


def test_cli_run_and_list(tmp_path, base):
    f = tmp_path/"grid.json"
    f.write_text(json.dumps({"grid": {"init": ["from-teacher", "from-scratch"]}, "kd": True,
                             **{k: (list(v) if isinstance(v, tuple) else v) for k, v in base.items()}}))
    study = tmp_path/"study"
    r = _kdnb("run", f, "--study", study, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 of 2 specs done" in r.stdout
    r = _kdnb("list", study)
    assert r.returncode == 0 and "2 rows" in r.stdout and "from-teacher + KD" in r.stdout, r.stdout + r.stderr
    r = _kdnb("list", study, "--format", "json")
    recs = json.loads(r.stdout)
    assert len(recs) == 2 and all(0 <= x["test_f1"] <= 1 for x in recs)
    r = _kdnb("run", f, "--study", study, "--no-progress")          # re-run: nothing to do
    assert r.returncode == 0 and "2 of 2 specs done" in r.stdout
    f.write_text(json.dumps({**{k: (list(v) if isinstance(v, tuple) else v) for k, v in base.items()}, "init": "frm-base"}))
    r = _kdnb("run", f, "--study", study)
    assert r.returncode == 2 and "Spec.init='frm-base' is invalid: allowed values are" in r.stderr
    r = _kdnb("list", tmp_path/"nothing")
    assert r.returncode == 2 and "No results store" in r.stderr


def test_nan_loss_stops_the_run_with_a_message(tmp_path, base):
    bad = Spec(**{**base, "init": "from-scratch", "kd": False, "learning_rate": 1e12, "max_steps": 20, "eval_steps": 2})
    good = Spec(**{**base, "init": "from-scratch", "kd": False})
    with pytest.raises(GridFailed, match=r"1 of 2 specs failed:\n.*TrainingDiverged: Training diverged: the loss is"):
        run_grid([bad, good], tmp_path, progress=False)
    df = results(tmp_path, status=None).set_index("spec_id")
    assert df.loc[bad.spec_id, "status"] == "failed" and "Lower the learning rate" in df.loc[bad.spec_id, "error"]
    assert df.loc[good.spec_id, "status"] == "done"      # the rest of the grid still ran
