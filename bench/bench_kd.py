"""Benchmark kdnb's distillation step against its floor and against TextBrewer, plus vocabulary trimming, student
inference and peak memory. Run on demand (not in CI's timed path); results go to BENCHMARKS.md by hand.

    python bench/bench_kd.py --out bench/results            # embedded multilingual-e5-small, real data if found
    python bench/bench_kd.py --smoke --out /tmp/kd-smoke     # tiny models, 1 repeat: checks the benchmark runs

Every timed variant runs in this one process on the same teacher, student, batch and device, with warm-up steps,
interleaved round-robin (so drift of a shared machine hits all variants alike), and reports medians over repeats.
It writes `kd.json` (all numbers) and `kd.md` (tables) to `--out`.
"""
from __future__ import annotations
import argparse, copy, json, os, platform, resource, statistics, sys, tempfile, time, warnings
from pathlib import Path
import subprocess
import torch

def _use_kdnb_from(argv):
    "`--kdnb DIR`: import kdnb from the source tree DIR (e.g. a `git worktree` of an older commit) to compare versions."
    if "--kdnb" in argv and argv.index("--kdnb") + 1 < len(argv):
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]   # the -e install's finder
        sys.path.insert(0, str(Path(argv[argv.index("--kdnb") + 1]).resolve()))
_use_kdnb_from(sys.argv)
os.environ["KDNB_TEACHER_CACHE_MB"] = "0"   # every timed step repeats one batch: kdnb's teacher cache would skip the teacher

import kdnb
from kdnb.models import EMBEDDED, count_parameters, load_model, load_tokenizer, tiny_model, trim_vocab, used_token_ids
from kdnb.data import BENCHMARKS, data_available, tokenize
from kdnb.loader import load_benchmark
from kdnb.initialize import make_student
from kdnb.losses import kd_loss_for, teacher_outputs
from kdnb.train import DistillationTrainer, training_arguments
from kdnb.testing import toy_tokenizer

# ---------------------------------------------------------------------------------------------------------------- utils
def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()

def median(xs): return statistics.median(xs)

FAULTS = {}   # name -> minor page faults of each timed call (the last `round_robin`)

def round_robin(fns:dict, device, warmup:int, repeats:int) -> dict:
    "Wall times (s) of each callable in `fns`, called in turn `warmup` + `repeats` times; warm-up calls are dropped."
    times = {k: [] for k in fns}
    FAULTS.clear(); FAULTS.update({k: [] for k in fns})
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            sync(device); t = time.perf_counter(); fn(); sync(device)
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
                FAULTS[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return times

def _status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field): return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")

def _malloc_trim():
    "glibc keeps freed memory for reuse; return it to the system so a step's peak shows up in the RSS."
    try: import ctypes; ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError): pass

def peak_memory(fn, device) -> dict:
    "Peak memory while `fn` runs: CUDA allocator peak, or on CPU the resident-set high-water mark (reset before)."
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
        fn(); torch.cuda.synchronize()
        return dict(kind="cuda allocated", before=before, peak=torch.cuda.max_memory_allocated())
    _malloc_trim()                                  # hand cached free memory back, so the step must fault its own in
    Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS (Linux)
    before = _status("VmRSS:")
    fn()
    return dict(kind="cpu rss", before=before, peak=_status("VmHWM:"))

def machine(device, threads) -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    import transformers
    try: import textbrewer; tb = textbrewer.__version__
    except ImportError: tb = None
    src = Path(kdnb.__file__).resolve().parents[1]
    try: commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True).stdout.strip()
    except OSError: commit = ""
    dirty = subprocess.run(["git", "status", "--porcelain", "kdnb"], cwd=src, capture_output=True, text=True).stdout.strip()
    return dict(kdnb=f"{src} at {commit or '?'}{' + uncommitted changes' if dirty else ''}", cpu=cpu, logical_cpus=os.cpu_count(), torch_threads=threads, device=str(device),
                gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                ram_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                textbrewer=tb, platform=platform.platform())

