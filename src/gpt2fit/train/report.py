"""Reporting from the loop: metrics.jsonl rows and trackers, the progress bar, the non-finite
bookkeeping and the spike check. The loop calls one method per concern; everything a user sees
while training is decided here.

metrics.jsonl rows (the run-dir contract in formats.py): ``kind`` train / eval / hellaswag / skip.
"""

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gpt2fit import formats, hardware
from gpt2fit.units import format_count


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only) and to trackers."""

    def __init__(self, run_dir, accelerator, trackers: bool):
        self.path = Path(run_dir) / formats.METRICS
        self.accelerator, self.trackers, self.main = accelerator, trackers, accelerator.is_main_process

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows past the checkpoint's step (they will be produced again). Written to a
        temporary file and renamed, so a kill in the middle leaves the old file, never a cut one."""
        if not self.main or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        formats.write_atomic(self.path, "".join(line + "\n" for line in keep))

    def log(self, row: dict) -> None:
        if not self.main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "loss" else v)
                 for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.trackers:
            kind = row.get("kind", "train")
            self.accelerator.log({f"{kind}/{k}": v for k, v in row.items()
                                  if k not in ("kind", "step") and isinstance(v, (int, float))}, step=row.get("step"))


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated CUDA memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class NonfiniteGuard:
    """Counts optimizer steps skipped as non-finite, for the K-in-a-row stop.

    With host_sync=step each verdict is a Python bool and ``check`` reports it at once. With
    host_sync=log the counts stay on the device (skipped since the last check, the current streak,
    the longest streak since the last check) and ``check`` reads them in one transfer, so the
    training step never waits for the GPU.
    """

    def __init__(self, state: dict, device, lazy: bool):
        self.state, self.lazy = state, lazy
        streak = state["consecutive_nonfinite"]
        self.pending = torch.tensor([0, streak, streak], device=device) if lazy else None
        self.last_bad = False

    def add(self, finite) -> None:
        if self.lazy:
            bad = (~finite).long()
            skipped, streak, longest = self.pending.unbind()
            streak = (streak + 1) * bad
            self.pending = torch.stack([skipped + bad, streak, torch.maximum(longest, streak)])
        else:
            self.last_bad = not finite

    def check(self) -> tuple[int, int]:
        """(steps skipped since the last check, longest streak since then); updates the state."""
        if self.lazy:
            skipped, streak, longest = self.pending.tolist()
            self.pending = torch.stack([torch.zeros_like(self.pending[1]), self.pending[1], self.pending[1]])
        else:
            skipped = int(self.last_bad)
            streak = self.state["consecutive_nonfinite"] + 1 if self.last_bad else 0
            longest, self.last_bad = streak, False
        self.state["skipped_steps"] += skipped
        self.state["consecutive_nonfinite"] = streak
        return skipped, longest


