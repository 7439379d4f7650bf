"""`gpt2fit bench`: tokens/s, step time, MFU and peak memory of THE gpt2fit training step (example: EPILOG).

Every cell of the grid is a real run: the TrainConfig `gpt2fit train` builds from the same options
(a throwaway out_dir), ``train.setup`` and ``train.train_step`` (what ``fit`` calls) for W warm-up
and N timed optimizer steps, back to back: a CUDA event recorded between steps marks each boundary
(the host clock on the CPU) and the device is synchronized once, after the last step, so the bench
adds no host sync the loop does not have. ``--grid key=v1,v2 key2=v3`` is the cartesian product of
its keys (the train options that change the step, ``data`` and ``sdpa_backend``; each also a
flag), repeated ``--grid`` groups run in order. Output: ``--out X.json`` and ``X.md`` (the table,
also printed last); benchmarks/README.md says what each number means. `gpt2fit plan` reads the
measured MFU of the rows in benchmarks/*.json.
"""

import contextlib
import dataclasses
import io
import itertools
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Trainer, TrainerCallback, TrainingArguments

from gpt2fit import config, formats, options
from gpt2fit.config import GPT2_VOCAB, ModelArgs, OptimArgs, TrainConfig
from gpt2fit.errors import ArgumentParser, UserError, suggest
from gpt2fit.hardware import flops_per_token
from gpt2fit.options import opt
from gpt2fit.plan.memory import count_params_for_flops, dtype_name, estimate_memory, memory_settings, scratch_shape
from gpt2fit.plan.planner import train_options
from gpt2fit.prepare.tokenizers import build_char_tokenizer, fingerprint, load_tokenizer
from gpt2fit.train.batches import make_loader
from gpt2fit.train.bench_report import (MEASUREMENTS, NOTES, add_mfu, attach_speedups, default_out, environment,
                                         shape_of, summary, table, write_outputs)
from gpt2fit.train.loop import apply_cuda_settings, resolved_precision, setup, train_step
from gpt2fit.train.model import build_config, build_model
from gpt2fit.train.report import peak_memory_bytes
from gpt2fit.units import parse_size

SCHEMA_VERSION = 1
SDPA_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
_PLUMBING = {  # train options that mean nothing for a few timed steps, and why
    "out_dir": "the bench uses a throwaway out_dir", "data_dir": "give --data_dir to the bench itself",
    "max_steps": "use --warmup / --steps", "max_tokens": "use --warmup / --steps", "epochs": "use --warmup / --steps",
}
SHOWN = ("preset", "block_size", "micro_batch_size", "grad_accum_steps", "mixed_precision", "seed")  # in "fixed"
# the resolved train options every row carries (what the planner and summarize.py match on)
ROW_KEYS = ("grad_checkpointing", "optimizer", "loss_chunk_size", "compile", "compile_scope", "compile_mode",
            "attn_implementation", "block_size", "tf32", "max_memory", "host_sync", "num_workers", "pin_memory")

# the train options beyond ModelArgs and OptimArgs that change what one optimizer step computes or costs
BenchRun = train_options(
    "BenchRun", "Run and data options of `gpt2fit train` that change the step (fixed unless the grid varies them)",
    ("seed", "mixed_precision", "tf32", "max_memory", "host_sync", "num_workers", "sampling", "pin_memory"),
    max_memory=dict(note="A cell that runs out of memory is recorded as oom and the grid goes on."))


@dataclass
class BenchArgs:
    """What to run and where the results go"""

    warmup: int = opt(3, "Untimed optimizer steps first (compile, cuDNN/cuBLAS autotuning, allocator).", minimum=1)
    steps: int = opt(10, "Timed optimizer steps per cell.", minimum=1)
    data: str | None = opt(None, "random: token ids drawn once, already on the device (the model alone); loader: the "
                                 "real DataLoader over --data_dir or a temp file of random ids (input stalls show). "
                                 "Not given: loader with --data_dir, else random. Also a grid key.",
                           choices=("random", "loader"))
    data_dir: str | None = opt(None, "A prepared data dir (else the ids are random).")
    vocab_size: int = opt(GPT2_VOCAB, "Vocabulary of the random token ids when no --data_dir is given.", minimum=1)
    data_tokens: int = opt(4 * 1024 * 1024, "Tokens in the temp token file of random ids.", minimum=1)
    sdpa_backend: str = opt("auto", "Force one SDPA kernel (torch.nn.attention.sdpa_kernel) around the warm-up and "
                                    "timed steps; auto lets PyTorch choose. Also a grid key.",
                            choices=tuple(SDPA_BACKENDS))
    baseline: str = opt("none", "trainer: also time transformers.Trainer on the same model config, micro-batch and "
                                "accumulation (its default AdamW, bf16 on CUDA) and report speedup_vs_trainer.",
                        choices=("none", "trainer"))
    matmul_size: int | None = opt(None, "Side of the square matmul that measures the device's achievable FLOP/s "
                                        "(not given: 8192 on CUDA, 1024 on the CPU).", minimum=1)
    out: str | None = opt(None, "JSON path; the Markdown table goes next to it as .md (not given: "
                                "benchmarks/bench_<model>_<device>.json).")
    dry_run: bool = opt(False, "Print the cells of the grid and exit.")


