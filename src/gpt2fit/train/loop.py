"""The training loop: ``setup()`` -> ``fit()`` (``train_step``, ``validate``), as torchtitan's
``Trainer.train``: ``fit`` has one line per concern (step, report, validate, checkpoint, stop);
what is reported lives in report.py, and what happens after training (export, summary, plot,
sample, push) in command.py.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch`` sequences on each process,
accumulated by Accelerate (``accumulate``), so DDP, DeepSpeed ZeRO and FSDP run the same step.
The loss is weighted per token over the whole step: every micro-batch contributes
``sum(token losses) / tokens_in_step``, so accumulation 4 x batch 2 equals batch 8 exactly.
"""

import importlib.util
import logging
import math
import os
import re
import shutil
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, TorchDynamoPlugin, parse_flag_from_env, set_seed

from gpt2fit import formats, hardware
from gpt2fit.config import TrainConfig, grad_accum_for, micro_batch, parse_count
from gpt2fit.errors import UserError
from gpt2fit.evaluate.hellaswag import encode_example, hellaswag_subset, load_hellaswag, score_hellaswag
from gpt2fit.evaluate.perplexity import windowed_loss
from gpt2fit.prepare import prepare
from gpt2fit.prepare.tokenizers import fingerprint, load_tokenizer
from gpt2fit.train import checkpoint as ckpt
from gpt2fit.train.autobatch import auto_micro_batch
from gpt2fit.train.batches import WindowBatches, make_loader
from gpt2fit.train.model import CausalLM, build_model, n_params
from gpt2fit.train.optim import build_optimizer, build_scheduler
from gpt2fit.train.report import MetricsLog, Reporter
from gpt2fit.units import parse_size

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
    n_params: int
    meta: dict
    log: object
    out_dir: Path
    start_step: int = 0
    state: dict = field(default_factory=lambda: {"step": 0, "tokens": 0, "skipped_steps": 0, "consecutive_nonfinite": 0,
                                                 "loss_ema": None, "best_val_loss": None, "elapsed_s": 0.0})
    hellaswag: list | None = None  # the fixed subset scored during training


# -- setup ---------------------------------------------------------------------------------
def preflight(cfg: TrainConfig):
    """Every check that can fail on user input, before anything is written to out_dir."""
    if not cfg.data.data_dir:
        raise UserError("no data_dir given; pass --data_dir DIR (prepared with `gpt2fit prepare`).")
    if cfg.run.max_steps is None and cfg.run.max_tokens is None and cfg.run.epochs is None:
        raise UserError("no stopping point: set --max_steps, --max_tokens (e.g. 10B) or --epochs.")
    d = cfg.data
    if d.prepare_from and not (Path(d.data_dir) / formats.META).is_file():
        prepare_data(cfg)
    meta = formats.read_meta(d.data_dir)
    train_data, val_data = (formats.open_split(d.data_dir, split, meta) for split in ("train", "val"))
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
                raise UserError(f"{d.data_dir} was prepared with tokenizer {meta['tokenizer']['name_or_path']!r}, "
                                f"not {cfg.model.init_from!r}'s; the ids would mean other words. Prepare again with "
                                f"`gpt2fit prepare --tokenizer {cfg.model.init_from} --input ... --out_dir ...`.")
            if base_tok is not None:
                tokenizer = base_tok
    if len(val_data) < 2:
        raise UserError(f"{cfg.data.data_dir}/val.bin holds {len(val_data)} token(s); validation needs at least 2. "
                        "Prepare with a larger --val_fraction.")
    vocab = int(meta["tokenizer"]["vocab_size"])
    if cfg.model.preset is None and cfg.model.init_from is None and cfg.model.n_layer is None:
        raise UserError("no model given: set --preset (gpt2, gpt2-medium, ...), --init_from, or "
                        "--n_layer/--n_head/--n_embd.")
    return meta, train_data, val_data, tokenizer, vocab


def process_state() -> PartialState:
    """The process group, made once per process (prepare_data and the Accelerator share it). On a host
    without a GPU, Accelerate finds no backend unless use_cpu is set, and use_cpu turns DeepSpeed and
    FSDP into DDP: there, name gloo, so DeepSpeed's engine runs on CPU processes too."""
    gloo = torch.accelerator.current_accelerator() is None and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **({"backend": "gloo"} if gloo else {}))


