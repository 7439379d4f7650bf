"""The memory model: GPU bytes of one GPT-2 training step, by component, before anything runs.

Pure arithmetic, no torch (`gpt2fit plan`, `--micro_batch_size auto` and `gpt2fit bench` use it).
The settings are the training options (mixed_precision resolved: bf16, fp16 or no = fp32;
loss_chunk_size 0 = the plain loss). Bytes; N = parameters, B = micro-batch, T = s = block size,
C = n_embd, a = n_head, L = n_layer, V = vocab, I = MLP width 4C, act = 2 under bf16/fp16
autocast, 4 in fp32.

weights      4N fp32 master weights (Accelerate autocasts fp32 parameters), + 2 bytes per matmul
             parameter under autocast: it caches a 16-bit copy of every weight it casts until the
             forward ends, and the backward keeps them (not LayerNorms or wpe; with the chunked
             loss, not the lm_head).
gradients    4N fp32 .grad; with more than one process, DDP's gradient buckets hold another 4N
             (Accelerate's default gradient_as_bucket_view=False; PyTorch DDP docs).
optimizer    AdamW: 8N (exp_avg, exp_avg_sq in fp32), + a 4N temporary in step() (the foreach
             sqrt of exp_avg_sq), counted in the optimizer-step peak. 8-bit AdamW (bitsandbytes;
             the paged one too, its spilling to CPU not counted on): 2 bytes/param + two fp32
             absmax per 256-element block; 8 bytes/param for tensors under 4096 elements (bnb's
             min_8bit_size) and the token embedding, which bitsandbytes keeps in 32-bit. Muon: 4 bytes
             (one fp32 momentum) per block matrix, AdamW's 8 for the rest; step() works one matrix
             at a time (fp32 Nesterov update + bf16 Newton-Schulz copies, 8 bytes/element).
activations  What autograd keeps for backward. Korthikanti et al. 2022 (arXiv 2205.05198) eq. (1):
             s*b*h*(34 + 5*a*s/h) bytes in 16 bits, 5*a*s^2*b being the attention matrix. SDPA
             keeps no s x s matrix (q, k, v, the output and a 4-byte logsumexp per head per token;
             it recomputes the scores in backward). HF's GPT2Block keeps, per token per layer (the
             residual stream is fp32 under autocast: LayerNorm runs in fp32, the add promotes):
               2 LayerNorm inputs 2*4C (+ mean and rstd, 2*8)   c_attn input (16-bit ln_1 out) act*C
               q, k, v (views of c_attn's output) 3*act*C        attention output (c_proj in) act*C
               logsumexp 4*a      c_fc input act*C      dropout masks (p > 0, 1 byte each) 2*C
               MLP activation: fused GELU (gelu_pytorch_tanh) input + output 2*act*I; gelu_new
               (HF's GPT-2 default, a Python expression) (12 + 2*act)*I: under CUDA autocast `pow`
               runs in fp32 (a 4-byte copy), and tanh(...), 1+tanh(...), 0.5*x and the product
               are all kept
             = 36C (fused) / 84C (gelu_new) bytes in bf16 (Korthikanti's 34C assumes a 16-bit
             residual stream, -4C, and 2 masks, +2C). Outside the layers: token ids (8) + ln_f input
             (4C + 8) (+ an embedding dropout mask). Eager attention adds the s x s terms per token:
             a*s*(4 + act) (fp32 softmax output + its 16-bit copy), a*s*(4 + 1 + act) with dropout
             (fp32: 4, and 4 + 1 + 4). Gradient checkpointing (HF checkpoints every GPT2Block) keeps
             each block's fp32 input (4C per token per layer) plus one block's full set during its
             recompute. tests/test_plan.py measures the fp32 numbers on the CPU (saved-tensor hooks,
             SDPA): they agree to within 1%.
logits       plain loss: B*T*(12V + act*C): at the start of backward, autograd holds the fp32
             log-softmax output (4 per logit) and allocates its gradient (4) and the logits' (4);
             the 16-bit logits and their fp32 upcast exist only during the forward. Chunked loss
             (n = loss_chunk_size rows at a time): the gradients it keeps, 4VC (fp32 weight
             gradient) + 4C per token (hidden gradient), plus the larger of the forward (a 16-bit
             weight copy act*VC and one chunk of fp32 logits and their 16-bit copy (4 + act)*n*V,
             fp32: 4*n*V; or, if larger, the 16-bit copy and an 8192-row slice of the
             weight-gradient product with its fp32 cast) and the backward (the scaled copies of
             both gradients). Both match torch.profiler's CPU peaks (tests).
workspace    256 MiB (cuBLAS/cuDNN workspaces, SDPA scratch) + the 16-bit gradient of the largest
             weight (lm_head, act*V*C) before it is added to its fp32 .grad + 10% of activations
             and logits for caching-allocator fragmentation.

The peak is max(forward/backward: the sum of the components, optimizer step: fp32 weights +
gradients + optimizer states + step temporaries + 256 MiB). Usable memory: the GPU's total minus
CUDA_RESERVE_BYTES (0.75 GiB of CUDA context, kernels and library handles PyTorch does not see),
minus a safety margin (10%).

Engines (``engine``, as accelerate_configs/ set them up; W = processes; bf16 figures: in fp32 the
weights and gradients take 4 bytes, with no master copy). Rajbhandari et al. 2020 (ZeRO, arXiv
1910.02054) fig. 1, K = 12; Ren et al. 2021 (ZeRO-Offload, arXiv 2101.06840).
zero1, zero2   DeepSpeed's module is bf16 (2N) and runs without autocast (no 16-bit copies; a 2-byte
               residual stream). Master weights + AdamW states 12N/W; gradients 2N (zero1), 2N/W (zero2);
               + the reduce bucket, 5e8 elements (DeepSpeed's default; Accelerate fills "auto" sizes from
               the hidden size only in a JSON config).
zero3          16N/W + the bucket + the working set: tensors under 1e5 elements whole on every GPU, the
               rest gathered up to stage3_max_live_parameters (1e9 elements, prefetch included).
zero2_offload  GPU: 2N + the bucket. Host: master weights, AdamW states, fp32 gradients, 16N.
zero3_offload  GPU: the working set + the bucket. Host: the same + the bf16 weights, 18N.
fsdp2          16N/W (fp32 shards) + two blocks' bf16 weights gathered (computing, prefetched) + the root
               module's (wte, wpe, ln_f; not resharded) + one block's bf16 gradient. Accelerate also
               autocasts: activations as under DDP. fsdp2_offload: GPU: the gathered pieces; host 16N.
Host RAM (the machine): each process first builds the fp32 model (4N), cast or moved before the
engine builds its state: max(W*4N, offloaded state) + HOST_PROCESS_BYTES per process.
DeepSpeed and FSDP run AdamW only (gpt2fit refuses the 8-bit optimizers there).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from gpt2fit.config import FIELDS, GPT2_POSITIONS, GPT2_VOCAB, PRESETS
from gpt2fit.errors import UserError, suggest
from gpt2fit.units import GiB, MiB

# what gpt2fit trains with: train.model builds presets with, and swaps a loaded model's gelu_new
# for, gelu_pytorch_tanh (the same function as one op)
DEFAULT_ACTIVATION = "gelu_pytorch_tanh"
# one autograd op that keeps only its input; any other activation is costed as gelu_new
FUSED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "relu", "silu", "swish", "gelu_accurate_fused")
# the training options' choices ("auto" mixed precision is resolved before it gets here)
OPTIMIZERS = FIELDS["optimizer"][1].metadata["choices"]
ATTENTIONS = FIELDS["attn_implementation"][1].metadata["choices"]  # only eager keeps T x T scores
PRECISIONS = tuple(c for c in FIELDS["mixed_precision"][1].metadata["choices"] if c != "auto")

CUDA_RESERVE_BYTES = int(0.75 * GiB)  # CUDA context + kernels + cuBLAS/cuDNN handles, per GPU
DEFAULT_MARGIN = 0.10  # keep 10% of the usable memory free
WORKSPACE_FIXED_BYTES = 256 * MiB
FRAGMENTATION = 0.10  # caching-allocator slack, as a fraction of activations + logits
LOSS_CHUNK_SIZE = 1024  # the chunk the planner tries; = gpt2fit.train.loss.DEFAULT_CHUNK_SIZE
LOSS_VOCAB_SLICE = 8192  # gpt2fit.train.loss._VOCAB_SLICE: weight-gradient rows accumulated at a time
BNB_BLOCK_SIZE = 256  # bitsandbytes 8-bit optimizer state block (one fp32 absmax per block)
BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit optimizer state
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "workspace")
# in order of preference: the least data moved per step first (sharding, then offload over PCIe)
ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp2", "zero2_offload", "zero3_offload", "fsdp2_offload")
DS_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's reduce_bucket_size default
DS_PERSISTENCE = 100_000  # stage3_param_persistence_threshold: smaller tensors stay whole on each GPU
DS_MAX_LIVE = 1_000_000_000  # stage3_max_live_parameters
HOST_PROCESS_BYTES = 2 * GiB  # Python, torch and the CUDA libraries per process: an allowance, not measured


def dtype_name(mixed_precision: str) -> str:
    """The activations' dtype of a resolved mixed_precision: bf16, fp16 or fp32 (for "no")."""
    return "fp32" if mixed_precision == "no" else mixed_precision


