"""Measure training steps: tokens/s, step time, MFU and peak memory of THE gpt2fit step.

    gpt2fit bench --preset gpt2 --block_size 1024 --micro_batch_size 16 --warmup 3 --steps 10 \\
        --grid grad_checkpointing=false,true optimizer=adamw,adamw8bit --baseline trainer \\
        --out benchmarks/gpt2_h100.json

Every cell of the grid is a real run: ``parse_config`` builds the TrainConfig (the same flags
``gpt2fit train`` takes, with a throwaway out_dir), ``train.setup`` builds the model, optimizer
and Accelerator, and ``train.train_step`` (what ``fit`` calls) takes W warm-up and N timed
optimizer steps. Each step is timed on the host with a device synchronize at its end.

Grid: ``--grid key=v1,v2 key2=v3,v4`` is the cartesian product of its keys; ``--grid`` may be
given several times and the cells of all groups are run in order (duplicates once), so one
baseline plus one lever at a time is ``--grid compile=true --grid optimizer=adamw8bit``. A key
with one value is a fixed setting. Keys are the train flags that change the step (model, optim,
mixed_precision, tf32, max_memory, num_workers, sampling, ...) plus two of the bench's own:
``data`` (random | loader) and ``sdpa_backend`` (auto | flash | efficient | math | cudnn).

Data: ``random`` draws token ids once per micro-batch index, already on the device, before the
timed steps (the input pipeline costs nothing: this isolates the model); ``loader`` runs the
real input pipeline, ``data.make_loader`` over ``--data_dir`` (or over a token file of random
ids written to a temp dir), so DataLoader stalls show up. Without ``--data_dir`` the model's
vocabulary is ``--vocab_size`` (GPT-2's 50,257).

Output: ``--out X.json`` (raw per-step times, every setting, device and versions) and ``X.md``
(the table, also printed last). The rows carry model, grad_checkpointing, optimizer, loss_impl,
mfu and device, so ``gpt2fit plan`` uses the measured MFU when the JSON lies in benchmarks/.

JSON (schema_version 1)::

    benchmark, schema_version, command, created, gpt2fit {version, commit}
    device      {type, name, gpu_key, datasheet_bf16_flops, memory_bytes, capability, cpu, threads}
    versions    {python, torch, cuda, cudnn, transformers, accelerate, bitsandbytes, ...}
    flops       formula and what N counts; matmul_peaks: [{dtype, size, flops, seconds}]
    settings    {warmup, steps, fixed, grid, cells, data_dir, vocab_size, baseline, sdpa_backend}
    rows        one per gpt2fit cell: id, kind "gpt2fit", settings, model, device,
                grad_checkpointing, optimizer, loss_impl, precision, block_size, micro_batch_size,
                grad_accum_steps, tokens_per_step, n_params, n_params_for_flops, flops_per_token,
                tokens_per_s, tokens_per_s_median, step_time_median_s, step_time_p90_s,
                step_time_mean_s, step_times_s, warmup_times_s, setup_s, mfu, mfu_measured_peak,
                peak_allocated_bytes, peak_reserved_bytes, warmup_peak_allocated_bytes,
                warmup_peak_reserved_bytes, peak_rss_bytes, memory_kind, predicted_peak_bytes,
                predicted_memory {component: bytes}, predicted_over_allocated,
                predicted_over_reserved, predicted_fits, predicted_within_cap, skipped_steps, loss,
                oom, error, speedup_vs_trainer, trainer_baseline, vs_trainer_like_for_like
    baselines   transformers.Trainer runs (kind "trainer"); the same timing and memory fields,
                without the planner keys (so the planner never reads the Trainer's MFU)
    notes       how to read the numbers
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gpt2fit.errors import ArgumentParser, UserError, positive_int, suggest

SCHEMA_VERSION = 1
DATA_MODES = ("random", "loader")
SDPA_BACKENDS = ("auto", "flash", "efficient", "math", "cudnn")
BENCH_KEYS = {"data": DATA_MODES, "sdpa_backend": SDPA_BACKENDS}  # grid keys that are not train flags
# train flags a cell may vary: everything that changes what one optimizer step computes or costs
_RUN_KEYS = ("seed", "mixed_precision", "tf32", "max_memory", "host_sync")
_DATA_KEYS = ("num_workers", "sampling", "pin_memory")
_PLUMBING = {  # train flags that mean nothing for a few timed steps, and why
    "out_dir": "the bench uses a throwaway out_dir", "data_dir": "give --data_dir to the bench itself",
    "max_steps": "use --warmup / --steps", "max_tokens": "use --warmup / --steps", "epochs": "use --warmup / --steps",
}
GIB = 1024**3


def grid_keys() -> dict[str, tuple | None]:
    """Grid key -> its choices (None: any value the train flag accepts)."""
    from gpt2fit.config import FIELDS, DataArgs, ModelArgs, OptimArgs

    keys: dict[str, tuple | None] = {}
    for name, (sec, fl, _) in FIELDS.items():
        if sec in (ModelArgs, OptimArgs) or name in _RUN_KEYS or (sec is DataArgs and name in _DATA_KEYS):
            keys[name] = fl.metadata.get("choices")
    keys.update(BENCH_KEYS)
    return keys


def parse_grid(groups: list[list[str]] | None) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """``[["optimizer=adamw,adamw8bit", "compile=false,true"], [...]]`` -> (cells, key -> values).

    Values are checked (and converted) the way the train flags are, before anything runs.
    """
    from gpt2fit.config import FIELDS, coerce

    allowed = grid_keys()
    cells: list[dict[str, Any]] = []
    seen_values: dict[str, list] = {}
    for group in groups or [[]]:
        axes: list[tuple[str, list]] = []
        for item in group:
            key, sep, raw = item.partition("=")
            key = key.strip().lstrip("-")
            if not sep or not key:
                raise UserError(f"grid item {item!r} is not key=value[,value...]; e.g. --grid optimizer=adamw,adamw8bit")
            if key not in allowed:
                if key in FIELDS:
                    why = _PLUMBING.get(key, "it does not change the training step")
                    raise UserError(f"grid key {key!r} cannot be varied in a bench: {why}.")
                raise UserError(f"unknown grid key {key!r}.{suggest(key, allowed)} Grid keys: "
                                f"{', '.join(sorted(allowed))}.")
            if key in (a for a, _ in axes):
                raise UserError(f"grid key {key!r} is given twice in one --grid group; list its values once, "
                                f"comma-separated: {key}=a,b.")
            values = [v.strip() for v in raw.split(",")]
            if not values or any(v == "" for v in values):
                raise UserError(f"grid item {item!r} has an empty value; e.g. {key}=a,b.")
            if key in BENCH_KEYS:
                for v in values:
                    if v not in BENCH_KEYS[key]:
                        raise UserError(f"{key}={v!r} in --grid is not one of {', '.join(BENCH_KEYS[key])}."
                                        f"{suggest(v, BENCH_KEYS[key])}")
            else:
                values = [coerce(key, v, "--grid") for v in values]
            axes.append((key, list(dict.fromkeys(values))))
            for v in values:
                seen_values.setdefault(key, [])
                if v not in seen_values[key]:
                    seen_values[key].append(v)
        for combo in itertools.product(*(vals for _, vals in axes)):
            cell = dict(zip((k for k, _ in axes), combo))
            if cell not in cells:
                cells.append(cell)
    return cells, seen_values


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2fit bench", allow_abbrev=False,
        description="Time warm-up + N optimizer steps of gpt2fit's real training step (train.setup + "
                    "train.train_step) for every cell of a settings grid; report tokens/s, step time "
                    "(median, p90), MFU and peak memory, and write JSON + a Markdown table.",
        epilog="example: gpt2fit bench --preset gpt2 --micro_batch_size 16 --grid compile=false,true "
               "optimizer=adamw,adamw8bit --baseline trainer --out benchmarks/gpt2_h100.json",
    )
    g = p.add_argument_group("model and batch (fixed for every cell unless the grid varies them)")
    g.add_argument("--preset", default=None, help="GPT-2 size: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                                                  "(default: gpt2 unless --n_layer/--init_from is given)")
    g.add_argument("--init_from", default=None, help="time finetuning steps of this model (local dir or Hub id)")
    g.add_argument("--n_layer", type=positive_int, default=None, help="transformer blocks of a custom model")
    g.add_argument("--n_head", type=positive_int, default=None, help="attention heads of a custom model")
    g.add_argument("--n_embd", type=positive_int, default=None, help="hidden width of a custom model")
    g.add_argument("--block_size", type=positive_int, default=1024, help="tokens per sequence (default: 1024)")
    g.add_argument("--micro_batch_size", default="8",
                   help="sequences per forward/backward, or auto (the train flag's probe) (default: 8)")
    g.add_argument("--grad_accum_steps", type=positive_int, default=1,
                   help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--mixed_precision", default="auto", choices=("auto", "bf16", "fp16", "no"),
                   help="auto = bf16 on GPUs that support it, else fp32 (default: auto)")
    g.add_argument("--max_memory", default=None,
                   help="cap the CUDA allocator to this much (e.g. 12GiB) to act like a smaller card; a cell "
                        "that runs out of memory is recorded as oom and the grid goes on")
    g.add_argument("--vocab_size", type=positive_int, default=50257,
                   help="vocabulary of the random token ids when no --data_dir is given (default: 50257, GPT-2's)")
    g = p.add_argument_group("what to run")
    g.add_argument("--grid", nargs="+", action="append", metavar="KEY=V1,V2",
                   help="settings to vary: the cartesian product of the keys in one --grid; repeat --grid "
                        "for more groups (cells of all groups run in order). Keys: train flags such as "
                        "grad_checkpointing, optimizer, loss_chunk_size, compile, attn_implementation, tf32, "
                        "micro_batch_size, preset, max_memory, num_workers, plus data and sdpa_backend")
    g.add_argument("--warmup", type=positive_int, default=3,
                   help="untimed optimizer steps first (compile, cuDNN/cuBLAS autotuning, allocator) (default: 3)")
    g.add_argument("--steps", type=positive_int, default=10, help="timed optimizer steps per cell (default: 10)")
    g.add_argument("--data_dir", default=None,
                   help="a prepared data dir: data=loader reads it through the real DataLoader (the default "
                        "mode when given); without it, the ids are random and data=loader reads a temp "
                        "token file of random ids")
    g.add_argument("--data_tokens", type=positive_int, default=4 * 1024 * 1024,
                   help="tokens in that temp token file (default: 4194304)")
    g.add_argument("--sdpa_backend", default="auto", choices=SDPA_BACKENDS,
                   help="force one SDPA kernel (torch.nn.attention.sdpa_kernel) around the warm-up and timed "
                        "steps; auto lets PyTorch choose (default: auto; also a grid key)")
    g.add_argument("--baseline", default="none", choices=("none", "trainer"),
                   help="trainer: also time transformers.Trainer on the same model config, micro-batch and "
                        "accumulation (default AdamW, bf16 on CUDA) and report speedup_vs_trainer (default: none)")
    g.add_argument("--seed", type=int, default=1337, help="seed for weights and token ids (default: 1337)")
    g.add_argument("--matmul_size", type=positive_int, default=None,
                   help="side of the square matmul that measures the device's achievable FLOP/s "
                        "(default: 8192 on CUDA, 1024 on CPU)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="JSON path; the Markdown table goes next to it as .md "
                        "(default: benchmarks/bench_<model>_<device>.json)")
    g.add_argument("--dry_run", action="store_true", help="print the cells of the grid and exit")
    return p


def fixed_settings(args) -> dict[str, Any]:
    """The bench flags as train-flag settings (the grid overrides them per cell)."""
    from gpt2fit.config import coerce

    s: dict[str, Any] = {}
    if args.preset is None and args.init_from is None and args.n_layer is None:
        s["preset"] = "gpt2"
    for key in ("preset", "init_from", "n_layer", "n_head", "n_embd", "max_memory"):
        if getattr(args, key) is not None:
            s[key] = coerce(key, getattr(args, key), "the command line")
    s["block_size"] = args.block_size
    s["micro_batch_size"] = coerce("micro_batch_size", args.micro_batch_size, "the command line")
    s["grad_accum_steps"] = args.grad_accum_steps
    s["mixed_precision"] = args.mixed_precision
    s["seed"] = args.seed
    s["sdpa_backend"] = args.sdpa_backend
    s["data"] = "loader" if args.data_dir else "random"
    return s


# ------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    import torch

    from gpt2fit import __version__
    from gpt2fit.hardware import device_peak_flops, gpu_key_for_device

    dev = {"type": device.type, "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        dev.update(name=name, gpu_key=gpu_key_for_device(name), datasheet_bf16_flops=device_peak_flops(name),
                   memory_bytes=int(props.total_memory), capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            dev["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            dev["driver"] = None
    else:
        dev.update(name=str(device), gpu_key=None, datasheet_bf16_flops=None)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for dist in ("transformers", "accelerate", "bitsandbytes", "numpy", "triton", "flash-attn", "liger-kernel"):
        versions[dist.replace("-", "_")] = _version(dist)
    versions["platform"] = platform.platform()
    return {"device": dev, "versions": versions, "gpt2fit": {"version": __version__, "commit": _git_commit()}}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Step boundaries without a host sync between steps: CUDA events recorded on the stream (so a
    step's time also counts the GPU idling while the host catches up, e.g. after a sync inside the
    step), or perf_counter on the CPU, where every op is synchronous anyway."""

    def __init__(self, device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        import torch

        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, pairs=None) -> list[float]:
        """Seconds between consecutive marks, or between the given (start, end) mark indices."""
        import torch

        pairs = pairs if pairs is not None else [(i, i + 1) for i in range(len(self.marks) - 1)]
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[a].elapsed_time(self.marks[b]) / 1e3 for a, b in pairs]
        return [self.marks[b] - self.marks[a] for a, b in pairs]


