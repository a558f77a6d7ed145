"Heavier tests for kdnb.train (the notebook holds the fast ones): exact resume, faults, NER + make_student, 2-process DDP."
import json, os, shutil, signal, subprocess, sys
from pathlib import Path

import pytest, torch
from datasets import DatasetDict
from safetensors.torch import load_file
from transformers import AutoModelForTokenClassification, TrainerCallback

from kdnb.data import NER_LABELS, tokenize
from kdnb.initialize import make_student
from kdnb.models import tiny_model
from kdnb.checkpoints import TrainingDiverged, last_checkpoint
from kdnb.train import KD_ATTR, as_settings, distill, evaluate_by_language, fine_tune
from kdnb.testing import toy_benchmark, toy_tokenizer

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
LABELS = ["neg", "neu", "pos"]
QUICK = as_settings("tiny").replace(max_steps=12, eval_steps=3, logging_steps=1, learning_rate=1e-3)


@pytest.fixture(scope="module")
def tok(): return toy_tokenizer()


@pytest.fixture(scope="module")
def data(tok): return tokenize(toy_benchmark(n_train=8, n_dev=4, n_test=4), tok, "classification")


@pytest.fixture(scope="module")
def teacher(): return tiny_model("xlmr", num_labels=3)


def student(): return tiny_model("xlmr", num_labels=3, num_layers=2, hidden_size=16, intermediate_size=32, seed=1)


def kw(tok, out, **more): return dict(task="classification", label_names=LABELS, tokenizer=tok, out_dir=out,
                                      settings=QUICK, progress=False, **more)


class Stop(TrainerCallback):
    "Raise after step `at` (a stand-in for a kill)."
    def __init__(self, at): self.at = at
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at: raise RuntimeError(f"stopped at {self.at}")


class Poison(TrainerCallback):
    "Set the input embeddings to NaN after step `at`."
    def __init__(self, at): self.at = at
    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.at: model.get_input_embeddings().weight.data.fill_(float("nan"))