# ----------------------------------------------------------------------------------------------------- models and data
def load_setup(smoke:bool, data_dir, batch:int, length:int, device):
    "Teacher (untrimmed), tokenizer, label names, a tokenized dataset for the vocabulary, and one padded batch."
    if smoke:
        tok = toy_tokenizer(200)
        labels = ["neg", "neu", "pos"]
        teacher = tiny_model("xlmr", num_labels=3, vocab_size=200, hidden_size=64, num_layers=4,
                             num_heads=4, intermediate_size=128)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, 120, (batch, length), generator=g)   # the "dataset" uses ids 4..119 of 200
        mask = torch.ones_like(ids); mask[::3, length // 2:] = 0   # some padding
        ids[:, 0], ids[mask == 0] = 0, tok.pad_token_id
        data_ids = {"input_ids": [r[m.bool()].tolist() for r, m in zip(ids, mask)]}
        b = dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 3, (batch,), generator=g))
        return teacher, tok, labels, data_ids, b, "toy (random ids)"
    name = "tsm" if data_available("tsm") or data_dir else "demo-intent"
    ds = load_benchmark(name, data_dir=data_dir)
    labels = list(BENCHMARKS[name].label_names)
    tok = load_tokenizer(EMBEDDED)
    teacher = load_model(EMBEDDED, "classification", labels)
    data = tokenize(ds, tok, "classification", max_length=length)
    # one batch of real training examples from every language, padded to `length` tokens
    train = ds["train"].shuffle(seed=0).select(range(batch))
    enc = tok(list(train["text"]), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    b = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=torch.tensor(list(train["label"])))
    return teacher, tok, labels, data, b, f"{name} ({', '.join(sorted(set(ds['train']['language'])))})"

def kdnb_trimmed(teacher, tok, data, batch):
    "The teacher trimmed to the dataset's tokens (kdnb's CPU path) and the batch in the trimmed ids."
    keep = used_token_ids(data, tokenizer=tok)
    small, old2new = trim_vocab(teacher, keep)
    b = dict(batch, input_ids=old2new[batch["input_ids"]])
    if (b["input_ids"] < 0).any(): raise RuntimeError("the batch uses tokens outside the trimmed vocabulary")
    return small, b, keep

def xlmr_base(num_labels):
    "A randomly initialised model of XLM-R base's shape (12 x 768, 250,002 tokens): the paper's teacher, for timing."
    from transformers import AutoModelForSequenceClassification, XLMRobertaConfig
    cfg = XLMRobertaConfig(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, num_labels=num_labels)
    return AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")

def to(batch, device): return {k: v.to(device) for k, v in batch.items()}

# ------------------------------------------------------------------------------------------------------- the variants
def optimizer_for(params, args):
    "The optimizer kdnb's Trainer builds (same class and settings for every variant)."
    from transformers import Trainer
    cls, kw = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls([p for p in params if p.requires_grad], **kw)

def floor_step(teacher, student, batch, opt):
    "Teacher forward without gradients (hidden states + attentions) plus a plain fine-tuning step of the student."
    def step():
        teacher_outputs(teacher, batch, attentions=True)
        student.train()
        student(**batch).loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
    return step

def kdnb_step(trainer):
    "One step of kdnb's `DistillationTrainer`: its `training_step` (KD forward + backward) and the optimizer step."
    model = trainer.model_wrapped
    def step():
        trainer.training_step(model, trainer._kdnb_batch)
        trainer.optimizer.step(); trainer.optimizer.zero_grad(set_to_none=True)
    return step

def make_trainer(student, teacher, batch, out_dir, bf16=False, compile=False):
    "kdnb's `DistillationTrainer` prepared as its training loop prepares it (accelerate: autocast when bf16)."
    kd = kd_loss_for(student, teacher, "classification")
    args = training_arguments(dict(learning_rate=5e-5, batch_size=batch["input_ids"].shape[0], bf16=bf16), out_dir,
                              progress=False, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    tr = DistillationTrainer(student, args=args, teacher=teacher, kd_loss=kd)
    tr.create_optimizer()
    tr.model_wrapped = tr.accelerator.prepare(tr.model)
    if compile: tr.model_wrapped = torch.compile(tr.model_wrapped)   # what accelerate does for torch_compile=True
    tr.optimizer = tr.accelerator.prepare(tr.optimizer)
    tr.current_gradient_accumulation_steps = 1   # set by `train()`; read by `training_step`
    tr._kdnb_batch = batch
    return tr

def bf16_supported(device) -> bool:
    "Native bf16 matmuls: CUDA with bf16, or a CPU with AVX512-BF16/AMX (elsewhere CPU bf16 is emulated and slow)."
    if device.type == "cuda": return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

def autocast_floor_step(teacher, student, batch, opt, device):
    "The floor under bf16 autocast (weights and optimizer in fp32, as kdnb's bf16 training does)."
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16): teacher_outputs(teacher, batch, attentions=True)
        student.train()
        with torch.autocast(device.type, dtype=torch.bfloat16): loss = student(**batch).loss
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
    return step