# -- Model shapes and parameter counts --------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The GPT-2 hyperparameters the memory model needs (a GPT2Config reduced to numbers)."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int = GPT2_POSITIONS
    vocab_size: int = GPT2_VOCAB
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    activation: str = DEFAULT_ACTIVATION
    tie_word_embeddings: bool = True
    dropout: float = 0.0  # resid/attn/embd dropout probability

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd


def scratch_shape(preset: str | None = None, n_layer: int | None = None, n_head: int | None = None,
                  n_embd: int | None = None, **kw) -> ModelShape:
    """A model built from scratch as train.model.build_config builds it: the preset's sizes (gpt2 when
    none) under the explicit ones. Named after the preset, or custom-L<n_layer>-H<n_head>-C<n_embd>."""
    if (preset or "gpt2") not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}.{suggest(preset, PRESETS)} Known: {', '.join(PRESETS)}")
    dims = dict(PRESETS[preset or "gpt2"])
    given = {k: v for k, v in dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd).items() if v is not None}
    dims.update(given)
    name = "custom-L{n_layer}-H{n_head}-C{n_embd}".format(**dims) if given else preset or "gpt2"
    return ModelShape(name, **dims, **kw)


def model_shape(model_cfg: Any) -> ModelShape:
    """A preset name, a ModelShape, a GPT2Config-like object or a config.json dict -> ModelShape."""
    if isinstance(model_cfg, ModelShape):
        return model_cfg
    if isinstance(model_cfg, str):
        return scratch_shape(model_cfg)
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k, d=None: getattr(model_cfg, k, d)
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if get(k) is None]
    if missing:
        kind = get("model_type") or type(model_cfg).__name__
        raise UserError(f"not a GPT-2 config ({kind}): it has no {', '.join(missing)}")
    activation = str(get("activation_function") or DEFAULT_ACTIVATION)
    return ModelShape(
        name=str(get("name_or_path") or get("_name_or_path") or "custom"),
        n_layer=int(get("n_layer")), n_head=int(get("n_head")), n_embd=int(get("n_embd")),
        n_positions=int(get("n_positions") or GPT2_POSITIONS), vocab_size=int(get("vocab_size")),
        n_inner=get("n_inner"), activation=DEFAULT_ACTIVATION if activation == "gelu_new" else activation,
        tie_word_embeddings=bool(get("tie_word_embeddings", True)),
        dropout=max(float(get(k) or 0.0) for k in ("resid_pdrop", "attn_pdrop", "embd_pdrop")),
    )