def test_resume_matches_uninterrupted_run(tmp_path, tok, data, teacher):
    "Stopping after step 8 and resuming gives the same student, W and best step as one uninterrupted run."
    full = distill(student(), teacher, data, **kw(tok, tmp_path/"full"))
    with pytest.raises(RuntimeError, match="stopped at 8"):
        distill(student(), teacher, data, **kw(tok, tmp_path/"cut", callbacks=[Stop(8)]))
    assert last_checkpoint(tmp_path/"cut"/"checkpoints").name == "checkpoint-6"
    cut = distill(student(), teacher, data, **kw(tok, tmp_path/"cut"))
    assert (cut.global_step, cut.best_step) == (full.global_step, full.best_step)
    for (k, a), b in zip(full.model.state_dict().items(), cut.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    torch.testing.assert_close(full.projection.weight, cut.projection.weight)
    losses = lambda r: [(h["step"], round(h["loss"], 5)) for h in r.log_history if "loss" in h]
    assert losses(full) == losses(cut)
    assert cut.wall_time > 0


def test_finished_run_is_not_retrained(tmp_path, tok, data, teacher):
    "Calling again on a finished run resumes from its last checkpoint: no new steps, same result."
    first = fine_tune(tiny_model("xlmr", num_labels=3), data, **kw(tok, tmp_path))
    again = fine_tune(tiny_model("xlmr", num_labels=3), data, **kw(tok, tmp_path))
    assert again.global_step == first.global_step and again.best_dev_f1 == first.best_dev_f1
    assert [h["step"] for h in again.log_history if "loss" in h] == [h["step"] for h in first.log_history if "loss" in h]


def test_half_written_checkpoint_is_ignored(tmp_path, tok, data, teacher):
    "A checkpoint folder without trainer_state.json (killed while saving) is skipped and removed."
    with pytest.raises(RuntimeError): distill(student(), teacher, data, **kw(tok, tmp_path, callbacks=[Stop(7)]))
    broken = tmp_path/"checkpoints"/"checkpoint-9"
    broken.mkdir(); (broken/"model.safetensors").write_bytes(b"truncated")
    assert last_checkpoint(tmp_path/"checkpoints").name == "checkpoint-6"
    res = distill(student(), teacher, data, **kw(tok, tmp_path))
    assert res.global_step == 12


def test_nan_after_checkpoint_quarantines_it(tmp_path, tok, data, teacher):
    "Weights broken just before a save: that checkpoint is set aside, the previous one is the last good one."
    with pytest.raises(TrainingDiverged, match="checkpoint-3") as e:
        distill(student(), teacher, data, **kw(tok, tmp_path, callbacks=[Poison(6)]))
    assert "step 7" in str(e.value)
    ck = tmp_path/"checkpoints"
    assert (ck/"diverged-checkpoint-6").is_dir() and last_checkpoint(ck).name == "checkpoint-3"
    res = distill(student(), teacher, data, **kw(tok, tmp_path))   # resumes from checkpoint-3 and finishes
    assert res.global_step == 12 and all(torch.isfinite(p).all() for p in res.model.parameters())


def test_fine_tune_diverges_cleanly(tmp_path, tok, data):
    with pytest.raises(TrainingDiverged, match="step 5"):
        fine_tune(tiny_model("xlmr", num_labels=3), data, **kw(tok, tmp_path, callbacks=[Poison(4)]))
    assert last_checkpoint(tmp_path/"checkpoints").name == "checkpoint-3"


def test_kd_weights_and_gradient_accumulation(tmp_path, tok, data, teacher):
    "A zero weight switches its term off; gradient accumulation keeps the terms per optimizer step."
    s = QUICK.replace(max_steps=4, gradient_accumulation_steps=2, batch_size=4)
    res = distill(student(), teacher, data, **kw(tok, tmp_path, weights={"att": 0, "w_pred": 2.}) | dict(settings=s))
    logs = [h for h in res.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4] and all(h["att"] == 0 for h in logs)
    h = logs[0]
    assert h["loss"] == pytest.approx(h["hid"] + h["embd"] + 2 * h["pred"] + h["clf"], rel=1e-4)
    assert json.loads((res.best_dir/"kdnb_run.json").read_text())["weights"] == {"att": 0., "pred": 2.}
    with pytest.raises(ValueError, match="Unknown KD weight"):
        distill(student(), teacher, data, **kw(tok, tmp_path/"x", weights={"attention": 0}))
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill(tiny_model("xlmr", num_labels=3, vocab_size=100), teacher, data, **kw(tok, tmp_path/"x"))


def test_bf16_on_cpu_autocasts_student_and_teacher(tmp_path, tok, data, teacher):
    "bf16=True works without a GPU: student and teacher matmuls run in bf16, the weights and the loss stay fp32."
    s, seen = student(), {}
    rec = lambda who: (lambda m, i, o: seen.setdefault(who, set()).add(o.dtype))
    hooks = [m.roberta.encoder.layer[0].attention.self.query.register_forward_hook(rec(who))
             for who, m in (("student", s), ("teacher", teacher))]
    try: res = distill(s, teacher, data, **kw(tok, tmp_path) | dict(settings=QUICK.replace(max_steps=2, bf16=True)))
    finally:
        for h in hooks: h.remove()
    assert torch.bfloat16 in seen["student"] and torch.bfloat16 in seen["teacher"], seen
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    logs = [h for h in res.log_history if "loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_ner_distill_from_make_student(tmp_path, tok):
    "NER end to end with a DeBERTa teacher and a from-teacher student of the same width (no W)."
    ner = tokenize(toy_benchmark("ner", n_train=8, n_dev=4, n_test=4), tok, "ner")
    labels = list(NER_LABELS)
    t = tiny_model("deberta", task="ner", num_labels=7)
    s = make_student(t, num_layers=2)
    res = distill(s, t, ner, task="ner", label_names=labels, tokenizer=tok, out_dir=tmp_path,
                  settings=QUICK.replace(max_steps=4, eval_steps=2), progress=False)
    assert res.projection is None and not (res.best_dir/"kd_projection.safetensors").exists()
    run = json.loads((res.best_dir/"kdnb_run.json").read_text())
    assert run["teacher_layers"] == [1, 3] and run["has_projection"] is False
    loaded = AutoModelForTokenClassification.from_pretrained(res.best_dir)
    assert loaded.config.id2label[1] == "B-PER" and not hasattr(res.model, KD_ATTR)
    scores = evaluate_by_language(res.model, ner["test"], task="ner", label_names=labels, tokenizer=tok)
    assert set(scores) == {"en", "id", "sw", "mean"}


def test_toy_task_is_learnable(tmp_path, tok):
    "Labels reach the model: a tiny model learns the toy task's cue words well above chance."
    data = tokenize(toy_benchmark(n_train=32, n_dev=16, languages=("en",)), tok, "classification")
    s = as_settings("tiny").replace(max_steps=80, eval_steps=40, learning_rate=5e-3, logging_steps=20)
    res = fine_tune(tiny_model("bert", num_labels=3), data, task="classification", label_names=LABELS,
                    tokenizer=tok, out_dir=tmp_path, settings=s, progress=False)
    assert res.best_dev_f1 > 0.6, res.log_history


def test_progress_bar_has_eta(tmp_path, tok, data, capfd):
    fine_tune(tiny_model("xlmr", num_labels=3), data, **(kw(tok, tmp_path) | dict(progress=True,
              settings=QUICK.replace(max_steps=2, eval_steps=2))))
    err = capfd.readouterr().err
    assert "2/2" in err and "<" in err   # tqdm: [elapsed<remaining, rate]


def test_two_processes_gloo(tmp_path):
    "torchrun --nproc_per_node 2 on the CPU (gloo): the run finishes and DDP keeps student and W in sync."
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO/"tests"/"ddp_train.py"), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)   # its own process group, so a hang can be killed whole
    try: out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL); proc.communicate()
        pytest.fail("torchrun with 2 CPU processes did not finish 4 steps in 240 s")
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if p.returncode != 0 and ("Address already in use" in p.stderr or "EADDRINUSE" in p.stderr
                              or "rendezvous" in p.stderr.lower() and "timeout" in p.stderr.lower()):
        pytest.skip(f"torchrun could not start its process group: {p.stderr[-500:]}")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "rank 0 done: step 4" in p.stdout and "rank 1 done: step 4" in p.stdout
    run = json.loads((tmp_path/"best"/"kdnb_run.json").read_text())
    assert run["world_size"] == 2 and run["global_step"] == 4 and run["has_projection"]
    a, b = load_file(tmp_path/"rank0.safetensors"), load_file(tmp_path/"rank1.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("proj.") for k in a)
    for k in a: torch.testing.assert_close(a[k], b[k], msg=k)