def matmul_peak(device, dtype_name: str, size: int, iters: int = 10) -> dict:
    """Achievable dense matmul FLOP/s: a size^3 product (bf16/fp16 on CUDA, as the run computes;
    fp32 on the CPU), timed with CUDA events on the GPU, the host clock on the CPU."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=g, device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g, device=device, dtype=dtype)
    for _ in range(3):
        c = a @ b
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            c = a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000 / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            c = a @ b
        seconds = (time.perf_counter() - t0) / iters
    del a, b, c
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" and dtype_name == "fp32" else None
    return {"dtype": dtype_name, "size": size, "iters": iters, "seconds": seconds,
            "flops": 2.0 * size**3 / seconds, "tf32": tf32,
            "timer": "cuda events" if device.type == "cuda" else "host perf_counter"}


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def write_random_data_dir(path: Path, vocab_size: int, tokens: int, seed: int, block_size: int) -> Path:
    """A data dir of random token ids (meta.json as `gpt2fit prepare` writes it), for setup()."""
    import numpy as np

    from gpt2fit import formats
    from gpt2fit.formats import dtype_for_vocab
    from gpt2fit.prepare.tokenizers import build_char_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    rng = np.random.default_rng(seed)
    n_val = 4 * (block_size + 1)
    tokens = max(tokens, 4 * (block_size + 2))
    for split, n in (("train", tokens), ("val", n_val)):
        rng.integers(0, vocab_size, size=n, dtype=np.int64).astype(dtype).tofile(path / f"{split}.bin")
    # setup() loads the data dir's tokenizer; the bench never decodes, so a 2-symbol one stands in
    build_char_tokenizer(["ab"]).save_pretrained(str(path / formats.TOKENIZER_DIR))
    meta = {"dtype": dtype,
            "tokenizer": {"name_or_path": str(path / formats.TOKENIZER_DIR), "kind": "random",
                          "vocab_size": vocab_size, "eot_id": vocab_size - 1},
            "splits": {"train": {"tokens": tokens, "documents": 1}, "val": {"tokens": n_val, "documents": 1}},
            "source": {"inputs": [f"uniform random token ids in [0, {vocab_size}) (gpt2fit bench, seed {seed})"]}}
    (path / formats.META).write_text(json.dumps(meta, indent=2))
    return path


class RandomBatches:
    """Micro-batch ``k`` -> (x, y) like ``data.WindowBatches``, from random ids drawn once per index
    (``pool`` distinct batches, reused cyclically) and placed on the device before timing, so the
    input pipeline costs nothing (``train_step``'s ``.to(device)`` is then a no-op)."""

    def __init__(self, vocab_size: int, micro_batch: int, block_size: int, device, *, pool: int, seed: int):
        import torch

        g = torch.Generator(device="cpu").manual_seed(seed)
        self.windows = [torch.randint(0, vocab_size, (micro_batch, block_size + 1), generator=g).to(device)
                        for _ in range(max(1, pool))]

    def __getitem__(self, k: int):
        w = self.windows[k % len(self.windows)]
        return w[:, :-1], w[:, 1:]

    def __iter__(self):
        return (self[k] for k in itertools.count())


# ------------------------------------------------------------------------------------------
# one cell
# ------------------------------------------------------------------------------------------
def reset_accelerate() -> None:
    """A fresh Accelerate state per cell (mixed precision, dynamo backend... are singletons)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sdpa_context(backend: str):
    if backend in (None, "auto"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend])


def _is_oom(e: BaseException) -> bool:
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, oom_type) or should_reduce_batch_size(e)


def _percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timing_fields(times: list[float], tokens_per_step: int) -> dict:
    med = statistics.median(times)
    return {"step_times_s": times, "step_time_median_s": med, "step_time_p90_s": _percentile(times, 90),
            "step_time_mean_s": sum(times) / len(times),
            "tokens_per_s": tokens_per_step * len(times) / sum(times), "tokens_per_s_median": tokens_per_step / med}


def memory_fields(device) -> dict:
    """Peak memory since the last reset: CUDA allocator peaks, or the process's peak RSS on the CPU."""
    import torch

    from gpt2fit.train.report import peak_memory_bytes

    if device.type == "cuda":
        return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)), "peak_rss_bytes": None,
                "memory_kind": "cuda max_memory_allocated / max_memory_reserved over the timed steps"}
    return {"peak_allocated_bytes": None, "peak_reserved_bytes": None,
            "peak_rss_bytes": peak_memory_bytes(device),
            "memory_kind": "cpu: peak RSS of the whole bench process so far (ru_maxrss; cannot be reset per cell)"}