SECTIONS = (ModelArgs, OptimArgs, BenchRun, BenchArgs)
FIELDS = options.fields_of(SECTIONS)
GRID_KEYS = [*options.fields_of(SECTIONS[:3]), "data", "sdpa_backend"]
PROG = "gpt2fit bench"
DESCRIPTION = ("Time warm-up + N optimizer steps of gpt2fit's real training step (train.setup + train.train_step) "
               "for every cell of a settings grid; report tokens/s, step time (median, p90), MFU and peak memory, "
               "and write JSON + a Markdown table. The model and step options are `gpt2fit train`'s.")
EPILOG = ("example: gpt2fit bench --preset gpt2 --micro_batch_size 16 --grid compile=false,true "
          "optimizer=adamw,adamw8bit --baseline trainer --out benchmarks/gpt2_h100.json")


def build_parser() -> ArgumentParser:
    p = options.make_parser(PROG, SECTIONS, description=DESCRIPTION, epilog=EPILOG)
    # a list of groups: the one option that is not a dataclass field (argparse's append of nargs="+")
    p.add_argument("--grid", nargs="+", action="append", metavar="KEY=V1,V2",
                   help="Settings to vary: the cartesian product of the keys in one --grid; repeat --grid for more "
                        "groups (cells of all groups run in order). Keys: the train options above (grad_checkpointing, "
                        "optimizer, loss_chunk_size, compile, micro_batch_size, preset, max_memory, ...), data and "
                        "sdpa_backend.")
    return p


def parse_grid(groups: list[list[str]] | None) -> list[dict[str, Any]]:
    """``[["optimizer=adamw,adamw8bit", "compile=false,true"], [...]]`` -> the cells, in order, once each.
    Values are checked (and converted) as the options are, before anything runs."""
    cells: list[dict[str, Any]] = []
    for group in groups or [[]]:
        axes: dict[str, list] = {}
        for item in group:
            key, sep, raw = item.partition("=")
            key = key.strip().lstrip("-")
            if not sep or not key:
                raise UserError(f"grid item {item!r} is not key=value[,value...]; "
                                "e.g. --grid optimizer=adamw,adamw8bit")
            if key not in GRID_KEYS:
                if key in config.FIELDS:
                    why = _PLUMBING.get(key, "it does not change the training step")
                    raise UserError(f"grid key {key!r} cannot be varied in a bench: {why}.")
                raise UserError(f"unknown grid key {key!r}.{suggest(key, GRID_KEYS)} Grid keys: "
                                f"{', '.join(sorted(GRID_KEYS))}.")
            if key in axes:
                raise UserError(f"grid key {key!r} is given twice in one --grid group; list its values once, "
                                f"comma-separated: {key}=a,b.")
            if any(not v.strip() for v in raw.split(",")):
                raise UserError(f"grid item {item!r} has an empty value; e.g. {key}=a,b.")
            axes[key] = list(dict.fromkeys(options.coerce(key, v.strip(), "--grid", FIELDS) for v in raw.split(",")))
        for combo in itertools.product(*axes.values()):
            if dict(zip(axes, combo)) not in cells:
                cells.append(dict(zip(axes, combo)))
    return cells


