"""Hardware: the GPU table (memory, dense bf16 peak), FLOPs per token and MFU.

Pure data and arithmetic, no torch: the planner uses it before anything runs, the training loop
and the bench to report MFU. Imports nothing from gpt2fit but ``errors`` and ``units``.
"""

import re
from dataclasses import dataclass

from gpt2fit.errors import UserError, suggest
from gpt2fit.units import GiB, MiB

@dataclass(frozen=True)
class GPU:
    """A GPU as the planner sees it: memory and dense bf16 tensor-core peak."""

    name: str  # marketing name, e.g. "GeForce RTX 4070"
    memory_bytes: int  # total device memory (before the CUDA context)
    bf16_dense_flops: float  # FLOP/s, dense (no 2:4 sparsity), bf16 inputs with fp32 accumulate
    notes: str = ""


# Peak convention, the same for every card: dense BF16 tensor-core FLOP/s with FP32 accumulate
# (the only accumulate mode bf16 has), at boost clock, no sparsity. GeForce cards run FP32
# accumulate at half their FP16-accumulate rate, so their number is half the headline "FP16
# tensor" figure: the RTX 4090's 165.2 is the Ada whitepaper's "Peak BF16 Tensor TFLOPS with FP32
# Accumulate" (330.3 with FP16 accumulate). Sources: NVIDIA Ampere GA102 whitepaper (RTX 3090:
# 71 TFLOPS), NVIDIA Ada Lovelace whitepaper (RTX 4090: 165.2; RTX 4070 Ti: 80.2), A100 / H100 /
# H200 datasheets (312 / 989 SXM / 756 PCIe / 989, dense = half the "with sparsity" figure). The
# RTX 3060 and RTX 4070 are not in those tables: tensor cores x boost clock x 128 FLOP/clock per
# tensor core (the per-core rate that reproduces the 3090 and 4090 figures), i.e.
# 112 x 1.777 GHz x 128 = 25.5 and 184 x 2.475 GHz x 128 = 58.3. (The ~51 often quoted for the
# 3060 is its FP16-accumulate rate.) Memory: GDDR6(X) and HBM "GB" are GiB here (12 GiB =
# 12,884,901,888 bytes); the H200 uses the 143,771 MiB that nvidia-smi reports for its "141 GB".
GPUS: dict[str, GPU] = {
    "rtx-3060": GPU("GeForce RTX 3060 12GB", 12 * GiB, 25.5e12,
                    "Ampere GA106, 112 tensor cores @ 1.777 GHz; a desktop display uses some memory"),
    "rtx-3090": GPU("GeForce RTX 3090", 24 * GiB, 71.0e12, "Ampere GA102; GA102 whitepaper"),
    "rtx-4070": GPU("GeForce RTX 4070", 12 * GiB, 58.3e12,
                    "Ada AD104, 184 tensor cores @ 2.475 GHz; a desktop display uses some memory"),
    "rtx-4070-ti": GPU("GeForce RTX 4070 Ti", 12 * GiB, 80.2e12, "Ada AD104, 240 tensor cores @ 2.61 GHz"),
    "rtx-4090": GPU("GeForce RTX 4090", 24 * GiB, 165.2e12, "Ada AD102; Ada whitepaper"),
    "a100-40gb": GPU("A100 40GB", 40 * GiB, 312e12, "SXM4 or PCIe; A100 datasheet"),
    "a100-80gb": GPU("A100 80GB", 80 * GiB, 312e12, "SXM4 or PCIe; A100 datasheet"),
    "h100-80gb": GPU("H100 80GB SXM", 80 * GiB, 989e12, "SXM5, HBM3; H100 datasheet"),
    "h100-pcie": GPU("H100 PCIe", 80 * GiB, 756e12, "PCIe, HBM2e; H100 datasheet"),
    "h200": GPU("H200", 143771 * MiB, 989e12, "141 GB HBM3e (nvidia-smi: 143,771 MiB); H200 datasheet"),
}

# torch.cuda.get_device_name() -> GPUS key. Variants with other specs (Ti / Super / laptop / 4090 D
# / H100 NVL) deliberately map to nothing rather than to a wrong number.
_DEVICE_PATTERNS: list[tuple[str, str | None]] = [
    (r"laptop|mobile|max-q", None),
    (r"h100.*nvl", None),
    (r"\bh200\b", "h200"),
    (r"h100.*pcie", "h100-pcie"),
    (r"\bh100\b", "h100-80gb"),
    (r"a100.*80\s*gb", "a100-80gb"),
    (r"\ba100\b", "a100-40gb"),
    (r"rtx[\s-]*4090\b(?![\s-]*d\b)", "rtx-4090"),
    (r"rtx[\s-]*4070[\s-]*ti\b(?![\s-]*super)", "rtx-4070-ti"),
    (r"rtx[\s-]*4070\b(?![\s-]*(ti|super))", "rtx-4070"),
    (r"rtx[\s-]*3090\b(?![\s-]*ti)", "rtx-3090"),
    (r"rtx[\s-]*3060\b(?![\s-]*ti)", "rtx-3060"),
]


def gpu_key_for_device(device_name: str) -> str | None:
    """The GPUS key for a ``torch.cuda.get_device_name()`` string, or None when unknown."""
    name = str(device_name).lower().replace("_", " ")
    for pattern, key in _DEVICE_PATTERNS:
        if re.search(pattern, name):
            return key
    return None


def device_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a device name such as "NVIDIA H100 80GB HBM3"; None if unknown."""
    key = gpu_key_for_device(device_name)
    return GPUS[key].bf16_dense_flops if key else None


def resolve_gpu(name: str) -> tuple[str, GPU]:
    """A GPUS key, or a device name as torch reports it, -> (key, GPU); UserError otherwise."""
    text = str(name).strip()
    key = text.lower().replace(" ", "-").replace("_", "-")
    if key in GPUS:
        return key, GPUS[key]
    found = gpu_key_for_device(text)
    if found:
        return found, GPUS[found]
    raise UserError(f"unknown GPU {name!r}.{suggest(key, GPUS)} Known: {', '.join(GPUS)}; "
                    "or describe yours with --memory 12GiB --peak_tflops 58.3")


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6N + 12*L*C*T (PaLM appendix B, nanoGPT).

    Pass N = count_params_for_flops(cfg). 12*L*C*T counts the attention matmuls (QK^T and AV,
    2 each forward, x3 with backward) over the full T x T square, as nanoGPT's MFU does.
    """
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the device's dense bf16 peak."""
    return tokens_per_s_per_device * flops_per_token / peak if peak else None


def resolve_precision(requested: str, *, cuda: bool, bf16_supported: bool, env: str | None = None) -> str:
    """mixed_precision 'auto' -> bf16 on a GPU that has it, else no; an explicit value stays.
    ``env`` is ACCELERATE_MIXED_PRECISION (what `accelerate config` / launch set), which auto follows."""
    return requested if requested != "auto" else env or ("bf16" if cuda and bf16_supported else "no")