def prepare_data(cfg: TrainConfig) -> None:
    """Build data_dir from ``prepare_from`` (main process; the others wait and then read it)."""
    d = cfg.data
    state = process_state()
    if state.is_main_process:
        print(f"data_dir {d.data_dir} is not prepared yet: preparing it from {d.prepare_from}")
        prepare([s.strip() for s in d.prepare_from.split(",")], d.data_dir, tokenizer=d.tokenizer,
                vocab_size=d.vocab_size, split=d.val_split, val_fraction=d.val_fraction, seed=cfg.run.seed)
    state.wait_for_everyone()


def prepare_out_dir(cfg: TrainConfig, accelerator) -> tuple[Path | None, dict | None]:
    """Refuse to clobber another run; return the checkpoint to resume from and its state (or Nones)."""
    out = Path(cfg.run.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {str(out)!r} is a file, not a directory; choose another --out_dir.")
    has_run = any((out / p).exists() for p in (formats.CONFIG, formats.METRICS, formats.CHECKPOINTS, formats.FINAL))
    resume_from, state = ckpt.find_resume(accelerator, out, cfg.run.resume)
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
    return resume_from, state


def resolved_precision(cfg: TrainConfig) -> str:
    """mixed_precision as the Accelerator gets it: auto -> bf16 on a GPU that has it, else no."""
    cuda = torch.cuda.is_available()
    return hardware.resolve_precision(cfg.run.mixed_precision, cuda=cuda, env=os.environ.get(
        "ACCELERATE_MIXED_PRECISION"), bf16_supported=cuda and torch.cuda.is_bf16_supported())


def apply_cuda_settings(cfg: TrainConfig, device) -> None:
    """TF32 and the --max_memory cap (also for the bench's Trainer baseline)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.run.tf32
        total = torch.cuda.get_device_properties(device).total_memory
        cap = parse_size(cfg.run.max_memory) if cfg.run.max_memory else total
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)


def make_accelerator(cfg: TrainConfig):
    # tied wte/lm_head: safetensors stores the shared tensor once; accelerate warns on every save
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    trackers = [t.strip() for t in cfg.run.report_to.split(",") if t.strip() not in ("none", "")]
    if trackers == ["auto"]:
        trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    for name in trackers:  # Accelerate only warns and trains without the tracker: refuse it here instead
        if name not in ("all",) and importlib.util.find_spec(name) is None:
            raise UserError(f"report_to={name} needs the {name} package: pip install {name}; or use "
                            "--report_to none.")
    m = cfg.model
    # Accelerate keeps mixed precision and the dynamo plugin in a process-wide singleton that a
    # second Accelerator would silently reuse: give every run (main() called twice in one
    # process: tests, notebooks) its own. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    process_state()
    # without --compile, an `accelerate config` dynamo setting (environment) still applies
    dynamo = TorchDynamoPlugin(backend="inductor", mode=m.compile_mode,
                               use_regional_compilation=m.compile_scope == "blocks") if m.compile else None
    return Accelerator(mixed_precision=resolved_precision(cfg), log_with=trackers or None, project_dir=cfg.run.out_dir,
                       dynamo_plugin=dynamo, step_scheduler_with_optimizer=False)  # we step it once per optimizer step


def configure_engine(accelerator, micro: int, accum: int, oargs) -> None:
    """Accelerate's accumulation is ours; DeepSpeed's engine, which clips and steps inside backward,
    also takes the micro-batch and the clipping from the run's settings, not its config file."""
    kind, n = accelerator.distributed_type, accelerator.num_processes
    if n > 1 and kind == DistributedType.NO:  # each process would train a model of its own
        raise UserError(f"{n} processes but Accelerate set up no engine to join them (it runs FSDP on GPUs "
                        "only); on a CPU use DDP (ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ...) "
                        "or a DeepSpeed config.")
    if oargs.optimizer != "adamw" and kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        engine = "DeepSpeed" if kind == DistributedType.DEEPSPEED else "FSDP"
        raise UserError(f"optimizer={oargs.optimizer} runs on one device or under DDP (multi_gpu.yaml), not "
                        f"{engine}, which shards or offloads the AdamW states itself: use --optimizer adamw.")
    accelerator.gradient_accumulation_steps = accum
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        # zero_force_ds_cpu_optimizer: with offload, keep our torch AdamW (stepped on the CPU) instead of
        # Accelerate's swap to DeepSpeedCPUAdam, whose param groups a resume replaces, so that the LR
        # schedule, written into the old ones, would silently stop applying
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
                                   train_batch_size=micro * accum * n, gradient_clipping=oargs.grad_clip,
                                   zero_force_ds_cpu_optimizer=False)


