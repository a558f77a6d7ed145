"""kdnb.data on the real benchmark files in ../shared/data (skipped with a reason when they are absent)."""
import gzip, json, shutil, time, warnings
from collections import Counter
from pathlib import Path

import pytest

from kdnb.data import BENCHMARKS, MASSIVE_INTENTS, NER_LABELS, collator, data_available, find_data_dir, select_languages, stratified_subset, tokenize
from kdnb.loader import SPLITS, DataFileError, PreliminaryDataWarning, load_benchmark


def _need(name):
    if not data_available(name):
        pytest.skip(f"{name} data absent: no {BENCHMARKS[name].folder}/ under $KDNB_DATA_DIR or ../shared/data")
    return find_data_dir()/BENCHMARKS[name].folder


def _counts(dd):
    return {s: dd[s].to_pandas().groupby("language").size().to_dict() for s in SPLITS}


# ---------------------------------------------------------------- partitions (paper Table 1, exact)
TABLE1_UNSEEN = {
    "massive": "am-ET cy-GB af-ZA km-KH sw-KE mn-MN tl-PH kn-IN te-IN sq-AL ur-PK az-AZ ml-IN ms-MY ca-ES sl-SL "
               "sv-SE ta-IN nl-NL it-IT he-IL pl-PL da-DK nb-NO ro-RO th-TH fa-IR".split(),
    "tsm": "arabic french hindi portuguese".split(),
    "universal-ner": "da_ddt pt_bosque sr_set sk_snk sv_talbanken".split(),
}


@pytest.mark.parametrize("name,n_all,n_unseen,english", [("massive", 52, 27, "en-US"), ("tsm", 8, 4, "english"),
                                                          ("universal-ner", 9, 5, "en_ewt")])
def test_partitions_match_table1(name, n_all, n_unseen, english):
    b = BENCHMARKS[name]
    assert set(select_languages(name, "unseen")) == set(TABLE1_UNSEEN[name])
    assert len(select_languages(name, "unseen")) == n_unseen and len(select_languages(name)) == n_all
    assert set(select_languages(name, "seen")) == set(b.languages) - set(TABLE1_UNSEEN[name])
    assert select_languages(name, "english") == [english]


def test_partitions_match_files():
    d = _need("massive")
    assert sorted(p.name.split(".")[0] for p in d.glob("*.jsonl.gz")) == sorted(BENCHMARKS["massive"].languages)
    d = _need("tsm")
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == sorted(BENCHMARKS["tsm"].languages)
    d = _need("universal-ner")
    b = BENCHMARKS["universal-ner"]
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == sorted(b.languages + b.test_only)


def test_bad_names():
    with pytest.raises(ValueError, match="massive, tsm, universal-ner"): load_benchmark("xnli")
    with pytest.raises(ValueError, match="af-ZA am-ET"): select_languages("massive", ["en-GB"])


# ---------------------------------------------------------------- tsm
def test_tsm_counts_and_labels():
    _need("tsm")
    dd = load_benchmark("tsm")
    c = _counts(dd)
    for lang in BENCHMARKS["tsm"].languages:
        assert (c["train"][lang], c["dev"][lang], c["test"][lang]) == (1839, 324, 870), lang
    assert dd["train"].features["label"].names == ["negative", "neutral", "positive"]
    per = dd["train"].to_pandas().groupby(["language", "label"]).size()
    assert set(per) == {613}
    assert set(dd["test"].to_pandas().groupby(["language", "label"]).size()) == {290}


# ---------------------------------------------------------------- massive
@pytest.fixture(scope="module")
def massive_all():
    _need("massive")
    t = time.time()
    dd = load_benchmark("massive")
    return dd, time.time() - t


def test_massive_all_locales(massive_all):
    dd, secs = massive_all
    assert secs < 60, f"loading all 52 locales took {secs:.1f} s"
    c = _counts(dd)
    for loc in BENCHMARKS["massive"].languages:
        assert (c["train"][loc], c["dev"][loc], c["test"][loc]) == (11514, 2033, 2974), loc
    assert dd["train"].features["label"].names == list(MASSIVE_INTENTS)
    assert set(dd["train"]["label"][:]) == set(range(60))


def test_massive_intents_fixed_list_matches_data():
    d = _need("massive")
    with gzip.open(d/"en-US.jsonl.gz", "rt", encoding="utf-8") as f: intents = {json.loads(l)["intent"] for l in f}
    assert tuple(sorted(intents)) == MASSIVE_INTENTS and len(intents) == 60


