"""Execute every analysis notebook (nbs/analysis) with papermill on the `tiny` preset and check what they produce.

One batch (`kdnb.batch.run_batch`) runs all seven notebooks against one temporary study folder, so the teachers of
section 4.1 are reused by 5.1-5.3, exactly as `kdnb batch` does; the tests then read the executed notebooks and the
tables the notebooks saved. Budget: a few minutes on 2 CPU cores.
"""
import json, os, subprocess, sys, time
from pathlib import Path
import nbformat, pandas as pd, pytest

from kdnb.batch import NOTEBOOKS, analysis_dir, run_batch
from kdnb.store import results

REPO = Path(__file__).resolve().parents[1]
# both tasks: classification and NER (random-tag baseline); KDNB_TEST_ANALYSIS_DATASETS="tsm" etc. to try others
DATASETS = os.environ.get("KDNB_TEST_ANALYSIS_DATASETS", "demo-intent,demo-ner").split(",")
EXTRA = json.loads(os.environ.get("KDNB_TEST_ANALYSIS_PARAMS", "{}"))  # e.g. '{"train_sample": 16}' for real data
PARAMS = {"datasets": DATASETS, "threads": 1, **EXTRA}  # one torch thread: no oversubscription on a shared CPU


def _demo_data_ok():
    from kdnb.loader import load_benchmark
    try:
        for d in DATASETS: load_benchmark(d)
    except Exception as e: return str(e)
    return None


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    "Run the whole batch once (tiny preset) into a temp folder; yields (output folder, study folder, seconds)."
    if (why := _demo_data_ok()) is not None: pytest.skip(f"built-in demo data not loadable: {why}")
    tmp = tmp_path_factory.mktemp("analysis")
    t0 = time.time()
    folder = run_batch("tiny", folder=tmp/"out", study_dir=tmp/"study", parameters=PARAMS,
                       notebooks_dir=REPO/"nbs"/"analysis", progress=False, raise_on_error=False)
    return folder, tmp/"study", time.time() - t0


def _nb(folder, name): return nbformat.read(folder/f"{name}.ipynb", as_version=4)

def _outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if kind in o.get("data", {})]

def _csv(folder, name, **kw): return pd.read_csv(folder/f"{name}.csv", **kw)


def test_notebooks_frontmatter_and_parameters():
    "Every analysis notebook is kept out of nbdev_test and has a papermill `parameters` cell with the shared names."
    for name in NOTEBOOKS:
        nb = nbformat.read(REPO/"nbs"/"analysis"/f"{name}.ipynb", as_version=4)
        assert nb.cells[0].cell_type == "raw" and "skip_exec: true" in nb.cells[0].source, name
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, name
        for p in ("preset", "models", "datasets", "seeds", "epochs", "eval_steps", "device", "threads", "study_dir", "data_dir", "out_dir", "progress"):
            assert f"\n{p} = " in "\n" + params[0].source, (name, p)
        assert 'preset = "demo"' in params[0].source
    assert analysis_dir() == REPO/"nbs"/"analysis"