def textbrewer_distiller(student, teacher, layers, d_s, d_t, out_dir, device, proj_like=None):
    """TextBrewer 0.2.1's GeneralDistiller doing kdnb's loss: attention MSE and hidden MSE per mapped layer (weights
    1/n so the sums equal kdnb's layer means), embedding MSE, logits MSE (T=1), CE (the student's own loss)."""
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    n = len(layers)
    proj = ["linear", d_s, d_t, {}] if d_s != d_t else None
    matches = [dict(layer_T=k, layer_S=i, feature="attention", loss="attention_mse", weight=1 / n)
               for i, k in enumerate(layers)]
    matches += [dict(layer_T=0, layer_S=0, feature="hidden", loss="hidden_mse", weight=1., proj=proj)]
    matches += [dict(layer_T=k + 1, layer_S=i + 1, feature="hidden", loss="hidden_mse", weight=1 / n, proj=proj)
                for i, k in enumerate(layers)]
    dc = DistillationConfig(temperature=1, kd_loss_type="mse", kd_loss_weight=1, hard_label_weight=1,
                            intermediate_matches=matches)
    tc = TrainingConfig(device=str(device), output_dir=str(out_dir), log_dir=str(Path(out_dir) / "tb"))
    def adaptor(batch, out):
        return dict(logits=out.logits, hidden=out.hidden_states, attention=out.attentions,
                    inputs_mask=batch["attention_mask"], losses=out.loss)
    d = GeneralDistiller(tc, dc, teacher, student, adaptor, adaptor)
    if proj_like is not None:   # same W in every projection, for the loss cross-check
        for p in d.projs:
            if p is not None: p.load_state_dict(proj_like.state_dict())
    return d

def textbrewer_step(distiller, batch, opt):
    "TextBrewer's per-batch work as in its training loop: `train_on_batch`, backward, optimizer step."
    fwd_args = dict(output_attentions=True, output_hidden_states=True)
    def step():
        distiller.model_S.train(); distiller.model_T.eval()
        loss, _ = distiller.train_on_batch(batch, fwd_args)
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
    return step

def losses_agree(trainer, distiller, batch) -> dict:
    "kdnb's and TextBrewer's total loss on the same batch, students in eval mode (no dropout)."
    model = trainer.model
    model.eval()
    with torch.no_grad():
        s = model(**{k: v for k, v in batch.items() if k != "labels"}, output_attentions=True, output_hidden_states=True)
        t = teacher_outputs(distiller.model_T, batch)
        ours, _ = trainer.kd_loss(s, t, batch["labels"], batch["attention_mask"])
        distiller.model_S.eval()
        theirs, _ = distiller.train_on_batch(batch, dict(output_attentions=True, output_hidden_states=True))
    return dict(kdnb=ours.item(), textbrewer=theirs.item())

# ------------------------------------------------------------------------------------------------------------ sections
def profile_table(fn, device, steps:int=3, rows:int=25) -> str:
    "torch.profiler table (top `rows` ops by self time) over `steps` calls of `fn` (after one unprofiled call)."
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        for _ in range(steps): fn()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)

