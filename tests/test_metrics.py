"Baselines of kdnb.metrics on the real benchmark files: the paper's Table 7 'random score' row (7.02 / 33.33 / 1.75)."
import glob
import pytest
from kdnb.data import find_data_dir, NER_LABELS
from kdnb.loader import read_massive, read_tsm, read_iob2
from kdnb.metrics import majority_baseline, random_ner_baseline

UNER_TRAINED = "da_ddt en_ewt hr_set pt_bosque sk_snk sr_set sv_talbanken zh_gsd zh_gsdsimp".split()


def data_dir(sub):
    d = find_data_dir()
    if d is None or not (d/sub).is_dir(): pytest.skip(f"benchmark data folder {sub}/ absent (../shared/data)")
    return d/sub


def test_majority_massive_matches_paper():
    cols = read_massive(next(data_dir("massive").glob("en-US.jsonl*")))
    train, test = cols["train"]["label"], cols["test"]["label"]
    assert majority_baseline(train, test, average="micro") == pytest.approx(0.0702, abs=6e-4)   # paper: 7.02
    assert majority_baseline(train, test) < 0.005                                               # macro-F1: 0.22%


def test_majority_tsm_matches_paper():
    for lang in ("english", "arabic"):
        cols = read_tsm(data_dir("tsm")/lang)
        assert majority_baseline(cols["train"]["label"], cols["test"]["label"], average="micro") == pytest.approx(1/3)  # 33.33
        assert majority_baseline(cols["train"]["label"], cols["test"]["label"]) == pytest.approx(1/6)


def test_random_ner_matches_paper():
    root, gold = data_dir("universal-ner"), []
    for tb in UNER_TRAINED:
        (path,) = glob.glob(str(root/tb/"*-test.iob2"))
        gold += [[NER_LABELS[i] for i in s] for s in read_iob2(path)["ner_tags"]]
    assert random_ner_baseline(gold, list(NER_LABELS), runs=30) == pytest.approx(0.0175, abs=1e-3)  # paper: 1.75