def preset_name(model_cfg: Any) -> str | None:
    """The preset with the same shape (e.g. a local copy of the Hub's "gpt2"), or None."""
    def dims(s: ModelShape) -> tuple:
        return s.n_layer, s.n_head, s.n_embd, s.n_positions, s.vocab_size, s.inner

    return next((name for name in PRESETS if dims(model_shape(name)) == dims(model_shape(model_cfg))), None)


def param_tensors(model_cfg: Any) -> list[tuple[str, int]]:
    """(name, numel) of every parameter tensor of GPT2LMHeadModel (tied lm_head counted once)."""
    m = model_shape(model_cfg)
    C, I = m.n_embd, m.inner
    block = {"ln_1.weight": C, "ln_1.bias": C, "attn.c_attn.weight": C * 3 * C, "attn.c_attn.bias": 3 * C,
             "attn.c_proj.weight": C * C, "attn.c_proj.bias": C, "ln_2.weight": C, "ln_2.bias": C,
             "mlp.c_fc.weight": C * I, "mlp.c_fc.bias": I, "mlp.c_proj.weight": I * C, "mlp.c_proj.bias": C}
    out = [("wte", m.vocab_size * C), ("wpe", m.n_positions * C)]
    out += [(f"h.{i}.{name}", n) for i in range(m.n_layer) for name, n in block.items()]
    out += [("ln_f.weight", C), ("ln_f.bias", C)]
    if not m.tie_word_embeddings:
        out.append(("lm_head.weight", m.vocab_size * C))
    return out


