"""Faults of the files a study lives in (kdnb issue 14, points 3 and 5), each reproduced for real:

- reading a study must not need write access: a read-only study folder is read by `results`, `curves`,
  `report.load_results` and `kdnb list` in a subprocess that truly cannot write (as root, whom permission bits do
  not stop, the subprocess runs without CAP_DAC_OVERRIDE through `setpriv`);
- a damaged store gives one error naming the file; a 0-byte store next to trained models is not a new study;
- a checkpoint that fails to load is set aside and the previous one is used; a cached teacher that fails to load
  is retrained;
- a failure is recorded as `failed` with its first error even when the store write fails at first (disk full).

Runs use tiny random models (see tests/test_train.py and tests/test_experiment.py for the same fixtures)."""
import errno, os, shutil, sqlite3, stat, subprocess, sys, tempfile, textwrap, warnings
from pathlib import Path

import pytest, torch

import kdnb.store as X
from kdnb.spec import Spec, grid
from kdnb.store import Store, results
from kdnb.runner import GridFailed, run_grid, teacher_dir
from kdnb.integrity import StoreError
from kdnb.data import tokenize
from kdnb.models import tiny_model
from kdnb.checkpoints import last_checkpoint
from kdnb.train import as_settings, fine_tune
from kdnb.testing import toy_benchmark, toy_tokenizer
from transformers import TrainerCallback

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def fake_runner(spec, study_dir, progress=False):
    return dict(dev_f1=0.5, test_f1_by_language={"en": 0.4, "de": 0.6}, best_step=2,
                curve=[{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])


def specs(n=3): return grid(model="tiny-xlmr", init="from-scratch", kd=False, seed=list(range(n)))


# ---------------------------------------------------------------- point 3: read-only studies, damaged stores

def _reader_prefix():
    "A command prefix that runs a process which cannot write files it lacks permission bits for, even as root."
    if os.geteuid() != 0: return []
    if shutil.which("setpriv") is None: pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def _chmod_tree(root, writable):
    for p in [root, *Path(root).rglob("*")]:
        mode = p.stat().st_mode
        w = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        p.chmod((mode | stat.S_IWUSR) if writable else (mode & ~w))


@pytest.fixture
def public_dir():
    "A temporary folder outside the (private) pytest tmp tree, made writable again before it is removed."
    d = Path(tempfile.mkdtemp(prefix="kdnb-ro-"))
    d.chmod(0o755)
    yield d
    _chmod_tree(d, True); shutil.rmtree(d)


READER = """
import json, sys
from kdnb.store import results, results_by_language, results_by_step
from kdnb.store import load_results
from kdnb.cli import main
study = sys.argv[1]
print(json.dumps(dict(results=len(results(study)), by_language=len(results_by_language(study)),
                      curves=len(results_by_step(study)), report=len(load_results(study)),
                      all=len(results(study, status=None)))))
sys.exit(main(["list", study]))
"""


def _read_as_reader(study, tmp):
    script = Path(tmp)/"reader.py"; script.write_text(READER); script.chmod(0o644)
    r = subprocess.run(_reader_prefix() + [sys.executable, str(script), str(study)], env=ENV, capture_output=True,
                       text=True, timeout=300)
    return r


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file()}