@pytest.mark.parametrize("locale", ["en-US", "de-DE", "am-ET", "zh-CN"])
def test_massive_locale(locale):
    d = _need("massive")
    dd = load_benchmark("massive", languages=[locale])
    assert [dd[s].num_rows for s in SPLITS] == [11514, 2033, 2974]
    with gzip.open(d/f"{locale}.jsonl.gz", "rt", encoding="utf-8") as f: first = json.loads(f.readline())
    row = dd[first["partition"]][0]
    assert row == {"text": first["utt"], "label": MASSIVE_INTENTS.index(first["intent"]), "language": locale}


def test_massive_parallel_labels():
    _need("massive")
    dd = load_benchmark("massive", languages=["en-US", "sw-KE"])
    for s in SPLITS:
        df = dd[s].to_pandas()
        assert list(df.label[df.language == "en-US"]) == list(df.label[df.language == "sw-KE"])


def test_massive_8_is_a_sample_of_massive():
    "massive-8 (the cpu-real preset's massive) reads the same files: four seen and four unseen locales of Table 1."
    _need("massive")
    b = BENCHMARKS["massive-8"]
    assert set(b.unseen) <= set(TABLE1_UNSEEN["massive"]) and len(b.unseen) == 4
    assert set(b.seen).isdisjoint(TABLE1_UNSEEN["massive"]) and len(b.seen) == 4 and b.english in b.seen
    small, full = load_benchmark("massive-8", languages="unseen"), load_benchmark("massive", languages=list(b.unseen))
    for s in SPLITS: assert small[s].to_dict() == full[s].to_dict()


# ---------------------------------------------------------------- universal-ner
# README table: treebank -> split -> (sentences, tokens, PER, ORG, LOC mentions)
UNER = {
    "da_ddt": {"train": (4383, 80378, 1235, 907, 880), "dev": (564, 10332, 166, 106, 107), "test": (565, 10023, 184, 172, 90)},
    "en_ewt": {"train": (12543, 204579, 2873, 1434, 2698), "dev": (2001, 25149, 343, 224, 399), "test": (2077, 25097, 449, 322, 317)},
    "hr_set": {"train": (6914, 152857, 2432, 2755, 3074), "dev": (960, 22292, 399, 424, 395), "test": (1136, 24260, 392, 414, 597)},
    "pt_bosque": {"train": (7018, 171776, 2914, 2762, 2425), "dev": (1172, 28447, 570, 417, 414), "test": (1167, 27604, 442, 456, 317)},
    "sk_snk": {"train": (8483, 80628, 2277, 153, 277), "dev": (1060, 12733, 276, 60, 300), "test": (1061, 12736, 539, 50, 326)},
    "sr_set": {"train": (3328, 74259, 1434, 1527, 2059), "dev": (536, 11993, 234, 215, 293), "test": (520, 11421, 209, 251, 387)},
    "sv_talbanken": {"train": (4303, 66646, 250, 213, 504), "dev": (504, 9797, 13, 5, 5), "test": (1219, 20377, 33, 31, 132)},
    "zh_gsd": {"train": (3997, 98616, 2155, 1110, 2871), "dev": (500, 12663, 238, 135, 437), "test": (500, 12012, 206, 127, 434)},
    "zh_gsdsimp": {"train": (3997, 98616, 2148, 1112, 2858), "dev": (500, 12663, 245, 133, 375), "test": (500, 12012, 205, 129, 429)},
    "ceb_gja": {"test": (188, 1295, 42, 1, 6)}, "de_pud": {"test": (1000, 21331, 418, 192, 429)},
    "en_pud": {"test": (1000, 21176, 414, 235, 426)}, "pt_pud": {"test": (1000, 23407, 413, 198, 488)},
    "ru_pud": {"test": (1000, 19355, 414, 276, 346)}, "sv_pud": {"test": (1000, 19076, 425, 162, 442)},
    "tl_trg": {"test": (128, 734, 19, 0, 4)}, "tl_ugnayan": {"test": (94, 1097, 2, 0, 31)},
    "zh_pud": {"test": (1000, 21415, 473, 154, 512)},
}


