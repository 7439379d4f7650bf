"""Model: GPT2Config presets -> GPT2LMHeadModel, or ``init_from`` a pretrained one.

``CausalLM`` wraps the Hugging Face model so that one ``forward`` returns the *sum* of token
losses: the training step divides by the tokens in the whole optimizer step (token-weighted
accumulation), and Accelerate's DDP/FSDP wrappers see the loss computation as part of the model.
"""

import importlib.util
import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config
from transformers.utils import logging as hf_logging

from gpt2fit import formats
from gpt2fit.config import PRESETS
from gpt2fit.errors import UserError, first_line
from gpt2fit.evaluate.model import LOAD_ERRORS, load_error
from gpt2fit.train.loss import lm_loss

# GPT-2's tanh-approximated GELU as one op: the same function as HF's "gelu_new", which is built
# from several elementwise ops that each save an activation (84C vs 36C bytes/token/layer in bf16,
# per plan/memory.py's measurement), ~1.1 GiB per 1024-token sequence for gpt2-medium.
GELU = "gelu_pytorch_tanh"


def build_config(margs, vocab_size: int, eot_id: int):
    """A GPT2Config from a preset and/or explicit sizes; n_positions = block_size."""
    preset = PRESETS[margs.preset or "gpt2"]
    dims = {k: preset[k] if getattr(margs, k) is None else getattr(margs, k) for k in preset}
    if dims["n_embd"] % dims["n_head"]:
        raise UserError(f"n_embd={dims['n_embd']} must be divisible by n_head={dims['n_head']}.")
    padded = math.ceil(vocab_size / margs.pad_vocab_to) * margs.pad_vocab_to
    return GPT2Config(vocab_size=padded, n_positions=margs.block_size,
                      resid_pdrop=margs.dropout, embd_pdrop=margs.dropout, attn_pdrop=margs.dropout,
                      bos_token_id=eot_id, eos_token_id=eot_id, activation_function=margs.activation_function, **dims)


def _attn_impl(requested: str) -> str:
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError("attn_implementation='flash_attention_2' needs the flash-attn package "
                        "(pip install flash-attn); or use sdpa, which uses flash kernels too.")
    return requested


def load_pretrained(init_from: str, margs):
    """Load a GPT-2-architecture model for finetuning, with float32 master weights."""
    src = formats.resolve_model_path(init_from)
    local = Path(src)
    if local.exists():
        missing = [what for what, ok in (("config.json", (local / "config.json").is_file()),
                                         ("*.safetensors weights", any(local.glob("*.safetensors")))) if not ok]
        if missing:
            raise UserError(f"init_from {init_from!r} is missing {', '.join(missing)}; "
                            "point it at a dir saved with save_pretrained (safetensors).")
    try:
        config = AutoConfig.from_pretrained(src)
    except OSError as e:
        raise UserError(f"cannot load init_from {init_from!r}: {first_line(e)} "
                        "Give a Hub id (gpt2-medium) or a local model dir.") from None
    if config.model_type != "gpt2":
        raise UserError(f"init_from {init_from!r} is a {config.model_type!r} model; gpt2fit finetunes "
                        "GPT-2-architecture models only.")
    if margs.block_size > config.n_positions:
        raise UserError(f"block_size={margs.block_size} exceeds {init_from}'s n_positions="
                        f"{config.n_positions}; use --block_size {config.n_positions} or less.")
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(config, k, margs.dropout)
    if config.activation_function == "gelu_new":
        config.activation_function = GELU  # same function, one fused op
    bars = hf_logging.is_progress_bar_enabled()
    if local.exists():  # a local load needs no progress bar (a Hub download keeps its own)
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=torch.float32, use_safetensors=True,
                                                     attn_implementation=_attn_impl(margs.attn_implementation))
    except LOAD_ERRORS as e:
        raise load_error(init_from, src, e) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model


def freeze_biases(model) -> None:
    """nanoGPT's ``bias=False`` on a standard GPT2LMHeadModel: every bias parameter is zeroed and
    excluded from training, so the function computed is the bias-free model's, while the weights
    stay loadable by any GPT-2 code."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_().requires_grad_(False)


def build_model(margs, vocab_size: int, seed: int, eot_id: int):
    """From scratch (preset / explicit sizes) or ``init_from``; returns a GPT2LMHeadModel."""
    if margs.init_from:
        model = load_pretrained(margs.init_from, margs)
        if model.config.vocab_size < vocab_size:
            raise UserError(f"the data's vocab ({vocab_size}) is larger than {margs.init_from}'s "
                            f"({model.config.vocab_size}); prepare the data with that model's tokenizer: "
                            f"--tokenizer {margs.init_from}.")
    else:
        config = build_config(margs, vocab_size, eot_id)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=_attn_impl(margs.attn_implementation),
                                                 dtype=torch.float32)
        if not margs.bias:  # (config.validate refuses bias=false with init_from)
            freeze_biases(model)
    if margs.grad_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model) -> None:
    """transformers 5.23 renamed gradient_checkpointing_enable; GPU hosts often have 5.17."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its kwarg was renamed too
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def n_params(model, non_embedding: bool = False) -> int:
    return sum(p.numel() for p in model.parameters()) - (model.transformer.wpe.weight.numel() if non_embedding else 0)


class CausalLM(nn.Module):
    """GPT2LMHeadModel whose forward returns the summed cross-entropy of ``targets``."""

    def __init__(self, lm, loss_chunk_size: int = 0):
        super().__init__()
        self.lm = lm
        self.loss_chunk_size = loss_chunk_size

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.transformer(input_ids=input_ids, use_cache=False).last_hidden_state
        return lm_loss(hidden, self.lm.lm_head.weight, targets, chunk_size=self.loss_chunk_size or None)