def kd_section(teacher, student0, batch, device, warmup, repeats, tmp, textbrewer:bool, profile:bool=False,
               bf16:bool=False, compile:bool=False):
    "Floor, kdnb and TextBrewer steps on copies of `student0` (and the bf16 floor and kdnb); loss cross-check; peak memory."
    cfg_s, cfg_t = student0.config, teacher.config
    layers = list(cfg_s.kdnb_teacher_layers)
    s_floor, s_kdnb, s_tb = (copy.deepcopy(student0).to(device) for _ in range(3))
    tr = make_trainer(s_kdnb, teacher, batch, tmp / "trainer")
    fns = dict(floor=floor_step(teacher, s_floor, batch, optimizer_for(s_floor.parameters(), tr.args)),
               kdnb=kdnb_step(tr))
    if bf16:
        s_floor16, s_kdnb16 = (copy.deepcopy(student0).to(device) for _ in range(2))
        fns["floor_bf16"] = autocast_floor_step(teacher, s_floor16, batch, optimizer_for(s_floor16.parameters(), tr.args), device)
        fns["kdnb_bf16"] = kdnb_step(make_trainer(s_kdnb16, teacher, batch, tmp / "trainer16", bf16=True))
    if compile:
        s_comp = copy.deepcopy(student0).to(device)
        fns["kdnb_compiled"] = kdnb_step(make_trainer(s_comp, teacher, batch, tmp / "trainer_c", compile=True))
    res = dict(layers=layers, student_hidden=cfg_s.hidden_size, teacher_hidden=cfg_t.hidden_size)
    if textbrewer:
        d = textbrewer_distiller(s_tb, teacher, layers, cfg_s.hidden_size, cfg_t.hidden_size, tmp / "tb", device,
                                 proj_like=tr.kd_loss.proj)
        opt = optimizer_for(s_tb.parameters(), tr.args)
        d.initialize_training(opt, None, None, None)   # adds TextBrewer's projections to the optimizer
        res["loss_check"] = losses_agree(tr, d, batch)
        fns["textbrewer"] = textbrewer_step(d, batch, opt)
    else: res["loss_check"] = None
    times = round_robin(fns, device, warmup, repeats)
    res["times"] = times
    res["page_faults"] = {k: median(v) for k, v in FAULTS.items()}
    res["median"] = {k: median(v) for k, v in times.items()}
    res["kdnb_over_floor"] = res["median"]["kdnb"] / res["median"]["floor"]
    if textbrewer: res["kdnb_over_textbrewer"] = res["median"]["kdnb"] / res["median"]["textbrewer"]
    if compile:
        res["kdnb_compiled_over_floor"] = res["median"]["kdnb_compiled"] / res["median"]["floor"]
        if textbrewer: res["kdnb_compiled_over_textbrewer"] = res["median"]["kdnb_compiled"] / res["median"]["textbrewer"]
    if bf16:
        res["kdnb_bf16_over_floor_bf16"] = res["median"]["kdnb_bf16"] / res["median"]["floor_bf16"]
        if textbrewer: res["kdnb_bf16_over_textbrewer"] = res["median"]["kdnb_bf16"] / res["median"]["textbrewer"]
    if profile: res["profile"] = {k: profile_table(fn, device) for k, fn in fns.items()}   # before memory: steady state
    res["memory"] = {k: peak_memory(fn, device) for k, fn in fns.items()}
    return res

def trim_section(models:dict, keep_ids, batch_full, device, warmup, repeats, optimizers=("kdnb", "foreach")):
    """A plain training step of each model with the full vs the trimmed vocabulary (kdnb's optimizer, the fused AdamW
    transformers picks, and torch's default foreach AdamW); max logit difference in eval mode."""
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=device.type == "cpu")
    def make_opt(params, kind):
        params = [p for p in params if p.requires_grad]
        return optimizer_for(params, args) if kind == "kdnb" else torch.optim.AdamW(params, lr=5e-5)
    def step(m, b, opt):
        def f():
            m.train(); m(**b).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return f
    res = {}
    for name, model in models.items():
        full = copy.deepcopy(model).to(device).requires_grad_(True)
        small, old2new = trim_vocab(full, keep_ids)
        batch_small = dict(batch_full, input_ids=old2new.to(device)[batch_full["input_ids"]])
        full.eval(); small.eval()
        with torch.no_grad(): diff = (full(**batch_full).logits - small(**batch_small).logits).abs().max().item()
        r = dict(vocab=dict(full=full.config.vocab_size, trimmed=small.config.vocab_size),
                 params=dict(full=count_parameters(full), trimmed=count_parameters(small)), max_abs_logit_diff=diff,
                 times={}, median={}, speedup={})
        for kind in optimizers:
            f, s_ = copy.deepcopy(full), copy.deepcopy(small)
            times = round_robin(dict(full=step(f, batch_full, make_opt(f.parameters(), kind)),
                                     trimmed=step(s_, batch_small, make_opt(s_.parameters(), kind))), device, warmup, repeats)
            r["times"][kind] = times
            r["median"][kind] = {k: median(v) for k, v in times.items()}
            r["speedup"][kind] = r["median"][kind]["full"] / r["median"][kind]["trimmed"]
            del f, s_
        res[name] = r
        del full, small
    return res

