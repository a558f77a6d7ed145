"""How fast this CPU is right now: the matrix product that dominates a demo run (a 512 x 384 -> 1536 `linear`, one
thread), timed alone and then in every core at once. Virtual machines of one model are not equally fast, nor one VM
all day: run it before and after a timed run and record it beside the time.

    python bench/cpu_probe.py                 # GFLOP/s alone and with every core busy
    python bench/cpu_probe.py --seconds 0.2   # a quick reading (and what the tests run)

Set the same ISA variables as the run it calibrates (e.g. `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2`). Prints one JSON line: `alone` and `all_cores` (the slowest core) in GFLOP/s.
"""
from __future__ import annotations
import argparse, json, multiprocessing as mp, os, sys, time
from pathlib import Path

SHAPE = (512, 384, 1536)   # tokens of a batch of 16 x 32, hidden 384, feed-forward 1536: multilingual-e5-small's FFN


def gflops(seconds: float = 2.0) -> float:
    "GFLOP/s of the probe's `linear` on one thread, over about `seconds`."
    import torch
    torch.set_num_threads(1)
    m, k, n = SHAPE
    a, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    f = torch.nn.functional.linear
    for _ in range(10): f(a, w, b)
    done, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        for _ in range(10): f(a, w, b)
        done += 10
    return 2 * m * k * n * done / dt / 1e9


def probe(seconds: float = 2.0, cores: int | None = None) -> dict:
    "The probe alone, then in `cores` processes at once (default: every usable core)."
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kdnb.parallel import cpu_cores
    cores = cores or cpu_cores()
    with mp.get_context("spawn").Pool(cores) as pool:
        alone = pool.apply(gflops, (seconds,))
        busy = pool.map(gflops, [seconds] * cores)
    isa = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    return dict(shape=list(SHAPE), cores=cores, alone=round(alone, 1), all_cores=round(min(busy), 1), isa=isa,
                time=time.strftime("%Y-%m-%d %H:%M:%S"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per reading (default 2)")
    print(json.dumps(probe(ap.parse_args().seconds)))
