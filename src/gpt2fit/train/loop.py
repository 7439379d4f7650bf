"""The training loop: ``setup()`` -> ``fit()`` (with ``validate()``) -> ``finish()``.

Launch with ``accelerate launch [--config_file accelerate_configs/X.yaml] scripts/train.py RECIPE
[--flag value ...]`` or plainly ``gpt2fit train RECIPE`` on one device.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch`` sequences on each process.
The loss is weighted per token over the whole step: every micro-batch contributes
``sum(token losses) / tokens_in_step``, so accumulation 4 x batch 2 equals batch 8 exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpt2fit.train import checkpoint as ckpt
from gpt2fit import formats
from gpt2fit.config import TrainConfig, grad_accum_for, micro_batch, parse_config, parse_count
from gpt2fit.errors import UserError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; rerun with --resume auto
MODEL_SHAPE_KEYS = ("preset", "init_from", "n_layer", "n_head", "n_embd", "block_size", "pad_vocab_to",
                    "activation_function", "bias")


@dataclass
class Run:
    """Everything ``fit`` needs, built by ``setup``."""

    cfg: TrainConfig
    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    tokenizer: object
    train_batches: object
    val_data: np.ndarray
    micro: int
    accum: int
    total_steps: int
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None
    n_params: int
    meta: dict
    log: object
    out_dir: Path
    start_step: int = 0
    state: dict = field(default_factory=dict)
    hellaswag: list | None = None  # the fixed subset scored during training
    hub_pusher: object = None  # hub.BackgroundPusher, created on the first push


# ------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------
def preflight(cfg: TrainConfig):
    """Every check that can fail on user input, before anything is written to out_dir."""
    from gpt2fit.formats import open_split, read_meta
    from gpt2fit.prepare.tokenizers import fingerprint, load_tokenizer

    if not cfg.data.data_dir:
        raise UserError("no data_dir given; pass --data_dir DIR (prepared with `gpt2fit prepare`).")
    if cfg.run.max_steps is None and cfg.run.max_tokens is None and cfg.run.epochs is None:
        raise UserError("no stopping point: set --max_steps, --max_tokens (e.g. 10B) or --epochs.")
    d = cfg.data
    if d.prepare_from and not (Path(d.data_dir) / formats.META).is_file():
        prepare_data(cfg)
    meta = read_meta(cfg.data.data_dir)
    train_data = open_split(cfg.data.data_dir, "train", meta)
    val_data = open_split(cfg.data.data_dir, "val", meta)
    tok_dir = Path(cfg.data.data_dir) / formats.TOKENIZER_DIR
    tokenizer = load_tokenizer(str(tok_dir) if tok_dir.is_dir() else meta["tokenizer"]["name_or_path"])
    if cfg.model.init_from:
        src = formats.resolve_model_path(cfg.model.init_from)
        if (Path(src) / "tokenizer_config.json").is_file() or not Path(src).exists():
            try:
                base_tok = load_tokenizer(src)
            except UserError:
                base_tok = None
            data_fp = meta["tokenizer"].get("fingerprint")
            if base_tok is not None and data_fp and fingerprint(base_tok) != data_fp:
                raise UserError(
                    f"{cfg.data.data_dir} was prepared with tokenizer {meta['tokenizer']['name_or_path']!r}, "
                    f"not {cfg.model.init_from!r}'s; the ids would mean other words. Prepare again with "
                    f"`gpt2fit prepare --tokenizer {cfg.model.init_from} --input ... --out_dir ...`.")
            if base_tok is not None:
                tokenizer = base_tok
    if cfg.run.push_to_hub:  # fail now, not after a week of training
        from huggingface_hub import constants

        from gpt2fit.publish.push import check_repo_id

        check_repo_id(cfg.run.hub_model_id)
        if constants.HF_HUB_OFFLINE:
            raise UserError("--push_to_hub needs the network but HF_HUB_OFFLINE is set; unset it, or drop "
                            "--push_to_hub and push later with `gpt2fit push RUN_DIR --repo_id ...`.")
    vocab = int(meta["tokenizer"]["vocab_size"])
    if cfg.model.preset is None and cfg.model.init_from is None and cfg.model.n_layer is None:
        raise UserError("no model given: set --preset (gpt2, gpt2-medium, ...), --init_from, or "
                        "--n_layer/--n_head/--n_embd.")
    return meta, train_data, val_data, tokenizer, vocab


def prepare_data(cfg: TrainConfig) -> None:
    """Build data_dir from ``prepare_from`` (main process; the others wait and then read it)."""
    from accelerate import PartialState

    from gpt2fit.prepare.core import prepare

    d = cfg.data
    state = PartialState()
    if state.is_main_process:
        print(f"data_dir {d.data_dir} is not prepared yet: preparing it from {d.prepare_from}")
        prepare([s.strip() for s in d.prepare_from.split(",")], d.data_dir, tokenizer=d.tokenizer,
                vocab_size=d.vocab_size, split=d.val_split, val_fraction=d.val_fraction, seed=cfg.run.seed)
    state.wait_for_everyone()


def prepare_out_dir(cfg: TrainConfig, accelerator) -> Path | None:
    """Refuse to clobber another run; return the checkpoint to resume from (or None)."""
    out = Path(cfg.run.out_dir)
    has_run = any((out / p).exists() for p in (formats.CONFIG, formats.METRICS, formats.CHECKPOINTS, formats.FINAL))
    resume_from = ckpt.find_resume(out, cfg.run.resume)
    # killed before its first checkpoint: nothing to lose, so `--resume auto` starts it over
    start_over = cfg.run.resume == "auto" and resume_from is None and has_run and not (out / formats.FINAL).exists()
    if cfg.run.resume is not None and resume_from is None and has_run and (out / formats.METRICS).exists() \
            and not start_over:
        raise UserError(f"--resume auto: {out} holds a run but no complete checkpoint to resume from; "
                        "use --overwrite to start it again, or another --out_dir.")
    if has_run and cfg.run.resume is None and not cfg.run.overwrite:
        raise UserError(f"out_dir {str(out)!r} already holds a run; pass --resume auto to continue it, "
                        "--overwrite to replace it, or choose another --out_dir.")
    if resume_from is not None:
        state = ckpt.verify(resume_from)
        saved = state.get("model_shape", {})
        now = {k: v for k, v in cfg.to_flat().items() if k in MODEL_SHAPE_KEYS}
        changed = {k: (saved.get(k), now[k]) for k in now if k in saved and saved[k] != now[k]}
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise UserError(f"cannot resume {resume_from}: the model shape changed ({diff}); resume with the "
                            "saved settings or start a new out_dir.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if start_over:
            print(f"--resume auto: {out} has no complete checkpoint yet; starting from step 0")
        if (cfg.run.overwrite or start_over) and out.exists():
            for p in (formats.CONFIG, formats.METRICS, formats.SUMMARY, formats.EVAL_RESULTS, formats.PLOT):
                (out / p).unlink(missing_ok=True)
            for p in (formats.CHECKPOINTS, formats.FINAL):
                shutil.rmtree(out / p, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return resume_from


def make_accelerator(cfg: TrainConfig):
    import logging

    from accelerate import Accelerator
    from accelerate.utils import TorchDynamoPlugin

    mp = cfg.run.mixed_precision
    if mp == "auto":
        mp = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
            "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")
    # tied wte/lm_head: safetensors stores the shared tensor once; accelerate warns on every save
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    trackers = [t.strip() for t in cfg.run.report_to.split(",") if t.strip() not in ("none", "")]
    if trackers == ["auto"]:
        import importlib.util

        trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    elif trackers == ["tensorboard"]:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("report_to=tensorboard needs tensorboard: pip install tensorboard") from None
    m = cfg.model
    from accelerate.state import AcceleratorState

    # Accelerate keeps mixed precision and the dynamo plugin in a process-wide singleton that a
    # second Accelerator would silently reuse: give every run (main() called twice in one
    # process: tests, notebooks) its own. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    # without --compile, an `accelerate config` dynamo setting (environment) still applies
    dynamo = TorchDynamoPlugin(backend="inductor", mode=m.compile_mode,
                               use_regional_compilation=m.compile_scope == "blocks") if m.compile else None
    return Accelerator(
        mixed_precision=mp, log_with=trackers or None, project_dir=cfg.run.out_dir,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step ourselves
        dynamo_plugin=dynamo,
    )


def compile_note(accelerator) -> str:
    """", compile inductor (mode default, per block)" when Accelerate compiles the model, else ""."""
    plugin = accelerator.state.dynamo_plugin
    if plugin.backend.value.lower() == "no":
        return ""
    scope = "per block" if plugin.use_regional_compilation else "whole model"
    return f", compile {plugin.backend.value.lower()} (mode {plugin.mode}, {scope})"


def setup(cfg: TrainConfig) -> Run:
    from accelerate.utils import set_seed

    from gpt2fit.train.batches import WindowBatches
    from gpt2fit.train.report import MetricsLog, device_peak_flops
    from gpt2fit.train.model import CausalLM, build_model, n_params
    from gpt2fit.train.optim import build_optimizer, build_scheduler
    from gpt2fit.hardware import flops_per_token

    meta, train_data, val_data, tokenizer, vocab = preflight(cfg)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32
        torch.backends.cudnn.allow_tf32 = cfg.run.tf32
        if cfg.run.max_memory:
            from gpt2fit.units import parse_size

            cap = parse_size(cfg.run.max_memory)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    set_seed(cfg.run.seed)
    lm = build_model(cfg.model, vocab, cfg.run.seed, eot_id=int(meta["tokenizer"]["eot_id"]))
    if cfg.model.block_size > lm.config.n_positions:
        raise UserError(f"block_size={cfg.model.block_size} exceeds the model's n_positions="
                        f"{lm.config.n_positions}; lower --block_size.")
    model = CausalLM(lm, cfg.model.loss_chunk_size)
    world = accelerator.num_processes
    micro = micro_batch(cfg)
    if micro is None:
        from gpt2fit.train.autobatch import auto_micro_batch

        micro = auto_micro_batch(cfg, model, accelerator)
    accum = grad_accum_for(cfg, micro, world)
    tokens_per_step = micro * cfg.model.block_size * accum * world
    batches = WindowBatches(train_data, cfg.model.block_size, micro, seed=cfg.run.seed,
                            rank=accelerator.process_index, world=world, sampling=cfg.data.sampling)
    steps = []
    if cfg.run.max_steps is not None:
        steps.append(cfg.run.max_steps)
    if cfg.run.max_tokens is not None:
        steps.append(math.ceil(parse_count(cfg.run.max_tokens, "max_tokens") / tokens_per_step))
    if cfg.run.epochs is not None:
        steps.append(math.ceil(cfg.run.epochs * batches.samples_per_epoch / (micro * world * accum)))
    total_steps = max(1, min(steps))
    optimizer = build_optimizer(model, cfg.optim, device.type, fused=cfg.run.host_sync == "log")
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    resume_from = prepare_out_dir(cfg, accelerator)
    trackers = bool(accelerator.log_with)
    if trackers:
        accelerator.init_trackers("gpt2fit", config={k: v for k, v in cfg.to_flat().items()
                                                     if isinstance(v, (int, float, str, bool))})
    n = n_params(lm)
    fpt = flops_per_token(n_params(lm, non_embedding=True), lm.config.n_layer, lm.config.n_embd,
                          cfg.model.block_size)
    run = Run(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
              tokenizer=tokenizer, train_batches=batches, val_data=val_data, micro=micro, accum=accum,
              total_steps=total_steps, tokens_per_step=tokens_per_step, flops_per_token=fpt,
              peak_flops=device_peak_flops(device), n_params=n, meta=meta,
              log=MetricsLog(cfg.run.out_dir, accelerator, trackers), out_dir=Path(cfg.run.out_dir))
    run.state = {"step": 0, "tokens": 0, "skipped_steps": 0, "consecutive_nonfinite": 0, "loss_ema": None,
                 "best_val_loss": None, "elapsed_s": 0.0}
    if cfg.run.hellaswag:
        from gpt2fit.evaluate.core import hellaswag_subset, load_hellaswag

        run.hellaswag = hellaswag_subset(load_hellaswag(cfg.run.hellaswag), cfg.run.hellaswag_examples or None,
                                         seed=cfg.run.seed)
    if resume_from is not None:
        run.state.update(ckpt.load(accelerator, resume_from))
        run.start_step = run.state["step"]
        run.log.truncate_after(run.start_step)
    if accelerator.is_main_process:
        (run.out_dir / formats.CONFIG).write_text(cfg.to_yaml())
    announce(run, resume_from)
    return run


def announce(run: Run, resume_from) -> None:
    a, cfg = run.accelerator, run.cfg
    if not a.is_main_process:
        return
    world = a.num_processes
    train_tokens = run.meta["splits"]["train"]["tokens"]
    epochs = run.total_steps * run.tokens_per_step / max(train_tokens, 1)
    src = f"init_from {cfg.model.init_from}" if cfg.model.init_from else (
        f"preset {cfg.model.preset}" if cfg.model.preset else "custom")
    print(f"model: GPT-2 {run.n_params / 1e6:.2f}M parameters ({src}), block {cfg.model.block_size}, "
          f"vocab {run.meta['tokenizer']['vocab_size']}")
    print(f"device: {a.device} x {world} process(es), mixed precision {a.mixed_precision}, "
          f"optimizer {cfg.optim.optimizer}, grad checkpointing {'on' if cfg.model.grad_checkpointing else 'off'}"
          f"{compile_note(a)}")
    print(f"batch: {run.micro} micro-batch x {cfg.model.block_size} block x {run.accum} accumulation x "
          f"{world} processes = {run.tokens_per_step:,} tokens per optimizer step")
    print(f"run: {run.total_steps:,} steps = {run.total_steps * run.tokens_per_step:,} tokens "
          f"({epochs:.2f} epochs of {train_tokens:,} train tokens) -> {run.out_dir}")
    if resume_from is not None:
        print(f"resuming from {resume_from} at step {run.start_step}")


# ------------------------------------------------------------------------------------------
# validate
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(run: Run) -> float:
    """Token-weighted mean loss over the same fixed validation windows every time."""
    from gpt2fit.train.batches import eval_windows

    a, T = run.accelerator, run.cfg.model.block_size
    n = run.cfg.run.eval_batches * run.micro if run.cfg.run.eval_batches else None
    starts = eval_windows(run.val_data, T, n)[a.process_index::a.num_processes]
    was_training = run.model.training
    run.model.eval()
    loss_sum = torch.zeros((), device=a.device, dtype=torch.float64)
    count = torch.zeros((), device=a.device, dtype=torch.float64)
    for i in range(0, len(starts), run.micro):
        idx = starts[i:i + run.micro, None] + np.arange(T + 1)[None, :]
        w = torch.from_numpy(run.val_data[idx].astype(np.int64)).to(a.device)
        loss_sum += run.model(w[:, :-1], w[:, 1:]).double()
        count += w[:, 1:].numel()
    loss_sum, count = a.reduce(loss_sum, "sum"), a.reduce(count, "sum")
    run.model.train(was_training)
    return float(loss_sum / count)


# ------------------------------------------------------------------------------------------
# fit
# ------------------------------------------------------------------------------------------
class NonfiniteGuard:
    """Counts optimizer steps skipped as non-finite, for the K-in-a-row stop.

    With host_sync=step each verdict is a Python bool and ``check`` reports it at once. With
    host_sync=log the counts stay on the device (skipped since the last check, the current streak,
    the longest streak since the last check) and ``check`` reads them in one transfer, so the
    training step never waits for the GPU.
    """

    def __init__(self, state: dict, device, lazy: bool):
        self.state, self.lazy = state, lazy
        streak = state["consecutive_nonfinite"]
        self.pending = torch.tensor([0, streak, streak], device=device) if lazy else None
        self.last_bad = False

    def add(self, finite) -> None:
        if self.lazy:
            bad = (~finite).long()
            skipped, streak, longest = self.pending.unbind()
            streak = (streak + 1) * bad
            self.pending = torch.stack([skipped + bad, streak, torch.maximum(longest, streak)])
        else:
            self.last_bad = not finite

    def check(self) -> tuple[int, int]:
        """(steps skipped since the last check, longest streak since then); updates the state."""
        if self.lazy:
            skipped, streak, longest = self.pending.tolist()
            self.pending = torch.stack([torch.zeros_like(self.pending[1]), self.pending[1], self.pending[1]])
        else:
            skipped = int(self.last_bad)
            streak = self.state["consecutive_nonfinite"] + 1 if self.last_bad else 0
            longest, self.last_bad = streak, False
        self.state["skipped_steps"] += skipped
        self.state["consecutive_nonfinite"] = streak
        return skipped, longest


class StopSignal:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit 75. Second SIGINT: abort now."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train_step(run: Run, batches) -> tuple[torch.Tensor, torch.Tensor, bool | torch.Tensor]:
    """One optimizer step: ``accum`` micro-batches from ``batches``, clip, step (unless non-finite),
    schedule. Returns (summed token loss on this rank, global grad norm, whether it was applied: a
    bool, or with host_sync=log a 0-d bool tensor still on the device)."""
    a, device = run.accelerator, run.accelerator.device
    tokens_per_rank_step = run.micro * run.cfg.model.block_size * run.accum
    step_loss = torch.zeros((), device=device, dtype=torch.float32)
    for micro_i in range(run.accum):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync = micro_i == run.accum - 1  # gradients are all-reduced once, on the last micro-batch
        with contextlib.nullcontext() if sync else a.no_sync(run.model):
            loss_sum = run.model(x, y)
            a.backward(loss_sum / tokens_per_rank_step)
        step_loss += loss_sum.detach().float()
    clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = a.clip_grad_norm_(run.model.parameters(), clip)
    # (with fp16 the grad scaler skips inf gradients itself, so only the loss is checked)
    finite = torch.isfinite(step_loss)
    if a.mixed_precision != "fp16":
        finite &= torch.isfinite(grad_norm)
    if run.cfg.run.host_sync == "log":
        # no host sync: fused AdamW reads found_inf on the device and, where it is 1, leaves the
        # weights, the moments and its step count untouched (the path GradScaler uses)
        inner = run.optimizer.optimizer  # the torch optimizer inside Accelerate's wrapper
        inner.found_inf = (~finite).float()
        try:
            run.optimizer.step()
        finally:
            inner.found_inf = None
    else:
        # one host sync per optimizer step: the divergence guard must know before stepping
        finite = bool(finite)
        if finite:
            run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        run.scheduler.step()
    return step_loss, grad_norm, finite


def fit(run: Run) -> str:
    """Train until the stopping point; returns 'completed', 'preempted' or 'diverged'."""
    from tqdm.auto import tqdm

    from gpt2fit.train.batches import make_loader
    from gpt2fit.units import format_count
    from gpt2fit.hardware import mfu
    from gpt2fit.train.report import peak_memory_bytes

    a, cfg = run.accelerator, run.cfg
    device = a.device
    loader = make_loader(run.train_batches, run.start_step * run.accum, cfg.data.num_workers,
                         pin_memory=cfg.data.pin_memory and device.type == "cuda")
    batches = iter(loader)
    if cfg.run.eval_before_training and run.start_step == 0:
        val = validate(run)
        run.log.log({"kind": "eval", "step": 0, "tokens": 0, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
        a.print(f"step 0: val loss {val:.4f}")
    bar = tqdm(total=run.total_steps, initial=run.start_step, disable=not a.is_main_process,
               dynamic_ncols=True, desc="train", unit="step", mininterval=1.0)
    tty = sys.stderr.isatty()
    status = "completed"
    t_log, tokens_at_log = time.time(), run.state["tokens"]
    t_start = time.time() - run.state["elapsed_s"]
    logged_loss = torch.zeros((), device=device)
    guard = NonfiniteGuard(run.state, device, lazy=cfg.run.host_sync == "log")
    checked = run.start_step
    run.model.train()
    with StopSignal() as stop, contextlib.closing(bar):
        for step in range(run.start_step + 1, run.total_steps + 1):
            lr = run.scheduler.get_last_lr()[0]
            step_loss, grad_norm, finite = train_step(run, batches)
            guard.add(finite)
            run.state["step"] = step
            run.state["tokens"] += run.tokens_per_step
            logged_loss = step_loss
            bar.update(1)

            last = step == run.total_steps
            interval = cfg.run.checkpoint_interval
            save_due = bool(interval and step % interval == 0) or last
            if not guard.lazy or save_due or stop.requested or step % cfg.run.log_interval == 0 \
                    or step % cfg.run.eval_interval == 0:
                skipped, longest = guard.check()
                if skipped:
                    streak = run.state["consecutive_nonfinite"]
                    if guard.lazy:
                        a.print(f"steps {checked + 1}-{step}: {skipped} non-finite update(s) skipped "
                                f"(longest streak {longest}, {streak} in a row now)")
                    else:
                        a.print(f"step {step}: non-finite loss or gradient norm; update skipped ({streak} in a row)")
                    run.log.log({"kind": "skip", "step": step, "tokens": run.state["tokens"], "consecutive": streak,
                                 "skipped": skipped, "longest": longest})
                checked = step
                if longest >= cfg.run.max_nonfinite_steps:
                    status = "diverged"
                    break
            if step % cfg.run.log_interval == 0 or last:
                loss = float(a.reduce(logged_loss, "sum")) / run.tokens_per_step
                now = time.time()
                tps = (run.state["tokens"] - tokens_at_log) / max(now - t_log, 1e-9)
                t_log, tokens_at_log = now, run.state["tokens"]
                row = {"kind": "train", "step": step, "tokens": run.state["tokens"], "loss": loss, "lr": lr,
                       "grad_norm": float(grad_norm), "tokens_per_s": tps,
                       "mfu": mfu(tps / a.num_processes, run.flops_per_token, run.peak_flops),
                       "peak_mem_bytes": peak_memory_bytes(device), "time_s": now - t_start}
                ema = run.state["loss_ema"]
                if ema is not None and math.isfinite(loss) and loss > cfg.run.spike_factor * ema:
                    a.print(f"step {step}: loss spike {loss:.3f} vs running mean {ema:.3f}")
                    row["spike"] = True
                if math.isfinite(loss):
                    run.state["loss_ema"] = loss if ema is None else 0.9 * ema + 0.1 * loss
                run.log.log(row)
                post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": format_count(tps)}
                if row["mfu"] is not None:
                    post["mfu"] = f"{100 * row['mfu']:.1f}%"
                bar.set_postfix(post, refresh=False)
                if not tty and a.is_main_process:
                    print(f"step {step}/{run.total_steps}: loss {loss:.4f}, lr {lr:.2e}, "
                          f"{format_count(tps)} tok/s", flush=True)
            if step % cfg.run.eval_interval == 0 or last:
                val = validate(run)
                run.state["best_val_loss"] = val if run.state["best_val_loss"] is None \
                    else min(val, run.state["best_val_loss"])
                run.log.log({"kind": "eval", "step": step, "tokens": run.state["tokens"], "val_loss": val,
                             "val_ppl": math.exp(min(val, 50))})
                a.print(f"step {step}: val loss {val:.4f}")
                run.state["last_val_loss"] = val
            hs_interval = cfg.run.hellaswag_interval or cfg.run.eval_interval
            if run.hellaswag and (step % hs_interval == 0 or last):
                score_hellaswag_now(run, step)
            run.state["elapsed_s"] = time.time() - t_start
            streak = run.state["consecutive_nonfinite"] > 0  # never save (and rotate) inside a non-finite streak
            if save_due and not streak or stop.requested:
                save_checkpoint(run)
            if stop.requested and not last:
                status = "preempted"
                break
    bar.close()
    return status


def score_hellaswag_now(run: Run, step: int) -> None:
    """Zero-shot HellaSwag on the fixed subset, on every rank (the scorer splits and all-reduces)."""
    from gpt2fit.evaluate.core import score_hellaswag

    a = run.accelerator
    lm = a.unwrap_model(run.model).lm
    res = score_hellaswag(lm, run.tokenizer, run.hellaswag, batch_size=run.micro, accelerator=a)
    run.log.log({"kind": "hellaswag", "step": step, "tokens": run.state["tokens"], "acc": res["acc"],
                 "acc_norm": res["acc_norm"], "n": res["n"]})
    a.print(f"step {step}: HellaSwag acc_norm {res['acc_norm']:.4f} (acc {res['acc']:.4f}, n={res['n']})")


def save_checkpoint(run: Run) -> None:
    state = dict(run.state)
    state["model_shape"] = {k: v for k, v in run.cfg.to_flat().items() if k in MODEL_SHAPE_KEYS}
    path = ckpt.save(run.accelerator, run.out_dir, run.state["step"], state, run.cfg.run.keep_checkpoints)
    if run.cfg.run.push_to_hub and run.cfg.run.hub_push_checkpoints and run.accelerator.is_main_process:
        pusher(run).submit(str(path), path_in_repo=f"checkpoints/{path.name}",
                           commit_message=f"checkpoint step {run.state['step']}")


def pusher(run: Run):
    if run.hub_pusher is None:
        from gpt2fit.publish.push import BackgroundPusher

        r = run.cfg.run
        run.hub_pusher = BackgroundPusher(r.hub_model_id, private=r.hub_private, revision=r.hub_revision)
    return run.hub_pusher


# ------------------------------------------------------------------------------------------
# finish
# ------------------------------------------------------------------------------------------
def finish(run: Run, status: str, wall_start: float) -> int:
    a, cfg = run.accelerator, run.cfg
    summary = {"status": status, "step": run.state["step"], "tokens": run.state["tokens"],
               "final_val_loss": run.state.get("last_val_loss"),
               "final_val_ppl": math.exp(min(run.state["last_val_loss"], 50))
               if run.state.get("last_val_loss") is not None else None,
               "best_val_loss": run.state["best_val_loss"], "skipped_steps": run.state["skipped_steps"],
               "init_from": cfg.model.init_from, "preset": cfg.model.preset, "data_dir": cfg.data.data_dir,
               "dataset": run.meta.get("source", {}).get("inputs"), "n_params": run.n_params,
               "device": device_name(a), "num_processes": a.num_processes,
               "tokens_per_step": run.tokens_per_step, "wall_time_s": round(time.time() - wall_start, 1)}
    if status == "completed":
        final = ckpt.export_final(a, run.model, run.tokenizer, run.out_dir)
        summary["final_dir"] = str(final)
    if a.is_main_process:
        (run.out_dir / formats.SUMMARY).write_text(json.dumps(summary, indent=2))
        if status == "completed":
            try:
                from gpt2fit.evaluate.plot import plot_runs

                plot_runs([run.out_dir], run.out_dir / formats.PLOT)
            except Exception as e:  # a plot must never fail a finished run
                print(f"note: could not draw {formats.PLOT}: {e}", file=sys.stderr)
    a.end_training()
    if status == "preempted":
        a.print(f"stopped at step {run.state['step']}; checkpoint saved. Continue with the same command plus "
                f"--resume auto (exit code {EXIT_PREEMPTED}).")
        return EXIT_PREEMPTED
    if status == "diverged":
        last = ckpt.complete_checkpoints(run.out_dir)
        where = "at" if cfg.run.host_sync == "step" else "by"  # with host_sync=log: seen at the next check
        raise UserError(f"training diverged: {cfg.run.max_nonfinite_steps} non-finite steps in a row {where} step "
                        f"{run.state['step']}. Lower --learning_rate or raise --warmup_steps; the last good "
                        f"checkpoint is {last[-1] if last else 'none'}.")
    if a.is_main_process:
        v = summary["final_val_loss"]
        print(f"done: {run.state['step']} steps, {run.state['tokens']:,} tokens, val loss "
              f"{v:.4f} (ppl {summary['final_val_ppl']:.2f}), {summary['wall_time_s']:.0f}s -> {run.out_dir / formats.FINAL}")
        if cfg.run.sample_prompt is not None:
            from gpt2fit.evaluate.sample import generate

            text = generate(str(run.out_dir / formats.FINAL), cfg.run.sample_prompt, max_new_tokens=cfg.run.sample_tokens,
                            seed=cfg.run.seed)[0]
            print(f"--- sample ---\n{text}\n--------------")
        if cfg.run.push_to_hub:
            p = pusher(run)
            p.submit(str(run.out_dir), commit_message=f"gpt2fit: final model after {run.state['step']} steps",
                     run_dir=True)
            failures = p.finish()
            from gpt2fit.publish.push import repo_url

            print(p.report() if failures else f"pushed to {repo_url(None, cfg.run.hub_model_id, cfg.run.hub_revision)}")
    return 0


def device_name(a) -> str:
    if a.device.type == "cuda":
        return torch.cuda.get_device_name(a.device)
    return str(a.device)


def main(argv=None) -> int:
    wall_start = time.time()
    cfg, print_only = parse_config(argv)
    if print_only:
        print(cfg.to_yaml(), end="")
        return 0
    run = setup(cfg)
    try:
        status = fit(run)
    except torch.OutOfMemoryError:
        raise UserError(oom_message(run)) from None
    return finish(run, status, wall_start)


def oom_message(run: Run) -> str:
    cfg = run.cfg
    model = cfg.model.init_from or cfg.model.preset or "custom"
    return (f"out of GPU memory with micro_batch_size={run.micro}, block_size={cfg.model.block_size}, "
            f"grad_checkpointing={cfg.model.grad_checkpointing}, optimizer={cfg.optim.optimizer}, "
            f"loss_chunk_size={cfg.model.loss_chunk_size}. See what fits: `gpt2fit plan --model {model} "
            f"--block_size {cfg.model.block_size} --micro_batch_size auto`, or pass --micro_batch_size auto, "
            "--grad_checkpointing true, --optimizer adamw8bit. No checkpoint was damaged.")


if __name__ == "__main__":
    from gpt2fit.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