def inference_section(models:dict, batch, device, warmup, repeats):
    "Forward latency per batch (eval, no gradients, SDPA attention as a user would deploy) and parameter counts."
    batch = {k: v for k, v in batch.items() if k != "labels"}
    ms = {}
    for k, m in models.items():
        m = copy.deepcopy(m).to(device).eval()
        m.set_attn_implementation("sdpa")
        ms[k] = m
    def fwd(m):
        def f():
            with torch.inference_mode(): m(**batch)
        return f
    times = round_robin({k: fwd(m) for k, m in ms.items()}, device, warmup, repeats)
    med = {k: median(v) for k, v in times.items()}
    return dict(times=times, median=med, params={k: count_parameters(m) for k, m in ms.items()},
                student_over_teacher=med["student"] / med["teacher"])

# -------------------------------------------------------------------------------------------------------------- report
def fmt_s(x): return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"
def mib(x): return f"{x / 2**20:,.0f} MiB"

VARIANTS = {"floor": "floor", "kdnb": "kdnb KD step", "textbrewer": "TextBrewer step", "floor_bf16": "floor, bf16",
            "kdnb_bf16": "kdnb, bf16", "kdnb_compiled": "kdnb, compiled"}

def _ratio(s, k): return f"{s[k]:.3f}" if k in s else "-"

def _cell(s, k):
    t = s["times"]
    return f"{fmt_s(s['median'][k])} ({fmt_s(min(t[k]))}-{fmt_s(max(t[k]))})" if k in t else "-"

