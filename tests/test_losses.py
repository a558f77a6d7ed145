"Integration tests for kdnb.losses with students built by kdnb.initialize.make_student (the notebook holds the unit tests)."
import pytest, torch
from kdnb.initialize import make_student, teacher_layers
from kdnb.losses import KDLoss, kd_loss_for, model_outputs, teacher_outputs, TERMS
from kdnb.models import tiny_model

torch.set_num_threads(1)
BATCH = dict(input_ids=torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]]),
             attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]))
LABELS = {"classification": torch.tensor([0, 2]),
          "ner": torch.tensor([[-100, 1, 0, 2, 0, -100], [-100, 3, 0, -100, -100, -100]])}


def batch(task, arch):
    b = dict(BATCH, labels=LABELS[task])
    if arch != "xlmr": b["input_ids"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, 0)   # pad id 0
    return b


@pytest.mark.parametrize("arch", ["xlmr", "deberta", "bert"])
@pytest.mark.parametrize("task", ["classification", "ner"])
def test_same_depth_copy_has_zero_kd_loss(arch, task):
    t = tiny_model(arch, task, num_labels=4, num_layers=4).eval()
    s = make_student(t, num_layers=4).eval()
    b = batch(task, arch)
    kd = kd_loss_for(s, t, task)
    _, terms = kd(model_outputs(s, b), teacher_outputs(t, b), b["labels"], b["attention_mask"])
    for k in ("att", "hid", "embd", "pred"): assert terms[k].item() == pytest.approx(0., abs=1e-10)


@pytest.mark.parametrize("arch", ["xlmr", "deberta", "bert"])
@pytest.mark.parametrize("task", ["classification", "ner"])
def test_half_student_padding_invariance_and_grads(arch, task):
    t = tiny_model(arch, task, num_labels=4, num_layers=4)
    s = make_student(t, num_layers=2, hidden_size=16, intermediate_size=32).eval()
    kd = kd_loss_for(s, t, task)
    assert kd.teacher_layers == [1, 3] and kd.proj.weight.shape == (32, 16)
    b = batch(task, arch)
    b2 = dict(b, input_ids=b["input_ids"].clone()); b2["input_ids"][1, 4:] = 50
    total, terms = kd(model_outputs(s, b), teacher_outputs(t, b), b["labels"], b["attention_mask"])
    _, terms2 = kd(model_outputs(s, b2), teacher_outputs(t, b2), b["labels"], b["attention_mask"])
    for k in TERMS: assert terms2[k].item() == pytest.approx(terms[k].item(), rel=1e-5, abs=1e-9)
    total.backward()
    assert kd.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in t.parameters())


def test_training_steps_reduce_kd_loss():
    "A few AdamW steps on student + W bring the distillation terms down (W is a trainable part of the loss)."
    t = tiny_model("xlmr", "classification", num_labels=4, num_layers=4)
    s = make_student(t, num_layers=2, hidden_size=16, intermediate_size=32, init="from-scratch")
    kd = kd_loss_for(s, t, "classification")
    opt = torch.optim.AdamW(list(s.parameters()) + list(kd.parameters()), lr=1e-2)
    b, losses = batch("classification", "xlmr"), []
    tout = teacher_outputs(t, b)
    s.train()
    for _ in range(30):
        total, terms = kd(model_outputs(s, b), tout, b["labels"], b["attention_mask"])
        opt.zero_grad(); total.backward(); opt.step()
        losses.append(terms["hid"].item() + terms["embd"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_models_give_float32_loss():
    t = tiny_model("xlmr", "ner", num_labels=4, num_layers=4).to(torch.bfloat16)
    s = make_student(t, num_layers=2, hidden_size=16, intermediate_size=32).to(torch.bfloat16)
    kd = kd_loss_for(s, t, "ner")
    b = batch("ner", "xlmr")
    total, terms = kd(model_outputs(s, b), teacher_outputs(t, b), b["labels"], b["attention_mask"])
    assert total.dtype == torch.float32 and torch.isfinite(total)


def test_projection_round_trips_through_state_dict(tmp_path):
    "W is saved with the run as the KDLoss state dict (e.g. kd_projection.safetensors)."
    from safetensors.torch import save_file, load_file
    kd = KDLoss(16, 32, [1, 3], task="ner")
    save_file(kd.state_dict(), tmp_path/"kd_projection.safetensors")
    kd2 = KDLoss(16, 32, [1, 3], task="ner"); kd2.load_state_dict(load_file(tmp_path/"kd_projection.safetensors"))
    assert torch.equal(kd.proj.weight, kd2.proj.weight)