def cell_config(values: dict[str, Any], steps: int) -> TrainConfig:
    """The TrainConfig `gpt2fit train` builds from these option values (checked as it checks them),
    for a throwaway run of ``steps`` optimizer steps; data_dir and out_dir are set when it runs."""
    flat = {k: v for k, v in values.items() if k in config.FIELDS}
    cfg = TrainConfig(*options.build(config.SECTIONS, {**flat, "max_steps": steps, "report_to": "none"}))
    config.validate(cfg)
    return cfg


def model_label(settings: dict) -> str:
    """The planner's model name: init_from, the preset, or custom-L<n_layer>-H<n_head>-C<n_embd>."""
    return str(settings.get("init_from") or scratch_shape(*(settings.get(k) for k in (
        "preset", "n_layer", "n_head", "n_embd"))).name)


# -- measuring --------------------------------------------------------------------------------
class StepClock:
    """Step boundaries without a host sync between steps: CUDA events recorded on the stream (so a
    step's time also counts the GPU idling while the host catches up, e.g. after a sync inside the
    step), or perf_counter on the CPU, where every op is synchronous anyway."""

    def __init__(self, device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, pairs=None) -> list[float]:
        """Seconds between consecutive marks, or between the given (start, end) mark indices."""
        pairs = pairs if pairs is not None else [(i, i + 1) for i in range(len(self.marks) - 1)]
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[a].elapsed_time(self.marks[b]) / 1e3 for a, b in pairs]
        return [self.marks[b] - self.marks[a] for a, b in pairs]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peaks(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def matmul_peak(device, dtype: str, size: int, iters: int = 10) -> dict:
    """Achievable dense matmul FLOP/s: a size^3 product (bf16/fp16 on CUDA, as the run computes;
    fp32 on the CPU), timed as the steps are."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=g, device=device, dtype=torch_dtype) for _ in range(2))
    for _ in range(3):  # warm-up
        a @ b
    clock = StepClock(device)
    clock.mark()
    for _ in range(iters):
        a @ b
    clock.mark()
    seconds = clock.seconds()[0] / iters
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if clock.cuda and dtype == "fp32" else None
    return {"dtype": dtype, "size": size, "iters": iters, "seconds": seconds, "flops": 2.0 * size**3 / seconds,
            "tf32": tf32, "timer": "cuda events" if clock.cuda else "host perf_counter"}


def timing_fields(times: list[float], tokens_per_step: int) -> dict:
    med = statistics.median(times)
    return {"step_times_s": times, "step_time_median_s": med, "step_time_p90_s": float(np.percentile(times, 90)),
            "step_time_mean_s": sum(times) / len(times),
            "tokens_per_s": tokens_per_step * len(times) / sum(times), "tokens_per_s_median": tokens_per_step / med}


def memory_fields(device, prefix: str = "") -> dict:
    """Peak memory since the last reset: CUDA allocator peaks, or the process's peak RSS on the CPU."""
    if prefix:  # the warm-up's allocator peaks
        mem = memory_fields(device)
        return {prefix + k: mem[k] for k in ("peak_allocated_bytes", "peak_reserved_bytes")}
    if device.type == "cuda":
        return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)), "peak_rss_bytes": None,
                "memory_kind": "cuda max_memory_allocated / max_memory_reserved over the timed steps"}
    return {"peak_allocated_bytes": None, "peak_reserved_bytes": None, "peak_rss_bytes": peak_memory_bytes(device),
            "memory_kind": "cpu: peak RSS of the whole bench process so far (ru_maxrss; cannot be reset per cell)"}


def predicted_memory(lm_config, cfg: TrainConfig, micro: int, mixed_precision: str, n_processes: int) -> dict:
    """plan.memory.estimate_memory for exactly this cell's settings (what `gpt2fit plan` would say)."""
    est = estimate_memory(lm_config, micro_batch_size=micro, n_processes=n_processes,
                          **memory_settings(cfg, mixed_precision))
    cap = parse_size(cfg.run.max_memory) if cfg.run.max_memory else None
    return {"predicted_peak_bytes": est.total, "predicted_memory": dataclasses.asdict(est),
            # the planner's rule for a card of this size (reserve, margin), and the allocator cap itself
            "predicted_fits": est.fits(cap) if cap else None, "predicted_within_cap": est.total <= cap if cap else None}