@pytest.fixture(scope="module")
def uner_all():
    _need("universal-ner")
    b = BENCHMARKS["universal-ner"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dd = load_benchmark("universal-ner", languages=list(b.languages + b.test_only))
    return dd, w


def test_uner_counts(uner_all):
    dd, _ = uner_all
    names = dd["train"].features["ner_tags"].feature.names
    B = {names.index(f"B-{t}"): t for t in ("PER", "ORG", "LOC")}
    for s in SPLITS:
        df = dd[s].to_pandas()
        for tb, g in df.groupby("language"):
            tags = [t for ts in g.ner_tags for t in ts]
            ments = Counter(B[t] for t in tags if t in B)
            got = (len(g), len(tags), ments["PER"], ments["ORG"], ments["LOC"])
            assert got == UNER[tb][s], (tb, s, got)
        assert set(df.language) == {tb for tb in UNER if s in UNER[tb]}


def test_uner_labels_and_preliminary_warning(uner_all):
    dd, w = uner_all
    assert dd["test"].features["ner_tags"].feature.names == list(NER_LABELS)
    assert all(len(r["tokens"]) == len(r["ner_tags"]) for r in dd["dev"])
    msgs = [str(x.message) for x in w if issubclass(x.category, PreliminaryDataWarning)]
    assert len(msgs) == 1 and "preliminary" in msgs[0] and "PRELIMINARY" in msgs[0]


@pytest.mark.parametrize("tb,split", [("hr_set", "train"), ("sr_set", "dev"), ("en_ewt", "train")])
def test_uner_oth_and_b_o_mapped_to_o(tb, split):
    d = _need("universal-ner")
    path = d/tb/f"{tb}-ud-{split}.iob2"
    if not path.exists(): path = d/tb/"preliminary"/path.name
    raw = [l.split("\t")[2] for l in path.read_text(encoding="utf-8").split("\n") if l.strip() and not l.startswith("#")]
    assert any(t.endswith("-OTH") for t in raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreliminaryDataWarning)
        ds = load_benchmark("universal-ner", languages=[tb])[split]
    got = [NER_LABELS[t] for ts in ds["ner_tags"][:] for t in ts]
    assert got == ["O" if t in ("B-OTH", "I-OTH", "B-O") else t for t in raw]


# ---------------------------------------------------------------- locations, env, hub
def test_data_dir_env(tmp_path, monkeypatch):
    src = _need("tsm")
    shutil.copytree(src/"german", tmp_path/"tsm"/"german")
    monkeypatch.setenv("KDNB_DATA_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path.resolve()
    assert load_benchmark("tsm", languages="german")["dev"].num_rows == 324
    with pytest.raises(DataFileError, match="english/train_text.txt.*KDNB_DATA_DIR"):
        load_benchmark("tsm", languages="english")
    monkeypatch.setenv("KDNB_DATA_DIR", str(tmp_path/"nope"))
    with pytest.raises(FileNotFoundError, match="KDNB_DATA_DIR"): find_data_dir()


def test_hub_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="KDNB_DATA_DIR") as e:
        load_benchmark("massive", languages="en-US", data_dir="hub")
    assert "massive/<locale>.jsonl.gz" in str(e.value)


# ---------------------------------------------------------------- bad files, from copies of real ones
@pytest.fixture
def bad_dir(tmp_path):
    d = find_data_dir()
    if d is None or not all(data_available(n) for n in ("massive", "tsm", "universal-ner")):
        pytest.skip("real data absent (../shared/data or $KDNB_DATA_DIR)")
    (tmp_path/"massive").mkdir()
    shutil.copytree(d/"tsm"/"english", tmp_path/"tsm"/"english")
    shutil.copytree(d/"universal-ner"/"sr_set", tmp_path/"universal-ner"/"sr_set")
    return d, tmp_path


def test_bad_massive_truncated_gzip(bad_dir):
    d, t = bad_dir
    data = (d/"massive"/"en-US.jsonl.gz").read_bytes()
    (t/"massive"/"en-US.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=r"en-US\.jsonl\.gz, line \d+: .*truncated"):
        load_benchmark("massive", languages="en-US", data_dir=t)


def test_bad_massive_truncated_json_line(bad_dir):
    d, t = bad_dir
    with gzip.open(d/"massive"/"de-DE.jsonl.gz", "rt", encoding="utf-8") as f: lines = f.read().split("\n")
    (t/"massive"/"de-DE.jsonl").write_text("\n".join(lines[:100]) + "\n" + lines[100][:40], encoding="utf-8")
    with pytest.raises(DataFileError, match=r"de-DE\.jsonl, line 101: not valid JSON"):
        load_benchmark("massive", languages="de-DE", data_dir=t)


def test_bad_massive_empty_utterance(bad_dir):
    d, t = bad_dir
    with gzip.open(d/"massive"/"de-DE.jsonl.gz", "rt", encoding="utf-8") as f: lines = f.read().split("\n")
    r = json.loads(lines[6]); r["utt"] = ""; lines[6] = json.dumps(r, ensure_ascii=False)
    with gzip.open(t/"massive"/"de-DE.jsonl.gz", "wt", encoding="utf-8") as f: f.write("\n".join(lines))
    with pytest.raises(DataFileError, match=r"de-DE\.jsonl\.gz, line 7: empty utterance"):
        load_benchmark("massive", languages="de-DE", data_dir=t)


def test_bad_missing_file(bad_dir):
    _, t = bad_dir
    with pytest.raises(DataFileError, match=r"Missing file\(s\).*massive/fr-FR\.jsonl\.gz.*KDNB_DATA_DIR"):
        load_benchmark("massive", languages="fr-FR", data_dir=t)
    (t/"tsm"/"english"/"val_labels.txt").unlink()
    with pytest.raises(DataFileError, match="english/val_labels.txt"):
        load_benchmark("tsm", languages="english", data_dir=t)


def test_bad_tsm_count_mismatch(bad_dir):
    _, t = bad_dir
    p = t/"tsm"/"english"/"test_labels.txt"
    p.write_text("\n".join(p.read_text().split("\n")[:-1]))
    with pytest.raises(DataFileError, match="test_text.txt has 870 lines but .*test_labels.txt has 869"):
        load_benchmark("tsm", languages="english", data_dir=t)


def test_bad_tsm_empty_text(bad_dir):
    _, t = bad_dir
    p = t/"tsm"/"english"/"val_text.txt"
    lines = p.read_text(encoding="utf-8").split("\n"); lines[9] = "  "
    p.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataFileError, match=r"val_text\.txt, line 10: empty utterance"):
        load_benchmark("tsm", languages="english", data_dir=t)


def test_bad_uner_unknown_tag(bad_dir):
    _, t = bad_dir
    p = t/"universal-ner"/"sr_set"/"sr_set-ud-dev.iob2"
    lines = p.read_text(encoding="utf-8").split("\n")
    i = next(i for i, l in enumerate(lines) if "\tB-LOC\t" in l)
    lines[i] = lines[i].replace("\tB-LOC\t", "\tB-GPE\t", 1)
    p.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"sr_set-ud-dev\.iob2, line {i + 1}: unknown NER tag 'B-GPE'"):
        load_benchmark("universal-ner", languages="sr_set", data_dir=t)