@pytest.mark.parametrize("side_files", [True, False])
def test_read_only_study_is_read_without_writing(public_dir, side_files):
    "Archived as left by the grid (with SQLite's empty -wal and -shm files), or as the store file alone."
    study = public_dir/"study"
    run_grid(specs(3), study, runner=fake_runner, progress=False)
    if not side_files:
        for s in ("-wal", "-shm"): (study/f"results.sqlite{s}").unlink(missing_ok=True)
    _chmod_tree(study, False)
    if os.geteuid() != 0: assert not os.access(study, os.W_OK)
    before = _snapshot(study)
    r = _read_as_reader(study, public_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    assert first == '{"results": 3, "by_language": 6, "curves": 6, "report": 3, "all": 3}', r.stdout
    assert "3 rows in" in r.stdout
    assert _snapshot(study) == before                         # same files, bytes and mtimes: no -wal/-shm either


def test_read_only_study_keeps_rows_in_a_leftover_wal(public_dir):
    "A writer killed after a commit leaves rows in the -wal file; a read-only reader still sees them."
    study = public_dir/"study"
    run_grid(specs(2), study, runner=fake_runner, progress=False)
    killed = textwrap.dedent(f"""
        import os
        from kdnb.spec import Spec
        from kdnb.store import Store
        st = Store({str(study)!r}); s = Spec(model="tiny-xlmr", init="from-scratch", kd=False, seed=9)
        con = st.connect(); con.execute("SELECT count(*) FROM runs").fetchone()   # open: no checkpoint on close
        st.register([s]); st.claim(s.spec_id); st.finish(s.spec_id, dict(dev_f1=0.7, test_f1_by_language={{"en": 0.7}}))
        os._exit(0)   # like a kill: the -wal file keeps the last commits
        """)
    subprocess.run([sys.executable, "-c", killed], env=ENV, check=True, timeout=120)
    assert (study/"results.sqlite-wal").stat().st_size > 0
    (study/"results.sqlite-shm").unlink()
    _chmod_tree(study, False)
    before = _snapshot(study)
    r = _read_as_reader(study, public_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0].startswith('{"results": 3,'), r.stdout
    assert _snapshot(study) == before


WRITER = """
import sys
from kdnb.spec import Spec
from kdnb.runner import run_grid
from kdnb.integrity import StoreError
try: run_grid([Spec(model="tiny-xlmr", seed=5)], sys.argv[1], runner=lambda *a, **k: {}, progress=False)
except StoreError as e: print(e); sys.exit(3)
"""


def test_running_into_a_read_only_study_says_so(public_dir):
    study = public_dir/"study"
    run_grid(specs(1), study, runner=fake_runner, progress=False)
    _chmod_tree(study, False)
    before = _snapshot(study)
    script = public_dir/"writer.py"; script.write_text(WRITER); script.chmod(0o644)
    r = subprocess.run(_reader_prefix() + [sys.executable, str(script), str(study)], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr[-3000:]
    assert r.stdout.startswith(f"The results store {study/'results.sqlite'} cannot be written") and "read-only" in r.stdout
    assert _snapshot(study) == before


def test_reader_leaves_a_rollback_journal_store_unchanged(tmp_path):
    "A store kept in rollback-journal mode (as some archiving tools leave it) is read without being switched to WAL."
    run_grid(specs(2), tmp_path, runner=fake_runner, progress=False)
    con = sqlite3.connect(tmp_path/"results.sqlite"); con.execute("PRAGMA journal_mode=DELETE"); con.close()
    before = _snapshot(tmp_path)
    assert len(results(tmp_path)) == 2
    assert _snapshot(tmp_path) == before
    con = sqlite3.connect(tmp_path/"results.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()


def _kdnb(*args):
    return subprocess.run([sys.executable, "-c", "import sys; from kdnb.cli import main; sys.exit(main())", *map(str, args)],
                          env=ENV, capture_output=True, text=True, timeout=300)


def test_damaged_store_gives_one_clear_error(tmp_path):
    calls = []
    run_grid(specs(2), tmp_path, runner=fake_runner, progress=False)
    (tmp_path/"teachers").mkdir(); (tmp_path/"runs").mkdir()
    f = tmp_path/"results.sqlite"
    f.write_bytes(b"\x00" * 100 + os.urandom(8000))      # garbled
    for s in ("-wal", "-shm"): Path(str(f) + s).unlink(missing_ok=True)
    with pytest.raises(StoreError, match=rf"The results store {f} is damaged: .*teachers.* are intact. To recover"):
        results(tmp_path)
    with pytest.raises(StoreError, match="is damaged"):    # a grid stops before any training
        run_grid(specs(2), tmp_path, runner=lambda *a, **k: calls.append(a), progress=False)
    assert calls == []
    r = _kdnb("list", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"kdnb list: error: The results store {f} is damaged") and "mv " in r.stderr


def test_empty_store_next_to_models_is_not_a_new_study(tmp_path):
    calls = []
    def runner(spec, study_dir, progress=False): calls.append(spec.spec_id); return fake_runner(spec, study_dir)
    run_grid(specs(2), tmp_path, runner=runner, progress=False)
    (tmp_path/"runs").mkdir()
    f = tmp_path/"results.sqlite"
    f.write_bytes(b"")                                     # truncated to 0 bytes (full disk, bad copy)
    for s in ("-wal", "-shm"): Path(str(f) + s).unlink(missing_ok=True)
    with pytest.raises(StoreError, match=r"is empty \(0 bytes\) but the study folder holds trained models"):
        run_grid(specs(2), tmp_path, runner=runner, progress=False)
    assert len(calls) == 2 and f.stat().st_size == 0       # nothing retrained, the file left as it was
    with pytest.raises(StoreError, match="is empty"): results(tmp_path)
    # a brand-new study folder with an empty store still just works
    new = tmp_path/"new"; new.mkdir(); (new/"results.sqlite").write_bytes(b"")
    assert len(results(new)) == 0
    assert (run_grid(specs(1), new, runner=runner, progress=False).status == "done").all()


# ---------------------------------------------------------------- point 5: checkpoints that fail to load

LABELS = ["neg", "neu", "pos"]
QUICK = as_settings("tiny").replace(max_steps=12, eval_steps=3, logging_steps=1, learning_rate=1e-3)


class Stop(TrainerCallback):
    "Record the steps run; raise after step `at` (a stand-in for a kill)."
    def __init__(self, at=None): self.at, self.steps = at, []
    def on_step_end(self, args, state, control, **kw):
        self.steps.append(state.global_step)
        if state.global_step == self.at: raise RuntimeError(f"stopped at {self.at}")


@pytest.fixture(scope="module")
def toy():
    tok = toy_tokenizer()
    return tok, tokenize(toy_benchmark(n_train=8, n_dev=4, n_test=4), tok, "classification")


def _cut(f): b = f.read_bytes(); f.write_bytes(b[:len(b) // 2])

DAMAGE = {"safetensors-truncated": lambda c: _cut(c/"model.safetensors"),
          "trainer-state-half-written": lambda c: _cut(c/"trainer_state.json"),
          "optimizer-cut-short": lambda c: _cut(c/"optimizer.pt")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, toy, damage):
    tok, data = toy
    kw = dict(task="classification", label_names=LABELS, tokenizer=tok, out_dir=tmp_path, settings=QUICK, progress=False)
    with pytest.raises(RuntimeError, match="stopped at 7"):
        fine_tune(tiny_model("xlmr", num_labels=3), data, callbacks=[Stop(7)], **kw)
    ck = tmp_path/"checkpoints"
    assert last_checkpoint(ck).name == "checkpoint-6"      # complete by the old check: trainer_state.json is there
    DAMAGE[damage](ck/"checkpoint-6")
    again = Stop()
    with pytest.warns(UserWarning, match=r"checkpoint-6 fails to load .* moved it aside to .*corrupt-checkpoint-6"):
        res = fine_tune(tiny_model("xlmr", num_labels=3), data, callbacks=[again], **kw)
    assert res.global_step == 12 and again.steps == list(range(4, 13))   # resumed from checkpoint-3
    assert (ck/"corrupt-checkpoint-6").is_dir()


def test_all_checkpoints_corrupt_trains_from_scratch(tmp_path, toy):
    tok, data = toy
    kw = dict(task="classification", label_names=LABELS, tokenizer=tok, out_dir=tmp_path, settings=QUICK, progress=False)
    with pytest.raises(RuntimeError, match="stopped at 7"):
        fine_tune(tiny_model("xlmr", num_labels=3), data, callbacks=[Stop(7)], **kw)
    ck = tmp_path/"checkpoints"
    for c in ("checkpoint-3", "checkpoint-6"): _cut(ck/c/"model.safetensors")
    again = Stop()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = fine_tune(tiny_model("xlmr", num_labels=3), data, callbacks=[again], **kw)
    assert res.global_step == 12 and again.steps == list(range(1, 13))   # started over
    assert sum("fails to load" in str(o.message) for o in w) == 2
    assert {p.name for p in ck.iterdir()} >= {"corrupt-checkpoint-3", "corrupt-checkpoint-6"}


def _base():
    from kdnb.loader import load_benchmark
    try: load_benchmark("demo-intent", languages=["en"])
    except Exception as e: pytest.skip(f"the demo data cannot be loaded: {e}")
    return dict(model="tiny-xlmr", dataset="demo-intent", train_languages=("de", "en"), test_languages=("de", "en"),
                train_sample=40, eval_subset=20, batch_size=8, max_length=32, trim=True, max_steps=6, eval_steps=3, seed=0)


def test_corrupt_cached_teacher_is_set_aside_and_retrained(tmp_path):
    base = _base()
    first = Spec(**{**base, "init": "from-teacher", "kd": True})
    run_grid([first], tmp_path, progress=False)
    best = teacher_dir(first, tmp_path)/"best"
    _cut(best/"model.safetensors")                         # a kill or a full disk cut the teacher's weights short
    second = Spec(**{**base, "init": "from-base", "kd": True})   # needs the same teacher, as KD target
    with pytest.warns(UserWarning, match=r"The cached teacher .* fails to load \(model.safetensors does not load"):
        df = run_grid([second], tmp_path, progress=False)
    assert df.status.iloc[0] == "done"
    t = Store(tmp_path).row(first.teacher_key, "teachers")
    assert t["status"] == "done" and t["trainings"] == 2
    assert (tmp_path/"teachers"/f"corrupt-{first.teacher_key}"/"best"/"model.safetensors").exists()


# ---------------------------------------------------------------- point 5: recording a failure when the store write fails

@pytest.fixture
def fast_retries(monkeypatch): monkeypatch.setattr(X, "_WRITE_WAIT", 0.01)


def _fail_first(monkeypatch, name, n=1):
    "Make `Store.<name>` raise SQLite's disk-full error on its first `n` calls."
    real, calls = getattr(Store, name), []
    def flaky(self, *a, **k):
        calls.append(a)
        if len(calls) <= n: raise sqlite3.OperationalError("database or disk is full")
        return real(self, *a, **k)
    monkeypatch.setattr(Store, name, flaky)
    return calls


def test_failure_is_recorded_with_the_first_error_when_the_store_write_fails(tmp_path, monkeypatch, fast_retries):
    def runner(spec, study_dir, progress=False):
        if spec.seed == 1: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "checkpoint-6/optimizer.pt")
        return fake_runner(spec, study_dir)
    calls = _fail_first(monkeypatch, "release")
    with pytest.raises(GridFailed, match=r"1 of 3 specs failed:\n.*No space left on device"):
        run_grid(specs(3), tmp_path, runner=runner, progress=False)
    assert len(calls) == 2                                 # the failed write was retried
    df = results(tmp_path, status=None).set_index("seed")
    assert list(df.status) == ["done", "failed", "done"]   # the grid went on, the row is not left `running`
    assert df.loc[1, "error"] == "OSError: [Errno 28] No space left on device: 'checkpoint-6/optimizer.pt'"


def test_results_write_that_fails_is_retried_or_recorded(tmp_path, monkeypatch, fast_retries):
    calls = _fail_first(monkeypatch, "finish", n=1)
    assert (run_grid(specs(1), tmp_path, runner=fake_runner, progress=False).status == "done").all()
    assert len(calls) == 2
    study = tmp_path/"b"
    _fail_first(monkeypatch, "finish", n=99)                # the store never takes the results
    with pytest.raises(GridFailed, match="could not record the results in .*database or disk is full"):
        run_grid(specs(1), study, runner=fake_runner, progress=False)
    r = results(study, status=None).iloc[0]
    assert r.status == "failed" and r.error.startswith("could not record the results")
