"""Does bf16 autocast change what a CPU run learns? Fine-tune the embedded e5-small teacher on demo-intent, build a
6-layer student from it and distil it, once in fp32 and once with bf16 autocast (`TrainSettings(bf16=True)`);
report test macro-F1 and wall time of each. Prints numbers; not run in CI.

    python bench/bench_bf16_quality.py [--benchmark demo-intent] [--epochs 3] [--threads 2]
"""
import argparse, tempfile, time
from pathlib import Path
import torch
import datasets, transformers
from kdnb.data import BENCHMARKS, tokenize
from kdnb.loader import load_benchmark
from kdnb.models import EMBEDDED, load_model, load_tokenizer, remap_ids, trim_vocab, used_token_ids
from kdnb.initialize import make_student
from kdnb.train import distill, evaluate_by_language, fine_tune

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", default="demo-intent")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    datasets.disable_progress_bars(); transformers.logging.set_verbosity_error()
    b = BENCHMARKS[a.benchmark]
    tok = load_tokenizer(EMBEDDED)
    data = tokenize(load_benchmark(a.benchmark), tok, b.task, max_length=64)
    keep = used_token_ids(data, tokenizer=tok)
    print(f"{a.benchmark}: train {data['train'].num_rows}, test {data['test'].num_rows}; {a.epochs} epochs, lr {a.lr}")
    for bf16 in (False, True):
        settings = dict(epochs=a.epochs, batch_size=16, eval_steps=50, logging_steps=10, learning_rate=a.lr, bf16=bf16)
        with tempfile.TemporaryDirectory() as d:
            teacher, old2new = trim_vocab(load_model(EMBEDDED, b.task, list(b.label_names)), keep)
            dd = remap_ids(data, old2new)
            t0 = time.perf_counter()
            t = fine_tune(teacher, dd, task=b.task, label_names=list(b.label_names), tokenizer=tok,
                          out_dir=Path(d) / "teacher", settings=settings, progress=False)
            t1 = time.perf_counter()
            student = make_student(t.model, num_layers=6, init="from-teacher")
            s = distill(student, t.model, dd, task=b.task, label_names=list(b.label_names), tokenizer=tok,
                        out_dir=Path(d) / "student", settings=settings, progress=False)
            t2 = time.perf_counter()
            f1 = {k: evaluate_by_language(m, dd["test"], task=b.task, label_names=list(b.label_names), tokenizer=tok)["mean"]
                  for k, m in (("teacher", t.model), ("student", s.model))}
        print(f"{'bf16' if bf16 else 'fp32'}: test macro-F1 teacher {100 * f1['teacher']:.1f} ({t1 - t0:.0f} s), "
              f"6-layer student, KD from-teacher {100 * f1['student']:.1f} ({t2 - t1:.0f} s)", flush=True)

if __name__ == "__main__": main()