def test_bad_uner_truncated_line(bad_dir):
    _, t = bad_dir
    p = t/"universal-ner"/"sr_set"/"sr_set-ud-test.iob2"
    lines = p.read_text(encoding="utf-8").split("\n")
    i = next(i for i in range(len(lines) // 2, len(lines)) if lines[i][:1].isdigit())
    lines[i] = "\t".join(lines[i].split("\t")[:2])  # the file now ends in the middle of a token line
    p.write_text("\n".join(lines[: i + 1]), encoding="utf-8")
    with pytest.raises(DataFileError, match=rf"sr_set-ud-test\.iob2, line {i + 1}: 2 tab-separated column"):
        load_benchmark("universal-ner", languages="sr_set", data_dir=t)


# ---------------------------------------------------------------- subsets
def test_stratified_subset_massive():
    _need("massive")
    ds = load_benchmark("massive", languages=["en-US", "fr-FR"])["train"]
    sub = stratified_subset(ds, 0.1, seed=0)
    full = ds.to_pandas().groupby(["language", "label"]).size()
    got = sub.to_pandas().groupby(["language", "label"]).size().reindex(full.index, fill_value=0)
    assert (abs(got - full * 0.1) <= 1).all()
    assert sub.to_pandas().groupby("language").size().to_dict() == {"en-US": 1151, "fr-FR": 1151}
    again = stratified_subset(load_benchmark("massive", languages=["en-US"])["train"], 0.1, seed=0)
    assert again["text"][:] == [r["text"] for r in sub if r["language"] == "en-US"]


# ---------------------------------------------------------------- tokenization
def _tokenizer():
    try:
        from kdnb.embedded import embedded_tokenizer
    except ImportError:
        embedded_tokenizer = None
    if embedded_tokenizer is not None:
        try: return embedded_tokenizer()
        except Exception as e: pytest.skip(f"embedded tokenizer unavailable: {e}")
    pytest.skip("kdnb.embedded.embedded_tokenizer missing")


def test_tokenize_ner_alignment_embedded():
    _need("universal-ner")
    tok = _tokenizer()
    dd = load_benchmark("universal-ner", languages=["zh_gsd", "sr_set"])
    dd = dd.filter(lambda r, i: i % 10 == 0, with_indices=True)
    out = tokenize(dd, tok, "ner", max_length=512)
    for raw, enc in zip(dd["dev"], out["dev"]):
        labelled = [l for l in enc["labels"] if l != -100]
        words_seen = {w for w in tok(raw["tokens"], is_split_into_words=True).word_ids() if w is not None}
        assert labelled == [t for i, t in enumerate(raw["ner_tags"]) if i in words_seen]
        assert enc["language"] == raw["language"]
    short = tokenize(dd, tok, "ner", max_length=16)
    assert max(len(x) for x in short["train"]["input_ids"][:]) == 16
    batch = collator(tok, "ner")([short["train"][i] for i in range(4)])
    assert batch["labels"].shape == batch["input_ids"].shape


def test_tokenize_classification_embedded():
    _need("tsm")
    tok = _tokenizer()
    dd = load_benchmark("tsm", languages=["hindi", "english"])
    out = tokenize(dd, tok, "classification", max_length=64)
    assert set(out["train"].column_names) == {"input_ids", "attention_mask", "labels", "language"}
    assert out["train"]["labels"][:] == dd["train"]["label"][:]
    assert max(len(x) for x in out["test"]["input_ids"][:]) <= 64
    batch = collator(tok, "classification")([out["test"][i] for i in range(8)])
    assert batch["input_ids"].shape[0] == 8 and "language" not in batch


# ---------------------------------------------------------------- hub path, with load_dataset faked
def test_hub_path_shares_processing(monkeypatch):
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
    calls = []
    hub_intents = ["weather_query", "alarm_set", "qa_maths"]  # hub ClassLabel order differs from kdnb's sorted list

    def fake_load_dataset(path, data_files=None, **kw):
        calls.append((path, data_files))
        url = next(iter(data_files.values()))
        if "massive" in url:
            f = Features({"utt": Value("string"), "intent": ClassLabel(names=hub_intents)})
            return DatasetDict({s: Dataset.from_dict({"utt": ["wake me up"], "intent": [1]}, features=f) for s in data_files})
        if "tweet" in url:
            f = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "neutral", "positive"])})
            return DatasetDict({s: Dataset.from_dict({"text": ["nice"], "label": [2]}, features=f) for s in data_files})
        f = Features({"tokens": Sequence(Value("string")),
                      "ner_tags": Sequence(ClassLabel(names=list(NER_LABELS) + ["B-OTH", "I-OTH"]))})
        return DatasetDict({s: Dataset.from_dict({"tokens": [["EU", "Ana"]], "ner_tags": [[7, 1]]}, features=f)
                            for s in data_files})

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dd = load_benchmark("massive", languages=["de-DE"], data_dir="hub")
    assert dd["train"][0] == {"text": "wake me up", "label": MASSIVE_INTENTS.index("alarm_set"), "language": "de-DE"}
    assert calls[-1] == ("parquet", {s: f"hf://datasets/AmazonScience/massive@refs%2Fconvert%2Fparquet/de-DE/{h}/*.parquet"
                                     for s, h in [("train", "train"), ("dev", "validation"), ("test", "test")]})
    assert load_benchmark("tsm", languages="hindi", data_dir="hub")["dev"][0]["label"] == 2
    dd = load_benchmark("universal-ner", languages=["hr_set", "de_pud"], data_dir="hub")
    assert dd["test"]["ner_tags"][:] == [[0, 1], [0, 1]] and dd["train"]["language"][:] == ["hr_set"]
    assert list(calls[-1][1]) == ["test"]