def count_params(model_cfg: Any) -> int:
    """Exact parameter count of GPT2LMHeadModel: gpt2 = 124,439,808; gpt2-medium = 354,823,168."""
    return sum(n for _, n in param_tensors(model_cfg))


def count_params_for_flops(model_cfg: Any) -> int:
    """N in 6N + 12LCT: every parameter except the position embedding (nanoGPT's convention): the
    tied wte/lm_head's matmul costs 2*V*C FLOPs per token like any weight; embedding lookups are free."""
    m = model_shape(model_cfg)
    return count_params(m) - m.n_positions * m.n_embd


# -- The estimate -----------------------------------------------------------------------------
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
    host: int = 0  # host RAM of the machine (all processes): start-up copies, offloaded state
    forward_backward: int = field(init=False)  # the sum of the components
    total: int = field(init=False)  # the peak: max(forward_backward, optimizer_step)

    def __post_init__(self):
        self.forward_backward = sum(getattr(self, k) for k in COMPONENTS)
        self.total = max(self.forward_backward, self.optimizer_step)

    def fits(self, memory_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
        """True when ``total`` fits in a GPU of ``memory_bytes`` after the CUDA reserve and margin."""
        return self.total <= usable_memory(memory_bytes, margin)


def usable_memory(memory_bytes: int, margin: float = DEFAULT_MARGIN) -> int:
    """Bytes a run may plan for: (total - CUDA_RESERVE_BYTES) * (1 - margin)."""
    return int(max(0, memory_bytes - CUDA_RESERVE_BYTES) * (1.0 - margin))


def check_choice(what: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}."
                        f"{suggest(str(value), map(str, choices))}")


def _optimizer_bytes(tensors: list[tuple[str, int]], optimizer: str) -> tuple[int, int]:
    """(state bytes, extra bytes allocated during optimizer.step())."""
    n = sum(k for _, k in tensors)
    if optimizer == "adamw":
        return 8 * n, 4 * n
    if optimizer == "muon":  # (bf16 momentum, which torch's Muon does not offer, would save 2 bytes each)
        matrices = [k for name, k in tensors if name.startswith("h.") and name.endswith("weight") and "ln_" not in name]
        rest = n - sum(matrices)
        return 4 * sum(matrices) + 8 * rest, max(8 * max(matrices), 4 * rest)
    return sum(8 * k if name == "wte" or k < BNB_MIN_8BIT_SIZE else 2 * k + 8 * math.ceil(k / BNB_BLOCK_SIZE)
               for name, k in tensors), 0