def model_label(settings: dict) -> str:
    """The planner's model name: the preset (as `gpt2fit plan --model`), init_from, or custom-L-H-C."""
    if settings.get("init_from"):
        return str(settings["init_from"])
    if settings.get("preset") and all(settings.get(k) is None for k in ("n_layer", "n_head", "n_embd")):
        return str(settings["preset"])
    from gpt2fit.train.model import PRESETS

    dims = dict(PRESETS.get(settings.get("preset") or "gpt2"))
    dims.update({k: settings[k] for k in ("n_layer", "n_head", "n_embd") if settings.get(k) is not None})
    return f"custom-L{dims['n_layer']}-H{dims['n_head']}-C{dims['n_embd']}"


def _precision(mixed_precision: str) -> str:
    return {"bf16": "bf16", "fp16": "fp16"}.get(str(mixed_precision), "fp32")


def predicted_memory(lm_config, cfg, *, micro: int, precision: str, n_processes: int, max_memory) -> dict:
    """plan.estimate_memory for exactly this cell's settings (what `gpt2fit plan` would say)."""
    from gpt2fit.plan.planner import estimate_memory
    from gpt2fit.units import parse_size

    est = estimate_memory(
        lm_config, block_size=cfg.model.block_size, micro_batch_size=micro, precision=precision,
        optimizer=cfg.optim.optimizer, grad_checkpointing=cfg.model.grad_checkpointing,
        loss_impl="chunked" if cfg.model.loss_chunk_size else "plain",
        loss_chunk_size=cfg.model.loss_chunk_size or 1024,
        attention="eager" if cfg.model.attn_implementation == "eager" else "sdpa",
        dropout=cfg.model.dropout, n_processes=n_processes)
    out = {"predicted_peak_bytes": est.total, "predicted_memory": est.to_dict(),
           "predicted_fits": None, "predicted_within_cap": None}
    if max_memory:
        cap = parse_size(max_memory)
        out["predicted_fits"] = est.fits(cap)  # the planner's rule for a card of this size (reserve, margin)
        out["predicted_within_cap"] = est.total <= cap  # against the allocator cap itself
    return out


