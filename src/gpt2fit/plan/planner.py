"""`gpt2fit plan`: will it fit? Memory, micro-batch, accumulation and time for a GPT-2 run, before it runs.

``gpt2fit plan --preset gpt2-medium --gpu rtx-4070`` prints, for each candidate setting (gradient
checkpointing off/on x AdamW / 8-bit AdamW x plain / chunked loss; an option given is fixed), the
memory by component (``plan.memory``), whether it fits and the largest micro-batch that does; then
the chosen setting as train flags, the accumulation that reaches the target tokens per optimizer
step, tokens/s, the time to the token budget, the training FLOPs and the Chinchilla-optimal token
count. The options are `gpt2fit train`'s. No torch: a Hub model's config.json comes through
huggingface_hub. ``--engine`` plans under one of Accelerate's DeepSpeed / FSDP2 engines instead of
DDP; when nothing fits under DDP, the plan tries them all and names the accelerate_configs/ file.

Speed: tokens/s = MFU * peak FLOP/s / FLOPs per token (PaLM appendix B / nanoGPT's
estimate_mfu): 6N + 12*L*C*T FLOPs per token, forward + backward, where N counts every parameter
except the position embedding (the tied wte/lm_head matmul costs 2VC per token; embedding
lookups are free); 12*L*C*T is the attention score and value matmuls, counted without the
causal-mask saving, as nanoGPT does. MFU comes from benchmarks/*.json when a row matches (model,
checkpointing, optimizer, loss, device, block, precision), else it is an assumption: 0.40 without
checkpointing, 0.30 with it (recomputing the forward costs 2N of 8N, and FLOPs are counted
without the recompute). An offload engine's micro-step also waits for its PCIe traffic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from huggingface_hub import hf_hub_download

from gpt2fit import config, options
from gpt2fit.errors import UserError
from gpt2fit.formats import resolve_model_path
from gpt2fit.hardware import GPU, GPUS, flops_per_token, gpu_key_for_device, resolve_gpu, resolve_precision
from gpt2fit.options import opt
from gpt2fit.plan.memory import (
    CUDA_RESERVE_BYTES, DEFAULT_MARGIN, ENGINES, FUSED_ACTIVATIONS, LOSS_CHUNK_SIZE, OPTIMIZERS, MemoryEstimate,
    ModelShape, count_params, count_params_for_flops, dtype_name, estimate_memory, max_micro_batch,
    model_shape, preset_name, scratch_shape, usable_memory,
)
from gpt2fit.units import GiB, format_bytes, format_count, format_duration, parse_count, parse_size

ASSUMED_MFU = {False: 0.40, True: 0.30}  # by gradient checkpointing
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022
DEFAULT_TOKENS_PER_STEP = 524288  # 2**19, ~0.5M tokens per optimizer step (GPT-2 124M in nanoGPT)
PCIE_BYTES_PER_S = 25e9  # host <-> GPU as PCIe 4.0 x16 achieves it (an assumption), for offload's traffic
# bytes per parameter an offload engine moves up per forward, backward or recompute: the weights that live
# on the host (fsdp2: fp32, cast on the GPU); + 2 (16-bit gradients down) per micro-step
OFFLOAD_UP = {"zero2_offload": 0, "zero3_offload": 2, "fsdp2_offload": 4}


# -- Options: the training ones, under their names, and the plan's own ------------------------
def train_options(name: str, doc: str, names: Iterable[str], **changes: dict) -> type:
    """A section of some `gpt2fit train` options: the same names, types, help and checks.
    ``changes`` maps a name to what differs: its ``default``, ``aliases``, a ``note`` after the help.
    (Generic over gpt2fit.options; the bench uses it too.)"""
    spec = []
    for n in names:
        _, fl, hint = config.FIELDS[n]
        meta = {**fl.metadata, **changes.get(n, {})}
        default = meta.pop("default", fl.default)
        text = f"{meta.pop('help')} {meta.pop('note', '')}".strip()
        spec.append((n, hint, opt(default, text, **meta)))
    return dataclasses.make_dataclass(name, spec, namespace={"__doc__": doc})


TRIED = "Not given: the plan tries"
PlanTrain = train_options(
    "PlanTrain", "Training options (as `gpt2fit train` takes them)",
    ("preset", "init_from", "n_layer", "n_head", "n_embd", "block_size", "pad_vocab_to", "dropout",
     "attn_implementation", "grad_checkpointing", "optimizer", "loss_chunk_size", "micro_batch_size",
     "tokens_per_step", "mixed_precision", "max_memory", "max_tokens"),
    preset=dict(aliases=("--model",)),
    block_size=dict(default=None, note="Not given: 1024, or an init_from model's n_positions."),
    grad_checkpointing=dict(default=None, note=f"{TRIED} false and true."),
    optimizer=dict(default=None, note=f"{TRIED} adamw and adamw8bit."),
    loss_chunk_size=dict(default=None, note=f"{TRIED} 0 and {LOSS_CHUNK_SIZE}."),
    micro_batch_size=dict(default="auto"),
    tokens_per_step=dict(default=str(DEFAULT_TOKENS_PER_STEP)),
    mixed_precision=dict(note="auto: bf16 (or what ACCELERATE_MIXED_PRECISION says)."),
    max_memory=dict(note="The plan is for the smaller of this and the GPU's memory."),
    max_tokens=dict(note="Here: the token budget for the time and FLOPs estimate (not given: Chinchilla-optimal, "
                         f"{CHINCHILLA_TOKENS_PER_PARAM} tokens per parameter)."),
)


@dataclass
class PlanArgs:
    """The GPU and the output"""

    gpu: str | None = opt(None, f"GPU: {', '.join(GPUS)}, or a name as torch reports it (not given: rtx-4090, "
                                "unless --memory describes the GPU).")
    memory: str | None = opt(None, "GPU memory, e.g. 12GiB, 11.5G (binary) or 12GB (decimal); overrides --gpu's.")
    peak_tflops: float | None = opt(None, "GPU dense bf16 tensor-core peak in TFLOP/s, for the time estimate; "
                                          "overrides --gpu's.", minimum=0, exclusive=True)
    margin: float = opt(DEFAULT_MARGIN, f"Fraction of memory (after the {CUDA_RESERVE_BYTES / GiB:.2f} GiB CUDA "
                                        "reserve) to keep free, in [0, 1).", minimum=0)
    n_processes: int = opt(1, "Data-parallel processes (GPUs); memory is per process.", minimum=1)
    engine: str | None = opt(None, "Accelerate's engine: ddp (one GPU or DDP), DeepSpeed zero1/2/3, fsdp2; _offload: "
                                   "state in host RAM. Not given: ddp, then the others if nothing fits.", choices=ENGINES)
    host_memory: str | None = opt(None, "Host RAM, e.g. 32GiB: plans that need more do not fit (not given: "
                                        "not checked, only shown).")
    json: bool = opt(False, "Print the plan as JSON instead of a table.")


RENAMED = {
    "--precision": "--mixed_precision (bf16, fp16, or no for fp32)",
    "--loss_impl": f"--loss_chunk_size (0 = plain, e.g. {LOSS_CHUNK_SIZE} = chunked; not given = both)",
    "--activation": "gone: gpt2fit trains a fused GELU (a config's gelu_new runs as gelu_pytorch_tanh), "
                    "and the plan counts the model's own activation",
}


# -- Throughput: measured MFU from benchmarks/, else an assumption ----------------------------
_BENCH_KEYS = ("model", "grad_checkpointing", "optimizer", "mfu", "device")
# a bench grid varies other levers too: only rows at the default settings describe a plain run
_DEFAULT_LEVERS = {"compile": False, "attn_implementation": "sdpa", "sdpa_backend": "auto", "tf32": True,
                   "host_sync": "step"}


def bench_rows(bench_dirs: Iterable[str | os.PathLike] | None = None) -> list[dict]:
    """Rows with model, grad_checkpointing, optimizer, mfu and device from benchmarks/*.json.

    Any JSON layout is accepted (a list of rows, {"results": [...]}, nested): every object that
    carries those keys is a row; each gets "_file". Unreadable files are skipped.
    """
    rows: list[dict] = []
    for d in _bench_dirs(bench_dirs):
        for f in sorted(Path(d).glob("*.json")):
            try:
                _walk(json.loads(f.read_text()), f"{Path(d).name}/{f.name}", rows)
            except (OSError, ValueError):
                continue
    return rows


def _bench_dirs(bench_dirs: Iterable[str | os.PathLike] | None) -> list[Path]:
    if bench_dirs is None:  # benchmarks/ of the working directory and of the repository
        roots = {p.resolve() for p in (Path.cwd(), Path(__file__).resolve().parents[3])}
        return sorted(p / "benchmarks" for p in roots if (p / "benchmarks").is_dir())
    return [Path(d) for d in bench_dirs]


def _walk(obj: Any, src: str, rows: list[dict]) -> None:
    if isinstance(obj, dict) and all(k in obj for k in _BENCH_KEYS):
        rows.append({**obj, "_file": src})
    for v in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ():
        _walk(v, src, rows)


def muon_token_fraction(bench_dirs: Iterable[str | os.PathLike] | None = None) -> tuple[float, str] | None:
    """(tokens Muon needed to reach AdamW's final val loss / AdamW's, the file) from the time-to-quality benchmark."""
    for d in _bench_dirs(bench_dirs):
        f = d / "time_to_quality" / "result.json"
        try:
            frac = json.loads(f.read_text())["summary"]["token_fraction"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(frac, (int, float)) and 0 < frac:
            return float(frac), f"{d.name}/time_to_quality/result.json"
    return None


def lookup_mfu(rows: list[dict], *, model: str, grad_checkpointing: bool, optimizer: str, gpu_key: str | None,
               loss_chunk_size: int | None = None, block_size: int | None = None,
               mixed_precision: str | None = None) -> tuple[float, str]:
    """(MFU, where it came from): the median of matching bench rows, else ASSUMED_MFU."""
    want = {"loss_impl": None if loss_chunk_size is None else "chunked" if loss_chunk_size else "plain",
            "block_size": block_size, "precision": mixed_precision and dtype_name(mixed_precision)}
    want.update(_DEFAULT_LEVERS, model=model, optimizer=optimizer)
    found = []
    for r in rows:
        mfu = r["mfu"]
        if not isinstance(mfu, (int, float)) or not 0 < mfu < 1 or r.get("oom") or r.get("error"):
            continue
        ckpt = str(r["grad_checkpointing"]).strip().lower() in ("1", "true", "yes", "on")
        if gpu_key is None or gpu_key_for_device(str(r["device"])) != gpu_key or ckpt != grad_checkpointing:
            continue
        if not any(v is not None and k in r and str(r[k]) != str(v) for k, v in want.items()):
            found.append((mfu, r))
    if not found:
        return ASSUMED_MFU[bool(grad_checkpointing)], "assumed"
    found.sort(key=lambda x: x[0])
    mfu, row = found[len(found) // 2]
    return mfu, f"measured ({row['_file']}, {row['device']}, {len(found)} row{'s' if len(found) > 1 else ''})"


# -- The plan ---------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One setting: memory at ``micro_batch_size`` and the largest micro-batch that fits."""

    grad_checkpointing: bool
    optimizer: str
    loss_chunk_size: int
    micro_batch_size: int
    memory: MemoryEstimate
    fits: bool
    max_micro_batch: int
    mfu: float
    mfu_source: str
    tokens_per_s: float | None  # all processes together
    engine: str = "ddp"


@dataclass
class PlanResult:
    model: ModelShape
    n_params: int
    n_params_for_flops: int
    block_size: int
    mixed_precision: str
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
    cuda_reserve_bytes: int = CUDA_RESERVE_BYTES
    engine: str = "ddp"
    alternatives: list[Candidate] = field(default_factory=list)  # each other engine's best, when ddp fits nothing
    host_memory_bytes: int | None = None


def _rank(c: Candidate) -> tuple:
    """Higher is better: throughput, then the exact optimizer, then a bigger micro-batch, then
    the simpler loss. Checkpointing only wins when it is all that fits (its MFU is lower)."""
    return (c.tokens_per_s or c.mfu, c.optimizer == "adamw", c.optimizer != "paged_adamw8bit",
            c.micro_batch_size, c.loss_chunk_size == 0)


def plan_run(model_cfg: Any = "gpt2", *, gpu: str | None = "rtx-4090", memory_bytes: int | None = None,
             max_memory: int | None = None, peak_flops: float | None = None, block_size: int | None = None,
             mixed_precision: str = "bf16", optimizer: str | None = None, grad_checkpointing: bool | None = None,
             loss_chunk_size: int | None = None, micro_batch_size: int | None = None,
             tokens_per_step: int | str = DEFAULT_TOKENS_PER_STEP, max_tokens: int | str | None = None,
             n_processes: int = 1, margin: float = DEFAULT_MARGIN, attn_implementation: str = "sdpa",
             dropout: float | None = None, bench_dirs: Iterable[str | os.PathLike] | None = None,
             engine: str | None = None, host_memory: int | None = None) -> PlanResult:
    """Memory by component for each candidate setting, the chosen one, accumulation and time.

    ``optimizer`` / ``grad_checkpointing`` / ``loss_chunk_size`` = None try adamw and adamw8bit /
    off and on / 0 and LOSS_CHUNK_SIZE; a value fixes it. ``micro_batch_size=None``: each candidate's
    largest that fits (at most the sequences of one optimizer step), lowered to the smallest with the
    same accumulation steps (max 50 of 512 sequences -> 11 steps -> micro 47). ``gpu``: a GPUS key or
    device name; ``memory_bytes`` / ``peak_flops`` override its memory / peak, or describe a GPU
    alone (``gpu=None``); ``max_memory`` caps the memory as train's does. Several processes: data
    parallelism, scaling linearly. ``engine`` None: ddp, and if nothing fits (with AdamW), each other
    engine's best in ``alternatives``, the first that fits chosen. ``host_memory``: host RAM to fit."""
    m = model_shape(model_cfg)
    tokens_per_step = parse_count(tokens_per_step)
    if not 0 <= margin < 1 or n_processes < 1 or tokens_per_step < 1:
        raise UserError(f"margin={margin} must be in [0, 1), n_processes={n_processes} and "
                        f"tokens_per_step={tokens_per_step} at least 1")
    gpu_key: str | None = None
    if gpu is not None:
        gpu_key, spec = resolve_gpu(gpu)
    elif memory_bytes is None:
        raise UserError("describe the GPU: give a GPU name (--gpu) or its memory (--memory 12GiB)")
    else:
        spec = GPU("custom GPU", int(memory_bytes), float(peak_flops or 0.0), "from --memory / --peak_tflops")
    full = int(memory_bytes or spec.memory_bytes)
    spec = dataclasses.replace(spec, memory_bytes=min(full, max_memory or full), bf16_dense_flops=float(
        peak_flops if peak_flops is not None else spec.bf16_dense_flops))
    # fp32 has no tensor-core bf16 peak: only a given one counts
    peak = spec.bf16_dense_flops if mixed_precision != "no" or peak_flops is not None else None

    T = int(block_size or m.n_positions)  # (estimate_memory checks it, and the precision)
    n_params = count_params(m)
    n_flops = count_params_for_flops(m)
    fpt = flops_per_token(n_flops, m.n_layer, m.n_embd, T)
    seqs_per_step = math.ceil(tokens_per_step / (T * n_processes))
    rows = bench_rows(bench_dirs)
    bench_model = preset_name(m) or m.name

    def grid(eng: str) -> list[Candidate]:
        out = []
        for ckpt in [grad_checkpointing] if grad_checkpointing is not None else [False, True]:
            for optim in [optimizer] if optimizer is not None else OPTIMIZERS[:2] if eng == "ddp" else ["adamw"]:
                for chunk in [loss_chunk_size] if loss_chunk_size is not None else [0, LOSS_CHUNK_SIZE]:
                    kw = dict(block_size=T, mixed_precision=mixed_precision, optimizer=optim, grad_checkpointing=ckpt,
                              loss_chunk_size=chunk, n_processes=n_processes, attn_implementation=attn_implementation,
                              dropout=dropout, engine=eng)
                    best = max_micro_batch(m, memory_bytes=spec.memory_bytes, margin=margin,
                                           limit=max(seqs_per_step, micro_batch_size or 1), **kw)
                    # auto: the same accumulation steps as `best`, with fewer padding sequences
                    micro = micro_batch_size or (math.ceil(seqs_per_step / math.ceil(seqs_per_step / best))
                                                 if best else 1)
                    est = estimate_memory(m, micro_batch_size=micro, **kw)
                    # bench rows are runs without an engine: an engine's MFU is the assumption
                    mfu, src = lookup_mfu(rows if eng == "ddp" else [], model=bench_model, grad_checkpointing=ckpt,
                                          optimizer=optim, gpu_key=gpu_key, loss_chunk_size=chunk, block_size=T,
                                          mixed_precision=mixed_precision)
                    fits = est.fits(spec.memory_bytes, margin) and est.host <= (host_memory or est.host)
                    traffic = (2 + OFFLOAD_UP[eng] * (2 + ckpt)) * n_params if eng in OFFLOAD_UP else 0
                    seconds = micro * T * fpt / (mfu * peak) + traffic / PCIE_BYTES_PER_S if peak else None
                    out.append(Candidate(ckpt, optim, chunk, micro, est, fits, best, mfu, src,
                                         micro * T * n_processes / seconds if peak else None, eng))
        return out

    candidates = grid(engine or "ddp")
    fitting = [c for c in candidates if c.fits]
    alternatives = []
    if engine is None and not fitting and optimizer in (None, "adamw"):
        for eng in ENGINES[1:]:
            cs = grid(eng)
            alternatives.append(max((c for c in cs if c.fits), key=_rank, default=None)
                                or min(cs, key=lambda c: (c.memory.total, c.memory.forward_backward)))
        fitting = [c for c in alternatives if c.fits][:1]
    chosen = max(fitting, key=_rank) if fitting else None
    grad_accum = tokens = None
    if chosen:
        grad_accum = math.ceil(tokens_per_step / (chosen.micro_batch_size * T * n_processes))
        tokens = chosen.micro_batch_size * T * n_processes * grad_accum
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * n_params
    budget = parse_count(max_tokens) if max_tokens is not None else chinchilla
    tps = chosen.tokens_per_s if chosen else None
    notes = []
    if chosen and chosen.mfu_source == "assumed":
        notes.append(f"MFU {chosen.mfu:.2f} is an assumption (no matching row in benchmarks/*.json); "
                     "run `gpt2fit bench` on this GPU to measure it")
    if peak is None:
        notes.append("fp32 has no bf16 tensor-core peak: give --peak_tflops for a time estimate")
    if m.activation not in FUSED_ACTIVATIONS:
        extra = [estimate_memory(m, block_size=T, mixed_precision=mixed_precision, activation=a, dropout=dropout,
                                 attn_implementation=attn_implementation).activations_per_sequence
                 for a in (m.activation, "gelu_pytorch_tanh")]
        notes.append(f"activation {m.activation} keeps {format_bytes(extra[0] - extra[1])} more per sequence "
                     "than gelu_pytorch_tanh (the same tanh GELU as one fused op)")
    if spec.memory_bytes < full:
        notes.append(f"planned for --max_memory {format_bytes(max_memory)}, below the GPU's memory")
    if n_processes > 1:
        notes.append(f"multi-process: {'DDP gradient buckets (+4 bytes/param) counted; ' if not engine else ''}"
                     "tokens/s assumes linear scaling")
    measured = muon_token_fraction(bench_dirs) if chosen and chosen.optimizer == "muon" else None
    if measured and tps:  # Muon's Newton-Schulz FLOPs: < 0.01% of a 0.5M-token step's (Jordan: <1%)
        notes.append(f"projection: Muon reached AdamW's final val loss in {measured[0]:.2f}x its tokens on a small "
                     f"CPU model ({measured[1]}); if that carries over, AdamW's loss at {format_count(budget)} tokens "
                     f"takes ~{format_count(budget * measured[0])} tokens, "
                     f"{format_duration(budget * measured[0] / tps)}")
    if chosen and chosen.engine.endswith("offload"):
        notes.append(f"offload: tokens/s counts the PCIe traffic at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s (assumed), "
                     "not AdamW's step on the CPU")
    return PlanResult(
        model=m, n_params=n_params, n_params_for_flops=n_flops, block_size=T, mixed_precision=mixed_precision,
        gpu_key=gpu_key, gpu=spec, margin=margin, usable_memory_bytes=usable_memory(spec.memory_bytes, margin),
        n_processes=n_processes, tokens_per_step_target=tokens_per_step, candidates=candidates, chosen=chosen,
        grad_accum=grad_accum, tokens_per_step=tokens, flops_per_token=fpt, budget_tokens=budget,
        budget_is_chinchilla=max_tokens is None, time_to_budget_s=budget / tps if tps else None,
        training_flops=fpt * budget, chinchilla_tokens=chinchilla, notes=notes, engine=engine or "ddp",
        alternatives=alternatives, host_memory_bytes=host_memory,
    )


# -- Output -----------------------------------------------------------------------------------
# the accelerate_configs/ file (and launch flags that adapt it) of each engine
LAUNCH = {"ddp": "multi_gpu.yaml", "zero1": "deepspeed_zero2.yaml --zero_stage 1", "zero2": "deepspeed_zero2.yaml",
          "zero3": "deepspeed_zero3_offload.yaml --offload_optimizer_device none --offload_param_device none",
          "zero2_offload": "deepspeed_zero2.yaml --offload_optimizer_device cpu",
          "zero3_offload": "deepspeed_zero3_offload.yaml", "fsdp2": "fsdp2.yaml", "fsdp2_offload": "fsdp2_offload.yaml"}


def _table(cands: list[Candidate], engine: bool) -> list[str]:
    head = ("engine",) * engine + ("ckpt", "optimizer", "loss", "micro", "weights", "grads", "optim", "activ",
                                   "logits", "work", "total", "host", "fits", "max micro")
    table = [head]
    for c in cands:
        e = c.memory
        sizes = (e.weights, e.gradients, e.optimizer, e.activations, e.logits, e.workspace, e.total, e.host)
        table.append((c.engine,) * engine + (
            "on" if c.grad_checkpointing else "off", c.optimizer, "chunked" if c.loss_chunk_size else "plain",
            str(c.micro_batch_size), *(f"{n / GiB:.2f}" for n in sizes), "yes" if c.fits else "no",
            str(c.max_micro_batch)))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    return ["  ".join(r[i].ljust(widths[i]) if i < 3 + engine else r[i].rjust(widths[i])
                      for i in range(len(head))).rstrip() for r in table]


def format_plan(p: PlanResult) -> str:
    m, g = p.model, p.gpu
    peak = f"{g.bf16_dense_flops / 1e12:.1f} TFLOP/s dense bf16" if g.bf16_dense_flops else "peak unknown"
    lines = [
        f"model: {m.name}  {p.n_params:,} params  (L={m.n_layer}, heads={m.n_head}, C={m.n_embd}, "
        f"V={m.vocab_size}, {m.activation})",
        f"run:   block {p.block_size}, {dtype_name(p.mixed_precision)}, {p.engine}, {p.n_processes} "
        f"process{'es' if p.n_processes > 1 else ''}, target {p.tokens_per_step_target:,} tokens/step",
        f"GPU:   {p.gpu_key or 'custom'} = {g.name}: {format_bytes(g.memory_bytes)}, {peak}; plan for "
        f"{format_bytes(p.usable_memory_bytes)} ({format_bytes(CUDA_RESERVE_BYTES)} CUDA context reserved, "
        f"{p.margin:.0%} margin)" + (f"; host RAM {format_bytes(p.host_memory_bytes)}" if p.host_memory_bytes else ""),
        "",
    ]
    lines += _table(p.candidates, engine=False)
    lines += ["(GiB, at the micro-batch shown; total = peak of forward/backward and optimizer step; host = host "
              "RAM of the machine; max micro = largest micro-batch that fits)", ""]
    if p.alternatives:
        lines += ["nothing fits under ddp; the other engines (AdamW), each at its best setting:",
                  *_table(p.alternatives, engine=True), ""]
    c = p.chosen
    if c is None:
        lines.append("nothing fits: try --grad_checkpointing true, --optimizer adamw8bit, --loss_chunk_size "
                     f"{LOSS_CHUNK_SIZE}, a smaller --block_size or a smaller model")
        if p.alternatives:  # what the engine that needs the least GPU memory lacks
            e = min(p.alternatives, key=lambda a: a.memory.total)
            short = [(e.memory.total - p.usable_memory_bytes, "of GPU memory"),
                     (e.memory.host - (p.host_memory_bytes or e.memory.host), "of host RAM")]
            lines.append(f"closest: --engine {e.engine} at micro-batch {e.micro_batch_size} lacks "
                         + " and ".join(f"{format_bytes(n)} {what}" for n, what in short if n > 0))
    else:
        launch = LAUNCH[c.engine] if c.engine != "ddp" or p.n_processes > 1 else "single_gpu.yaml"
        lines += [f"chosen: --grad_checkpointing {str(c.grad_checkpointing).lower()} --optimizer {c.optimizer} "
                  f"--loss_chunk_size {c.loss_chunk_size} --micro_batch_size {c.micro_batch_size}"
                  f"{'' if c.engine == 'ddp' else f' under {c.engine}'}",
                  f"  launch:        accelerate launch --config_file accelerate_configs/{launch} --num_processes "
                  f"{p.n_processes} scripts/train.py RECIPE ...",
                  f"  tokens/step:   {c.micro_batch_size} micro x {p.block_size} block x {p.n_processes} proc x "
                  f"{p.grad_accum} accum = {p.tokens_per_step:,}",
                  f"  throughput:    {c.tokens_per_s:,.0f} tokens/s at MFU {c.mfu:.2f} ({c.mfu_source})"
                  if c.tokens_per_s else "  throughput:    n/a (unknown peak FLOP/s: give --peak_tflops)"]
    lines += [f"  FLOPs/token:   {p.flops_per_token:.3g}  (6N + 12*L*C*T, N = {p.n_params_for_flops:,} without wpe)",
              f"  {'Chinchilla-optimal budget' if p.budget_is_chinchilla else 'budget'}: "
              f"{format_count(p.budget_tokens)} tokens -> {format_duration(p.time_to_budget_s)}, "
              f"{p.training_flops:.3g} training FLOPs",
              f"  Chinchilla:    {format_count(p.chinchilla_tokens)} tokens ({CHINCHILLA_TOKENS_PER_PARAM} per parameter)"]
    return "\n".join(lines + [f"note: {n}" for n in p.notes])


# -- CLI --------------------------------------------------------------------------------------
def load_model_config(init_from: str) -> ModelShape:
    """config.json of a local model dir / run dir, or of a Hub id (from the Hub or its offline cache)."""
    path = Path(resolve_model_path(init_from))
    try:
        file = path / "config.json" if path.is_dir() else Path(hf_hub_download(init_from, "config.json"))
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:  # no file, offline, unknown or invalid id, bad JSON (hub errors are OSErrors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--init_from {init_from!r}: no readable config.json in a local model dir, on the Hugging "
                        f"Face Hub or in its cache ({first})") from None
    return model_shape({**data, "_name_or_path": str(init_from)})


def _drop_auto(argv: list[str]) -> list[str]:
    """`--optimizer auto` (and grad_checkpointing, loss_impl): the earlier spelling of "not given"."""
    out: list[str] = []
    for a in argv:
        if a == "auto" and out and out[-1] in ("--optimizer", "--grad_checkpointing", "--loss_impl"):
            out.pop()
        elif a not in ("--optimizer=auto", "--grad_checkpointing=auto", "--loss_impl=auto"):
            out.append(a)
    return out


DESCRIPTION = ("Will it fit? Memory by component, the largest micro-batch, gradient accumulation, tokens/s and "
               "time to a token budget, for training a GPT-2 on one GPU. Takes `gpt2fit train`'s options.")
EPILOG = "example: gpt2fit plan --preset gpt2-medium --gpu rtx-4070 --max_tokens 10B"


def main(argv: list[str] | None = None) -> int:
    (t, p), _ = options.parse(_drop_auto(list(argv or [])), [PlanTrain, PlanArgs], prog="gpt2fit plan",
                              description=DESCRIPTION, epilog=EPILOG, renamed=RENAMED)
    if t.preset and t.init_from:
        raise UserError("give --preset (--model) or --init_from, not both")
    # the TrainConfig `gpt2fit train` would build from these options, and its checks
    cfg = config.TrainConfig(*options.build(config.SECTIONS, {k: v for k, v in vars(t).items() if v is not None}))
    config.validate(cfg)
    m = cfg.model
    if m.init_from:
        shape = dataclasses.replace(load_model_config(m.init_from), dropout=m.dropout)
    else:  # as train.model.build_config: n_positions = block_size, the vocab padded
        vocab = math.ceil(config.GPT2_VOCAB / m.pad_vocab_to) * m.pad_vocab_to
        shape = scratch_shape(m.preset, m.n_layer, m.n_head, m.n_embd, n_positions=m.block_size, vocab_size=vocab,
                              dropout=m.dropout)
    result = plan_run(
        shape, gpu=p.gpu if p.gpu is not None or p.memory is not None else "rtx-4090",
        memory_bytes=parse_size(p.memory) if p.memory else None,
        max_memory=parse_size(cfg.run.max_memory) if cfg.run.max_memory else None,
        peak_flops=p.peak_tflops * 1e12 if p.peak_tflops is not None else None, block_size=t.block_size,
        mixed_precision=resolve_precision(cfg.run.mixed_precision, cuda=True, bf16_supported=True,
                                          env=os.environ.get("ACCELERATE_MIXED_PRECISION")),
        optimizer=t.optimizer, grad_checkpointing=t.grad_checkpointing, loss_chunk_size=t.loss_chunk_size,
        micro_batch_size=config.micro_batch(cfg), tokens_per_step=cfg.optim.tokens_per_step,
        max_tokens=cfg.run.max_tokens, n_processes=p.n_processes, margin=p.margin,
        attn_implementation=m.attn_implementation, dropout=m.dropout, engine=p.engine,
        host_memory=parse_size(p.host_memory) if p.host_memory else None)
    if p.gpu is None and p.memory is None:
        result.notes.insert(0, "no --gpu given: planned for an rtx-4090")
    print(json.dumps(dataclasses.asdict(result), indent=2) if p.json else format_plan(result))
    return 0
