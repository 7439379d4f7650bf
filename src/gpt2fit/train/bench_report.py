"""What `gpt2fit bench` writes: the device and versions, MFU and Trainer speedups of its rows, the
JSON + Markdown outputs and the table (also used by benchmarks/gpu/summarize.py)."""

import contextlib
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from gpt2fit import __version__
from gpt2fit.formats import write_json_atomic
from gpt2fit.hardware import device_peak_flops, gpu_key_for_device
from gpt2fit.units import format_bytes, format_count

NOTES = [
    "Every gpt2fit row runs gpt2fit.train.setup + train_step, the optimizer step `gpt2fit train` runs.",
    "Step time: the timed steps run back to back; a CUDA event between steps marks each boundary (the host clock on "
    "the CPU) and the device is synchronized once, after the last, so a step's time includes the GPU waiting for the "
    "host (host_sync=step makes one sync per step, host_sync=log none). tokens_per_s = tokens_per_step * steps / "
    "sum(step times); tokens_per_s_median = tokens_per_step / median.",
    "MFU = tokens_per_s * flops_per_token / peak, flops_per_token = 6N + 12*L*C*T (PaLM appendix B, nanoGPT), N = "
    "every parameter except wpe (tied wte/lm_head once); mfu: the datasheet dense bf16 peak (hardware.GPUS), "
    "mfu_measured_peak: the matmul rate measured in this run at the row's precision.",
    "Memory on CUDA: max_memory_allocated / max_memory_reserved over the timed steps (warmup_*: setup and warm-up), "
    "without the CUDA context (~0.5-0.8 GiB). predicted_peak_bytes = plan.memory.estimate_memory(...).total for the "
    "row's settings (256 MiB workspace and 10% fragmentation included); the planner targets +-10% of "
    "peak_reserved_bytes. sdpa_backend=math and compile change memory in ways it does not model.",
    "Trainer baseline: step time from one on_step_end to the next (so it includes the Trainer's batch prefetch); "
    "in_step_times_s is on_step_begin to on_step_end.",
]
# every row has every key; a cell that fails (OOM, error) keeps None where it got no number
MEASUREMENTS = ("precision", "micro_batch_size", "grad_accum_steps", "tokens_per_step", "n_processes", "n_params",
                "n_params_for_flops", "flops_per_token", "vocab_size", "setup_s", "tokens_per_s", "tokens_per_s_median",
                "step_time_median_s", "step_time_p90_s", "step_time_mean_s", "step_times_s", "warmup_times_s",
                "timed_wall_s", "skipped_steps", "loss", "mfu", "mfu_measured_peak", "achieved_flops",
                "matmul_peak_flops", "peak_allocated_bytes", "peak_reserved_bytes", "warmup_peak_allocated_bytes",
                "warmup_peak_reserved_bytes", "peak_rss_bytes", "memory_kind", "memory_at_failure",
                "predicted_peak_bytes", "predicted_memory", "predicted_over_allocated", "predicted_over_reserved",
                "predicted_fits", "predicted_within_cap", "speedup_vs_trainer", "trainer_baseline",
                "vs_trainer_like_for_like")
SHAPE_KEYS = ("model", "block_size", "micro_batch_size", "grad_accum_steps", "precision", "vocab_size")
TRAINER_LIKE = {"grad_checkpointing": False, "optimizer": "adamw", "compile": False, "attn_implementation": "sdpa",
                "sdpa_backend": "auto", "loss_impl": "plain"}


def _version(dist: str) -> str | None:
    with contextlib.suppress(PackageNotFoundError):
        return version(dist)
    return None