# ---------------------------------------------------------------- built-in demo data (always available)
def test_demo_intent():
    from kdnb.data import DEMO_INTENTS
    b = BENCHMARKS["demo-intent"]
    dd = load_benchmark("demo-intent")
    df = dd["train"].to_pandas()
    assert set(df.language) == set(b.languages) and set(dd["test"]["language"][:]) == set(b.languages)
    assert set(df.label) == set(range(len(DEMO_INTENTS))) == set(dd["test"]["label"][:])
    full = pd_concat(dd).groupby(["language", "label"]).size()
    assert full.min() >= 20, full.min()
    assert set(load_benchmark("demo-intent", languages="unseen")["dev"]["language"][:]) == {"pt", "ru", "ar"}


def test_demo_ner_tokenize_embedded():
    b = BENCHMARKS["demo-ner"]
    dd = load_benchmark("demo-ner")
    assert pd_concat(dd).groupby("language").size().min() >= 150
    assert set(dd["train"]["language"][:]) == set(b.languages)
    tok = _tokenizer()
    out = tokenize(dd, tok, "ner")
    for raw, enc in zip(dd["test"], out["test"]):
        assert [l for l in enc["labels"] if l != -100] == raw["ner_tags"]


def pd_concat(dd):
    import pandas as pd
    return pd.concat([dd[s].to_pandas() for s in SPLITS])