def cell_argv(settings: dict, data_dir, out_dir, total_steps: int) -> list[str]:
    """The `gpt2fit train` flags of one cell (its train-flag settings + a throwaway run)."""
    from gpt2fit.config import FIELDS

    argv = ["--data_dir", str(data_dir), "--out_dir", str(out_dir), "--max_steps", str(total_steps),
            "--eval_interval", str(10**9), "--log_interval", str(10**9), "--report_to", "none"]
    for key, value in settings.items():
        if key in FIELDS and value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def check_cells(settings_list: list[dict]) -> None:
    """Resolve every cell's config before anything runs, so a bad combination fails in a second."""
    from gpt2fit.config import parse_config
    from gpt2fit.units import parse_size

    for i, s in enumerate(settings_list, 1):
        try:
            parse_config(cell_argv(s, "DATA", "OUT", 1), prog="gpt2fit bench")
            if s.get("max_memory"):
                parse_size(s["max_memory"])
        except UserError as e:
            label = " ".join(f"{k}={v}" for k, v in s.items())
            raise UserError(f"cell c{i} ({label}): {e}") from None


# every row has every key; a cell that fails (OOM, error) keeps None where it got no number
MEASUREMENTS = ("precision", "micro_batch_size", "grad_accum_steps", "tokens_per_step", "n_processes", "n_params",
                "n_params_for_flops", "flops_per_token", "vocab_size", "setup_s", "tokens_per_s",
                "tokens_per_s_median", "step_time_median_s", "step_time_p90_s", "step_time_mean_s", "step_times_s",
                "warmup_times_s", "timed_wall_s", "skipped_steps", "loss", "mfu", "mfu_measured_peak", "achieved_flops",
                "matmul_peak_flops", "peak_allocated_bytes", "peak_reserved_bytes", "warmup_peak_allocated_bytes",
                "warmup_peak_reserved_bytes", "peak_rss_bytes", "memory_kind", "memory_at_failure",
                "predicted_peak_bytes", "predicted_memory", "predicted_over_allocated", "predicted_over_reserved",
                "predicted_fits", "predicted_within_cap", "speedup_vs_trainer", "trainer_baseline",
                "vs_trainer_like_for_like")


