"""Reporting from the loop: metrics.jsonl rows and trackers, peak memory."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch

from gpt2fit import formats, hardware


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only) and to trackers."""

    def __init__(self, run_dir, accelerator, trackers: bool):
        self.path = Path(run_dir) / formats.METRICS
        self.accelerator = accelerator
        self.trackers = trackers
        self.main = accelerator.is_main_process

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows past the checkpoint's step (they will be produced again)."""
        if not self.main or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, row: dict) -> None:
        if not self.main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "loss" else v)
                 for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.trackers:
            kind = row.get("kind", "train")
            values = {f"{kind}/{k}": v for k, v in row.items()
                      if k not in ("kind", "step") and isinstance(v, (int, float)) and v is not None}
            self.accelerator.log(values, step=row.get("step"))


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated CUDA memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def device_peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device from the GPU table; None on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    return hardware.device_peak_flops(torch.cuda.get_device_name(device))
