"""Will it fit? GPU memory, micro-batch, accumulation and time for a GPT-2 run, before it runs.

``gpt2fit plan --model gpt2-medium --gpu rtx-4070`` prints, for each candidate setting
(gradient checkpointing on/off x AdamW / 8-bit AdamW x plain / chunked loss), the memory by
component, whether it fits and the largest micro-batch that does; then the chosen setting, the
gradient accumulation that reaches the target tokens per optimizer step, the predicted tokens/s,
the time to the token budget, the training FLOPs and the Chinchilla-optimal token count.

Pure functions: no torch, no CUDA (``--init_from <hub id>`` imports transformers' AutoConfig).

The memory model (bytes; N = parameters, B = micro-batch, T = block size, C = n_embd,
a = n_head, L = n_layer, V = vocab size, I = MLP width 4C; "16-bit" = bf16/fp16)
------------------------------------------------------------------------------------------------
weights      4N fp32 master weights (Accelerate mixed precision keeps fp32 parameters and
             autocasts), + 2 bytes per matmul parameter under bf16/fp16: autocast caches a 16-bit
             copy of every weight it casts until the forward ends, and the backward keeps them
             (LayerNorms and wpe are not cast; with the chunked loss, neither is the lm_head).
gradients    4N (fp32 .grad). With more than one process, DDP's gradient buckets hold another
             4N (Accelerate's default gradient_as_bucket_view=False; PyTorch DDP docs).
optimizer    AdamW: 8N (exp_avg, exp_avg_sq in fp32); optimizer.step() also allocates a 4N
             temporary (the foreach sqrt of exp_avg_sq), counted in the optimizer-step peak.
             8-bit AdamW (bitsandbytes): 2 bytes/param + two fp32 absmax per 256-element block,
             except tensors under 4096 elements (bnb's min_8bit_size) and the token embedding,
             which bitsandbytes recommends keeping in 32-bit: 8 bytes/param for those. The paged
             variant has the same size (it can spill to CPU under pressure: not counted on).
activations  What autograd keeps for backward, per token per layer. Korthikanti et al. 2022,
             "Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198),
             eq. (1): s*b*h*(34 + 5*a*s/h) bytes for 16-bit activations, no tensor parallelism,
             where 5*a*s^2*b is the attention matrix: softmax output (2), its dropout mask (1)
             and dropout output (2). With SDPA (flash / memory-efficient kernels) no s x s matrix
             is kept: the kernel keeps q, k, v, the output and a logsumexp (4 bytes per head per
             token) and recomputes the scores in backward; attention dropout keeps an RNG seed.
             What this repo's HF GPT2Block keeps, per token per layer (act = 2 under bf16/fp16
             autocast, 4 in fp32; the residual stream is fp32 under autocast because LayerNorm
             runs in fp32 and the residual add promotes):
               2 LayerNorm inputs        2 * 4C  (+ mean and rstd, 2 * 8 bytes)
               c_attn input              act*C   (16-bit copy of the ln_1 output)
               q, k, v                   3*act*C (views of the c_attn output, kept by SDPA)
               attention output          act*C   (c_proj input; same storage as SDPA's output)
               logsumexp                 4*a
               c_fc input                act*C
               MLP activation            fused GELU (gelu_pytorch_tanh): input + output 2*act*I
                                         gelu_new (HF's GPT-2 default, a Python expression):
                                         (12 + 2*act)*I, because under CUDA autocast `pow` runs
                                         in fp32 (a 4-byte copy of its input), and tanh(...),
                                         1+tanh(...), 0.5*x and the 16-bit copy of the product
                                         are all kept: 64C bytes vs 16C for the fused GELU
               dropout masks (p > 0)     2*C     (1 byte each, after attention and after MLP)
             = 36C (fused) / 84C (gelu_new) bytes per token per layer in bf16, vs Korthikanti's
             34C: they assume a 16-bit residual stream (-4C) and count 2 masks (+2C).
             Non-layer: token ids (8) + ln_f input (4C + 8) (+ an embedding dropout mask).
             eager attention adds the s x s terms: a*s*(4 + act) bytes per token (fp32 softmax
             output + its 16-bit copy), a*s*(4 + 1 + act) with dropout (4 + 1 + 4 in fp32).
             Gradient checkpointing (HF checkpoints every GPT2Block) keeps only each block's
             fp32 input (4C per token per layer) plus one block's full set during its recompute.
             tests/test_plan.py measures the fp32 numbers on CPU (saved-tensor hooks, SDPA):
             they agree to within 1%.
logits       plain loss: B*T*V*12 + B*T*act*C. At the start of backward, autograd holds the fp32
             log-softmax output (4 per logit) and allocates the gradient of it (4) and of the
             logits (4); the 16-bit logits and their fp32 upcast (6 more) exist only during the
             forward and are freed before. chunked loss (gpt2fit.loss): the gradients it keeps,
             4VC (fp32 weight gradient) + 4C per token (hidden gradient), plus the larger of
             forward: a 16-bit copy of the weight (act*VC) and one chunk of n rows as fp32 logits
             and a 16-bit copy ((4 + act)*n*V; fp32: 4*n*V, no copies; or, if larger, the 16-bit
             copy and an 8192-row slice of the weight-gradient product with its fp32 cast) /
             backward: the scaled copies of both gradients. Both formulas match torch.profiler's CPU peaks (tests).
workspace    256 MiB (cuBLAS/cuDNN workspaces, SDPA scratch) + the 16-bit gradient of the
             largest weight (lm_head, act*V*C) before it is added to its fp32 .grad + 10% of
             activations and logits for caching-allocator fragmentation.

A GPU's usable memory is its total minus CUDA_RESERVE_BYTES (0.75 GiB: the CUDA context, kernels
and library handles, which PyTorch does not account for) minus the safety margin (10%).
The peak is max(forward/backward: the sum of all components, optimizer step: weights (fp32) +
gradients + optimizer states + step temporaries + 256 MiB).

Speed: tokens/s = MFU * peak FLOP/s / FLOPs per token (PaLM appendix B / nanoGPT's
estimate_mfu): 6N + 12*L*C*T FLOPs per token, forward + backward, where N counts every parameter
except the position embedding (the tied wte/lm_head matmul costs 2VC per token; embedding
lookups are free); 12*L*C*T is the attention score and value matmuls, counted without the
causal-mask saving, as nanoGPT does. MFU comes from benchmarks/*.json when a row matches (model,
checkpointing, optimizer, device), else it is an assumption: 0.40 without checkpointing, 0.30 with
it (recomputing the forward costs 2N of 8N, and FLOPs are counted without the recompute).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from gpt2fit.errors import ArgumentParser, UserError, positive_int, suggest
from gpt2fit.hardware import GPU, GPUS, flops_per_token, gpu_key_for_device, resolve_gpu
from gpt2fit.units import GiB, MiB, format_count, format_duration, parse_count, parse_size


# ---------------------------------------------------------------------------------------------
# Model shapes and parameter counts
# ---------------------------------------------------------------------------------------------

# what gpt2fit.model trains with: it builds presets with, and swaps a loaded model's gelu_new for,
# gelu_pytorch_tanh (the same function as one op); pass activation="gelu_new" to plan stock HF code
DEFAULT_ACTIVATION = "gelu_pytorch_tanh"
# Activations computed by one autograd op that keeps only its input. Anything else is assumed
# to cost what gelu_new costs (a Python expression of several kept tensors).
FUSED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "relu", "silu", "swish", "gelu_accurate_fused")


@dataclass(frozen=True)
class ModelShape:
    """The GPT-2 hyperparameters the planner needs (a GPT2Config reduced to numbers)."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int = 1024
    vocab_size: int = 50257
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    activation: str = DEFAULT_ACTIVATION
    tie_word_embeddings: bool = True
    dropout: float = 0.0  # resid/attn/embd dropout probability

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd


PRESETS: dict[str, ModelShape] = {
    "gpt2": ModelShape("gpt2", 12, 12, 768),
    "gpt2-medium": ModelShape("gpt2-medium", 24, 16, 1024),
    "gpt2-large": ModelShape("gpt2-large", 36, 20, 1280),
    "gpt2-xl": ModelShape("gpt2-xl", 48, 25, 1600),
}


def model_shape(model_cfg: Any) -> ModelShape:
    """A preset name, a ModelShape, a GPT2Config-like object or a config.json dict -> ModelShape."""
    if isinstance(model_cfg, ModelShape):
        return model_cfg
    if isinstance(model_cfg, str):
        if model_cfg in PRESETS:
            return PRESETS[model_cfg]
        raise UserError(f"unknown model preset {model_cfg!r}.{suggest(model_cfg, PRESETS)} Known: {', '.join(PRESETS)}")
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k, d=None: getattr(model_cfg, k, d)
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if get(k) is None]
    if missing:
        kind = get("model_type") or type(model_cfg).__name__
        raise UserError(f"not a GPT-2 config ({kind}): it has no {', '.join(missing)}")
    name = get("name_or_path") or get("_name_or_path") or "custom"
    dropout = max(float(get("resid_pdrop", 0.0) or 0.0), float(get("attn_pdrop", 0.0) or 0.0),
                  float(get("embd_pdrop", 0.0) or 0.0))
    return ModelShape(
        name=str(name),
        n_layer=int(get("n_layer")),
        n_head=int(get("n_head")),
        n_embd=int(get("n_embd")),
        n_positions=int(get("n_positions", 1024) or 1024),
        vocab_size=int(get("vocab_size")),
        n_inner=get("n_inner"),
        activation=_as_trained(str(get("activation_function", DEFAULT_ACTIVATION) or DEFAULT_ACTIVATION)),
        tie_word_embeddings=bool(get("tie_word_embeddings", True)),
        dropout=dropout,
    )


def preset_name(model_cfg: Any) -> str | None:
    """The preset with the same shape (e.g. a local copy of the Hub's "gpt2"), or None."""
    m = model_shape(model_cfg)
    for name, p in PRESETS.items():
        if (p.n_layer, p.n_head, p.n_embd, p.n_positions, p.vocab_size, p.inner) == (
                m.n_layer, m.n_head, m.n_embd, m.n_positions, m.vocab_size, m.inner):
            return name
    return None


def _as_trained(activation: str) -> str:
    return DEFAULT_ACTIVATION if activation == "gelu_new" else activation


def param_tensors(model_cfg: Any) -> list[tuple[str, int]]:
    """(name, numel) of every parameter tensor of GPT2LMHeadModel (tied lm_head counted once)."""
    m = model_shape(model_cfg)
    C, I = m.n_embd, m.inner
    out = [("wte", m.vocab_size * C), ("wpe", m.n_positions * C)]
    for i in range(m.n_layer):
        p = f"h.{i}."
        out += [
            (p + "ln_1.weight", C), (p + "ln_1.bias", C),
            (p + "attn.c_attn.weight", C * 3 * C), (p + "attn.c_attn.bias", 3 * C),
            (p + "attn.c_proj.weight", C * C), (p + "attn.c_proj.bias", C),
            (p + "ln_2.weight", C), (p + "ln_2.bias", C),
            (p + "mlp.c_fc.weight", C * I), (p + "mlp.c_fc.bias", I),
            (p + "mlp.c_proj.weight", I * C), (p + "mlp.c_proj.bias", C),
        ]
    out += [("ln_f.weight", C), ("ln_f.bias", C)]
    if not m.tie_word_embeddings:
        out.append(("lm_head.weight", m.vocab_size * C))
    return out