def run_cell(row: dict, settings: dict, *, data_dir: Path, warmup: int, steps: int, workdir: Path,
             vocab_size: int) -> None:
    """Set up one real run from ``settings`` and time warm-up + timed steps, filling ``row`` as it
    goes (so a cell that runs out of memory still has its settings and the planner's prediction)."""
    import torch

    from gpt2fit.config import micro_batch, parse_config
    from gpt2fit.formats import read_meta
    from gpt2fit.train.model import build_config
    from gpt2fit.plan.planner import count_params_for_flops
    from gpt2fit.hardware import flops_per_token
    from gpt2fit.train.loop import setup, train_step

    out_dir = Path(tempfile.mkdtemp(prefix="cell-", dir=workdir))
    cfg, _ = parse_config(cell_argv(settings, data_dir, out_dir, warmup + steps), prog="gpt2fit bench")
    cuda = torch.cuda.is_available()
    if cuda and not cfg.run.max_memory:
        torch.cuda.set_per_process_memory_fraction(1.0)  # undo an earlier cell's cap
    mp = cfg.run.mixed_precision  # as train.make_accelerator resolves it
    if mp == "auto":
        mp = os.environ.get("ACCELERATE_MIXED_PRECISION") or ("bf16" if cuda and torch.cuda.is_bf16_supported() else "no")
    if micro_batch(cfg) is not None and not cfg.model.init_from:  # predict before anything is allocated
        meta = read_meta(data_dir)
        lm_config = build_config(cfg.model, int(meta["tokenizer"]["vocab_size"]), int(meta["tokenizer"]["eot_id"]))
        row.update(precision=_precision(mp), micro_batch_size=micro_batch(cfg),
                   **predicted_memory(lm_config, cfg, micro=micro_batch(cfg), precision=_precision(mp),
                                      n_processes=1, max_memory=cfg.run.max_memory))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # setup's announcement, once per cell, is noise here
        run = setup(cfg)
    row["setup_s"] = time.perf_counter() - t0
    a = run.accelerator
    device = a.device
    lm = a.unwrap_model(run.model).lm
    n_flops = count_params_for_flops(lm.config)
    row.update(precision=_precision(a.mixed_precision), micro_batch_size=run.micro, grad_accum_steps=run.accum,
               tokens_per_step=run.tokens_per_step, n_processes=a.num_processes, n_params=run.n_params,
               n_params_for_flops=n_flops, vocab_size=lm.config.vocab_size,
               flops_per_token=flops_per_token(n_flops, lm.config.n_layer, lm.config.n_embd, cfg.model.block_size))
    row.update(predicted_memory(lm.config, cfg, micro=run.micro, precision=row["precision"],
                                n_processes=a.num_processes, max_memory=cfg.run.max_memory))
    loader = None
    if settings["data"] == "random":
        pool = min((warmup + steps) * run.accum, 32)
        batches = iter(RandomBatches(vocab_size, run.micro, cfg.model.block_size, device, pool=pool, seed=cfg.run.seed))
    else:
        from gpt2fit.train.batches import make_loader

        loader = make_loader(run.train_batches, 0, cfg.data.num_workers,
                             pin_memory=cfg.data.pin_memory and device.type == "cuda")
        batches = iter(loader)
    run.model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm_times, times, skipped = [], [], 0
    try:
        with sdpa_context(settings.get("sdpa_backend", "auto")):
            _sync(device)
            for _ in range(warmup):
                t = time.perf_counter()
                train_step(run, batches)
                _sync(device)
                warm_times.append(time.perf_counter() - t)
            row["warmup_times_s"] = warm_times
            warm_mem = memory_fields(device)
            row.update(warmup_peak_allocated_bytes=warm_mem["peak_allocated_bytes"],
                       warmup_peak_reserved_bytes=warm_mem["peak_reserved_bytes"])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            clock, verdicts = StepClock(device), []
            t = time.perf_counter()
            clock.mark()
            for _ in range(steps):  # no host sync here that the training loop would not have
                step_loss, _, finite = train_step(run, batches)
                clock.mark()
                verdicts.append(finite)
            times = clock.seconds()  # waits for the device
            row["timed_wall_s"] = time.perf_counter() - t
            skipped = sum(not bool(f) for f in verdicts)
        row.update(timing_fields(times, run.tokens_per_step))
        row.update(memory_fields(device))
        row.update(skipped_steps=skipped, loss=float(step_loss) / (run.micro * cfg.model.block_size * run.accum))
        alloc, reserved = row["peak_allocated_bytes"], row["peak_reserved_bytes"]
        row["predicted_over_allocated"] = row["predicted_peak_bytes"] / alloc if alloc else None
        row["predicted_over_reserved"] = row["predicted_peak_bytes"] / reserved if reserved else None
    finally:
        del batches
        if loader is not None:
            del loader  # persistent workers exit with their iterator
        a.free_memory()
        if cfg.model.compile:
            torch._dynamo.reset()


# ------------------------------------------------------------------------------------------
# transformers.Trainer baseline
# ------------------------------------------------------------------------------------------
# the settings a Trainer baseline shares with the gpt2fit cells (everything else is Trainer defaults)
TRAINER_SETTING_KEYS = ("preset", "init_from", "n_layer", "n_head", "n_embd", "block_size", "micro_batch_size",
                        "grad_accum_steps", "mixed_precision", "seed", "tf32", "max_memory", "dropout",
                        "pad_vocab_to", "learning_rate", "weight_decay")