def test_section_notebooks_pass_the_grid_parameters():
    "A notebook that runs a grid takes every `GRID_PARAMETERS` name and hands it to `run_section`: the batch's pooled grid is its grid."
    from kdnb.parallel import GRID_PARAMETERS
    ran = 0
    for name in NOTEBOOKS:
        nb = nbformat.read(REPO/"nbs"/"analysis"/f"{name}.ipynb", as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        if "run_section(" not in code: continue
        ran += 1
        params = "\n" + next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        for p in GRID_PARAMETERS:
            if p == "subsets" and "\nsubsets = " not in params: continue   # the subset sections' own parameter
            assert f"\n{p} = " in params and f"{p}={p}" in code, (name, p)
    assert ran == 6


def test_batch_ran_every_notebook(batch):
    folder, _, seconds = batch
    log = json.loads((folder/"batch.json").read_text())
    status = {n["name"]: (n["status"], n["error"]) for n in log["notebooks"]}
    assert list(status) == list(NOTEBOOKS)
    assert all(s == "ok" for s, _ in status.values()), status
    assert (folder/"README.md").exists()
    print(f"tiny batch: {seconds:.0f} s; per notebook: " + ", ".join(f"{n['name']} {n['seconds']:.0f}s" for n in log["notebooks"]))


def test_batch_plan_matches_the_notebooks(batch):
    "The specs the batch registered up front (for its runs bar) are exactly the ones the notebooks ran: none left pending."
    from kdnb.progress import progress
    folder, study, _ = batch
    p = progress(study)
    assert (p.pending, p.running, p.failed) == (0, 0, 0) and p.done > 0, str(p)
    assert json.loads((folder/"batch.json").read_text())["workers"] == "auto"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_figures_rendered(batch, name):
    "Each executed notebook has an inline PNG figure and no error output."
    nb = _nb(batch[0], name)
    assert _outputs(nb, "image/png"), f"{name}: no figure"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    assert (batch[0]/f"{name}_figure.png").stat().st_size > 1000


def _rows(t, n_index): return [tuple(r) for r in t.iloc[:, :n_index].ffill().itertuples(index=False)]

def test_4_1_tables(batch):
    folder = batch[0]
    t8 = _csv(folder, "4_1_weight_copy_table8", header=[0, 1], index_col=[0, 1, 2])
    assert t8.index.names == ["init", "width", "kd"]
    assert len(t8) == 1 + 3 * 2 * 2                   # teacher + init x width x KD
    assert list(t8.index.get_level_values(0).unique()) == ["teacher", "from-teacher", "from-base", "from-scratch"]
    assert sorted(t8.columns.get_level_values(1)) == sorted(DATASETS)
    assert t8.notna().all().all() and ((t8 >= 0) & (t8 <= 100)).all().all()
    t2 = _csv(folder, "4_1_weight_copy_table2", header=[0, 1], index_col=[0, 1])
    assert len(t2) == 5 and t2.columns[-1][0] == "Avg"
    assert "**" in (folder/"4_1_weight_copy_table8.md").read_text()   # bold best


def test_4_2_and_4_3_tables(batch):
    folder = batch[0]
    t9 = _csv(folder, "4_2_zero_shot_table9", header=[0, 1], index_col=[0, 1, 2])
    assert len(t9) == 1 + 3 * 2 * 2                   # teacher + init x (seen, english) x KD
    assert set(t9.index.get_level_values(1)) == {"seen", "english"}
    t6 = _csv(folder, "4_3_english_teacher_table6", header=[0, 1], index_col=[0])
    assert list(t6.index) == ["teacher", "from-teacher", "from-scratch"]
    assert t6.columns[-1][0] == "Avg"


def test_5_1_table(batch):
    t7 = _csv(batch[0], "5_1_copy_only_table7", index_col=[0])
    assert list(t7.index) == ["from-teacher", "copy-only", "baseline"]
    assert sorted(t7.columns) == sorted(DATASETS)
    assert t7.notna().all().all()


def test_5_2_and_5_3_tables(batch):
    folder = batch[0]
    ts = _csv(folder, "5_2_subsets_subsets", header=[0, 1, 2], index_col=[0])
    assert list(ts.index) == ["from-teacher", "from-base", "from-scratch"]
    assert sorted({float(c[2]) for c in ts.columns}) == [0.5, 1.0]
    conv = _csv(folder, "5_3_convergence_convergence")
    assert len(conv) == len(DATASETS) * 2 * 3           # datasets x subsets x inits
    assert {"mean loss", "final loss", "steps to half"} <= set(conv.columns)


def test_report_compares_with_paper(batch):
    folder = batch[0]
    cmp = _csv(folder, "report_compare")
    assert {"ours", "paper", "diff", "paper_dataset", "paper_model"} <= set(cmp.columns)
    matched = cmp.dropna(subset=["paper"])
    assert len(matched) >= 15 * len(DATASETS)           # every section's configurations meet a paper number
    from kdnb.frames import DATASET_ANALOGUES
    assert set(matched.paper_dataset) == {DATASET_ANALOGUES.get(d, d) for d in DATASETS}
    assert (matched["diff"] - (matched.ours - matched.paper)).abs().max() < 1e-9
    t8 = pd.read_csv(REPO/"kdnb"/"assets"/"paper"/"table8_all_languages.csv")
    ds = matched.paper_dataset.iloc[0]
    row = matched[(matched.paper_dataset == ds) & (matched.init == "from-teacher") & (matched.kd == True)
                  & (matched.width == "full") & (matched.test_languages == "all")]
    ref = t8[(t8.model == "xlm-roberta-base") & (t8.init == "from-teacher") & (t8.kd == "yes") & (t8.hidden == 768)
             & (t8.dataset == ds)].f1.item()
    assert row.paper.tolist() == [ref]
    claims = _csv(folder, "report_claims", dtype={"section": str}, index_col=0)
    from kdnb.paper import paper_claims
    assert len(claims) == len(paper_claims()) and set(claims.section) == {"4.1", "4.2", "4.3", "5.1", "5.2", "5.3"}
    assert {"quote", "section", "scope", "difference", "ci_low", "ci_high", "n_seeds", "verdict"} <= set(claims.columns)
    assert set(claims.verdict) <= {"supported", "contradicted", "inconclusive", "not run"}
    paper_txt = REPO.parent/"shared"/"paper"/"privileged-students.txt"
    if paper_txt.exists(): assert all(q in paper_txt.read_text() for q in claims.quote)
    # the tiny grid covers every claim whose datasets it has: only tsm's and real massive's absolute numbers are not run
    names = {DATASET_ANALOGUES.get(d, d) for d in DATASETS}
    skipped = claims.scope.map(lambda s: s != "every dataset" and not set(s.split(", ")) & names)
    skipped |= claims.claim == "about 69% at 1% of massive"
    assert (claims.verdict[~skipped] != "not run").all(), claims[["claim", "verdict"]]
    assert (claims.verdict[skipped] == "not run").all(), claims[["claim", "verdict"]]
    # every run stored its per-example predictions: the F1 claims carry paired-bootstrap intervals
    ran = claims[(claims.verdict != "not run") & (claims.section != "5.3")]
    assert ran.method.str.startswith("paired bootstrap").all(), ran[["claim", "method"]]
    assert (ran.ci_low <= ran.difference + 1e-9).all() and (ran.difference <= ran.ci_high + 1e-9).all()
    assert claims.set_index("claim").paper_verdict["KD improves every configuration"] == "contradicted"   # the paper's own Table 8
    assert (claims[claims.section.isin(["5.2", "5.3"])].paper_verdict == "figure only").all()
    runs = results(batch[1])
    assert all((batch[1]/"runs"/s/"predictions.jsonl.gz").exists() for s in runs.spec_id)


def test_rerun_reuses_finished_runs(batch, tmp_path):
    "Re-running a section notebook on the same study trains nothing new."
    folder, study, _ = batch
    before = results(study, status=None)
    t0 = time.time()
    run_batch("tiny", folder=tmp_path, study_dir=study, parameters=PARAMS, notebooks=["4_1_weight_copy"],
              notebooks_dir=REPO/"nbs"/"analysis", progress=False)
    after = results(study, status=None)
    assert len(after) == len(before) and (after.status == "done").all()
    assert list(after.finished_at) == list(before.finished_at)
    print(f"re-run of 4_1_weight_copy: {time.time() - t0:.0f} s")


TRAINING_STACK = ("torch", "transformers", "datasets", "sklearn")

def test_finished_study_needs_no_training_stack(batch):
    "Reading a finished study (a section notebook re-rendering, the report, `kdnb list`, the CLI and batch modules) imports no torch, transformers, datasets or scikit-learn: seconds per notebook kernel and per command."
    folder, study, _ = batch
    code = f"""
import sys, json
from kdnb.runner import run_section
from kdnb import report as R
from kdnb.cli import main, parser
import kdnb.batch, kdnb.export, kdnb.explore
df = run_section("4.1", "tiny", {str(study)!r}, progress=False, datasets={DATASETS!r})
cl = R.claims(df, study_dir={str(study)!r})
parser(); main(["list", {str(study)!r}])
print("HEAVY", json.dumps([m for m in {TRAINING_STACK!r} if m in sys.modules]), len(df), len(cl))
"""
    env = {**os.environ, "KDNB_WORKERS": "auto"}   # as `kdnb batch` sets it for its notebooks: the pooled grid's path
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    heavy, n_rows, n_claims = r.stdout.split("HEAVY ")[1].split()
    assert int(n_rows) > 0 and int(n_claims) > 0
    assert json.loads(heavy) == [], f"imported on a finished study: {heavy}"


def test_cli_batch_help():
    "`kdnb batch` is a subcommand of the console script."
    r = subprocess.run([sys.executable, "-c", "import sys; from kdnb.cli import main; sys.exit(main(['batch', '--help']))"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "--preset" in r.stdout and "tiny" in r.stdout