def compile_note(accelerator) -> str:
    """", compile inductor (mode default, per block)" when Accelerate compiles the model, else ""."""
    plugin = accelerator.state.dynamo_plugin
    if plugin.backend.value.lower() == "no":
        return ""
    scope = "per block" if plugin.use_regional_compilation else "whole model"
    return f", compile {plugin.backend.value.lower()} (mode {plugin.mode}, {scope})"


def setup(cfg: TrainConfig) -> Run:
    meta, train_data, val_data, tokenizer, vocab = preflight(cfg)
    set_seed(cfg.run.seed)
    # built whole, before the Accelerator: with DeepSpeed ZeRO-3 in effect transformers would build it
    # already partitioned (zero.Init), with other random weights and 0-element tensors in their place
    lm = build_model(cfg.model, vocab, cfg.run.seed, eot_id=int(meta["tokenizer"]["eot_id"]))
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    apply_cuda_settings(cfg, device)
    if cfg.model.block_size > lm.config.n_positions:
        raise UserError(f"block_size={cfg.model.block_size} exceeds the model's n_positions="
                        f"{lm.config.n_positions}; lower --block_size.")
    for split, data in (("train", train_data), ("val", val_data)):  # an id past the vocab fails mid-step
        formats.check_token_ids(Path(cfg.data.data_dir) / f"{split}.bin", data, lm.config.vocab_size)
    model = CausalLM(lm, cfg.model.loss_chunk_size)
    world = accelerator.num_processes
    micro = micro_batch(cfg) or auto_micro_batch(cfg, model, accelerator)  # None: auto
    accum = grad_accum_for(cfg, micro, world)
    configure_engine(accelerator, micro, accum, cfg.optim)
    tokens_per_step = micro * cfg.model.block_size * accum * world
    batches = WindowBatches(train_data, cfg.model.block_size, micro, seed=cfg.run.seed,
                            rank=accelerator.process_index, world=world, sampling=cfg.data.sampling)
    r = cfg.run  # the first stopping point reached (preflight made sure there is one)
    steps = [r.max_steps, r.max_tokens and math.ceil(parse_count(r.max_tokens, "max_tokens") / tokens_per_step),
             r.epochs and math.ceil(r.epochs * batches.windows / (micro * world * accum))]
    total_steps = max(1, min(s for s in steps if s is not None))
    optimizer = build_optimizer(model, cfg.optim, device.type, fused=cfg.run.host_sync == "log")
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    n = n_params(lm)  # (before prepare: ZeRO-3 and FSDP leave each process a shard)
    fpt = hardware.flops_per_token(n_params(lm, non_embedding=True), lm.config.n_layer, lm.config.n_embd,
                                   cfg.model.block_size)
    hellaswag = None
    if cfg.run.hellaswag:  # loaded, and every ending checked to fit the model, before anything is written
        hellaswag = hellaswag_subset(load_hellaswag(cfg.run.hellaswag), cfg.run.hellaswag_examples or None,
                                     seed=cfg.run.seed)
        for example in hellaswag:
            encode_example(tokenizer, example, lm.config.n_positions)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    resume_from, resume_state = prepare_out_dir(cfg, accelerator)
    trackers = bool(accelerator.log_with)
    if trackers:
        accelerator.init_trackers("gpt2fit", config={k: v for k, v in cfg.to_flat().items()
                                                     if isinstance(v, (int, float, str, bool))})
    run = Run(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
              tokenizer=tokenizer, train_batches=batches, val_data=val_data, micro=micro, accum=accum,
              total_steps=total_steps, tokens_per_step=tokens_per_step, flops_per_token=fpt, n_params=n, meta=meta,
              log=MetricsLog(cfg.run.out_dir, accelerator, trackers), out_dir=Path(cfg.run.out_dir),
              hellaswag=hellaswag)
    if resume_from is not None:
        ckpt.load(accelerator, resume_from)
        run.state.update(resume_state)
        run.start_step = run.state["step"]
        run.log.truncate_after(run.start_step)
    if accelerator.is_main_process:
        formats.write_atomic(run.out_dir / formats.CONFIG, cfg.to_yaml())
    announce(run, resume_from)
    return run