def _per_variant(kd, value) -> list:
    "A table with one column per variant that ran, `value(section, variant)` in each cell."
    ks = [k for k in VARIANTS if any(k in s["times"] for s in kd.values())]
    rows = ["| student | " + " | ".join(VARIANTS[k] for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    return rows + [f"| {name} | " + " | ".join(value(s, k) if k in s["times"] else "-" for k in ks) + " |"
                   for name, s in kd.items()]

def md_kd(r) -> list:
    kd, out = r["kd"], []
    out += ["fp32 (every variant):", "",
            "| student | floor | kdnb KD step | TextBrewer step | kdnb / floor | kdnb / TextBrewer | loss kdnb vs TextBrewer |",
            "|---|---|---|---|---|---|---|"]
    for name, s in kd.items():
        lc = s["loss_check"]
        out.append(f"| {name} | {_cell(s, 'floor')} | {_cell(s, 'kdnb')} | {_cell(s, 'textbrewer')} | "
                   f"{_ratio(s, 'kdnb_over_floor')} | {_ratio(s, 'kdnb_over_textbrewer')} | "
                   f"{'%.6f vs %.6f' % (lc['kdnb'], lc['textbrewer']) if lc else '-'} |")
    if any("kdnb_bf16" in s["times"] for s in kd.values()):
        out += ["", "bf16 autocast (kdnb `TrainSettings(bf16=True)`; weights, optimizer and KD loss in fp32), against "
                "TextBrewer in fp32 (its only mixed precision is apex fp16 on CUDA):", "",
                "| student | floor, bf16 | kdnb KD step, bf16 | kdnb bf16 / floor bf16 | kdnb bf16 / TextBrewer fp32 |",
                "|---|---|---|---|---|"]
        out += [f"| {name} | {_cell(s, 'floor_bf16')} | {_cell(s, 'kdnb_bf16')} | {_ratio(s, 'kdnb_bf16_over_floor_bf16')} | "
                f"{_ratio(s, 'kdnb_bf16_over_textbrewer')} |" for name, s in kd.items()]
    if any("kdnb_compiled" in s["times"] for s in kd.values()):
        out += ["", "torch.compile (inductor) on the student inside kdnb's Trainer step, fp32 (compilation happens in "
                "the warm-up steps and is not timed):", "",
                "| student | kdnb KD step, compiled | compiled / floor | compiled / TextBrewer |", "|---|---|---|---|"]
        out += [f"| {name} | {_cell(s, 'kdnb_compiled')} | {_ratio(s, 'kdnb_compiled_over_floor')} | "
                f"{_ratio(s, 'kdnb_compiled_over_textbrewer')} |" for name, s in kd.items()]
    kind = next(iter(kd.values()))["memory"]["floor"]["kind"]
    out += ["", f"Peak memory of one step ({kind}; high-water mark during the step minus the level before it):", ""]
    out += _per_variant(kd, lambda s, k: mib(s["memory"][k]["peak"] - s["memory"][k]["before"]))
    if r["machine"]["device"] == "cpu":
        out += ["", "Minor page faults per timed step (median; fresh pages the allocator had to get from the kernel):", ""]
        out += _per_variant(kd, lambda s, k: f"{s['page_faults'][k]:,.0f}")
    return out + [""]

def md_trim(r) -> list:
    out = [f"Vocabulary trimming to the data's tokens: one plain training step (forward, backward, optimizer) "
           f"of each model, full vs trimmed vocabulary ({r['trim_repeats']} timed steps each); logits compared "
           "in eval mode on the same batch. Optimizers: `kdnb` = what kdnb's Trainer uses (transformers' default, "
           "fused AdamW); `foreach` = `torch.optim.AdamW` defaults.", "",
           "| model | vocabulary | parameters | optimizer | step, full | step, trimmed | speed-up | max abs logit diff |",
           "|---|---|---|---|---|---|---|---|"]
    for name, t in r["trim"].items():
        for kind, med in t["median"].items():
            out.append(f"| {name} | {t['vocab']['full']:,} -> {t['vocab']['trimmed']:,} | {t['params']['full']:,} -> "
                       f"{t['params']['trimmed']:,} | {kind} | {fmt_s(med['full'])} | {fmt_s(med['trimmed'])} | "
                       f"**{t['speedup'][kind]:.1f}x** | {t['max_abs_logit_diff']:.1e} |")
    return out + [""]

def md_inference(r) -> list:
    inf = r["inference"]
    out = [f"Inference (eval forward of one {r['batch']}x{r['length']} batch, SDPA attention):", "",
           "| model | parameters | latency per batch |", "|---|---|---|"]
    out += [f"| {k} | {inf['params'][k]:,} | {fmt_s(inf['median'][k])} |" for k in inf["median"]]
    return out + ["", f"Student / teacher latency: **{inf['student_over_teacher']:.3f}**.", ""]

def md_params(r) -> list:
    out = ["Parameter counts:", "", "| model | full vocabulary | trimmed vocabulary |", "|---|---|---|"]
    return out + [f"| {k} | {v['full']:,} | {v['trimmed']:,} |" for k, v in r["param_counts"].items()] + [""]

def markdown(r) -> str:
    "The results as Markdown: header (command, machine, setup), then a table per section that ran."
    m = r["machine"]
    out = [f"Command: `{r['command']}`", "",
           f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['ram_gb']} GiB RAM, device {m['device']}"
           f"{' (' + m['gpu'] + ')' if m['gpu'] else ''}, torch {m['torch']} ({m['torch_threads']} threads), "
           f"transformers {m['transformers']}, TextBrewer {m['textbrewer']}, Python {m['python']}. kdnb: {m['kdnb']}.", "",
           f"Models: {r['models']}. Data: {r['data']}. Batch {r['batch']}x{r['length']} tokens "
           f"({r['real_tokens']} real, the rest padding). {r['warmup']} warm-up + {r['repeats']} timed steps per "
           "variant, interleaved; medians (min-max).", ""]
    if r["kd"]: out += md_kd(r)
    if "trim" in r: out += md_trim(r)
    if "inference" in r: out += md_inference(r)
    return "\n".join(out + md_params(r))

# ---------------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, 1 warm-up + 1 repeat: checks the benchmark runs")
    ap.add_argument("--out", default="bench/results", help="folder for kd.json and kd.md")
    ap.add_argument("--data-dir", default=None, help="benchmark data folder (default: found like kdnb does)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--trim-repeats", type=int, default=5, help="repeats of the (slow) untrimmed training step")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--profile", action="store_true", help="also profile each step variant (torch.profiler) into kd_profile.txt")
    ap.add_argument("--kdnb", default=None, metavar="DIR", help="import kdnb from this source tree (compare commits)")
    ap.add_argument("--no-xlmr-base", action="store_true", help="skip the XLM-R-base-shaped model in the trimming section")
    ap.add_argument("--compile", action="store_true", help="also time kdnb's step with the student under torch.compile")
    ap.add_argument("--sections", nargs="+", default=["kd", "trim", "inference"], choices=["kd", "trim", "inference"])
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16-autocast variants (skipped anyway without native bf16)")
    ap.add_argument("--no-textbrewer", action="store_true", help="skip TextBrewer even if it is installed")
    a = ap.parse_args(argv)
    if a.smoke: a.warmup, a.repeats, a.trim_repeats = 1, 1, 1
    if a.threads: torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    textbrewer = not a.no_textbrewer
    bf16 = not a.no_bf16 and bf16_supported(device)
    if textbrewer:
        try: import textbrewer as _  # noqa: F401
        except ImportError as e:
            sys.exit(f"TextBrewer is not importable ({e}); install it with `pip install textbrewer==0.2.1 tensorboard` "
                     "(or `pip install -e .[bench]`), or pass --no-textbrewer.")
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kdnb-bench-"))
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets, transformers
    datasets.disable_progress_bars(); transformers.logging.set_verbosity_error()
    torch.manual_seed(0)

    teacher_full, tok, labels, data, batch_full, data_name = load_setup(a.smoke, a.data_dir, a.batch, a.length, device)
    teacher, batch, keep_ids = kdnb_trimmed(teacher_full, tok, data, batch_full)
    teacher, batch, batch_full = teacher.to(device), to(batch, device), to(batch_full, device)
    n_t, d_t = teacher.config.num_hidden_layers, teacher.config.hidden_size
    students = {f"{n_t // 2} layers, width {d_t}": make_student(teacher, num_layers=n_t // 2, init="from-teacher"),
                f"{n_t // 2} layers, width {d_t // 2}": make_student(
                    teacher, num_layers=n_t // 2, hidden_size=d_t // 2,
                    intermediate_size=teacher.config.intermediate_size // 2, init="from-teacher")}
    r = dict(command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
             machine=machine(device, torch.get_num_threads()), data=data_name, batch=a.batch, length=a.length,
             real_tokens=int(batch["attention_mask"].sum()), warmup=a.warmup, repeats=a.repeats, trim_repeats=a.trim_repeats,
             teacher_layers=n_t, models=("tiny XLM-R (4 layers, width 64)" if a.smoke else
                                         f"embedded multilingual-e5-small (12 layers, width 384) as a {len(labels)}-class "
                                         "classifier teacher, students copied from it (from-teacher)") + ", vocabulary trimmed to the data", kd={})
    steps = [("kd:" + k, lambda k=k, s=s: kd_section(teacher, s, batch, device, a.warmup, a.repeats, tmp / k.replace(' ', ''), textbrewer,
                                                          a.profile, bf16, a.compile))
             for k, s in students.items()]
    trim_models = {"teacher (" + ("tiny XLM-R" if a.smoke else "e5-small") + ")": teacher_full}
    if not a.smoke and not a.no_xlmr_base: trim_models["XLM-R base shape (random weights)"] = xlmr_base(len(labels))
    half = list(students.values())[1].config
    trim_models[f"student ({half.num_hidden_layers} layers, width {half.hidden_size})"] = make_student(
        teacher_full, num_layers=half.num_hidden_layers, hidden_size=half.hidden_size,
        intermediate_size=half.intermediate_size, init="from-teacher")
    steps += [("trim", lambda: trim_section(trim_models, keep_ids, batch_full, device, min(a.warmup, 1), a.trim_repeats)),
              ("inference", lambda: inference_section(dict(teacher=teacher, student=next(iter(students.values()))),
                                                      {k: v for k, v in batch.items()}, device, a.warmup, a.repeats))]
    from tqdm.auto import tqdm
    steps = [(n, f) for n, f in steps if n.split(":")[0] in a.sections]
    for name, fn in tqdm(steps, desc="benchmark", file=sys.stdout):
        res = fn()
        if name.startswith("kd:"): r["kd"][name[3:]] = res
        else: r[name] = res
    r["param_counts"] = {
        "teacher": dict(full=count_parameters(teacher_full), trimmed=count_parameters(teacher)),
        **{f"student, {k}": dict(full=count_parameters(make_student(teacher_full, num_layers=s.config.num_hidden_layers,
                                                                    hidden_size=s.config.hidden_size,
                                                                    intermediate_size=s.config.intermediate_size,
                                                                    init="from-scratch")),
                                 trimmed=count_parameters(s)) for k, s in students.items()}}
    if a.profile:
        (out / "kd_profile.txt").write_text("\n".join(f"## {name}: {k}\n{t}" for name, s in r["kd"].items()
                                                      for k, t in s.pop("profile").items()))
    (out / "kd.json").write_text(json.dumps(r, indent=1))
    md = markdown(r)
    (out / "kd.md").write_text(md)
    print(md)
    return r

if __name__ == "__main__": main()