# -- data -------------------------------------------------------------------------------------
def write_random_data_dir(path: Path, vocab_size: int, tokens: int, seed: int, block_size: int,
                          init_from: str | None = None) -> Path:
    """A data dir of random token ids, as `gpt2fit prepare` writes one, for setup()."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = formats.dtype_for_vocab(vocab_size)
    rng = np.random.default_rng(seed)
    n_val, tokens = 4 * (block_size + 1), max(tokens, 4 * (block_size + 2))
    for split, n in (("train", tokens), ("val", n_val)):
        rng.integers(0, vocab_size, size=n, dtype=np.int64).astype(dtype).tofile(path / f"{split}.bin")
    # setup() loads the data dir's tokenizer and checks that an init_from model's is the same; the
    # bench never decodes, so without one a 2-symbol tokenizer stands in
    tok = None
    with contextlib.suppress(UserError):
        tok = init_from and load_tokenizer(formats.resolve_model_path(init_from))
    tok = tok or build_char_tokenizer(["ab"])
    tok.save_pretrained(str(path / formats.TOKENIZER_DIR))
    formats.write_meta(path, formats.make_meta(
        dtype=dtype, splits={"train": {"tokens": tokens, "documents": 1}, "val": {"tokens": n_val, "documents": 1}},
        tokenizer={"name_or_path": str(path / formats.TOKENIZER_DIR), "kind": "random", "vocab_size": vocab_size,
                   "eot_id": vocab_size - 1, "fingerprint": fingerprint(tok)},
        source={"inputs": [f"uniform random token ids in [0, {vocab_size}) (gpt2fit bench, seed {seed})"]}))
    return path


def random_batches(vocab_size: int, micro_batch: int, block_size: int, device, *, pool: int, seed: int):
    """(x, y) micro-batches like ``batches.WindowBatches``', from ``pool`` batches of random ids drawn
    once, placed on the device before timing and reused cyclically: the input pipeline costs nothing
    (``train_step``'s ``.to(device)`` is then a no-op)."""
    g = torch.Generator().manual_seed(seed)
    windows = [torch.randint(0, vocab_size, (micro_batch, block_size + 1), generator=g).to(device)
               for _ in range(max(1, pool))]
    return ((w[:, :-1], w[:, 1:]) for w in itertools.cycle(windows))


# -- one cell ---------------------------------------------------------------------------------
def reset_accelerate() -> None:
    """A fresh Accelerate state per cell: mixed precision, the dynamo plugin, the process state are
    singletons. There is no public reset; accelerate's own AccelerateTestCase does this."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


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
        if isinstance(e, torch.OutOfMemoryError) or should_reduce_batch_size(e):
            row["oom"], row["error_message"] = True, first or "out of memory"
            return False
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {first}"
        return True
    finally:  # the failed run's tensors go with the exception's frames; then the allocator's cache
        reset_accelerate()
        clear_device_cache(garbage_collection=True)
    return False


def run_cell(row: dict, cfg: TrainConfig, settings: dict, *, data_dir: Path, warmup: int, steps: int,
             workdir: Path, vocab_size: int) -> None:
    """Set up one real run from ``cfg`` and time warm-up + timed steps, filling ``row`` as it goes
    (so a cell that runs out of memory still has its settings and the planner's prediction)."""
    cfg.data.data_dir, cfg.run.out_dir = str(data_dir), tempfile.mkdtemp(prefix="cell-", dir=workdir)
    micro = config.micro_batch(cfg)
    if micro is not None and not cfg.model.init_from:  # predict before anything is allocated
        tok = formats.read_meta(data_dir)["tokenizer"]
        mp = resolved_precision(cfg)
        row.update(precision=dtype_name(mp), micro_batch_size=micro, **predicted_memory(
            build_config(cfg.model, int(tok["vocab_size"]), int(tok["eot_id"])), cfg, micro, mp, 1))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # setup's announcement, once per cell, is noise here
        run = setup(cfg)
    row["setup_s"] = time.perf_counter() - t0
    a = run.accelerator
    device, lm = a.device, a.unwrap_model(run.model).lm
    n_flops = count_params_for_flops(lm.config)
    row.update(precision=dtype_name(a.mixed_precision), micro_batch_size=run.micro, grad_accum_steps=run.accum,
               tokens_per_step=run.tokens_per_step, n_processes=a.num_processes, n_params=run.n_params,
               n_params_for_flops=n_flops, vocab_size=lm.config.vocab_size,
               flops_per_token=flops_per_token(n_flops, lm.config.n_layer, lm.config.n_embd, cfg.model.block_size),
               **predicted_memory(lm.config, cfg, run.micro, a.mixed_precision, a.num_processes))
    loader = None
    if settings["data"] == "random":
        pool = min((warmup + steps) * run.accum, 32)
        batches = random_batches(vocab_size, run.micro, cfg.model.block_size, device, pool=pool, seed=cfg.run.seed)
    else:
        loader = make_loader(run.train_batches, 0, cfg.data.num_workers,
                             pin_memory=cfg.data.pin_memory and device.type == "cuda")
        batches = iter(loader)
    run.model.train()
    _reset_peaks(device)
    backend = SDPA_BACKENDS[settings["sdpa_backend"]]
    try:
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            row["warmup_times_s"] = warm_times = []
            _sync(device)
            for _ in range(warmup):  # untimed: the host clock, a synchronize after each step
                t = time.perf_counter()
                train_step(run, batches)
                _sync(device)
                warm_times.append(time.perf_counter() - t)
            row.update(memory_fields(device, "warmup_"))
            _reset_peaks(device)
            clock, verdicts = StepClock(device), []
            t = time.perf_counter()
            clock.mark()
            for _ in range(steps):  # no host sync here that the training loop would not have
                step_loss, _, finite = train_step(run, batches)
                clock.mark()
                verdicts.append(finite)
            times = clock.seconds()  # waits for the device
            row["timed_wall_s"] = time.perf_counter() - t
        row.update(timing_fields(times, run.tokens_per_step), **memory_fields(device), skipped_steps=sum(
            not bool(f) for f in verdicts), loss=float(step_loss) / (run.micro * cfg.model.block_size * run.accum))
        for kind in ("allocated", "reserved"):
            peak = row[f"peak_{kind}_bytes"]
            row[f"predicted_over_{kind}"] = row["predicted_peak_bytes"] / peak if peak else None
    finally:
        del batches, loader  # persistent workers exit with their iterator
        a.free_memory()
        if cfg.model.compile:
            torch.compiler.reset()


# -- transformers.Trainer baseline ------------------------------------------------------------
# the settings a Trainer baseline shares with the gpt2fit cells (everything else is Trainer defaults)
TRAINER_SETTING_KEYS = ("preset", "init_from", "n_layer", "n_head", "n_embd", "block_size", "micro_batch_size",
                        "grad_accum_steps", "mixed_precision", "seed", "tf32", "max_memory", "dropout",
                        "pad_vocab_to", "learning_rate", "weight_decay")


def run_trainer_baseline(settings: dict, *, device, data_dir: Path, warmup: int, steps: int, workdir: Path) -> dict:
    """The same model config, micro-batch and accumulation, trained the way a Hugging Face user
    would: Trainer + TrainingArguments defaults (fused AdamW on torch >= 2.8), bf16 on CUDA."""
    cfg = cell_config(settings, 1)
    micro, T, accum = int(cfg.optim.micro_batch_size), cfg.model.block_size, cfg.optim.grad_accum_steps
    cuda, mp = device.type == "cuda", resolved_precision(cfg)
    apply_cuda_settings(cfg, device)  # as setup() does for the gpt2fit cells
    tok = formats.read_meta(data_dir)["tokenizer"]
    model = build_model(cfg.model, int(tok["vocab_size"]), cfg.run.seed, eot_id=int(tok["eot_id"]))
    vocab_size = model.config.vocab_size
    ids = torch.randint(0, int(tok["vocab_size"]), ((warmup + steps) * micro * accum, T),
                        generator=torch.Generator().manual_seed(cfg.run.seed))

    class StepTimer(TrainerCallback):  # marks on the stream, as the gpt2fit cells are timed
        def __init__(self):
            self.clock, self.begins, self.ends, self.warm_mem = StepClock(device), [], [], {}

        def on_step_begin(self, args, state, control, **kw):
            self.begins.append(len(self.clock.marks))
            self.clock.mark()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(len(self.clock.marks))
            self.clock.mark()
            if len(self.ends) == warmup:
                self.warm_mem = memory_fields(device, "warmup_")  # synchronizes, outside the timed steps
                _reset_peaks(device)

    timer = StepTimer()
    targs = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        max_steps=warmup + steps, learning_rate=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay,
        bf16=mp == "bf16", fp16=mp == "fp16", use_cpu=not cuda, report_to=[], logging_strategy="no", log_level="error",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=cfg.run.seed)
    _reset_peaks(device)
    trainer = Trainer(model=model, args=targs, train_dataset=[{"input_ids": x, "labels": x} for x in ids],
                      callbacks=[timer])
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
    seconds, begins, ends = timer.clock.seconds, timer.begins, timer.ends
    return {"precision": dtype_name(mp), "micro_batch_size": micro, "grad_accum_steps": accum, "vocab_size": vocab_size,
            "tokens_per_step": micro * T * accum, "trainer_optim": str(getattr(targs.optim, "value", targs.optim)),
            "train_wall_s": wall, "in_step_times_s": seconds(list(zip(begins[warmup:], ends[warmup:]))),
            "warmup_times_s": seconds(list(zip([begins[0]] + ends[:warmup - 1], ends[:warmup]))),
            **timing_fields(seconds(list(zip(ends[warmup - 1:-1], ends[warmup:]))), micro * T * accum),
            **memory_fields(device), **timer.warm_mem}


# -- the grid ---------------------------------------------------------------------------------
def run_bench(b: BenchArgs, fixed: dict, cells: list[dict], configs: list[TrainConfig], command: str,
              groups: list) -> tuple[dict, Path, int]:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    env = environment(device)
    settings_list = [{**fixed, **c} for c in cells]
    varied = [k for k in dict.fromkeys(k for c in cells for k in c)
              if len({json.dumps(s.get(k), default=str) for s in settings_list}) > 1]
    out = Path(b.out) if b.out else default_out({model_label(s) for s in settings_list}, env["device"]["name"])
    doc = {"benchmark": "gpt2fit bench: training-step throughput, MFU and memory", "schema_version": SCHEMA_VERSION,
           "command": command, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **env,
           "flops": {"per_token": "6N + 12*L*C*T (forward + backward; PaLM appendix B / nanoGPT estimate_mfu)",
                     "N": "plan.memory.count_params_for_flops: all parameters except wpe (tied wte/lm_head "
                          "counted once)",
                     "peak": "hardware.GPUS datasheet dense bf16 FLOP/s for mfu; matmul_peaks for mfu_measured_peak",
                     "matmul_peaks": []},
           "settings": {"warmup": b.warmup, "steps": b.steps, "fixed": fixed, "grid": groups or [], "varied": varied,
                        "cells": len(cells), "data_dir": b.data_dir, "vocab_size": None if b.data_dir else b.vocab_size,
                        "baseline": b.baseline, "max_memory": fixed.get("max_memory"), "n_processes": 1},
           "rows": [], "baselines": [], "notes": NOTES}
    blank = {**dict.fromkeys(MEASUREMENTS), "oom": False, "error": None, "error_message": None}
    failures, peaks, datasheet_peak = 0, {}, env["device"].get("datasheet_bf16_flops")

    def measure(kind: str, row: dict, label: str, fn) -> None:
        """Run one row, then print it and rewrite the outputs (a killed run keeps what it measured)."""
        nonlocal failures
        print(f"{label} ...", file=sys.stderr, flush=True)
        failures += guarded(row, device, fn)
        prec = row["precision"]
        if row["tokens_per_s"] and kind == "rows" and prec not in peaks:  # the achievable matmul rate, once
            size = b.matmul_size or (8192 if device.type == "cuda" else 1024)
            peaks[prec] = matmul_peak(device, prec if device.type == "cuda" else "fp32", size)
            doc["flops"]["matmul_peaks"].append(peaks[prec])
            clear_device_cache(garbage_collection=True)
        if row["tokens_per_s"] and row["flops_per_token"]:
            add_mfu(row, datasheet_peak, peaks.get(prec, {}).get("flops"))
        doc[kind].append(row)
        if kind == "baselines":
            attach_speedups(doc["rows"], doc["baselines"])
        print("    " + summary(row), file=sys.stderr, flush=True)
        write_outputs(doc, out)

    with tempfile.TemporaryDirectory(prefix="gpt2fit-bench-") as tmp:
        workdir = Path(tmp)
        if b.data_dir:
            data_dir = Path(b.data_dir)
            vocab = int(formats.read_meta(data_dir)["tokenizer"]["vocab_size"])
        else:
            vocab = b.vocab_size
            data_dir = write_random_data_dir(workdir / "random-data", vocab, b.data_tokens, configs[0].run.seed,
                                             max(c.model.block_size for c in configs),
                                             next((c.model.init_from for c in configs if c.model.init_from), None))
        for i, (s, cfg) in enumerate(zip(settings_list, configs), 1):
            flat = cfg.to_flat()
            row = {"id": f"c{i}", "kind": "gpt2fit", "settings": s, "model": model_label(s),
                   "device": env["device"]["name"], **{k: flat[k] for k in ROW_KEYS}, "sdpa_backend": s["sdpa_backend"],
                   "data": s["data"], "loss_impl": "chunked" if flat["loss_chunk_size"] else "plain", **blank}
            label = " ".join(f"{k}={s[k]}" for k in varied if k in cells[i - 1]) or "default"
            measure("rows", row, f"[{i}/{len(cells)}] {label}", lambda row=row, cfg=cfg, s=s: run_cell(
                row, cfg, s, data_dir=data_dir, warmup=b.warmup, steps=b.steps, workdir=workdir, vocab_size=vocab))

        if b.baseline == "trainer":  # once per model / block / micro-batch / accumulation / precision
            shapes = {}
            for r, s in zip(doc["rows"], settings_list):
                if r["tokens_per_s"] and shape_of(r) not in shapes:
                    shapes[shape_of(r)] = {**{k: s[k] for k in TRAINER_SETTING_KEYS if k in s},
                                           "micro_batch_size": r["micro_batch_size"]}
            for j, s in enumerate(shapes.values(), 1):
                row = {"id": f"trainer{j}", "kind": "trainer", "settings": s, "model": model_label(s),
                       "device_name": env["device"]["name"], "block_size": s.get("block_size"), **blank,
                       "trainer_optim": None, "in_step_times_s": None, "train_wall_s": None}
                # the MFU of the same model and block as a gpt2fit row (the FLOPs are the model's)
                fpt = next((r["flops_per_token"] for r in doc["rows"]
                            if r["flops_per_token"] and shape_of(r)[:2] == shape_of(row)[:2]), None)
                measure("baselines", row, f"[trainer {j}/{len(shapes)}] micro_batch_size={s['micro_batch_size']}",
                        lambda row=row, s=s, fpt=fpt: row.update(run_trainer_baseline(
                            s, device=device, data_dir=data_dir, warmup=b.warmup, steps=b.steps, workdir=workdir),
                            flops_per_token=fpt))
    return doc, out, failures


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    (model, optim, run, b), explicit = options.parse(argv, SECTIONS, prog=PROG, description=DESCRIPTION,
                                                     parser=parser)
    if b.data_dir and not Path(b.data_dir).is_dir():
        raise UserError(f"--data_dir {b.data_dir!r} does not exist; prepare one with `gpt2fit prepare`, "
                        "or leave it out to use random token ids.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("gpt2fit bench measures one process; run it with python (or `gpt2fit bench`), not "
                        "`accelerate launch --num_processes N`.")
    groups = parser.parse_known_args(argv)[0].grid
    cells = parse_grid(groups)
    base = {**vars(model), **vars(optim), **vars(run)}  # every train option a cell starts from
    if not explicit & {"preset", "init_from", "n_layer"}:
        base["preset"] = "gpt2"  # train needs a model; the bench's is GPT-2 124M
    fixed = {k: v for k, v in base.items() if k in explicit or (k in SHOWN and v is not None)}
    fixed.update(sdpa_backend=b.sdpa_backend, data=b.data or ("loader" if b.data_dir else "random"))
    configs = []
    for i, c in enumerate(cells, 1):
        try:  # every cell's config is resolved before anything runs: a bad combination fails in a second
            configs.append(cell_config({**base, **c}, b.warmup + b.steps))
        except UserError as e:
            raise UserError(f"cell c{i} ({' '.join(f'{k}={v}' for k, v in {**fixed, **c}.items())}): {e}") from None
    if b.dry_run:
        for i, c in enumerate(cells, 1):
            print(f"c{i}: " + " ".join(f"{k}={v}" for k, v in {**fixed, **c}.items()))
        return 0
    doc, out, failures = run_bench(b, fixed, cells, configs, f"{PROG} {shlex.join(argv)}", groups)
    print(table(doc), end="")
    print(f"\nwrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    if failures:
        print(f"{failures} cell(s) failed with an error other than out-of-memory (see the rows' error field)",
              file=sys.stderr)
        return 1
    return 0