def run_trainer_baseline(settings: dict, *, data_dir: Path, warmup: int, steps: int, workdir: Path) -> dict:
    """The same model config, micro-batch and accumulation, trained the way a Hugging Face user
    would: Trainer + TrainingArguments defaults (fused AdamW on torch >= 2.8), bf16 on CUDA."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gpt2fit.config import parse_config
    from gpt2fit.formats import read_meta
    from gpt2fit.train.model import build_model

    argv = ["--data_dir", str(data_dir), "--out_dir", str(workdir / "trainer-cfg"), "--max_steps", "1"]
    for key in TRAINER_SETTING_KEYS:
        if settings.get(key) is not None:
            argv += [f"--{key}", str(settings[key])]
    cfg, _ = parse_config(argv, prog="gpt2fit bench")
    micro = int(cfg.optim.micro_batch_size)
    T, accum = cfg.model.block_size, cfg.optim.grad_accum_steps
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mp = cfg.run.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32  # as the gpt2fit cells run
        torch.backends.cudnn.allow_tf32 = cfg.run.tf32
        if cfg.run.max_memory:
            from gpt2fit.units import parse_size

            cap = parse_size(cfg.run.max_memory)
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(device).total_memory))
        else:
            torch.cuda.set_per_process_memory_fraction(1.0)
    meta = read_meta(data_dir)
    vocab = int(meta["tokenizer"]["vocab_size"])
    margs = cfg.model
    margs.grad_checkpointing, margs.compile = False, False
    model = build_model(margs, vocab, cfg.run.seed, eot_id=int(meta["tokenizer"]["eot_id"]))

    n_seq = (warmup + steps) * micro * accum
    g = torch.Generator().manual_seed(cfg.run.seed)
    ids = torch.randint(0, vocab, (n_seq, T), generator=g)

    class RandomIds(torch.utils.data.Dataset):
        def __len__(self):
            return n_seq

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    class StepTimer(TrainerCallback):  # marks on the stream, as the gpt2fit cells are timed
        def __init__(self):
            self.clock, self.begins, self.ends, self.warm_mem = StepClock(device), [], [], None

        def on_step_begin(self, args, state, control, **kw):
            self.begins.append(len(self.clock.marks))
            self.clock.mark()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(len(self.clock.marks))
            self.clock.mark()
            if len(self.ends) == warmup:
                self.warm_mem = memory_fields(device)  # synchronizes, outside the timed steps
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)

    timer = StepTimer()
    targs = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        max_steps=warmup + steps, learning_rate=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay,
        bf16=mp == "bf16", fp16=mp == "fp16", use_cpu=not cuda, report_to=[], logging_strategy="no",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=cfg.run.seed,
        log_level="error")
    optim_name = str(getattr(targs.optim, "value", targs.optim))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(model=model, args=targs, train_dataset=RandomIds(), callbacks=[timer])
    del model
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its final metrics dict
            trainer.train()
    finally:
        trainer.accelerator.free_memory()
        del trainer
    wall = time.perf_counter() - t0
    # a step = on_step_end to on_step_end: data fetching (Trainer prefetches the accumulation window
    # before on_step_begin), forward/backward, clip, optimizer, scheduler, callbacks
    times = timer.clock.seconds(list(zip(timer.ends[warmup - 1:-1], timer.ends[warmup:])))
    in_step = timer.clock.seconds(list(zip(timer.begins[warmup:], timer.ends[warmup:])))
    tokens_per_step = micro * T * accum
    row = {"precision": _precision(mp), "micro_batch_size": micro, "grad_accum_steps": accum,
           "tokens_per_step": tokens_per_step, "trainer_optim": optim_name, "vocab_size": model_vocab(cfg, vocab),
           "train_wall_s": wall, "in_step_times_s": in_step,
           "warmup_times_s": timer.clock.seconds(list(zip([timer.begins[0]] + timer.ends[:warmup - 1],
                                                          timer.ends[:warmup])))}
    row.update(timing_fields(times, tokens_per_step))
    row.update(memory_fields(device))
    if timer.warm_mem:
        row.update(warmup_peak_allocated_bytes=timer.warm_mem["peak_allocated_bytes"],
                   warmup_peak_reserved_bytes=timer.warm_mem["peak_reserved_bytes"])
    return row


def model_vocab(cfg, vocab: int) -> int:
    from gpt2fit.train.model import padded_vocab

    return padded_vocab(vocab, cfg.model.pad_vocab_to)


# ------------------------------------------------------------------------------------------
# rows, baseline matching, output
# ------------------------------------------------------------------------------------------
SHAPE_KEYS = ("model", "block_size", "micro_batch_size", "grad_accum_steps", "precision", "vocab_size")
TRAINER_LIKE = {"grad_checkpointing": False, "optimizer": "adamw", "compile": False, "attn_implementation": "sdpa",
                "sdpa_backend": "auto", "loss_impl": "plain"}


def shape_of(row: dict) -> tuple:
    return tuple(row.get(k) for k in SHAPE_KEYS)


def attach_speedups(rows: list[dict], baselines: list[dict]) -> None:
    """speedup_vs_trainer = tokens/s / the Trainer's tokens/s at the same model, block, micro-batch,
    accumulation and precision (every gpt2fit row of that shape, whatever its levers)."""
    by_shape = {shape_of(b): b for b in baselines if b.get("tokens_per_s")}
    for r in rows:
        b = by_shape.get(shape_of(r))
        r["trainer_baseline"] = b["id"] if b else None
        r["speedup_vs_trainer"] = r["tokens_per_s"] / b["tokens_per_s"] if b and r.get("tokens_per_s") else None
        r["vs_trainer_like_for_like"] = bool(b) and all(r.get(k) == v for k, v in TRAINER_LIKE.items()) \
            and r.get("data") == "random"


def _gib(n) -> str:
    return "" if n is None else f"{n / GIB:.2f}"


def _tok(n) -> str:
    if n is None:
        return ""
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _short(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return "" if v is None else str(v)


def table(doc: dict) -> str:
    """The Markdown table: the settings that vary, then the measurements (rows, then baselines)."""
    rows, baselines = doc["rows"], doc.get("baselines", [])
    cuda = doc["device"]["type"] == "cuda"
    keys = [k for k in doc["settings"]["varied"] if k not in ("preset", "n_layer", "n_head", "n_embd", "init_from")]
    multi_model = len({r.get("model") for r in rows + baselines}) > 1
    head = ["id"] + (["model"] if multi_model else []) + keys + [
        "tok/s", "step ms (med)", "p90 ms", "MFU", "MFU (meas. peak)"]
    head += ["peak alloc GiB", "reserved GiB"] if cuda else ["peak RSS GiB"]
    head += ["predicted GiB", "pred/reserved" if cuda else "pred/RSS", "vs Trainer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def cells(r, settings):
        out = [r["id"]] + ([str(r.get("model"))] if multi_model else []) + [_short(settings.get(k)) for k in keys]
        if r.get("oom") or r.get("error"):
            note = "OOM" if r.get("oom") else "error: " + str(r["error"]).splitlines()[0][:60]
            pred = _gib(r.get("predicted_peak_bytes"))
            rest = [note] + [""] * (len(head) - len(out) - 4) + [pred, "", ""]
            return out + rest
        ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
        out += [_tok(r["tokens_per_s"]), ms(r["step_time_median_s"]), ms(r["step_time_p90_s"]), _pct(r.get("mfu")),
                _pct(r.get("mfu_measured_peak"))]
        if cuda:
            out += [_gib(r.get("peak_allocated_bytes")), _gib(r.get("peak_reserved_bytes"))]
            ratio = r.get("predicted_over_reserved")
        else:
            out += [_gib(r.get("peak_rss_bytes"))]
            p, rss = r.get("predicted_peak_bytes"), r.get("peak_rss_bytes")
            ratio = p / rss if p and rss else None
        sp = r.get("speedup_vs_trainer")
        out += [_gib(r.get("predicted_peak_bytes")), "" if ratio is None else f"{ratio:.2f}",
                "" if sp is None else f"{sp:.2f}x"]
        return out

    for r in rows:  # the value the cell ran with: resolved in the row, else as set
        lines.append("| " + " | ".join(cells(r, {k: r[k] if k in r else r["settings"].get(k) for k in keys})) + " |")
    for b in baselines:
        s = {k: b["settings"].get(k, "-") for k in keys}
        b = {**b, "id": f"{b['id']} (HF Trainer, {b.get('trainer_optim', 'default optim')})"}
        lines.append("| " + " | ".join(cells(b, s)) + " |")
    d, v = doc["device"], doc["versions"]
    peak = d.get("datasheet_bf16_flops")
    mm = "; ".join(f"{p['dtype']} {p['size']}^3 matmul {_flops(p['flops'])}" for p in doc["flops"]["matmul_peaks"])
    fixed = ", ".join(f"{k}={v}" for k, v in doc["settings"]["fixed"].items() if k not in doc["settings"]["varied"])
    head_lines = [
        f"device: {d['name']}" + (f" (datasheet dense bf16 {peak / 1e12:.0f} TFLOP/s)" if peak else "")
        + f"; measured: {mm or 'n/a'}",
        f"torch {v['torch']} (CUDA {v['cuda']}), transformers {v['transformers']}, accelerate {v['accelerate']}, "
        f"bitsandbytes {v['bitsandbytes']}; gpt2fit {doc['gpt2fit']['commit']}",
        f"fixed: {fixed}; {doc['settings']['warmup']} warm-up + {doc['settings']['steps']} timed optimizer steps per cell",
        "tok/s = tokens per optimizer step x timed steps / their total time; MFU = tok/s x (6N + 12LCT) / peak, "
        "N = all parameters except wpe" + ("" if cuda else "; on the CPU there is no datasheet peak, and memory is "
                                           "the peak RSS of the whole process"),
    ]
    return "\n".join(head_lines) + "\n\n" + "\n".join(lines) + "\n"


def default_out(settings_list: list[dict], device_name: str) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower().replace("nvidia", "")).strip("-")
    slug = "-".join(p for p in slug.split("-") if p)
    models = {model_label(s) for s in settings_list}
    return Path("benchmarks") / f"bench_{models.pop() if len(models) == 1 else 'models'}_{slug}.json"


def write_outputs(doc: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    md = out.with_suffix(".md")
    md.write_text(f"# gpt2fit bench: {out.stem}\n\n`{doc['command']}`\n\n" + table(doc))
    return md


NOTES = [
    "Every gpt2fit row runs gpt2fit.train.setup + train_step, the optimizer step `gpt2fit train` runs.",
    "Step time: host clock around train_step with torch.cuda.synchronize() at the end of each step; "
    "tokens_per_s = tokens_per_step * steps / sum(step times); tokens_per_s_median = tokens_per_step / median.",
    "MFU = tokens_per_s * flops_per_token / peak, flops_per_token = 6N + 12*L*C*T (PaLM appendix B, nanoGPT), "
    "N = plan.count_params_for_flops: every parameter except the position embedding (wpe), tied wte/lm_head "
    "once; mfu uses the datasheet dense bf16 peak (plan.GPUS), mfu_measured_peak the matmul rate measured in "
    "this run at the row's precision.",
    "Host syncs: train_step makes exactly one per optimizer step (bool() of the finite check on the loss and "
    "gradient norm, before optimizer.step()); it is inside every timed step and not separately measured.",
    "Memory on CUDA: torch.cuda.max_memory_allocated / max_memory_reserved after reset_peak_memory_stats, over the "
    "timed steps (warmup_* over setup and warm-up); the CUDA context (~0.5-0.8 GiB) is in neither. "
    "predicted_peak_bytes = plan.estimate_memory(...).total for the row's settings (it includes 256 MiB workspace "
    "and 10% fragmentation); the planner targets +-10% of peak_reserved_bytes. sdpa_backend=math and compile "
    "change memory in ways the planner does not model.",
    "Trainer baseline: step time from one on_step_end to the next (so it includes the Trainer's batch "
    "prefetch); in_step_times_s is on_step_begin to on_step_end.",
]


def guarded(row: dict, device, fn) -> bool:
    """Run one cell (or baseline) with fresh Accelerate state; an OOM or any other failure becomes
    the row's ``oom`` / ``error`` and the grid goes on. Returns True on a failure that is not OOM."""
    reset_accelerate()
    try:
        fn()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one cell's failure is a row, the grid goes on
        row["memory_at_failure"] = memory_fields(device)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        if _is_oom(e):
            row["oom"], row["error_message"] = True, first or "out of memory"
            return False
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {first}"
        return True
    finally:  # the failed run's tensors go with the exception's frames; then the allocator's cache
        reset_accelerate()
        free_device_memory()
    return False