def _run(*cmd: str) -> str | None:
    """A command's first line of output, or None when it fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _git_commit() -> str | None:
    root = str(Path(__file__).resolve().parents[3])
    commit = _run("git", "-C", root, "rev-parse", "--short", "HEAD")
    dirty = _run("git", "-C", root, "status", "--porcelain", "--untracked-files=no")
    return commit and commit + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    dev = {"type": device.type, "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        dev.update(name=name, gpu_key=gpu_key_for_device(name), datasheet_bf16_flops=device_peak_flops(name),
                   memory_bytes=int(props.total_memory), capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count,
                   driver=_run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"))
    else:
        dev.update(name=str(device), gpu_key=None, datasheet_bf16_flops=None)
    dists = ("transformers", "accelerate", "bitsandbytes", "numpy", "triton", "flash-attn", "liger-kernel")
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                **{d.replace("-", "_"): _version(d) for d in dists}, "platform": platform.platform()}
    return {"device": dev, "versions": versions, "gpt2fit": {"version": __version__, "commit": _git_commit()}}


def add_mfu(row: dict, datasheet_peak: float | None, measured_peak: float | None) -> None:
    achieved = row["tokens_per_s"] / (row.get("n_processes") or 1) * row["flops_per_token"]
    row.update(achieved_flops=achieved, matmul_peak_flops=measured_peak,
               mfu=achieved / datasheet_peak if datasheet_peak else None,
               mfu_measured_peak=achieved / measured_peak if measured_peak else None)


def shape_of(row: dict) -> tuple:
    return tuple(row.get(k) for k in SHAPE_KEYS)


def attach_speedups(rows: list[dict], baselines: list[dict]) -> None:
    """speedup_vs_trainer = tokens/s / the Trainer's tokens/s at the same model, block, micro-batch,
    accumulation and precision (every gpt2fit row of that shape, whatever its levers)."""
    by_shape = {shape_of(b): b for b in baselines if b.get("tokens_per_s")}
    for r in rows:
        b = by_shape.get(shape_of(r))
        r["trainer_baseline"] = b["id"] if b else None
        r["speedup_vs_trainer"] = r["tokens_per_s"] / b["tokens_per_s"] if b and r.get("tokens_per_s") else None
        r["vs_trainer_like_for_like"] = bool(b) and all(r.get(k) == v for k, v in TRAINER_LIKE.items()) \
            and r.get("data") == "random"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _short(v) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else "" if v is None else str(v)


def table(doc: dict) -> str:
    """The Markdown table: the settings that vary, then the measurements (rows, then baselines)."""
    rows, baselines = doc["rows"], doc.get("baselines", [])
    cuda = doc["device"]["type"] == "cuda"
    keys = [k for k in doc["settings"]["varied"] if k not in ("preset", "n_layer", "n_head", "n_embd", "init_from")]
    multi_model = len({r.get("model") for r in rows + baselines}) > 1
    head = ["id", *(["model"] if multi_model else []), *keys, "tok/s", "step ms (med)", "p90 ms", "MFU",
            "MFU (meas. peak)", *(["peak alloc", "reserved"] if cuda else ["peak RSS"])]
    head += ["predicted", "pred/reserved" if cuda else "pred/RSS", "vs Trainer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def cells(r, settings):
        out = [r["id"]] + ([str(r.get("model"))] if multi_model else []) + [_short(settings.get(k)) for k in keys]
        pred = format_bytes(r.get("predicted_peak_bytes"))
        if r.get("oom") or r.get("error"):
            note = "OOM" if r.get("oom") else "error: " + str(r["error"]).splitlines()[0][:60]
            return out + [note] + [""] * (len(head) - len(out) - 4) + [pred, "", ""]
        measured = [r.get("peak_allocated_bytes"), r.get("peak_reserved_bytes")] if cuda else [r.get("peak_rss_bytes")]
        sp = r.get("speedup_vs_trainer")
        return out + [format_count(r["tokens_per_s"]), f"{1000 * r['step_time_median_s']:.1f}",
                      f"{1000 * r['step_time_p90_s']:.1f}", _pct(r.get("mfu")), _pct(r.get("mfu_measured_peak")),
                      *map(format_bytes, measured), pred,
                      f"{r['predicted_peak_bytes'] / measured[-1]:.2f}" if pred and measured[-1] else "",
                      "" if sp is None else f"{sp:.2f}x"]

    for r in rows:  # the value the cell ran with: resolved in the row, else as set
        lines.append("| " + " | ".join(cells(r, {k: r[k] if k in r else r["settings"].get(k) for k in keys})) + " |")
    for b in baselines:
        s = {k: b["settings"].get(k, "-") for k in keys}
        b = {**b, "id": f"{b['id']} (HF Trainer, {b.get('trainer_optim', 'default optim')})"}
        lines.append("| " + " | ".join(cells(b, s)) + " |")
    d, v = doc["device"], doc["versions"]
    peak = d.get("datasheet_bf16_flops")
    mm = "; ".join(f"{p['dtype']} {p['size']}^3 matmul {p['flops'] / 1e12:.3g} TFLOP/s"
                   for p in doc["flops"]["matmul_peaks"])
    fixed = ", ".join(f"{k}={v}" for k, v in doc["settings"]["fixed"].items() if k not in doc["settings"]["varied"])
    head_lines = [
        f"device: {d['name']}" + (f" (datasheet dense bf16 {peak / 1e12:.0f} TFLOP/s)" if peak else "")
        + f"; measured: {mm or 'n/a'}",
        f"torch {v['torch']} (CUDA {v['cuda']}), transformers {v['transformers']}, accelerate {v['accelerate']}, "
        f"bitsandbytes {v['bitsandbytes']}; gpt2fit {doc['gpt2fit']['commit']}",
        f"fixed: {fixed}; {doc['settings']['warmup']} warm-up + {doc['settings']['steps']} timed optimizer steps "
        "per cell",
        "tok/s = tokens per optimizer step x timed steps / their total time; MFU = tok/s x (6N + 12LCT) / peak, "
        "N = all parameters except wpe" + ("" if cuda else "; on the CPU there is no datasheet peak, and memory is "
                                           "the peak RSS of the whole process"),
    ]
    return "\n".join(head_lines) + "\n\n" + "\n".join(lines) + "\n"


def summary(r: dict) -> str:
    """One row in a line, for the progress log."""
    if r.get("oom"):
        return "out of memory (recorded as oom)"
    if r.get("error"):
        return f"failed: {r['error']}"
    mem = (f"peak {format_bytes(r['peak_allocated_bytes'])} alloc / {format_bytes(r['peak_reserved_bytes'])} reserved"
           if r.get("peak_allocated_bytes") is not None else f"peak RSS {format_bytes(r.get('peak_rss_bytes'))}")
    mfu = f", MFU {_pct(r['mfu'])}" if r.get("mfu") is not None else ""
    return (f"{format_count(r['tokens_per_s'])} tok/s, step {1000 * r['step_time_median_s']:.1f} ms "
            f"(p90 {1000 * r['step_time_p90_s']:.1f}){mfu}, {mem}")


def default_out(models: set[str], device_name: str) -> Path:
    slug = "-".join(p for p in "".join(c if c.isalnum() else "-" for c in device_name.lower().replace("nvidia", ""))
                    .split("-") if p)
    return Path("benchmarks") / f"bench_{models.pop() if len(models) == 1 else 'models'}_{slug}.json"


def write_outputs(doc: dict, out: Path) -> Path:
    """The JSON (atomically: a killed run leaves the previous cell's file) and the Markdown next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, doc)
    md = out.with_suffix(".md")
    md.write_text(f"# gpt2fit bench: {out.stem}\n\n`{doc['command']}`\n\n" + table(doc))
    return md
