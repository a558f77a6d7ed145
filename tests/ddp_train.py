"""Distill a tiny student for a few steps under a multi-process launcher (used by tests/test_train.py).

    torchrun --standalone --nproc_per_node 2 tests/ddp_train.py OUT_DIR          # CPU: gloo backend
    accelerate launch --multi_gpu --num_processes 2 tests/ddp_train.py OUT_DIR   # 2 GPUs: nccl

Each process writes OUT_DIR/rank<R>.safetensors with its final student weights and W, so the test can check that
DDP kept the processes in sync (W included)."""
import os, sys
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)
from kdnb.data import tokenize
from kdnb.models import tiny_model
from kdnb.train import as_settings, distill
from kdnb.testing import toy_benchmark, toy_tokenizer

out = sys.argv[1]
tok = toy_tokenizer()
data = tokenize(toy_benchmark(n_train=8, n_dev=4, n_test=4), tok, "classification")
teacher = tiny_model("xlmr", num_labels=3)
student = tiny_model("xlmr", num_labels=3, num_layers=2, hidden_size=16, intermediate_size=32, seed=1)
settings = as_settings("tiny").replace(max_steps=4, eval_steps=2, batch_size=4, logging_steps=1, learning_rate=1e-3)
res = distill(student, teacher, data, task="classification", label_names=["neg", "neu", "pos"], tokenizer=tok,
              out_dir=out, settings=settings, progress=False)
rank = int(os.environ.get("RANK", 0))
state = {f"student.{k}": v.detach().cpu().contiguous() for k, v in res.model.state_dict().items()}
state.update({f"proj.{k}": v.detach().cpu().contiguous() for k, v in res.projection.state_dict().items()})
save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
print(f"rank {rank} done: step {res.global_step}, best dev f1 {res.best_dev_f1:.3f}")