def add_mfu(row: dict, datasheet_peak: float | None, measured_peak: float | None) -> None:
    achieved = row["tokens_per_s"] / (row.get("n_processes") or 1) * row["flops_per_token"]
    row.update(achieved_flops=achieved, matmul_peak_flops=measured_peak,
               mfu=achieved / datasheet_peak if datasheet_peak else None,
               mfu_measured_peak=achieved / measured_peak if measured_peak else None)


def run_bench(args, cells: list[dict], fixed: dict) -> tuple[dict, Path, int]:
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    env = environment(device)
    settings_list = [{**fixed, **c} for c in cells]
    varied = [k for k in dict.fromkeys(k for c in cells for k in c)
              if len({json.dumps(s.get(k), default=str) for s in settings_list}) > 1]
    out = Path(args.out) if args.out else default_out(settings_list, env["device"]["name"])
    doc = {
        "benchmark": "gpt2fit bench: training-step throughput, MFU and memory", "schema_version": SCHEMA_VERSION,
        "command": "gpt2fit bench " + " ".join(shlex.quote(a) for a in args.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **env,
        "flops": {"per_token": "6N + 12*L*C*T (forward + backward; PaLM appendix B / nanoGPT estimate_mfu)",
                  "N": "plan.count_params_for_flops: all parameters except wpe (tied wte/lm_head counted once)",
                  "peak": "plan.GPUS datasheet dense bf16 FLOP/s for mfu; matmul_peaks for mfu_measured_peak",
                  "matmul_peaks": []},
        "settings": {"warmup": args.warmup, "steps": args.steps, "fixed": fixed, "grid": args.grid or [],
                     "varied": varied, "cells": len(cells), "data_dir": args.data_dir,
                     "vocab_size": None if args.data_dir else args.vocab_size, "baseline": args.baseline,
                     "max_memory": args.max_memory, "n_processes": 1},
        "rows": [], "baselines": [], "notes": NOTES,
    }
    failures = 0
    with tempfile.TemporaryDirectory(prefix="gpt2fit-bench-") as tmp:
        workdir = Path(tmp)
        if args.data_dir:
            data_dir = Path(args.data_dir)
            from gpt2fit.formats import read_meta

            vocab = int(read_meta(data_dir)["tokenizer"]["vocab_size"])
        else:
            vocab = args.vocab_size
            block = max(int(s.get("block_size") or 1024) for s in settings_list)
            data_dir = write_random_data_dir(workdir / "random-data", vocab, args.data_tokens, args.seed, block)
        peaks: dict[str, dict] = {}
        datasheet_peak = env["device"].get("datasheet_bf16_flops")
        for i, settings in enumerate(settings_list, 1):
            row: dict[str, Any] = {"id": f"c{i}", "kind": "gpt2fit", "settings": settings,
                                   "model": model_label(settings), "device": env["device"]["name"]}
            row.update({k: settings.get(k, d) for k, d in (
                ("grad_checkpointing", False), ("optimizer", "adamw"), ("compile", False),
                ("attn_implementation", "sdpa"), ("sdpa_backend", "auto"), ("tf32", True), ("data", "random"),
                ("num_workers", 0), ("pin_memory", True), ("loss_chunk_size", 0), ("block_size", 1024),
                ("max_memory", None), ("host_sync", "step"), ("compile_scope", "model"), ("compile_mode", "default"))})
            row["loss_impl"] = "chunked" if row["loss_chunk_size"] else "plain"
            row.update(dict.fromkeys(MEASUREMENTS), oom=False, error=None, error_message=None)
            label = " ".join(f"{k}={settings[k]}" for k in varied if k in cells[i - 1]) or "default"
            print(f"[{i}/{len(settings_list)}] {label} ...", file=sys.stderr, flush=True)
            failures += guarded(row, device, lambda: run_cell(
                row, settings, data_dir=data_dir, warmup=args.warmup, steps=args.steps, workdir=workdir,
                vocab_size=vocab))
            if row["tokens_per_s"]:
                prec = row["precision"]
                if prec not in peaks:  # the achievable matmul rate, measured once per precision
                    size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
                    peaks[prec] = matmul_peak(device, prec if device.type == "cuda" else "fp32", size)
                    doc["flops"]["matmul_peaks"].append(peaks[prec])
                    free_device_memory()
                add_mfu(row, datasheet_peak, peaks[prec]["flops"])
            doc["rows"].append(row)
            print("    " + _summary(row), file=sys.stderr, flush=True)
            write_outputs(doc, out)  # after every cell: a killed run keeps what it measured

        if args.baseline == "trainer":  # once per model / block / micro-batch / accumulation / precision
            shapes = {}
            for r, s in zip(doc["rows"], settings_list):
                if r["tokens_per_s"] and shape_of(r) not in shapes:
                    shapes[shape_of(r)] = {**{k: s[k] for k in TRAINER_SETTING_KEYS if k in s},
                                           "micro_batch_size": r["micro_batch_size"]}
            for j, s in enumerate(shapes.values(), 1):
                b: dict[str, Any] = {"id": f"trainer{j}", "kind": "trainer", "settings": s, "model": model_label(s),
                                     "device_name": env["device"]["name"], "block_size": s.get("block_size"),
                                     **dict.fromkeys(MEASUREMENTS), "trainer_optim": None, "in_step_times_s": None,
                                     "train_wall_s": None, "oom": False, "error": None, "error_message": None}
                print(f"[trainer {j}/{len(shapes)}] micro_batch_size={s['micro_batch_size']} ...",
                      file=sys.stderr, flush=True)
                failures += guarded(b, device, lambda: b.update(run_trainer_baseline(
                    s, data_dir=data_dir, warmup=args.warmup, steps=args.steps, workdir=workdir)))
                twin = next((r for r in doc["rows"] if r["flops_per_token"] and shape_of(r)[:2] == shape_of(b)[:2]), None)
                if b["tokens_per_s"] and twin:
                    b["flops_per_token"] = twin["flops_per_token"]
                    add_mfu(b, datasheet_peak, peaks.get(b["precision"], {}).get("flops"))
                doc["baselines"].append(b)
                print("    " + _summary(b), file=sys.stderr, flush=True)
                attach_speedups(doc["rows"], doc["baselines"])
                write_outputs(doc, out)
    return doc, out, failures


def _summary(r: dict) -> str:
    if r.get("oom"):
        return "out of memory (recorded as oom)"
    if r.get("error"):
        return f"failed: {r['error']}"
    mem = (f"peak {_gib(r['peak_allocated_bytes'])} GiB alloc / {_gib(r['peak_reserved_bytes'])} GiB reserved"
           if r.get("peak_allocated_bytes") is not None else f"peak RSS {_gib(r.get('peak_rss_bytes'))} GiB")
    mfu = f", MFU {_pct(r['mfu'])}" if r.get("mfu") is not None else ""
    return (f"{_tok(r['tokens_per_s'])} tok/s, step {1000 * r['step_time_median_s']:.1f} ms "
            f"(p90 {1000 * r['step_time_p90_s']:.1f}){mfu}, {mem}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UserError(f"--data_dir {args.data_dir!r} does not exist; prepare one with `gpt2fit prepare`, "
                        "or leave it out to use random token ids.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("gpt2fit bench measures one process; run it with python (or `gpt2fit bench`), not "
                        "`accelerate launch --num_processes N`.")
    cells, _ = parse_grid(args.grid)
    fixed = fixed_settings(args)
    check_cells([{**fixed, **c} for c in cells])
    if args.dry_run:
        for i, c in enumerate(cells, 1):
            print(f"c{i}: " + " ".join(f"{k}={v}" for k, v in {**fixed, **c}.items()))
        return 0
    doc, out, failures = run_bench(args, cells, fixed)
    print(table(doc), end="")
    print(f"\nwrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    if failures:
        print(f"{failures} cell(s) failed with an error other than out-of-memory (see the rows' error field)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from gpt2fit.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
