"""Optimizers and learning-rate schedules.

Weight decay applies to 2-D weight matrices only: attention/MLP projections and the (tied)
token embedding. Biases, LayerNorms (ln_1, ln_2, ln_f) and the position embedding do not decay
(the transformers example's name-based no-decay list misses GPT-2's ``ln_*``; shape is robust).
"""

import math

import torch
from transformers import get_scheduler

from gpt2fit.errors import UserError


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied wte / lm_head appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decay_param_names(model) -> tuple[list[str], list[str]]:
    """(names with decay, names without), for logging and tests."""
    decay = {id(p) for p in param_groups(model, 1.0)[0]["params"]}
    named = dict(model.named_parameters())
    return [n for n, p in named.items() if id(p) in decay], [n for n, p in named.items() if id(p) not in decay]


def build_optimizer(model, oargs, device_type: str, fused: bool = False):
    """``fused``: use torch's fused AdamW off CUDA too (it is always used on CUDA); the sync-free step
    (host_sync=log) needs it, because only the fused kernel honours ``found_inf``."""
    groups = param_groups(model, oargs.weight_decay)
    betas = (oargs.beta1, oargs.beta2)
    if oargs.optimizer == "adamw":
        fused = fused or device_type == "cuda"
        return torch.optim.AdamW(groups, lr=oargs.learning_rate, betas=betas, eps=oargs.eps, fused=fused)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"optimizer={oargs.optimizer!r} needs bitsandbytes: pip install bitsandbytes") from None
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[oargs.optimizer]
    # bitsandbytes recommends 32-bit state for the token embedding (sparse, outlier-heavy updates);
    # registered per module as transformers' Trainer does, applied when the optimizer first steps
    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    return cls(groups, lr=oargs.learning_rate, betas=betas, eps=oargs.eps)


def build_scheduler(optimizer, oargs, total_steps: int):
    """Warmup then cosine to min_lr / warmup-stable-decay / constant, via transformers.get_scheduler."""
    warmup = min(oargs.warmup_steps, max(total_steps - 1, 0))
    decay_steps = oargs.lr_decay_steps or total_steps
    min_ratio = oargs.min_lr / oargs.learning_rate
    if oargs.lr_schedule == "cosine":
        decay_steps = max(decay_steps, warmup + 1)
        sched = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup,
                              num_training_steps=decay_steps, scheduler_specific_kwargs={"min_lr_rate": min_ratio})
        # transformers' cosine rises again after num_training_steps; hold min_lr there (as nanoGPT does)
        sched.lr_lambdas = [lambda s, f=f: f(min(s, decay_steps)) for f in sched.lr_lambdas]
        return sched
    if oargs.lr_schedule == "wsd":
        n_decay = max(1, math.ceil(oargs.wsd_decay_fraction * decay_steps))
        return get_scheduler("warmup_stable_decay", optimizer, num_warmup_steps=warmup,
                             num_training_steps=max(decay_steps, warmup + n_decay),
                             scheduler_specific_kwargs={"num_decay_steps": n_decay, "min_lr_ratio": min_ratio})
    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