def announce(run: Run, resume_from) -> None:
    a, cfg = run.accelerator, run.cfg
    if not a.is_main_process:
        return
    world = a.num_processes
    train_tokens = run.meta["splits"]["train"]["tokens"]
    epochs = run.total_steps * run.tokens_per_step / max(train_tokens, 1)
    m = cfg.model
    src = f"init_from {m.init_from}" if m.init_from else f"preset {m.preset}" if m.preset else "custom"
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


# -- validate ------------------------------------------------------------------------------
def validate(run: Run) -> float:
    """Token-weighted mean loss over the same fixed validation windows every time: the estimator
    `gpt2fit eval` uses (gpt2fit.evaluate.perplexity), so the two agree on the same checkpoint."""
    return windowed_loss(run.model, run.val_data, run.cfg.model.block_size, batch_size=run.micro,
                         max_windows=run.cfg.run.eval_batches * run.micro or None, accelerator=run.accelerator)["loss"]


# -- fit -----------------------------------------------------------------------------------
class StopSignal:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit 75. Second SIGINT: abort now."""

    def __init__(self):
        self.requested, self._old = None, {}

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
    tokens_per_micro = run.micro * run.cfg.model.block_size
    step_loss = torch.zeros((), device=device, dtype=torch.float32)
    for _ in range(run.accum):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # Accelerate syncs gradients on the last micro-batch only (DeepSpeed also steps there) and
        # divides the loss by the accumulation steps: per token over the whole optimizer step
        with a.accumulate(run.model):
            loss_sum = run.model(x, y)
            a.backward(loss_sum / tokens_per_micro)
        step_loss += loss_sum.detach().float()
    clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else float("inf")
    # (DeepSpeed clipped, and skipped a non-finite step, inside backward; it returns its norm as a float)
    grad_norm = torch.as_tensor(a.clip_grad_norm_(run.model.parameters(), clip), device=device)
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


def due(step: int, interval: int, last: bool) -> bool:
    """Every ``interval`` steps (0 = never) and at the last step."""
    return last or bool(interval and step % interval == 0)


def fit(run: Run, on_checkpoint=None) -> str:
    """Train until the stopping point; returns 'completed', 'preempted' or 'diverged'.
    ``on_checkpoint(path, step)`` is called after each checkpoint (the train command pushes it)."""
    a, r = run.accelerator, run.cfg.run
    pin = run.cfg.data.pin_memory and a.device.type == "cuda"
    batches = iter(make_loader(run.train_batches, run.start_step * run.accum, run.cfg.data.num_workers, pin))
    status = "completed"
    with StopSignal() as stop, Reporter(run) as report:
        if r.eval_before_training and run.start_step == 0:
            report.eval(0, validate(run))
        run.model.train()
        for step in range(run.start_step + 1, run.total_steps + 1):
            lr = run.scheduler.get_last_lr()[0]
            step_loss, grad_norm, finite = train_step(run, batches)
            report.step(step, finite)
            last = step == run.total_steps
            save = due(step, r.checkpoint_interval, last)
            if report.nonfinite(step, force=save or stop.requested) >= r.max_nonfinite_steps:
                status = "diverged"
                break
            if due(step, r.log_interval, last):
                report.train(step, step_loss, lr, grad_norm)
            if due(step, r.eval_interval, last):
                report.eval(step, validate(run))
            if run.hellaswag and due(step, r.hellaswag_interval or r.eval_interval, last):
                report.hellaswag(step, score_hellaswag(a.unwrap_model(run.model).lm, run.tokenizer, run.hellaswag,
                                                       batch_size=run.micro, accelerator=a))
            # never save (and rotate away the last good checkpoint) inside a non-finite streak; a
            # signal (seen at any point of this step) always saves, so nothing is lost
            if (save and run.state["consecutive_nonfinite"] == 0) or stop.requested:
                path = save_checkpoint(run)
                if on_checkpoint is not None:
                    on_checkpoint(path, step)
            if stop.requested and not last:
                status = "preempted"
                break
    return status


def save_checkpoint(run: Run) -> Path:
    state = dict(run.state)
    state["model_shape"] = {k: v for k, v in run.cfg.to_flat().items() if k in MODEL_SHAPE_KEYS}
    return ckpt.save(run.accelerator, run.out_dir, run.state["step"], state, run.cfg.run.keep_checkpoints)