class Reporter:
    """What the loop reports, one method per concern: progress, non-finite steps, train/eval/
    HellaSwag rows. Holds the throughput clock and the loss running mean for spike detection."""

    def __init__(self, run):
        self.run, self.a, self.r = run, run.accelerator, run.cfg.run
        self.state, self.log = run.state, run.log
        self.bar = tqdm(total=run.total_steps, initial=run.start_step, disable=not self.a.is_main_process,
                        dynamic_ncols=True, desc="train", unit="step", mininterval=1.0)
        self.tty = sys.stderr.isatty()
        self.t_log, self.tokens_at_log = time.time(), self.state["tokens"]
        self.t_start = time.time() - self.state["elapsed_s"]
        self.guard = NonfiniteGuard(self.state, self.a.device, lazy=self.r.host_sync == "log")
        self.checked = run.start_step
        # the GPU table's dense bf16 peak; None on the CPU or an unknown GPU (no MFU then)
        cuda = self.a.device.type == "cuda"
        self.peak_flops = hardware.device_peak_flops(torch.cuda.get_device_name(self.a.device)) if cuda else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def step(self, step: int, finite) -> None:
        """Count the step (progress, tokens, clock) and its non-finite verdict."""
        self.guard.add(finite)
        self.state["step"] = step
        self.state["tokens"] += self.run.tokens_per_step
        self.state["elapsed_s"] = time.time() - self.t_start
        self.bar.update(1)

    def nonfinite(self, step: int, force: bool) -> int:
        """Report skipped updates; return the longest non-finite streak seen (for the K-in-a-row
        stop). With host_sync=log the device counters are read only at log/eval/save steps or when
        ``force``; otherwise every step."""
        r = self.r
        if self.guard.lazy and not (force or step % r.log_interval == 0 or step % r.eval_interval == 0):
            return 0
        skipped, longest = self.guard.check()
        if skipped:
            streak = self.state["consecutive_nonfinite"]
            if self.guard.lazy:
                self.a.print(f"steps {self.checked + 1}-{step}: {skipped} non-finite update(s) skipped "
                             f"(longest streak {longest}, {streak} in a row now)")
            else:
                self.a.print(f"step {step}: non-finite loss or gradient norm; update skipped ({streak} in a row)")
            self.log.log({"kind": "skip", "step": step, "tokens": self.state["tokens"], "consecutive": streak,
                          "skipped": skipped, "longest": longest})
        self.checked = step
        return longest

    def train(self, step: int, step_loss: torch.Tensor, lr: float, grad_norm) -> None:
        """A train row: loss over all ranks, throughput and MFU since the last row, peak memory."""
        run, a = self.run, self.a
        loss = float(a.reduce(step_loss, "sum")) / run.tokens_per_step
        now = time.time()
        tps = (self.state["tokens"] - self.tokens_at_log) / max(now - self.t_log, 1e-9)
        self.t_log, self.tokens_at_log = now, self.state["tokens"]
        row = {"kind": "train", "step": step, "tokens": self.state["tokens"], "loss": loss, "lr": lr,
               "grad_norm": float(grad_norm), "tokens_per_s": tps,
               "mfu": hardware.mfu(tps / a.num_processes, run.flops_per_token, self.peak_flops),
               "peak_mem_bytes": peak_memory_bytes(a.device), "time_s": now - self.t_start}
        ema = self.state["loss_ema"]
        if ema is not None and math.isfinite(loss) and loss > self.r.spike_factor * ema:
            a.print(f"step {step}: loss spike {loss:.3f} vs running mean {ema:.3f}")
            row["spike"] = True
        if math.isfinite(loss):
            self.state["loss_ema"] = loss if ema is None else 0.9 * ema + 0.1 * loss
        self.log.log(row)
        post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": format_count(tps)}
        if row["mfu"] is not None:
            post["mfu"] = f"{100 * row['mfu']:.1f}%"
        self.bar.set_postfix(post, refresh=False)
        if not self.tty and a.is_main_process:  # a log file gets plain lines, not bar redraws
            print(f"step {step}/{run.total_steps}: loss {loss:.4f}, lr {lr:.2e}, {format_count(tps)} tok/s",
                  flush=True)

    def eval(self, step: int, val: float) -> None:
        best = self.state.get("best_val_loss")
        self.state["best_val_loss"] = val if best is None else min(val, best)
        self.state["last_val_loss"] = val
        self.log.log({"kind": "eval", "step": step, "tokens": self.state["tokens"], "val_loss": val,
                      "val_ppl": math.exp(min(val, 50))})
        self.a.print(f"step {step}: val loss {val:.4f}")

    def hellaswag(self, step: int, res: dict) -> None:
        self.log.log({"kind": "hellaswag", "step": step, "tokens": self.state["tokens"], "acc": res["acc"],
                      "acc_norm": res["acc_norm"], "acc_norm_token": res["acc_norm_token"], "n": res["n"]})
        self.a.print(f"step {step}: HellaSwag acc_norm {res['acc_norm']:.4f} (acc {res['acc']:.4f}, n={res['n']})")
