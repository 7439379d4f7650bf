"""Optimizers and learning-rate schedules.

Weight decay applies to 2-D weight matrices only: attention/MLP projections and the (tied)
token embedding. Biases, LayerNorms (ln_1, ln_2, ln_f) and the position embedding do not decay
(the transformers example's name-based no-decay list misses GPT-2's ``ln_*``; shape is robust).

``--optimizer muon``: torch.optim.Muon (momentum, then Newton-Schulz orthogonalization of each 2-D
update; Jordan et al. 2024) on the 2-D weights inside the transformer blocks, AdamW on the rest
(token/position embeddings, LayerNorms, biases), as modded-nanogpt and Moonlight split them.
Shape-aware LR: Moonlight's ``match_rms_adamw`` (update RMS 0.2, lr x 0.2*sqrt(max(A, B))), which
(i) lets Muon reuse AdamW-scale rates and decay (Liu et al. 2025, "Muon is Scalable for LLM
Training") and (ii) is symmetric in A, B, so GPT-2's Conv1D (in, out) layout, the transpose of
nn.Linear, needs no special case (Keller's ``original`` sqrt(max(1, A/B)) would). ``c_attn`` is one
matrix (Q, K, V side by side) and is orthogonalized as one: it is one parameter of GPT2LMHeadModel,
and splitting it would mean changing the model's checkpoint layout or re-implementing torch's step.
"""

import math
import re

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


MUON_MOMENTUM = 0.95  # Jordan et al.; Moonlight; torch's default
BLOCK_PARAM = re.compile(r"(^|\.)h\.\d+\.")  # GPT-2's transformer blocks: transformer.h.<i>.


def muon_params(model) -> list:
    """The blocks' 2-D weights, which Muon steps (every other parameter stays with AdamW)."""
    muon = [p for name, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and BLOCK_PARAM.search(name)]
    if not muon:
        raise UserError("--optimizer muon found no 2-D weights inside transformer blocks (GPT-2's transformer.h.*) "
                        "in this model; use --optimizer adamw.")
    return muon


class MuonWithAdamW(torch.optim.Optimizer):
    """torch's Muon and AdamW behind one optimizer, as the loop, Accelerate, the LR scheduler and the
    checkpoint expect: ``param_groups`` are the two optimizers' own group dicts (the scheduler's LR
    writes reach them), ``step`` steps both, the state dict holds both."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})
        self._link()

    def _link(self):
        # the very group dicts of the two optimizers (load_state_dict replaces theirs): the scheduler's
        # LR writes must reach them
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):  # a read-only merge (each optimizer keeps its own; their defaultdicts must not leak)
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value):  # Optimizer.__init__'s empty one
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():  # (a closure runs forward and backward)
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict):
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._link()


def _unless_none(value, default):
    return default if value is None else value  # (0 is a value, not "unset")


def build_optimizer(model, oargs, device_type: str, fused: bool = False):
    """``fused``: use torch's fused AdamW off CUDA too (it is always used on CUDA); the sync-free step
    (host_sync=log) needs it, because only the fused kernel honours ``found_inf``."""
    groups = param_groups(model, oargs.weight_decay)
    betas = (oargs.beta1, oargs.beta2)
    if oargs.optimizer == "muon":
        matrices = muon_params(model)
        in_muon = {id(p) for p in matrices}
        rest_groups = [{**g, "params": [p for p in g["params"] if id(p) not in in_muon]} for g in groups]
        muon = torch.optim.Muon(matrices, lr=_unless_none(oargs.muon_learning_rate, oargs.learning_rate),
                                weight_decay=_unless_none(oargs.muon_weight_decay, oargs.weight_decay),
                                momentum=_unless_none(oargs.muon_momentum, MUON_MOMENTUM), adjust_lr_fn="match_rms_adamw")
        adamw = torch.optim.AdamW([g for g in rest_groups if g["params"]], lr=oargs.learning_rate, betas=betas,
                                  eps=oargs.eps, fused=fused or device_type == "cuda")
        return MuonWithAdamW(muon, adamw)
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
