"""Time one AdamW training step (batch 32 x 64 tokens) of the embedded multilingual-e5-small classifier,
untrimmed vs vocabulary-trimmed. Prints numbers; not run in CI.

    python bench/bench_trim.py [--threads 2] [--steps 5] [--keep 2000 20000]
"""
import argparse, statistics, time
import torch
from kdnb.models import EMBEDDED, count_parameters, load_model, trim_vocab

def step_times(model, ids, labels, steps):
    "Wall time (s) of each of `steps` forward+backward+AdamW steps, after one warm-up step."
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if i: times.append(time.perf_counter() - t)
    return times

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--keep", type=int, nargs="+", default=[2000, 20000], help="kept vocabulary sizes to try")
    a = ap.parse_args()
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    full = load_model(EMBEDDED, "classification", [f"intent{i}" for i in range(60)])
    V = full.config.vocab_size
    labels = torch.randint(0, 60, (a.batch,))
    print(f"threads={a.threads} batch={a.batch}x{a.length} steps={a.steps} (median of steps after 1 warm-up)")
    keep = torch.cat([torch.arange(4), torch.randperm(V - 4)[:max(a.keep)] + 4])
    ids = keep[torch.randint(4, len(keep), (a.batch, a.length))]
    t = step_times(full, ids, labels, a.steps)
    print(f"untrimmed  vocab {V:>7,}  params {count_parameters(full):>11,}  step {statistics.median(t):6.2f} s")
    base = statistics.median(t)
    for k in sorted(a.keep):
        kk = keep[:k]
        ids_k = kk[torch.randint(4, k, (a.batch, a.length))]
        small, old2new = trim_vocab(load_model(EMBEDDED, "classification", [f"intent{i}" for i in range(60)]), kk)
        t = step_times(small, old2new[ids_k], labels, a.steps)
        print(f"trimmed    vocab {small.config.vocab_size:>7,}  params {count_parameters(small):>11,}  "
              f"step {statistics.median(t):6.2f} s  ({base / statistics.median(t):.1f}x faster)")
        del small

if __name__ == "__main__": main()
