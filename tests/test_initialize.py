"Matrix tests for kdnb.initialize (the notebook nbs/05_initialize.ipynb holds the readable ones)."
import re
import pytest, torch
from transformers import (AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                          DistilBertConfig, DistilBertForSequenceClassification, DebertaConfig,
                          DebertaForSequenceClassification)
from transformers.utils import logging as hf_logging
import kdnb.initialize as ki
from kdnb.initialize import make_student, width_indices, param_roles, evenly_spaced, INITIALIZATIONS
from kdnb.models import tiny_config, tiny_model
from kdnb.testing import perturbed, tiny_teacher, assert_selected

torch.set_num_threads(1)
hf_logging.disable_progress_bar()
ARCHS, TASKS = ("xlmr", "deberta", "bert"), ("classification", "ner")
AUTO = {"classification": AutoModelForSequenceClassification, "ner": AutoModelForTokenClassification}
IDS = torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(0))


teacher = tiny_teacher


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("init", list(INITIALIZATIONS))
@pytest.mark.parametrize("hidden", [None, 16])
def test_matrix_roundtrip(arch, task, init, hidden, tmp_path):
    t = teacher(arch, task)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    base = perturbed(AutoModel.from_config(tiny_config(arch)), 1) if init == "from-base" else None
    s = make_student(t, num_layers=2, hidden_size=hidden, init=init, base=base).eval()
    assert type(s) is type(t)
    assert s.config.kdnb_teacher_layers == [1, 3] and s.config.kdnb_init == init
    assert s.config.hidden_size == (hidden or 32) and s.config.intermediate_size == (64 if hidden is None else 32)
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in before.items())   # the teacher is untouched
    out = s(IDS, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and out.hidden_states[-1].shape[-1] == (hidden or 32)
    idx = width_indices(t.config, s.config.hidden_size, s.config.intermediate_size)
    if init == "from-teacher": assert_selected(s, t, [1, 3], idx)
    if init == "from-base": assert_selected(s.base_model, base, [1, 3], idx,
                                            names={n for n, _ in s.base_model.named_parameters() if not n.startswith("pooler.")})
    s.save_pretrained(tmp_path)
    r = AUTO[task].from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(r) is type(s) and r.config.kdnb_teacher_layers == [1, 3] and r.config.kdnb_init == init
    with torch.no_grad(): assert torch.equal(r(IDS).logits, s(IDS).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_12_to_6_and_layer_map(arch):
    t = teacher(arch, num_layers=12, hidden_size=16, num_heads=2, intermediate_size=32)
    idx = width_indices(t.config, 16, 32)
    s = make_student(t, num_layers=6)
    assert s.config.kdnb_teacher_layers == [1, 3, 5, 7, 9, 11]
    assert_selected(s, t, [1, 3, 5, 7, 9, 11], idx)
    lm = [0, 2, 4, 7, 9, 11]
    s = make_student(t, num_layers=6, layer_map=lm)
    assert s.config.kdnb_teacher_layers == lm
    assert_selected(s, t, lm, idx)
    with pytest.raises(ValueError, match="layer_map"): make_student(t, num_layers=5)
    with pytest.raises(ValueError, match="increasing"): make_student(t, num_layers=3, layer_map=[4, 4, 8])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("task", TASKS)
def test_non_integer_width_ratio(arch, task):
    "48 -> 36 (head size 12 -> 9): per-head selection, default intermediate scaled by 3/4."
    t = teacher(arch, task, hidden_size=48, intermediate_size=96)
    s = make_student(t, num_layers=4, hidden_size=36)
    assert s.config.intermediate_size == 72
    idx = width_indices(t.config, 36, 72)
    heads = idx["head"].view(4, 9) - torch.arange(4)[:, None] * 12
    assert (heads == evenly_spaced(12, 9)).all()
    assert_selected(s, t, [0, 1, 2, 3], idx)
    s(IDS)


@pytest.mark.parametrize("extra", [dict(conv_kernel_size=3), dict(share_att_key=False), dict(conv_kernel_size=3, share_att_key=False)])
def test_deberta_variants_width_halved(extra):
    cfg = tiny_config("deberta", num_labels=3)
    for k, v in extra.items(): setattr(cfg, k, v)   # tiny_config fixes share_att_key, so set it afterwards
    torch.manual_seed(0)
    t = perturbed(AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager"))
    s = make_student(t, num_layers=2, hidden_size=16)
    names = {n for n, _ in s.named_parameters()}
    if "conv_kernel_size" in extra: assert "deberta.encoder.conv.conv.weight" in names
    if extra.get("share_att_key") is False: assert any("pos_key_proj" in n for n in names)
    assert_selected(s, t, [1, 3], width_indices(t.config, 16, 32))
    assert s.deberta.encoder.rel_embeddings.weight.shape == (32, 16)   # buckets kept, width selected
    s(IDS)
    with torch.no_grad():                                               # full copy is still exact
        assert torch.equal(make_student(t, num_layers=4)(IDS).logits, t(IDS).logits)


BAD = [
    (dict(num_layers=8), "deeper"),
    (dict(num_layers=3), "layer_map"),
    (dict(num_layers=2, hidden_size=64), "wider"),
    (dict(num_layers=2, intermediate_size=128), "wider"),
    (dict(num_layers=2, hidden_size=30), "divisible"),
    (dict(num_layers=2, init="copy"), "from-teacher, from-base, from-scratch"),
    (dict(num_layers=2, init="from-base"), "needs base"),
    (dict(num_layers=2, init="from-scratch", base="x"), "only used with"),
]


@pytest.mark.parametrize("kw,msg", BAD)
def test_errors_before_building(kw, msg, monkeypatch):
    t = teacher("xlmr")
    def no_build(*a, **k): raise AssertionError("a model was built before the request was validated")
    monkeypatch.setattr(ki, "_build", no_build)
    with pytest.raises(ValueError, match=re.escape(msg)): make_student(t, **kw)


@pytest.mark.parametrize("base,msg", [
    (lambda: tiny_model("xlmr"), "model_type"),
    (lambda: tiny_model("bert", hidden_size=64), "hidden_size"),
    (lambda: tiny_model("bert", num_layers=6), "num_hidden_layers"),
    (lambda: tiny_model("bert", vocab_size=100), "vocab_size"),
    (lambda: torch.nn.Linear(2, 2), "model_type"),
])
def test_bad_base(base, msg, monkeypatch):
    t = teacher("bert")
    monkeypatch.setattr(ki, "_build", lambda *a, **k: pytest.fail("built before validating the base"))
    with pytest.raises(ValueError, match=msg): make_student(t, num_layers=2, init="from-base", base=base())


@pytest.mark.parametrize("model", [
    lambda: DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
    lambda: DebertaForSequenceClassification(DebertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=2, intermediate_size=64)),
    lambda: AutoModel.from_config(tiny_config("xlmr")),
])
def test_unsupported(model):
    with pytest.raises(ValueError, match="XLM-R.*BERT.*DeBERTa-v2/v3.*ForSequenceClassification or ForTokenClassification"):
        make_student(model(), num_layers=1)


def test_dtype_mode_and_base_with_head():
    t = teacher("deberta", "ner").to(torch.bfloat16).train()
    s = make_student(t, num_layers=2, hidden_size=16)
    assert s.dtype == torch.bfloat16 and s.training and t.training
    b = teacher("deberta", "classification", seed=3).to(torch.bfloat16)          # a base that has (another) head
    s = make_student(t, num_layers=2, init="from-base", base=b)
    assert torch.equal(s.deberta.encoder.rel_embeddings.weight, b.deberta.encoder.rel_embeddings.weight)
    assert not (s.classifier.weight == t.classifier.weight).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_feed_forward_only_reduction(arch):
    t = teacher(arch)
    s = make_student(t, num_layers=4, intermediate_size=48)
    assert (s.config.hidden_size, s.config.intermediate_size) == (32, 48)
    idx = width_indices(t.config, 32, 48)
    assert idx["hid"].tolist() == list(range(32))
    assert_selected(s, t, [0, 1, 2, 3], idx)