def engine_bytes(tensors: list[tuple[str, int]], engine: str, W: int, mixed: bool) -> tuple[int, int, int, int]:
    """(weights, gradients, AdamW states) per GPU and the offloaded host bytes of the machine, under
    a DeepSpeed or FSDP2 engine (see the module docstring)."""
    N = sum(k for _, k in tensors)
    pw = 2 if mixed else 4  # bytes per parameter of the compute weights and their gradients
    if engine.startswith("fsdp2"):
        block = sum(k for name, k in tensors if name.startswith("h.0."))
        gathered = pw * (2 * block + sum(k for name, k in tensors if not name.startswith("h.")))
        if engine.endswith("offload"):
            return gathered, pw * block, 0, 16 * N
        return 4 * N // W + gathered, 4 * N // W + pw * block, 8 * N // W, 0
    states, bucket = (12 if mixed else 8) * N, pw * DS_REDUCE_BUCKET
    small = sum(k for _, k in tensors if k < DS_PERSISTENCE)
    gathered = pw * (small + min(N - small, DS_MAX_LIVE))
    if engine == "zero2_offload":
        return pw * N, bucket, 0, states + 4 * N
    if engine == "zero3_offload":
        return gathered, bucket, 0, states + 4 * N + pw * N
    weights = pw * (N - small) // W + gathered if engine == "zero3" else pw * N
    return weights, (pw * N if engine == "zero1" else pw * N // W) + bucket, states // W, 0


def estimate_memory(model_cfg: Any, *, block_size: int | None = None, micro_batch_size: int = 1,
                    mixed_precision: str = "bf16", optimizer: str = "adamw", grad_checkpointing: bool = False,
                    loss_chunk_size: int = 0, attn_implementation: str = "sdpa", dropout: float | None = None,
                    activation: str | None = None, n_processes: int = 1, engine: str = "ddp") -> MemoryEstimate:
    """Peak GPU memory of a training micro-step (per process), by component, and the host RAM, for a
    preset name, a ModelShape, a GPT2Config-like object or a config.json dict. ``activation`` /
    ``dropout`` default to the config's (a config's gelu_new counts as gelu_pytorch_tanh, which
    gpt2fit swaps in)."""
    m = model_shape(model_cfg)
    check_choice("mixed_precision", mixed_precision, PRECISIONS)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("attn_implementation", attn_implementation, ATTENTIONS)
    check_choice("engine", engine, ENGINES)
    if engine != "ddp" and optimizer != "adamw":
        raise UserError(f"optimizer={optimizer} runs on one device or under DDP, not {engine}, which shards or "
                        "offloads the AdamW states itself: use --optimizer adamw (or --engine ddp).")
    T, B = int(block_size or m.n_positions), int(micro_batch_size)
    if not 1 <= T <= m.n_positions:
        raise UserError(f"block_size {T} must be between 1 and the model's n_positions ({m.n_positions})")
    if B < 1:
        raise UserError(f"micro_batch_size must be at least 1, got {B}")
    dropout = m.dropout if dropout is None else float(dropout)
    mixed, ddp = mixed_precision != "no", engine == "ddp"
    act = 2 if mixed else 4
    rb = 2 if mixed and engine.startswith("zero") else 4  # residual stream: fp32 under autocast
    C, V, L = m.n_embd, m.vocab_size, m.n_layer
    tokens = B * T

    tensors = param_tensors(m)
    N = sum(k for _, k in tensors)
    # parameters that go through a matmul (autocast keeps a 16-bit copy): all but wpe and LayerNorms
    matmul_params = sum(k for name, k in tensors if name != "wpe" and "ln_" not in name)
    if loss_chunk_size:  # the chunked loss casts the lm_head weight itself (counted in logits)
        matmul_params -= V * C
    opt_state, opt_temp = _optimizer_bytes(tensors, optimizer)
    if ddp:
        weights, host = 4 * N + (2 * matmul_params if mixed else 0), 0
        gradients = 4 * N * (2 if n_processes > 1 else 1)
        step = 4 * N + gradients + opt_state + opt_temp
    else:
        weights, gradients, opt_state, host = engine_bytes(tensors, engine, n_processes, mixed)
        step = weights + gradients + opt_state + (0 if engine.endswith("offload") else opt_temp // n_processes)
    host = max(host, n_processes * 4 * N) + n_processes * HOST_PROCESS_BYTES

    # what one GPT2Block keeps per token: LayerNorm inputs (fp32 residual stream, also under autocast),
    # c_attn input + q, k, v + attention output, logsumexp, c_fc input, the MLP activation, dropout masks
    I, a, fused = m.inner, m.n_head, (activation or m.activation) in FUSED_ACTIVATIONS
    per_layer = (2 * (rb * C + 8) + 5 * act * C + 4 * a + act * C + (2 * act * I if fused else (12 + 2 * act) * I)
                 + (2 * C if dropout > 0 else 0))
    if attn_implementation == "eager":  # fp32 softmax output (+ its 16-bit copy, or mask + output)
        per_layer += a * T * (4 + (1 + act if dropout > 0 else act if mixed else 0))
    non_layer = 8 + (rb * C + 8) + (C if dropout > 0 else 0)  # ids, ln_f input (+ embedding dropout mask)
    if grad_checkpointing:  # each block's fp32 input, + one block's full set during its recompute
        per_sequence = T * (L * rb * C + non_layer + per_layer)
    else:
        per_sequence = T * (L * per_layer + non_layer)
    activations = B * per_sequence

    if not loss_chunk_size:
        logits = tokens * (12 * V + act * C)
    else:
        rows = min(loss_chunk_size, tokens)
        saved = 4 * V * C + tokens * 4 * C  # fp32 weight gradient + hidden gradient (fp32 ln_f output)
        if mixed:  # weight copy + max(fp32 chunk and its 16-bit copy, 16-bit copy + one vocab slice
            # of the weight-gradient product and its fp32 cast)
            slice_tmp = min(V, LOSS_VOCAB_SLICE) * C * (act + 4)
            forward_extra = (act * V * C if ddp else 0) + max((4 + act) * rows * V, act * rows * V + slice_tmp)
        else:
            forward_extra = 4 * rows * V
        logits = saved + max(forward_extra, saved)  # backward: the scaled copies handed to autograd

    workspace = WORKSPACE_FIXED_BYTES + act * V * C + int(FRAGMENTATION * (activations + logits))
    return MemoryEstimate(
        weights=weights, gradients=gradients, optimizer=opt_state, activations=activations, logits=logits,
        workspace=workspace, optimizer_step=step + WORKSPACE_FIXED_BYTES, activations_per_sequence=per_sequence,
        micro_batch_size=B, block_size=T, host=host)


def max_micro_batch(model_cfg: Any, *, memory_bytes: int, margin: float = DEFAULT_MARGIN, limit: int = 1024,
                    **settings) -> int:
    """Largest micro-batch (<= ``limit``) whose estimate fits ``memory_bytes``; 0 if even 1 doesn't.
    ``settings`` are those of ``estimate_memory`` (block_size, mixed_precision, optimizer, ...)."""
    def too_big(b: int) -> bool:
        return not estimate_memory(model_cfg, micro_batch_size=b, **settings).fits(memory_bytes, margin)

    # memory grows with the micro-batch: the sizes 1..limit that fit come first, then those that do not
    return bisect.bisect_left(range(1, int(limit) + 1), True, key=too_big)


def memory_settings(cfg, mixed_precision: str) -> dict:
    """``estimate_memory``'s settings of a TrainConfig, with its mixed precision resolved."""
    m = cfg.model
    return dict(block_size=m.block_size, mixed_precision=mixed_precision, optimizer=cfg.optim.optimizer,
                grad_checkpointing=m.grad_checkpointing, loss_chunk_size=m.loss_chunk_size,
                attn_implementation=m.attn_implementation, dropout=m.dropout)
