"""Where one gpt2fit training step's time goes: torch.profiler over gpt2fit's own setup + train_step
(the bench's random ids, already on the device), the top kernels by GPU time, the GPU's idle gaps
between them, and the profiler's op table. Takes `gpt2fit bench`'s flags (one cell: no --grid):

    python benchmarks/gpu/profile_step.py --preset gpt2 --micro_batch_size 16 --block_size 1024 \\
        --mixed_precision bf16 --warmup 3 --steps 2 --out $OUT/profile_step.json

Writes X.json (device, versions, settings, kernel totals, gaps), X.txt (the tables, also printed) and
X_trace.json.gz (the Chrome trace: ui.perfetto.dev opens it). The profiler adds host time per op, so
the gaps here are an upper bound on the gaps of an unprofiled step.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel
from torch.profiler import DeviceType, ProfilerActivity, profile

from gpt2fit import options
from gpt2fit.cli import run_main
from gpt2fit.errors import UserError
from gpt2fit.train import bench
from gpt2fit.train.bench_report import environment
from gpt2fit.train.loop import setup, train_step

# kernel name -> a coarse kind (first match); names as cuBLAS, flash/cuDNN attention and PyTorch give them
KINDS = [("matmul", r"gemm|gemv|nvjet|xmma|cutlass|cublas"), ("attention", r"flash|fmha|attention|sdpa"),
         ("loss", r"softmax|nll|cross_entropy"), ("optimizer", r"adam|multi_tensor|foreach|optimizer"),
         ("norm", r"layer_norm|norm_"), ("copy/fill", r"memcpy|memset|copy|fill")]


def kind_of(name: str) -> str:
    return next((k for k, pat in KINDS if re.search(pat, name, re.I)), "other")


def analyse(kernels: list, steps: int) -> tuple[dict, list[str]]:
    """Kernel totals and the idle gaps between busy stretches of the GPU (all streams merged)."""
    kernels = sorted(kernels, key=lambda e: e.time_range.start)
    busy, totals = [], defaultdict(lambda: [0.0, 0])  # [start, end, first name, last name]; name -> [us, calls]
    for e in kernels:
        s, t = e.time_range.start, e.time_range.end
        totals[e.name][0] += t - s
        totals[e.name][1] += 1
        if busy and s <= busy[-1][1]:  # overlaps the stretch before (another stream)
            busy[-1][1], busy[-1][3] = max(busy[-1][1], t), e.name
        else:
            busy.append([s, t, e.name, e.name])
    span = busy[-1][1] - busy[0][0]
    gaps = sorted(((b[0] - a[1], a[3], b[2]) for a, b in zip(busy, busy[1:])), reverse=True)
    kinds = defaultdict(float)
    for name, (us, _) in totals.items():
        kinds[kind_of(name)] += us
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])
    buckets = {k: [g for g, *_ in gaps if lo <= g < hi]
               for k, lo, hi in (("<10 us", 0, 10), ("10-100 us", 10, 100), (">=100 us", 100, float("inf")))}
    kernel_us = sum(us for us, _ in totals.values())  # over the busy time where streams overlap
    out = {"steps": steps, "kernels": len(kernels), "span_ms": span / 1e3,
           "busy_ms": sum(b[1] - b[0] for b in busy) / 1e3, "kernel_ms": kernel_us / 1e3,
           "idle_ms": sum(g for g, *_ in gaps) / 1e3, "gaps": len(gaps),
           "gap_buckets": {k: {"count": len(v), "ms": sum(v) / 1e3} for k, v in buckets.items()},
           "by_kind_ms": {k: us / 1e3 for k, us in sorted(kinds.items(), key=lambda kv: -kv[1])},
           "top_kernels": [{"name": n, "ms": us / 1e3, "calls": c, "kind": kind_of(n)} for n, (us, c) in top[:50]],
           "largest_gaps": [{"us": g, "after": a, "before": b} for g, a, b in gaps[:20]]}
    per = f" per step ({steps} steps)" if steps > 1 else ""
    sizes = ", ".join(f"{k}: {v['count']} = {v['ms']:.2f} ms" for k, v in out["gap_buckets"].items())
    lines = [f"GPU span {out['span_ms'] / steps:.2f} ms{per}: kernels busy {out['busy_ms'] / steps:.2f} ms "
             f"({100 * out['busy_ms'] / out['span_ms']:.1f}%), idle {out['idle_ms'] / steps:.2f} ms; "
             f"{len(gaps)} gaps in all ({sizes})",
             "kernel time by kind: " + ", ".join(f"{k} {100 * ms / out['kernel_ms']:.1f}%"
                                                 for k, ms in out["by_kind_ms"].items()),
             "", f"{'ms':>9} {'%':>6} {'calls':>6}  kernel (top 20 by GPU time; % of all kernel time)"]
    lines += [f"{us / 1e3:9.3f} {100 * us / kernel_us:6.1f} {c:6d}  {n[:110]}" for n, (us, c) in top[:20]]
    lines += ["", f"{'gap us':>9}  between (the 10 largest idle gaps)"]
    lines += [f"{g:9.1f}  {a[:60]}  ->  {b[:60]}" for g, a, b in gaps[:10]]
    return out, lines


def main(argv: list[str]) -> int:
    (model, optim, run_opts, b), explicit = options.parse(
        argv, bench.SECTIONS, prog="profile_step.py", description=__doc__.split("\n\n")[0])
    if b.data_dir or b.data == "loader" or b.baseline != "none":
        raise UserError("profile_step.py profiles the bench's random ids on the device: leave out --data_dir, "
                        "--data loader and --baseline.")
    values = {**vars(model), **vars(optim), **vars(run_opts)}
    if not explicit & {"preset", "init_from", "n_layer"}:
        values["preset"] = "gpt2"
    cfg = bench.cell_config(values, b.warmup + b.steps)
    out = Path(b.out or "profile_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpt2fit-profile-") as tmp:
        cfg.data.data_dir = str(bench.write_random_data_dir(Path(tmp) / "data", b.vocab_size, b.data_tokens,
                                                            cfg.run.seed, cfg.model.block_size))
        cfg.run.out_dir = str(Path(tmp) / "run")
        with contextlib.redirect_stdout(io.StringIO()):
            run = setup(cfg)
        device = run.accelerator.device
        batches = bench.random_batches(b.vocab_size, run.micro, cfg.model.block_size, device, pool=4, seed=cfg.run.seed)
        backend = bench.SDPA_BACKENDS[b.sdpa_backend]
        cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            for _ in range(b.warmup):
                train_step(run, batches)
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                for _ in range(b.steps):
                    train_step(run, batches)
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t0
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        with trace.open("rb") as src, gzip.open(out.with_name(out.stem + "_trace.json.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    env = environment(device)
    title = (f"{bench.model_label(values)}, micro {run.micro}, block {cfg.model.block_size}, "
             f"mixed precision {run.accelerator.mixed_precision}, {env['device']['name']}: {b.steps} profiled "
             f"step(s) after {b.warmup} warm-up, host wall {1e3 * wall / b.steps:.2f} ms/step under the profiler")
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    doc = {"benchmark": "gpt2fit profile of training steps (benchmarks/gpu/profile_step.py)",
           "command": "profile_step.py " + " ".join(argv), **env, "settings": cfg.to_flat(),
           "micro_batch_size": run.micro, "wall_ms_per_step": 1e3 * wall / b.steps}
    lines = [title]
    if kernels:
        doc["gpu"], more = analyse(kernels, b.steps)
        lines += more
    else:
        lines.append("no GPU kernels (a CPU run): the op table only")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
    lines += ["", f"torch.profiler ops by {sort} (top 25)", ops]
    doc["ops_table"] = ops
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    text = "\n".join(lines)
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