def count_params(model_cfg: Any) -> int:
    """Exact parameter count of GPT2LMHeadModel: gpt2 = 124,439,808; gpt2-medium = 354,823,168."""
    return sum(n for _, n in param_tensors(model_cfg))


def count_params_for_flops(model_cfg: Any) -> int:
    """N in 6N + 12LCT: every parameter except the position embedding (nanoGPT's convention).

    The tied wte/lm_head stays in: its lm_head matmul costs 2*V*C FLOPs per token forward, like
    any weight; the embedding lookups (wte and wpe) cost nothing, so wpe is left out.
    """
    m = model_shape(model_cfg)
    return count_params(m) - m.n_positions * m.n_embd


# ---------------------------------------------------------------------------------------------
# Memory model
# ---------------------------------------------------------------------------------------------

PRECISIONS = ("bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
LOSS_IMPLS = ("plain", "chunked", "liger")
ATTENTIONS = ("sdpa", "eager")

CUDA_RESERVE_BYTES = int(0.75 * GiB)  # CUDA context + kernels + cuBLAS/cuDNN handles, per GPU
DEFAULT_MARGIN = 0.10  # keep 10% of the usable memory free
WORKSPACE_FIXED_BYTES = 256 * MiB
FRAGMENTATION = 0.10  # caching-allocator slack, as a fraction of activations + logits
LOSS_CHUNK_SIZE = 1024  # rows per chunk; keep equal to gpt2fit.loss.DEFAULT_CHUNK_SIZE
LOSS_VOCAB_SLICE = 8192  # gpt2fit.loss._VOCAB_SLICE: weight-gradient rows accumulated at a time
BNB_BLOCK_SIZE = 256  # bitsandbytes 8-bit optimizer state block (one fp32 absmax per block)
BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit optimizer state
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "workspace")


