"""``gpt2fit train``: parse -> check -> setup -> fit -> after training (export, summary, plot,
sample, push). The loop (loop.py) only trains; everything a finished run leaves behind is
written here.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml scripts/train.py RECIPE [--flag value ...]
    gpt2fit train RECIPE                       # one device, no launcher

Exit codes: 0 done, 2 bad input, 75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun the
same command with --resume auto).
"""

import math
import sys
import time

import torch
from huggingface_hub import constants

from gpt2fit import formats
from gpt2fit.config import parse_config
from gpt2fit.errors import UserError
from gpt2fit.evaluate.plot import plot_runs
from gpt2fit.evaluate.sample import generate
from gpt2fit.publish.push import BackgroundPusher, check_repo_id, repo_url
from gpt2fit.train import checkpoint as ckpt
from gpt2fit.train.loop import Run, fit, setup

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; rerun with --resume auto


def main(argv=None) -> int:
    wall_start = time.time()
    cfg, print_only = parse_config(argv)
    if print_only:
        print(cfg.to_yaml(), end="")
        return 0
    r = cfg.run
    if r.push_to_hub:  # fails now, not after a week of training
        check_repo_id(r.hub_model_id)
        if constants.HF_HUB_OFFLINE:
            raise UserError("--push_to_hub needs the network but HF_HUB_OFFLINE is set; unset it, or drop "
                            "--push_to_hub and push later with `gpt2fit push RUN_DIR --repo_id ...`.")
    run = setup(cfg)
    pusher = on_checkpoint = None
    if r.push_to_hub and run.accelerator.is_main_process:  # checkpoints: config and tokenizer of the live model
        pusher = BackgroundPusher(r.hub_model_id, private=r.hub_private, revision=r.hub_revision,
                                  template=(run.accelerator.unwrap_model(run.model).lm, run.tokenizer))
    if pusher is not None and r.hub_push_checkpoints:
        def on_checkpoint(path, step):  # a complete model on branch step<N>
            pusher.submit(str(path), commit_message=f"checkpoint step {step}")
    try:
        status = fit(run, on_checkpoint)
    except torch.OutOfMemoryError:
        raise UserError(oom_message(run)) from None
    return finish(run, status, wall_start, pusher)


def finish(run: Run, status: str, wall_start: float, pusher=None) -> int:
    """After fit: export final/, write summary.json and loss.png, print a sample, push."""
    a, cfg, state = run.accelerator, run.cfg, run.state
    val = state.get("last_val_loss")
    summary = {"status": status, "step": state["step"], "tokens": state["tokens"],
               "final_val_loss": val, "final_val_ppl": math.exp(min(val, 50)) if val is not None else None,
               "best_val_loss": state["best_val_loss"], "skipped_steps": state["skipped_steps"],
               "init_from": cfg.model.init_from, "preset": cfg.model.preset, "data_dir": cfg.data.data_dir,
               "dataset": run.meta.get("source", {}).get("inputs") or run.meta.get("source", {}).get("dataset"),
               "n_params": run.n_params, "num_processes": a.num_processes, "mixed_precision": a.mixed_precision,
               "device": torch.cuda.get_device_name(a.device) if a.device.type == "cuda" else str(a.device),
               "flops_per_token": run.flops_per_token, "tokens_per_step": run.tokens_per_step,
               "wall_time_s": round(time.time() - wall_start, 1)}
    if status == "completed":
        summary["final_dir"] = str(ckpt.export_final(a, run.model, run.tokenizer, run.out_dir))
    if a.is_main_process:
        formats.write_json_atomic(run.out_dir / formats.SUMMARY, summary)
        if status == "completed":
            try:
                plot_runs([run.out_dir], run.out_dir / formats.PLOT)
            except Exception as e:  # a plot must never fail a finished run
                print(f"note: could not draw {formats.PLOT}: {e}", file=sys.stderr)
    a.end_training()
    if status == "preempted":
        a.print(f"stopped at step {state['step']}; checkpoint saved. Continue with the same command plus "
                f"--resume auto (exit code {EXIT_PREEMPTED}).")
        return EXIT_PREEMPTED
    if status == "diverged":
        last = formats.complete_checkpoints(run.out_dir)
        where = "at" if cfg.run.host_sync == "step" else "by"  # with host_sync=log: seen at the next check
        raise UserError(f"training diverged: {cfg.run.max_nonfinite_steps} non-finite steps in a row {where} step "
                        f"{state['step']}. Lower --learning_rate or raise --warmup_steps; the last good "
                        f"checkpoint is {last[-1] if last else 'none'}.")
    if a.is_main_process:
        print(f"done: {state['step']} steps, {state['tokens']:,} tokens, val loss {val:.4f} "
              f"(ppl {summary['final_val_ppl']:.2f}), {summary['wall_time_s']:.0f}s -> {run.out_dir / formats.FINAL}")
        if cfg.run.sample_prompt is not None:
            text = generate(str(run.out_dir / formats.FINAL), cfg.run.sample_prompt,
                            max_new_tokens=cfg.run.sample_tokens, seed=cfg.run.seed)[0]
            print(f"--- sample ---\n{text}\n--------------")
        if pusher is not None:
            pusher.submit(str(run.out_dir), commit_message=f"gpt2fit: final model after {state['step']} steps",
                          run_dir=True)
            failures = pusher.finish()
            url = repo_url(None, cfg.run.hub_model_id, cfg.run.hub_revision)
            print(pusher.report() if failures else f"pushed to {url}")
    return 0


def oom_message(run: Run) -> str:
    cfg = run.cfg
    m = cfg.model
    model = f"--init_from {m.init_from}" if m.init_from else f"--model {m.preset}" if m.preset else \
        f"--n_layer {m.n_layer} --n_head {m.n_head} --n_embd {m.n_embd}"
    return (f"out of GPU memory with micro_batch_size={run.micro}, block_size={cfg.model.block_size}, "
            f"grad_checkpointing={cfg.model.grad_checkpointing}, optimizer={cfg.optim.optimizer}, "
            f"loss_chunk_size={cfg.model.loss_chunk_size}. See what fits: `gpt2fit plan {model} "
            f"--block_size {cfg.model.block_size} --micro_batch_size auto`, or pass --micro_batch_size auto, "
            "--grad_checkpointing true, --optimizer adamw8bit. No checkpoint was damaged.")
