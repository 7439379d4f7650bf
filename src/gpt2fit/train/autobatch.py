"""``--micro_batch_size auto``: the largest micro-batch that fits.

1. The planner's estimate (``plan.memory.max_micro_batch``) for this model, block, precision, optimizer,
   checkpointing and loss, against the device's memory (or ``--max_memory``).
2. On CUDA, a real probe from that estimate: two forward + backward + optimizer steps on random
   tokens (the second backward runs with the optimizer states allocated, as every step of the
   run after the first does), backing off 10% per out-of-memory, then bisecting to the exact
   largest size. The probe steps with lr 0, so the weights are untouched, its optimizer is thrown
   away, and it runs under a forked RNG, so the run's random stream is the same as without it.
   With several processes, every rank takes the smallest size any rank found.
On the CPU there is nothing to run out of in practice: the estimate against host RAM, capped at 64.
"""

import os

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from gpt2fit.errors import UserError
from gpt2fit.plan.memory import max_micro_batch, memory_settings
from gpt2fit.train.optim import build_optimizer
from gpt2fit.units import GiB, parse_size

CPU_CAP = 64


def probe_micro_batch(try_step, start: int) -> int:
    """Largest micro-batch <= start for which ``try_step(b)`` raises no out-of-memory error: 10% back
    off per out-of-memory (as Accelerate's find_executable_batch_size), then bisection."""
    def runs(b: int) -> bool:
        try:
            try_step(b)
            return True
        except Exception as e:
            if not should_reduce_batch_size(e):
                raise
            clear_device_cache(garbage_collection=True)
            return False

    failed, b = None, start
    while not runs(b):
        failed, b = b, int(b * 0.9) if int(b * 0.9) < b else b - 1
        if b == 0:
            raise UserError("even micro_batch_size=1 runs out of memory; turn on --grad_checkpointing, "
                            "--optimizer adamw8bit, --loss_chunk_size 1024, or lower --block_size. "
                            "`gpt2fit plan` shows what fits.")
    if failed is None:
        return b
    lo, hi = b, failed
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if runs(mid) else (lo, mid)
    return lo


def auto_micro_batch(cfg, model, accelerator) -> int:
    device, world = accelerator.device, accelerator.num_processes
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        memory = min(memory, parse_size(cfg.run.max_memory)) if cfg.run.max_memory else memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # host RAM
    est = max_micro_batch(model.lm.config, memory_bytes=memory, n_processes=world,
                          **memory_settings(cfg, accelerator.mixed_precision))
    if device.type != "cuda":
        est = min(CPU_CAP, max(1, est))
        accelerator.print(f"micro_batch_size auto: {est} (planner estimate for {memory / GiB:.0f} GiB host RAM, "
                          f"capped at {CPU_CAP})")
        return est
    if est == 0:
        raise UserError(f"the planner finds no micro-batch that fits {memory / GiB:.1f} GiB with these settings; "
                        "turn on --grad_checkpointing, --optimizer adamw8bit or --loss_chunk_size 1024. "
                        "`gpt2fit plan` shows the breakdown.")
    model.to(device)
    with torch.random.fork_rng(devices=[device]):
        found = probe_micro_batch(lambda b: _try_step(cfg, model, accelerator, b), est)
    if world > 1:  # ranks must agree (and a rank with less free memory decides)
        found = int(accelerator.gather(torch.tensor([found], device=device)).min())
    accelerator.print(f"micro_batch_size auto: {found} (planner estimate {est}, probed on {device})")
    return found


PROBE_STEPS = 2  # the first step allocates the optimizer states; the second backward runs beside them


def _try_step(cfg, model, accelerator, batch: int) -> None:
    vocab = model.lm.config.vocab_size
    x = torch.randint(0, vocab, (batch, cfg.model.block_size + 1), device=accelerator.device)
    opt = build_optimizer(model, cfg.optim, accelerator.device.type, fused=cfg.run.host_sync == "log")
    for group in opt.param_groups:
        group["lr"] = 0.0
    try:
        for _ in range(PROBE_STEPS):
            with accelerator.autocast():
                loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
        clear_device_cache()