@dataclass
class MemoryEstimate:
    """Peak GPU memory of one training micro-step, by component (bytes)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    workspace: int
    optimizer_step: int  # peak during optimizer.step(): fp32 weights + grads + states + temporaries
    activations_per_sequence: int  # activations / micro_batch_size (without checkpointing's fixed part)
    micro_batch_size: int
    block_size: int

    @property
    def forward_backward(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.workspace

    @property
    def total(self) -> int:
        return max(self.forward_backward, self.optimizer_step)

    def fits(self, memory_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
        """True when ``total`` fits in a GPU of ``memory_bytes`` after the CUDA reserve and margin."""
        return self.total <= usable_memory(memory_bytes, margin)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in COMPONENTS}
        d.update(optimizer_step=self.optimizer_step, forward_backward=self.forward_backward, total=self.total,
                 activations_per_sequence=self.activations_per_sequence,
                 micro_batch_size=self.micro_batch_size, block_size=self.block_size)
        return d


def usable_memory(memory_bytes: int, margin: float = DEFAULT_MARGIN) -> int:
    """Bytes a run may plan for: (total - CUDA_RESERVE_BYTES) * (1 - margin)."""
    return int(max(0, memory_bytes - CUDA_RESERVE_BYTES) * (1.0 - margin))


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _check_choice(what: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}.{suggest(str(value), choices)}")
    return value


def layer_activation_bytes_per_token(
    model_cfg: Any, *, block_size: int, precision: str = "bf16", activation: str | None = None,
    attention: str = "sdpa", dropout: float | None = None,
) -> int:
    """Bytes one GPT2Block keeps for backward per token (see the module docstring for each term)."""
    m = model_shape(model_cfg)
    act = _act_bytes(precision)
    res = 4  # residual stream: fp32 under autocast (LayerNorm output fp32 + promoting add), and in fp32
    C, I, a, s = m.n_embd, m.inner, m.n_head, block_size
    activation = activation or m.activation
    dropout = m.dropout if dropout is None else dropout
    layer_norms = 2 * (res * C + 8)
    attn = act * C + 3 * act * C + act * C + 4 * a
    mlp_in = act * C
    if activation in FUSED_ACTIVATIONS:
        mlp = 2 * act * I
    else:
        mlp = (12 + 2 * act) * I
    masks = 2 * C if dropout > 0 else 0
    scores = 0
    if attention == "eager":
        if precision == "fp32":
            scores = a * s * (4 + 1 + 4 if dropout > 0 else 4)
        else:
            scores = a * s * (4 + 1 + act if dropout > 0 else 4 + act)
    return layer_norms + attn + mlp_in + mlp + masks + scores


def _optimizer_bytes(model_cfg: Any, optimizer: str) -> tuple[int, int]:
    """(state bytes, extra bytes allocated during optimizer.step())."""
    tensors = param_tensors(model_cfg)
    n = sum(k for _, k in tensors)
    if optimizer == "adamw":
        return 8 * n, 4 * n
    total = 0
    for name, k in tensors:
        if name == "wte" or k < BNB_MIN_8BIT_SIZE:
            total += 8 * k
        else:
            total += 2 * k + 2 * 4 * math.ceil(k / BNB_BLOCK_SIZE)
    return total, 0


def estimate_memory(
    model_cfg: Any,
    *,
    block_size: int | None = None,
    micro_batch_size: int = 1,
    precision: str = "bf16",
    optimizer: str = "adamw",
    grad_checkpointing: bool = False,
    loss_impl: str = "plain",
    n_params: int | None = None,
    n_processes: int = 1,
    activation: str | None = None,
    attention: str = "sdpa",
    dropout: float | None = None,
    loss_chunk_size: int = LOSS_CHUNK_SIZE,
) -> MemoryEstimate:
    """Peak GPU memory of a training micro-step (per process), by component.

    ``model_cfg``: preset name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"), a GPT2Config-like
    object (n_layer, n_head, n_embd, n_positions, vocab_size) or a config.json dict.
    ``n_params`` overrides the parameter count used for weights, gradients and optimizer states
    (for a model with extra parameters); by default it is ``count_params(model_cfg)``.
    ``activation`` / ``dropout`` default to the config's (presets: gelu_pytorch_tanh, 0.0; a config's
    gelu_new counts as gelu_pytorch_tanh, which gpt2fit swaps in).
    """
    m = model_shape(model_cfg)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("loss implementation", loss_impl, LOSS_IMPLS)
    _check_choice("attention", attention, ATTENTIONS)
    T = int(block_size or m.n_positions)
    if T < 1 or T > m.n_positions:
        raise UserError(f"block_size {T} must be between 1 and the model's n_positions ({m.n_positions})")
    B = int(micro_batch_size)
    if B < 1:
        raise UserError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    dropout = m.dropout if dropout is None else float(dropout)
    act = _act_bytes(precision)
    mixed = precision != "fp32"
    C, V, L = m.n_embd, m.vocab_size, m.n_layer
    tokens = B * T

    tensors = param_tensors(m)
    counted = sum(k for _, k in tensors)
    N = counted if n_params is None else int(n_params)
    # parameters that go through a matmul (autocast keeps a 16-bit copy): all but wpe and LayerNorms
    matmul_params = sum(k for name, k in tensors if name != "wpe" and ".ln_" not in name and not name.startswith("ln_f"))
    if loss_impl != "plain":  # the chunked loss casts the lm_head weight itself (counted in logits)
        matmul_params -= V * C

    weights = 4 * N + (2 * matmul_params if mixed else 0)
    gradients = 4 * N * (2 if n_processes > 1 else 1)
    opt_state, opt_temp = _optimizer_bytes(m, optimizer)
    opt_state += (8 if optimizer == "adamw" else 2) * (N - counted)

    per_layer = layer_activation_bytes_per_token(
        m, block_size=T, precision=precision, activation=activation, attention=attention, dropout=dropout)
    non_layer = 8 + (4 * C + 8) + (C if dropout > 0 else 0)  # ids, ln_f input (+ embedding dropout mask)
    if grad_checkpointing:
        per_token = L * 4 * C + non_layer  # each block's fp32 input
        activations = tokens * per_token + tokens * per_layer  # + one block during its recompute
        per_sequence = T * (per_token + per_layer)
    else:
        activations = tokens * (L * per_layer + non_layer)
        per_sequence = T * (L * per_layer + non_layer)

    if loss_impl == "plain":
        logits = tokens * (12 * V + act * C)
    else:
        rows = min(loss_chunk_size, tokens)
        saved = 4 * V * C + tokens * 4 * C  # fp32 weight gradient + hidden gradient (fp32 ln_f output)
        if mixed:  # weight copy + max(fp32 chunk and its 16-bit copy, 16-bit copy + one vocab slice
            # of the weight-gradient product and its fp32 cast)
            slice_tmp = min(V, LOSS_VOCAB_SLICE) * C * (act + 4)
            forward_extra = act * V * C + max((4 + act) * rows * V, act * rows * V + slice_tmp)
        else:
            forward_extra = 4 * rows * V
        backward_extra = saved  # the scaled copies handed to autograd
        logits = saved + max(forward_extra, backward_extra)

    workspace = WORKSPACE_FIXED_BYTES + act * V * C + int(FRAGMENTATION * (activations + logits))
    optimizer_step = 4 * N + gradients + opt_state + opt_temp + WORKSPACE_FIXED_BYTES
    return MemoryEstimate(
        weights=int(weights), gradients=int(gradients), optimizer=int(opt_state), activations=int(activations),
        logits=int(logits), workspace=int(workspace), optimizer_step=int(optimizer_step),
        activations_per_sequence=int(per_sequence), micro_batch_size=B, block_size=T,
    )


def max_micro_batch(
    model_cfg: Any, *, memory_bytes: int, margin: float = DEFAULT_MARGIN, limit: int = 1024, **estimate_kwargs
) -> int:
    """Largest micro-batch (<= ``limit``) whose estimate fits ``memory_bytes``; 0 if even 1 doesn't.

    ``estimate_kwargs`` are those of ``estimate_memory`` (block_size, precision, optimizer, ...).
    """
    def fits(b: int) -> bool:
        return estimate_memory(model_cfg, micro_batch_size=b, **estimate_kwargs).fits(memory_bytes, margin)

    if limit < 1 or not fits(1):
        return 0
    lo, hi = 1, int(limit)
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo) and not fits(hi); memory grows with the micro-batch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------------------
# Throughput: measured MFU from benchmarks/, else an assumption
# ---------------------------------------------------------------------------------------------

ASSUMED_MFU = {False: 0.40, True: 0.30}  # by gradient checkpointing
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022
DEFAULT_TOKENS_PER_STEP = 524288  # 2**19, ~0.5M tokens per optimizer step (GPT-2 124M in nanoGPT)
_BENCH_KEYS = ("model", "grad_checkpointing", "optimizer", "mfu", "device")


def _default_bench_dirs() -> list[Path]:
    dirs = [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def bench_rows(bench_dirs: Iterable[str | os.PathLike] | None = None) -> list[dict]:
    """Rows with model, grad_checkpointing, optimizer, mfu and device from benchmarks/*.json.

    Any JSON layout is accepted (a list of rows, {"results": [...]}, nested): every object that
    carries those keys is a row; each gets "_file". Unreadable files are skipped.
    """
    rows: list[dict] = []

    def walk(obj: Any, src: str) -> None:
        if isinstance(obj, dict):
            if all(k in obj for k in _BENCH_KEYS):
                rows.append({**obj, "_file": src})
            for v in obj.values():
                walk(v, src)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, src)

    for d in (_default_bench_dirs() if bench_dirs is None else [Path(p) for p in bench_dirs]):
        for f in sorted(Path(d).glob("*.json")):
            try:
                walk(json.loads(f.read_text()), f"{Path(d).name}/{f.name}")
            except (OSError, ValueError):
                continue
    return rows


_DEFAULT_LEVERS = {"compile": False, "attn_implementation": "sdpa", "sdpa_backend": "auto", "tf32": True,
                   "host_sync": "step"}


def lookup_mfu(
    rows: list[dict], *, model: str, grad_checkpointing: bool, optimizer: str, gpu_key: str | None,
    loss_impl: str | None = None, block_size: int | None = None, precision: str | None = None,
) -> tuple[float, str]:
    """(MFU, where it came from): the median of matching bench rows, else ASSUMED_MFU."""
    found = []
    for r in rows:
        try:
            mfu = float(r["mfu"])
        except (TypeError, ValueError):
            continue
        if not (0 < mfu < 1) or str(r["model"]) != model or _as_bool(r["grad_checkpointing"]) != grad_checkpointing:
            continue
        if str(r["optimizer"]) != optimizer or gpu_key is None or gpu_key_for_device(str(r["device"])) != gpu_key:
            continue
        if loss_impl is not None and "loss_impl" in r and str(r["loss_impl"]) != loss_impl:
            continue
        if r.get("oom") or r.get("error"):
            continue
        # a bench grid varies other levers too: only rows at the default settings describe a plain run
        if any(k in r and r[k] != v for k, v in _DEFAULT_LEVERS.items()):
            continue
        if block_size is not None and "block_size" in r and int(r["block_size"]) != block_size:
            continue
        if precision is not None and "precision" in r and str(r["precision"]) != precision:
            continue
        found.append((mfu, r))
    if not found:
        return ASSUMED_MFU[bool(grad_checkpointing)], "assumed"
    found.sort(key=lambda x: x[0])
    mfu, row = found[len(found) // 2]
    return mfu, f"measured ({row['_file']}, {row['device']}, {len(found)} row{'s' if len(found) > 1 else ''})"


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One setting: memory at ``micro_batch_size`` and the largest micro-batch that fits."""

    grad_checkpointing: bool
    optimizer: str
    loss_impl: str
    micro_batch_size: int
    memory: MemoryEstimate
    fits: bool
    max_micro_batch: int
    mfu: float
    mfu_source: str
    tokens_per_s: float | None  # all processes together

    def to_dict(self) -> dict:
        return {
            "grad_checkpointing": self.grad_checkpointing, "optimizer": self.optimizer,
            "loss_impl": self.loss_impl, "micro_batch_size": self.micro_batch_size,
            "memory": self.memory.to_dict(), "fits": self.fits, "max_micro_batch": self.max_micro_batch,
            "mfu": self.mfu, "mfu_source": self.mfu_source, "tokens_per_s": self.tokens_per_s,
        }


@dataclass
class PlanResult:
    model: ModelShape
    n_params: int
    n_params_for_flops: int
    block_size: int
    precision: str
    activation: str
    gpu_key: str | None
    gpu: GPU
    margin: float
    usable_memory_bytes: int
    n_processes: int
    tokens_per_step_target: int
    candidates: list[Candidate]
    chosen: Candidate | None
    grad_accum: int | None
    tokens_per_step: int | None
    flops_per_token: float
    budget_tokens: int
    budget_is_chinchilla: bool
    time_to_budget_s: float | None
    training_flops: float
    chinchilla_tokens: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model": {"name": self.model.name, "n_layer": self.model.n_layer, "n_head": self.model.n_head,
                      "n_embd": self.model.n_embd, "n_positions": self.model.n_positions,
                      "vocab_size": self.model.vocab_size, "activation": self.activation},
            "n_params": self.n_params, "n_params_for_flops": self.n_params_for_flops,
            "block_size": self.block_size, "precision": self.precision,
            "gpu": {"key": self.gpu_key, "name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes,
                    "bf16_dense_flops": self.gpu.bf16_dense_flops},
            "margin": self.margin, "cuda_reserve_bytes": CUDA_RESERVE_BYTES,
            "usable_memory_bytes": self.usable_memory_bytes, "n_processes": self.n_processes,
            "tokens_per_step_target": self.tokens_per_step_target,
            "candidates": [c.to_dict() for c in self.candidates],
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "grad_accum": self.grad_accum, "tokens_per_step": self.tokens_per_step,
            "tokens_per_s": self.chosen.tokens_per_s if self.chosen else None,
            "mfu": self.chosen.mfu if self.chosen else None,
            "mfu_source": self.chosen.mfu_source if self.chosen else None,
            "flops_per_token": self.flops_per_token, "budget_tokens": self.budget_tokens,
            "budget_is_chinchilla": self.budget_is_chinchilla, "time_to_budget_s": self.time_to_budget_s,
            "training_flops": self.training_flops, "chinchilla_tokens": self.chinchilla_tokens,
            "notes": self.notes,
        }


def _grid(value: Any, choices: tuple, what: str) -> list:
    if value in (None, "auto"):
        return list(choices)
    if isinstance(choices[0], bool):
        return [_as_bool(value)]
    return [_check_choice(what, value, choices + ("liger",) if what == "loss implementation" else choices)]


def _rank(c: Candidate) -> tuple:
    """Higher is better: throughput, then the exact optimizer, then a bigger micro-batch, then
    the simpler loss. Checkpointing only wins when it is all that fits (its MFU is lower)."""
    return (c.tokens_per_s or c.mfu, c.optimizer == "adamw", c.optimizer != "paged_adamw8bit",
            c.micro_batch_size, c.loss_impl == "plain")


def plan_run(
    model_cfg: Any = "gpt2",
    *,
    gpu: str | GPU | None = "rtx-4090",
    memory_bytes: int | None = None,
    peak_flops: float | None = None,
    block_size: int | None = None,
    precision: str = "bf16",
    optimizer: str = "auto",
    grad_checkpointing: bool | str = "auto",
    loss_impl: str = "auto",
    micro_batch_size: int | str = "auto",
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP,
    max_tokens: int | None = None,
    n_processes: int = 1,
    margin: float = DEFAULT_MARGIN,
    activation: str | None = None,
    attention: str = "sdpa",
    dropout: float | None = None,
    bench_dirs: Iterable[str | os.PathLike] | None = None,
) -> PlanResult:
    """Memory by component for each candidate setting, the chosen one, accumulation and time.

    ``optimizer`` / ``grad_checkpointing`` / ``loss_impl`` = "auto" try every choice (a grid);
    a value fixes it. ``micro_batch_size="auto"`` evaluates each candidate at the largest
    micro-batch that fits (capped at the sequences in one optimizer step), lowered to the smallest
    one that needs the same number of accumulation steps (max 50 of 512 sequences -> 11 steps ->
    micro 47); an int evaluates all at that size. ``gpu`` is a GPUS key or a GPU;
    ``memory_bytes`` / ``peak_flops`` override its memory / peak (or describe a GPU on their own
    with ``gpu=None``). Multi-process plans assume data parallelism with linear scaling.
    """
    m = model_shape(model_cfg)
    _check_choice("precision", precision, PRECISIONS)
    if not 0 <= margin < 1:
        raise UserError(f"margin must be a fraction in [0, 1), got {margin}")
    if n_processes < 1:
        raise UserError(f"n_processes must be at least 1, got {n_processes}")
    tokens_per_step = parse_count(tokens_per_step)
    if tokens_per_step < 1:
        raise UserError("tokens_per_step must be at least 1")

    gpu_key: str | None = None
    if isinstance(gpu, GPU):
        spec = gpu
    elif gpu is not None:
        gpu_key, spec = resolve_gpu(gpu)
    else:
        if memory_bytes is None:
            raise UserError("describe the GPU: give a GPU name (--gpu) or its memory (--memory 12GiB)")
        spec = GPU("custom GPU", int(memory_bytes), float(peak_flops or 0.0), "from --memory / --peak_tflops")
    if memory_bytes is not None or peak_flops is not None:
        spec = GPU(spec.name, int(memory_bytes or spec.memory_bytes),
                   float(peak_flops if peak_flops is not None else spec.bf16_dense_flops), spec.notes)
    peak = spec.bf16_dense_flops if precision != "fp32" else None  # fp32 has no tensor-core bf16 peak
    if precision == "fp32" and peak_flops is not None:
        peak = float(peak_flops)

    T = int(block_size or m.n_positions)
    if T < 1 or T > m.n_positions:
        raise UserError(f"block_size {T} must be between 1 and the model's n_positions ({m.n_positions})")
    act_fn = activation or m.activation
    n_params = count_params(m)
    n_flops = count_params_for_flops(m)
    fpt = flops_per_token(n_flops, m.n_layer, m.n_embd, T)
    seqs_per_step = math.ceil(tokens_per_step / (T * n_processes))
    fixed_micro = None if micro_batch_size in (None, "auto") else int(micro_batch_size)
    if fixed_micro is not None and fixed_micro < 1:
        raise UserError(f"micro_batch_size must be at least 1 or 'auto', got {micro_batch_size}")
    rows = bench_rows(bench_dirs)
    bench_model = preset_name(m) or m.name

    candidates = []
    for ckpt in _grid(grad_checkpointing, (False, True), "grad_checkpointing"):
        for opt in _grid(optimizer, OPTIMIZERS[:2], "optimizer"):
            for loss in _grid(loss_impl, LOSS_IMPLS[:2], "loss implementation"):
                kw = dict(block_size=T, precision=precision, optimizer=opt, grad_checkpointing=ckpt,
                          loss_impl=loss, n_processes=n_processes, activation=act_fn, attention=attention,
                          dropout=dropout)
                best = max_micro_batch(m, memory_bytes=spec.memory_bytes, margin=margin,
                                       limit=max(seqs_per_step, fixed_micro or 1), **kw)
                if fixed_micro:
                    micro = fixed_micro
                elif best >= 1:  # same accumulation steps as `best`, fewer padding sequences
                    micro = math.ceil(seqs_per_step / math.ceil(seqs_per_step / best))
                else:
                    micro = 1
                est = estimate_memory(m, micro_batch_size=micro, **kw)
                fits = est.fits(spec.memory_bytes, margin)
                mfu, src = lookup_mfu(rows, model=bench_model, grad_checkpointing=ckpt, optimizer=opt,
                                      gpu_key=gpu_key, loss_impl=loss, block_size=T, precision=precision)
                tps = mfu * peak / fpt * n_processes if peak else None
                candidates.append(Candidate(ckpt, opt, loss, micro, est, fits, best, mfu, src, tps))

    fitting = [c for c in candidates if c.fits]
    chosen = max(fitting, key=_rank) if fitting else None
    grad_accum = tokens = None
    if chosen:
        grad_accum = math.ceil(tokens_per_step / (chosen.micro_batch_size * T * n_processes))
        tokens = chosen.micro_batch_size * T * n_processes * grad_accum
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * n_params
    max_tokens = parse_count(max_tokens) if max_tokens is not None else None
    budget = max_tokens or chinchilla
    tps = chosen.tokens_per_s if chosen else None
    notes = []
    if chosen and chosen.mfu_source == "assumed":
        notes.append(f"MFU {chosen.mfu:.2f} is an assumption (no matching row in benchmarks/*.json); "
                     "run `gpt2fit bench` on this GPU to measure it")
    if precision == "fp32" and peak_flops is None:
        notes.append("fp32 has no bf16 tensor-core peak: give --peak_tflops for a time estimate")
    if act_fn not in FUSED_ACTIVATIONS:
        fused = estimate_memory(m, micro_batch_size=1, block_size=T, precision=precision,
                                activation="gelu_pytorch_tanh", dropout=dropout, attention=attention)
        slow = estimate_memory(m, micro_batch_size=1, block_size=T, precision=precision,
                               activation=act_fn, dropout=dropout, attention=attention)
        notes.append(f"activation {act_fn} keeps {(slow.activations_per_sequence - fused.activations_per_sequence) / GiB:.2f} "
                     "GiB more per sequence than gelu_pytorch_tanh (the same tanh GELU as one fused op)")
    if n_processes > 1:
        notes.append("multi-process: DDP gradient buckets (+4 bytes/param) counted; tokens/s assumes linear scaling")
    return PlanResult(
        model=m, n_params=n_params, n_params_for_flops=n_flops, block_size=T, precision=precision,
        activation=act_fn, gpu_key=gpu_key, gpu=spec, margin=margin,
        usable_memory_bytes=usable_memory(spec.memory_bytes, margin), n_processes=n_processes,
        tokens_per_step_target=tokens_per_step, candidates=candidates, chosen=chosen, grad_accum=grad_accum,
        tokens_per_step=tokens, flops_per_token=fpt, budget_tokens=budget, budget_is_chinchilla=not max_tokens,
        time_to_budget_s=budget / tps if tps else None, training_flops=fpt * budget,
        chinchilla_tokens=chinchilla, notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def format_plan(p: PlanResult) -> str:
    m, g = p.model, p.gpu
    peak = f"{g.bf16_dense_flops / 1e12:.1f} TFLOP/s dense bf16" if g.bf16_dense_flops else "peak unknown"
    lines = [
        f"model: {m.name}  {p.n_params:,} params  (L={m.n_layer}, heads={m.n_head}, C={m.n_embd}, "
        f"V={m.vocab_size}, {p.activation})",
        f"run:   block {p.block_size}, {p.precision}, {p.n_processes} process{'es' if p.n_processes > 1 else ''}, "
        f"target {p.tokens_per_step_target:,} tokens/step",
        f"GPU:   {p.gpu_key or 'custom'} = {g.name}: {_gib(g.memory_bytes)} GiB, {peak}; plan for {_gib(p.usable_memory_bytes)} GiB "
        f"({_gib(CUDA_RESERVE_BYTES)} GiB CUDA context reserved, {p.margin:.0%} margin)",
        "",
    ]
    head = ("ckpt", "optimizer", "loss", "micro", "weights", "grads", "optim", "activ", "logits", "work", "total", "fits", "max micro")
    table = [head]
    for c in p.candidates:
        e = c.memory
        table.append((
            "on" if c.grad_checkpointing else "off", c.optimizer, c.loss_impl, str(c.micro_batch_size),
            _gib(e.weights), _gib(e.gradients), _gib(e.optimizer), _gib(e.activations), _gib(e.logits),
            _gib(e.workspace), _gib(e.total), "yes" if c.fits else "no", str(c.max_micro_batch),
        ))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        cells = [r[i].ljust(widths[i]) if i < 3 else r[i].rjust(widths[i]) for i in range(len(head))]
        lines.append("  ".join(cells).rstrip())
    lines.append("(GiB, at the micro-batch shown; total = peak of forward/backward and optimizer step; "
                 "max micro = largest micro-batch that fits)")
    lines.append("")
    c = p.chosen
    if c is None:
        lines.append("nothing fits: try --grad_checkpointing on, --optimizer adamw8bit, --loss_impl chunked, "
                     "a smaller --block_size or a smaller model")
    else:
        lines.append(f"chosen: grad_checkpointing={'on' if c.grad_checkpointing else 'off'}  optimizer={c.optimizer}  "
                     f"loss_impl={c.loss_impl}  micro_batch_size={c.micro_batch_size}")
        lines.append(f"  tokens/step:   {c.micro_batch_size} micro x {p.block_size} block x {p.n_processes} proc x "
                     f"{p.grad_accum} accum = {p.tokens_per_step:,}")
        if c.tokens_per_s:
            lines.append(f"  throughput:    {c.tokens_per_s:,.0f} tokens/s at MFU {c.mfu:.2f} ({c.mfu_source})")
        else:
            lines.append("  throughput:    n/a (unknown peak FLOP/s: give --peak_tflops)")
    lines.append(f"  FLOPs/token:   {p.flops_per_token:.3g}  (6N + 12*L*C*T, N = {p.n_params_for_flops:,} without wpe)")
    budget = "Chinchilla-optimal budget" if p.budget_is_chinchilla else "budget"
    lines.append(f"  {budget}: {format_count(p.budget_tokens)} tokens -> {format_duration(p.time_to_budget_s)}, "
                 f"{p.training_flops:.3g} training FLOPs")
    lines.append(f"  Chinchilla:    {format_count(p.chinchilla_tokens)} tokens ({CHINCHILLA_TOKENS_PER_PARAM} per parameter)")
    for n in p.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _micro(text: str) -> int | str:
    return text if text == "auto" else positive_int(text)


def load_model_config(init_from: str) -> ModelShape:
    """config.json of a local model dir / run dir, or a Hub id via transformers' AutoConfig."""
    from gpt2fit.formats import resolve_model_path

    path = Path(resolve_model_path(init_from))
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"--init_from {init_from!r}: no config.json in {path}")
        try:
            data = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--init_from {init_from!r}: cannot read {cfg_file}: {e}") from None
        data.setdefault("_name_or_path", str(init_from))
        return model_shape(data)
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(init_from)
    except Exception as e:  # offline, unknown id, not a model repo, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--init_from {init_from!r}: not a local model dir and its config could not be loaded "
                        f"from the Hugging Face Hub or its cache ({first})") from None
    shape = model_shape(cfg)
    return ModelShape(**{**shape.__dict__, "name": init_from})


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2fit plan",
        description="Will it fit? Memory by component, the largest micro-batch, gradient accumulation, "
                    "tokens/s and time to a token budget, for training a GPT-2 on one GPU.",
        epilog="example: gpt2fit plan --model gpt2-medium --gpu rtx-4070 --max_tokens 10B",
    )
    p.add_argument("--model", default=None, help=f"model preset: {', '.join(PRESETS)} (default: gpt2)")
    p.add_argument("--init_from", default=None,
                   help="plan for this model instead of a preset: a local model dir or run dir with config.json, "
                        "or a Hugging Face Hub id (read from the Hub or its offline cache)")
    p.add_argument("--block_size", type=int, default=None,
                   help="tokens per training sequence (default: the model's n_positions, 1024 for GPT-2)")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS,
                   help="bf16/fp16: autocast with fp32 master weights; fp32: no autocast (default: bf16)")
    p.add_argument("--optimizer", default="auto", choices=("auto",) + OPTIMIZERS,
                   help="adamw (8 bytes/param), adamw8bit or paged_adamw8bit (bitsandbytes, ~2 bytes/param); "
                        "auto tries adamw and adamw8bit (default: auto)")
    p.add_argument("--grad_checkpointing", default="auto", choices=("on", "off", "auto"),
                   help="recompute each block in backward to keep only block inputs; auto tries both (default: auto)")
    p.add_argument("--loss_impl", default="auto", choices=("auto",) + LOSS_IMPLS,
                   help="plain (full B*T*V logits) or chunked (gpt2fit.loss, one chunk of logits at a time; "
                        "liger is planned like chunked); auto tries plain and chunked (default: auto)")
    p.add_argument("--micro_batch_size", type=_micro, default="auto",
                   help="sequences per forward/backward, or auto for the largest that fits (default: auto)")
    p.add_argument("--tokens_per_step", type=parse_count, default=DEFAULT_TOKENS_PER_STEP,
                   help="target tokens per optimizer step; sets gradient accumulation "
                        f"(default: {DEFAULT_TOKENS_PER_STEP:,}, ~0.5M; accepts 0.5M)")
    p.add_argument("--max_tokens", type=parse_count, default=None,
                   help="token budget for the time and FLOPs estimate, e.g. 10B or 2.5e9 "
                        "(default: the Chinchilla-optimal 20 tokens per parameter)")
    p.add_argument("--gpu", default=None,
                   help=f"GPU: {', '.join(GPUS)}, or a name as torch reports it (default: rtx-4090 unless --memory is given)")
    p.add_argument("--memory", type=parse_size, default=None,
                   help="GPU memory, e.g. 12GiB, 11.5G (binary) or 12GB (decimal); overrides --gpu's memory")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="GPU dense bf16 tensor-core peak in TFLOP/s, for the time estimate; overrides --gpu's")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"fraction of memory (after the {CUDA_RESERVE_BYTES / GiB:.2f} GiB CUDA reserve) "
                        f"to keep free (default: {DEFAULT_MARGIN})")
    p.add_argument("--n_processes", type=int, default=1,
                   help="data-parallel processes (GPUs); memory is per process (default: 1)")
    p.add_argument("--activation", default=None,
                   help="MLP activation as in GPT2Config.activation_function: gelu_new (HF default, "
                        "keeps 4 extra tensors) or gelu_pytorch_tanh (fused) (default: the config's)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout probability; > 0 adds 1-byte masks (default: the config's, 0 for presets)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model and args.init_from:
        raise UserError("give --model or --init_from, not both")
    model = load_model_config(args.init_from) if args.init_from else model_shape(args.model or "gpt2")
    gpu = args.gpu if args.gpu is not None else (None if args.memory is not None else "rtx-4090")
    ckpt = {"on": True, "off": False, "auto": "auto"}[args.grad_checkpointing]
    result = plan_run(
        model, gpu=gpu, memory_bytes=args.memory,
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops is not None else None,
        block_size=args.block_size, precision=args.precision, optimizer=args.optimizer,
        grad_checkpointing=ckpt, loss_impl=args.loss_impl, micro_batch_size=args.micro_batch_size,
        tokens_per_step=args.tokens_per_step, max_tokens=args.max_tokens, n_processes=args.n_processes,
        margin=args.margin, activation=args.activation, dropout=args.dropout,
    )
    if args.gpu is None and args.memory is None:
        result.notes.insert(0, "no --gpu given: planned for an rtx-4090")
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0
