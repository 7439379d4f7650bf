"""Resilience: kills, preemption, divergence, full disks and secrets, on a tiny CPU model in fp32.

The reference for "nothing was lost" is an uninterrupted run with the same flags: a run that is
killed (SIGKILL at random steps, or inside each phase of a checkpoint save), preempted (SIGTERM /
SIGINT) or stopped by a full disk, and then continued with ``--resume auto``, must log the very
same per-step loss, grad norm and learning rate (bitwise) and export the very same weights. With
``dropout 0.1`` that needs the RNG states, with ``adamw8bit`` the 8-bit optimizer state (with ``muon``
its momentum and AdamW's moments), and with
a cosine schedule the scheduler state, all restored exactly.

Training runs in subprocesses (``python -m gpt2fit.cli train``) so that signals, exit codes and
stderr are what a user sees; they run with one thread each (the CPU is small and shared, and all
runs of a comparison use the same setting).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, read_rows, run_cli, tiny_flags
from gpt2fit.train import checkpoint as ckpt
from gpt2fit.cli import run_main
from gpt2fit.train.command import EXIT_PREEMPTED
from gpt2fit.train.command import main as train_main

ENV = {"OMP_NUM_THREADS": "1"}
STEPS = 24
# 24 steps of 4 x 32 tokens; a checkpoint every 3 steps (the newest 2 kept); evals at 8, 16, 24
FLAGS = dict(max_steps=STEPS, checkpoint_interval=3, keep_checkpoints=2, dropout=0.1, eval_interval=8)


def sdir(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------------------------
# subprocess plumbing
# ------------------------------------------------------------------------------------------
class Proc:
    """One training process; stdout/stderr go to files (no pipe can fill up and stall it)."""

    def __init__(self, argv, logdir: Path, name: str, env=None, script: Path | None = None):
        logdir.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logdir / f"{name}.out", logdir / f"{name}.err"
        head = [str(script)] if script else ["-m", "gpt2fit.cli", "train"]
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.p = subprocess.Popen([sys.executable, *head, *map(str, argv)], stdout=o, stderr=e,
                                      env=dict(os.environ, PYTHONUNBUFFERED="1", **ENV, **(env or {})))
        _LIVE.append(self)

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait(self, timeout=300) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            pytest.fail(f"training did not finish in {timeout}s:\n{self.stderr()[-3000:]}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def error_line(self) -> str:
        return error_line(self.stderr())


_LIVE: list[Proc] = []


def error_line(stderr: str, own_line: bool = False) -> str:
    """The one ``error: ...`` message in stderr, up to its end of line.

    ``own_line``: it must also start a line (a progress bar redrawn with \\r may stand before it
    on the same terminal line, but not directly in front of it).
    """
    lines = [seg for ln in stderr.splitlines() for seg in ln.split("\r")]
    if own_line:
        errors = [ln for ln in lines if ln.startswith("error: ")]
    else:
        errors = [ln[ln.index("error: "):] for ln in lines if "error: " in ln]
    assert len(errors) == 1, f"expected one 'error: ' line in stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.fixture(autouse=True)
def _no_stray_processes():
    yield
    while _LIVE:
        p = _LIVE.pop()
        if p.p.poll() is None:
            p.p.kill()
            p.p.wait()


def wait_for(cond, proc: Proc, what: str, timeout: float = 240) -> None:
    """Poll ``cond`` (every ~2 ms) until true; fail if the process exits first or time runs out."""
    t0 = time.monotonic()
    while not cond():
        if proc.p.poll() is not None:
            if cond():
                return
            pytest.fail(f"training exited with {proc.p.returncode} before {what}:\n{proc.stderr()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def logged_steps(run: Path) -> list[int]:
    """Steps of the train rows in metrics.jsonl (a line cut short by a kill is ignored)."""
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "train":
            out.append(row["step"])
    return out


def last_step(run: Path) -> int:
    return max(logged_steps(run), default=0)


def sound_checkpoints(run: Path) -> list[int]:
    """Every complete checkpoint verifies against its manifest; returns their steps, oldest first."""
    steps = []
    for c in ckpt.complete_checkpoints(run):
        state = ckpt.verify(c)  # raises UserError on a damaged one
        assert state["step"] == int(c.name.split("_")[1])
        assert (c / "model.safetensors").is_file()
        steps.append(state["step"])
    newest = ckpt.find(run, "auto")
    assert (newest[0].name if newest else None) == (sdir(steps[-1]) if steps else None)
    return steps


def assert_same_run(run: Path, base: Path, steps: int = STEPS) -> None:
    """Bitwise the same training: every train row, every eval, and the exported weights."""
    from safetensors.torch import load_file

    ra, rb = read_rows(run), read_rows(base)
    assert [r["step"] for r in ra] == list(range(1, steps + 1)), [r["step"] for r in ra]
    assert [r["step"] for r in rb] == list(range(1, steps + 1))
    for a, b in zip(ra, rb):
        for key in ("tokens", "loss", "grad_norm", "lr"):
            assert a[key] == b[key], f"step {a['step']}: {key} {a[key]!r} != {b[key]!r} (uninterrupted)"
    ea, eb = read_rows(run, "eval"), read_rows(base, "eval")
    assert [(e["step"], e["val_loss"]) for e in ea] == [(e["step"], e["val_loss"]) for e in eb]
    wa, wb = load_file(run / "final/model.safetensors"), load_file(base / "final/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"final weight {k} differs from the uninterrupted run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == steps


class Baselines:
    """Uninterrupted reference runs, one per flag set, started early and shared by the module."""

    def __init__(self, data: Path, root: Path):
        self.data, self.root, self.runs = data, root, {}

    def start(self, **flags) -> tuple:
        key = tuple(sorted(flags.items()))
        if key not in self.runs:
            out = self.root / f"base{len(self.runs)}"
            self.runs[key] = (out, Proc(tiny_flags(self.data, out, **flags), self.root, out.name), None)
        return key

    def get(self, **flags) -> Path:
        key = self.start(**flags)
        out, proc, rc = self.runs[key]
        if rc is None:
            rc = proc.wait()
            self.runs[key] = (out, proc, rc)
        assert rc == 0, proc.stderr()[-3000:]
        return out


@pytest.fixture(scope="module")
def baselines(char_data, tmp_path_factory):
    b = Baselines(char_data, tmp_path_factory.mktemp("baselines"))
    yield b
    for _, proc, _ in b.runs.values():
        if proc.p.poll() is None:
            proc.p.kill()
            proc.p.wait()


def copy_unfinished(base: Path, dest: Path, drop_after: int) -> Path:
    """A copy of a finished run as if it had died right after checkpoint ``drop_after``."""
    shutil.copytree(base, dest)
    for c in ckpt.complete_checkpoints(dest):
        if int(c.name.split("_")[1]) > drop_after:
            shutil.rmtree(c)
    shutil.rmtree(dest / "final")
    (dest / "summary.json").unlink()
    return dest


# ------------------------------------------------------------------------------------------
# 1. exact resume after SIGKILL at random steps
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "muon"])
def test_sigkill_at_random_points_then_resume_is_bitwise_identical(char_data, baselines, tmp_path, optimizer):
    """Three real SIGKILLs: at two random steps, and at a random moment around a checkpoint save."""
    flags = dict(FLAGS, optimizer=optimizer)
    baselines.start(**flags)
    rng = random.Random(f"kill-{optimizer}")
    first, second = sorted(rng.sample(range(4, 14), 2))  # after the first checkpoint (step 3)
    save_step = 3 * rng.randint(6, 7)  # the save of checkpoint 18 or 21 ...
    delay = rng.choice([0.0, 0.001, 0.003, 0.006, 0.01, 0.02])  # ... plus this many seconds
    run, ck_dir, seen = tmp_path / "run", tmp_path / "run" / "checkpoints", 0
    for i, target in enumerate((first, second, save_step)):
        # rows up to `seen` may still be in metrics.jsonl: aim past them (at a checkpoint step for the last)
        target = max(target, seen + 2) if i < 2 else max(target, 3 * math.ceil((seen + 2) / 3))
        expect = (ckpt.find(run, "auto") or [None])[0]
        p = Proc(tiny_flags(char_data, run, resume="auto", **flags), tmp_path, f"seg{i}")
        if i < 2:
            wait_for(lambda: last_step(run) >= target, p, f"step {target}")
        else:
            wait_for(lambda: (ck_dir / f".tmp-{sdir(target)}").exists() or (ck_dir / sdir(target)).exists(), p,
                     f"the save of step {target}")
            time.sleep(delay)
        p.kill()
        assert p.wait() == -signal.SIGKILL
        assert last_step(run) > seen
        seen = last_step(run)
        steps = sound_checkpoints(run)
        assert steps and steps[-1] <= seen, (steps, seen)
        if i == 2:
            assert steps[-1] in (save_step - 3, save_step), steps
        if expect is not None:
            assert f"resuming from {expect} at step {int(expect.name[5:])}" in p.stdout()
    p = Proc(tiny_flags(char_data, run, resume="auto", **flags), tmp_path, "last")
    assert p.wait() == 0, p.stderr()[-3000:]
    assert "resuming from" in p.stdout()
    assert not list(ck_dir.glob(".tmp-*")), "temp dirs left behind"
    assert_same_run(run, baselines.get(**flags))


def test_sigkill_before_the_first_checkpoint_then_resume_auto_starts_over(char_data, baselines, tmp_path):
    """Killed before any checkpoint exists: the same `--resume auto` command must still work."""
    baselines.start(**FLAGS)
    run = tmp_path / "run"
    p = Proc(tiny_flags(char_data, run, resume="auto", **FLAGS), tmp_path, "seg0")
    wait_for(lambda: last_step(run) >= 1, p, "step 1")
    p.kill()
    p.wait()
    assert ckpt.complete_checkpoints(run) == [], "killed later than intended (a checkpoint exists)"
    p = Proc(tiny_flags(char_data, run, resume="auto", **FLAGS), tmp_path, "seg1")
    assert p.wait() == 0, p.stderr()[-3000:]
    assert_same_run(run, baselines.get(**FLAGS))


# ------------------------------------------------------------------------------------------
# 2. atomic checkpoints
# ------------------------------------------------------------------------------------------
KILLER = r'''
"""Run `gpt2fit train ARGS`, SIGKILLing itself inside one phase of the save of one checkpoint."""
import os, signal, sys
from pathlib import Path

phase, step = os.environ["KILL_AT"].split(":")
tag = f"step_{int(step):08d}"


def die():
    os.kill(os.getpid(), signal.SIGKILL)


import accelerate.checkpointing as ac
import gpt2fit.train.checkpoint as ck

if phase == "model_write":  # half of model.safetensors is on disk
    orig_save = ac.save

    def save(obj, f, *a, **k):
        out = orig_save(obj, f, *a, **k)
        if tag in str(f) and str(f).endswith("model.safetensors"):
            os.truncate(f, os.path.getsize(f) // 2)
            die()
        return out

    ac.save = save
elif phase == "manifest_write":  # half of MANIFEST.json written
    orig_fsync = ck.formats.fsync

    def fsync(path):
        if tag in str(path) and str(path).endswith("MANIFEST.json"):
            os.truncate(path, os.path.getsize(path) // 2)
            die()
        return orig_fsync(path)

    ck.formats.fsync = fsync
elif phase in ("before_rename", "export_final"):  # complete temp dir, not renamed yet
    orig_replace = os.replace
    name = f".tmp-{tag}" if phase == "before_rename" else ".tmp-final"

    def replace(src, dst, *a, **k):
        if Path(src).name == name:
            die()
        return orig_replace(src, dst, *a, **k)

    os.replace = replace
elif phase == "before_rotate":  # renamed into place, older ones not yet rotated away
    orig_rotate = ck.rotate

    def rotate(run_dir, keep):
        if ck.step_dir(run_dir, int(step)).is_dir():
            die()
        return orig_rotate(run_dir, keep)

    ck.rotate = rotate
else:
    raise SystemExit(f"unknown phase {phase}")

from gpt2fit.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
'''


@pytest.mark.slow
def test_sigkill_in_every_phase_of_a_checkpoint_save(char_data, baselines, tmp_path):
    """A kill at each point of save(): --resume auto always finds the newest complete checkpoint."""
    baselines.start(**FLAGS)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    run = tmp_path / "run"
    # (phase, step whose save it kills, newest complete checkpoint left behind)
    plan = [("model_write", 6, 3), ("manifest_write", 9, 6), ("before_rename", 12, 9),
            ("before_rotate", 15, 15), ("export_final", 24, 24)]
    resume_from = None
    for phase, step, newest in plan:
        p = Proc(tiny_flags(char_data, run, resume="auto", **FLAGS), tmp_path, phase,
                 env={"KILL_AT": f"{phase}:{step}"}, script=killer)
        assert p.wait() == -signal.SIGKILL, f"{phase}: not killed\n{p.stderr()[-3000:]}"
        if resume_from is not None:
            assert f"resuming from {ckpt.step_dir(run, resume_from)} at step {resume_from}" in p.stdout()
        steps = sound_checkpoints(run)
        assert steps[-1] == newest, (phase, steps)
        tmp = run / "checkpoints" / f".tmp-{sdir(step)}"
        if phase == "model_write":
            assert (tmp / "model.safetensors").is_file() and not (tmp / "MANIFEST.json").exists()
        elif phase == "manifest_write":
            with pytest.raises(json.JSONDecodeError):
                json.loads((tmp / "MANIFEST.json").read_text())
        elif phase == "before_rename":
            assert (tmp / "MANIFEST.json").is_file()  # complete, but never renamed: not picked
        elif phase == "before_rotate":
            assert steps == [9, 12, 15]  # nothing rotated away yet; the newest is complete
        else:
            assert (run / ".tmp-final").is_dir() and not (run / "final").exists()
        resume_from = newest
    p = Proc(tiny_flags(char_data, run, resume="auto", **FLAGS), tmp_path, "last")
    assert p.wait() == 0, p.stderr()[-3000:]
    assert f"resuming from {ckpt.step_dir(run, 24)} at step 24" in p.stdout()
    assert not list((run / "checkpoints").glob(".tmp-*")), "temp dirs left behind"
    assert sound_checkpoints(run) == [21, 24]
    assert_same_run(run, baselines.get(**FLAGS))


def test_resume_auto_skips_half_written_checkpoints_and_rotation_keeps_newest(char_data, baselines, tmp_path):
    """Leftovers of an interrupted save (a .tmp dir, a step dir without manifest, a cut metrics line)."""
    base = baselines.get(**FLAGS)
    run = copy_unfinished(base, tmp_path / "run", drop_after=21)
    good = ckpt.step_dir(base, 24)
    half = run / "checkpoints" / f".tmp-{sdir(24)}"
    half.mkdir()
    (half / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    no_manifest = ckpt.step_dir(run, 24)  # same name as the next save: must be replaced, not trusted
    no_manifest.mkdir()
    for f in ("model.safetensors", "optimizer.bin"):
        shutil.copy(good / f, no_manifest / f)
    stray = ckpt.step_dir(run, 99)  # incomplete and newer than everything: never picked, never counted
    stray.mkdir()
    (stray / "optimizer.bin").write_bytes(b"\0" * 10)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 25, "tok')  # a row cut short by the kill
    assert sound_checkpoints(run) == [21]
    p = Proc(tiny_flags(char_data, run, **dict(FLAGS, resume="auto", keep_checkpoints=1)), tmp_path, "resume")
    assert p.wait() == 0, p.stderr()[-3000:]
    assert f"resuming from {ckpt.step_dir(run, 21)} at step 21" in p.stdout()
    assert sound_checkpoints(run) == [24]  # keep_checkpoints=1: the newest complete one survives
    assert not half.exists()
    assert ckpt.verify(no_manifest)["step"] == 24
    assert_same_run(run, base)


@pytest.mark.parametrize("damage", ["truncated", "zeroed_same_size"])
def test_damaged_newest_checkpoint_is_named_kept_and_auto_resumes_the_one_before(char_data, baselines, tmp_path,
                                                                              capsys, damage):
    """A checkpoint damaged in any byte is caught by its hashes: --resume PATH refuses it naming the
    file (and touches nothing); --resume auto says so loudly, keeps it renamed, resumes the one
    before, and the run ends bitwise as the uninterrupted one."""
    base = baselines.get(**FLAGS)
    run = copy_unfinished(base, tmp_path / "run", drop_after=24)
    damaged = ckpt.step_dir(run, 24)
    if damage == "truncated":
        target = damaged / "model.safetensors"
        size = target.stat().st_size
        os.truncate(target, size // 3)
        expect = f"{damaged} is damaged: model.safetensors is {size // 3} bytes, expected {size}"
    else:  # same size: a manifest of sizes alone would resume from this silently
        target = damaged / "optimizer.bin"
        target.write_bytes(bytes(target.stat().st_size))
        expect = f"{damaged} is damaged: optimizer.bin does not match the hash recorded when it was saved"
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    rc, out, err = cli_in_process("train", tiny_flags(char_data, run, resume=damaged, **FLAGS), capsys)
    assert rc == 2
    line = error_line(err)
    assert line == err.strip().splitlines()[0]  # nothing was drawn before it
    assert expect in line and "--resume PATH" in line, line
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before  # nothing touched
    p = Proc(tiny_flags(char_data, run, resume="auto", **FLAGS), tmp_path, "auto")
    assert p.wait() == 0, p.stderr()[-3000:]
    assert expect in p.stderr() and f"kept it as {run / 'checkpoints' / ('damaged-' + damaged.name)}" in p.stderr()
    assert f"resuming from {ckpt.step_dir(run, 21)} at step 21" in p.stdout()
    kept = run / "checkpoints" / f"damaged-{damaged.name}"
    assert kept.is_dir() and (kept / target.name).read_bytes() == before[target]  # renamed, never deleted
    assert_same_run(run, base)


# ------------------------------------------------------------------------------------------
# 3. preemption: SIGTERM / SIGINT
# ------------------------------------------------------------------------------------------
def test_checkpoint_files_reach_the_disk_before_the_rename(char_data, tmp_path, monkeypatch, capsys):
    """Durability across a power cut: every file of a checkpoint is fsynced before the temp dir is
    renamed to step_<N>, and the checkpoints dir is fsynced after the rename."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    rc, out, err = run_in_process(tiny_flags(char_data, run, max_steps=2, checkpoint_interval=2), capsys)
    assert rc == 0, err
    final = ckpt.step_dir(run, 2)
    (i, rename), = [(i, e) for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final)]
    tmp = rename[1]
    synced_before = {e[1] for e in events[:i] if e[0] == "fsync"}
    files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    assert "model.safetensors" in files and "optimizer.bin" in files
    missing = [f for f in files if f"{tmp}/{f}" not in synced_before]
    assert not missing, missing
    assert tmp in synced_before  # the temp dir's entries
    assert ("fsync", str(final.parent)) in events[i + 1:]  # the rename


def test_sigterm_and_sigint_finish_the_step_checkpoint_exit_75_and_resume_identically(char_data, baselines,
                                                                                        tmp_path):
    baselines.start(**FLAGS)
    run = tmp_path / "run"
    stopped = None
    for i, (sig, after) in enumerate(((signal.SIGTERM, 4), (signal.SIGINT, 4))):
        p = Proc(tiny_flags(char_data, run, resume="auto", **FLAGS), tmp_path, f"seg{i}")
        target = (stopped or 0) + after
        wait_for(lambda: last_step(run) >= target, p, f"step {target}")
        p.kill(sig)
        assert p.wait(60) == EXIT_PREEMPTED, p.stderr()[-3000:]
        assert f"{sig.name} received" in p.stderr()
        assert "--resume auto" in p.stdout() and f"exit code {EXIT_PREEMPTED}" in p.stdout()
        if stopped is not None:
            assert f"resuming from {ckpt.step_dir(run, stopped)} at step {stopped}" in p.stdout()
        stopped = last_step(run)
        assert target <= stopped < STEPS
        # the step in flight was finished, logged and checkpointed: nothing to redo
        assert sound_checkpoints(run)[-1] == stopped
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "preempted" and summary["step"] == stopped
        assert not (run / "final").exists()
    p = Proc(tiny_flags(char_data, run, resume="auto", **FLAGS), tmp_path, "last")
    assert p.wait() == 0, p.stderr()[-3000:]
    assert f"resuming from {ckpt.step_dir(run, stopped)} at step {stopped}" in p.stdout()
    assert_same_run(run, baselines.get(**FLAGS))


def test_second_sigint_aborts_at_once_without_saving(char_data, tmp_path):
    run = tmp_path / "run"
    # 128 micro-batches per step: a step is long enough to tell "abort now" from "finish the step"
    p = Proc(tiny_flags(char_data, run, max_steps=50, grad_accum_steps=128, checkpoint_interval=0,
                        eval_interval=1000), tmp_path, "run")
    wait_for(lambda: last_step(run) >= 1, p, "step 1")
    time.sleep(0.2)  # well inside step 2
    p.kill(signal.SIGINT)
    wait_for(lambda: "SIGINT received" in p.stderr(), p, "the first SIGINT to be handled", timeout=60)
    at_first = last_step(run)
    t0 = time.monotonic()
    p.kill(signal.SIGINT)
    rc = p.wait(60)
    elapsed = time.monotonic() - t0
    assert rc == 130, (rc, p.stderr()[-3000:])
    assert "interrupted" in p.stderr()
    assert elapsed < 10, f"took {elapsed:.1f}s to stop after the second SIGINT"
    assert last_step(run) == at_first, "the step in flight was finished although aborted"
    assert ckpt.complete_checkpoints(run) == [], "a checkpoint was saved although aborted"


# ------------------------------------------------------------------------------------------
# 4. divergence guard and loss spikes (in-process, with a poisoned loss)
# ------------------------------------------------------------------------------------------
def poison_loss(monkeypatch, steps, factor=float("nan")) -> dict:
    """Multiply the training loss by ``factor`` on the given optimizer steps (1 micro-batch a step).

    Returns {step: all parameters as the step saw them}, i.e. the weights after the previous step.
    """
    from gpt2fit.train.model import CausalLM

    orig = CausalLM.forward
    seen = {}

    def forward(self, input_ids, targets):
        if not torch.is_grad_enabled():  # validation runs under no_grad and is not counted
            return orig(self, input_ids, targets)
        step = len(seen) + 1
        seen[step] = torch.cat([p.detach().flatten() for p in self.parameters()]).clone()
        out = orig(self, input_ids, targets)
        return out * factor if step in steps else out

    monkeypatch.setattr(CausalLM, "forward", forward)
    return seen


def run_in_process(argv, capsys):
    return cli_in_process("train", argv, capsys)


def cli_in_process(command: str, argv, capsys):
    """`gpt2fit COMMAND ARGV` in this process (as cli.main dispatches it): (exit code, stdout, stderr)."""
    import importlib

    from gpt2fit.cli import COMMANDS

    module = importlib.import_module(COMMANDS[command][0])
    capsys.readouterr()
    rc = run_main(getattr(module, "cli_main", None) or module.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_nonfinite_steps_are_skipped_and_counted(char_data, tmp_path, monkeypatch, capsys, optimizer):
    weights = poison_loss(monkeypatch, {5, 6})
    run = tmp_path / "run"
    rc, out, err = run_in_process(tiny_flags(char_data, run, max_steps=10, max_nonfinite_steps=3,
                                             optimizer=optimizer), capsys)
    assert rc == 0, err
    skips = read_rows(run, "skip")
    assert [(r["step"], r["consecutive"]) for r in skips] == [(5, 1), (6, 2)]
    assert "step 5: non-finite loss or gradient norm; update skipped (1 in a row)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_steps"] == 2
    rows = {r["step"]: r for r in read_rows(run)}
    assert math.isnan(rows[5]["loss"]) and math.isfinite(rows[7]["loss"]) and math.isfinite(rows[10]["loss"])
    # the skipped updates changed nothing: the weights after steps 4, 5 and 6 are the same ...
    assert torch.equal(weights[5], weights[6]) and torch.equal(weights[5], weights[7])
    assert torch.isfinite(weights[7]).all()
    assert not torch.equal(weights[7], weights[8])  # ... and training went on after the streak
    assert not torch.equal(weights[4], weights[5])
    # ... and Adam took 8 steps in 10 (its moments, and Muon's momentum, were not fed the NaN gradients)
    state = torch.load(ckpt.step_dir(run, 10) / "optimizer.bin", weights_only=True)
    adam = state["adamw"] if optimizer == "muon" else state
    assert {float(v["step"]) for v in adam["state"].values()} == {8.0}
    if optimizer == "muon":
        assert all(torch.isfinite(v["momentum_buffer"]).all() for v in state["muon"]["state"].values())


def test_k_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(char_data, tmp_path,
                                                                                   monkeypatch, capsys):
    from safetensors.torch import load_file

    poison_loss(monkeypatch, set(range(5, 1000)))  # diverged for good from step 5 on
    run = tmp_path / "run"
    rc, out, err = run_in_process(tiny_flags(char_data, run, max_steps=20, checkpoint_interval=1,
                                             keep_checkpoints=2, max_nonfinite_steps=3), capsys)
    assert rc == 2
    first = error_line(err)
    assert first.startswith("error: training diverged: 3 non-finite steps in a row at step 7"), first
    good = ckpt.step_dir(run, 4)
    assert f"the last good checkpoint is {good}" in first, first
    assert [(r["step"], r["consecutive"]) for r in read_rows(run, "skip")] == [(5, 1), (6, 2), (7, 3)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 3
    assert not (run / "final").exists()
    # no checkpoint was written during the streak, so rotation kept the last one from a finite step
    assert sound_checkpoints(run)[-1] == 4
    w = load_file(good / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in w.values())


def test_sync_free_step_skips_nonfinite_updates_on_the_device(char_data, tmp_path, monkeypatch, capsys):
    """host_sync=log: no per-step verdict on the host; fused AdamW skips the NaN steps itself via
    found_inf, and the skips are counted at the next check (here the log step 8)."""
    weights = poison_loss(monkeypatch, {5, 6})
    run = tmp_path / "run"
    rc, out, err = run_in_process(tiny_flags(char_data, run, max_steps=10, max_nonfinite_steps=3, host_sync="log",
                                             log_interval=4, checkpoint_interval=10), capsys)
    assert rc == 0, err
    skips = read_rows(run, "skip")
    assert [(r["step"], r["skipped"], r["longest"], r["consecutive"]) for r in skips] == [(8, 2, 2, 0)]
    assert "steps 5-8: 2 non-finite update(s) skipped (longest streak 2, 0 in a row now)" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_steps"] == 2
    assert torch.equal(weights[5], weights[6]) and torch.equal(weights[5], weights[7])
    assert torch.isfinite(weights[7]).all() and not torch.equal(weights[7], weights[8])
    assert not torch.equal(weights[4], weights[5])
    adam = torch.load(ckpt.step_dir(run, 10) / "optimizer.bin", weights_only=True)
    assert {float(v["step"]) for v in adam["state"].values()} == {8.0}
    assert all(torch.isfinite(v["exp_avg_sq"]).all() for v in adam["state"].values())


def test_sync_free_step_stops_a_diverged_run_at_the_next_check(char_data, tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, set(range(5, 1000)))
    run = tmp_path / "run"
    rc, out, err = run_in_process(tiny_flags(char_data, run, max_steps=20, checkpoint_interval=2, log_interval=4,
                                             keep_checkpoints=2, max_nonfinite_steps=3, host_sync="log"), capsys)
    assert rc == 2
    first = error_line(err)
    # checks at 6 (checkpoint due: streak of 2, so no save) and 8 (log: a streak of 4 >= 3)
    assert first.startswith("error: training diverged: 3 non-finite steps in a row by step 8"), first
    assert f"the last good checkpoint is {ckpt.step_dir(run, 4)}" in first, first
    assert [(r["step"], r["skipped"], r["consecutive"]) for r in read_rows(run, "skip")] == [(6, 2, 2), (8, 2, 4)]
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 4
    assert sound_checkpoints(run)[-1] == 4


def test_loss_spike_is_logged(char_data, tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, {8}, factor=10.0)
    run = tmp_path / "run"
    rc, out, err = run_in_process(tiny_flags(char_data, run, max_steps=10), capsys)
    assert rc == 0, err
    assert [r["step"] for r in read_rows(run) if r.get("spike")] == [8]
    assert "step 8: loss spike" in out


def test_inf_weights_diverge_without_any_patching(char_data, tmp_path, capsys):
    """No patching: a model whose weights hold inf makes every step non-finite -> exit 2 after K."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=128))
    with torch.no_grad():
        lm.transformer.h[0].mlp.c_fc.weight.fill_(float("inf"))
    lm.save_pretrained(tmp_path / "bad_model")
    run = tmp_path / "run"
    rc, out, err = cli_in_process("train", tiny_flags(char_data, run, n_layer=None, n_head=None, n_embd=None,
                                                      init_from=tmp_path / "bad_model", max_nonfinite_steps=3),
                                  capsys)
    assert rc == 2, err[-3000:]
    first = error_line(err)
    assert first.startswith("error: training diverged: 3 non-finite steps in a row at step 3")
    assert "the last good checkpoint is none" in first
    assert [(r["step"], r["consecutive"]) for r in read_rows(run, "skip")] == [(1, 1), (2, 2), (3, 3)]
    assert ckpt.complete_checkpoints(run) == [] and not (run / "final").exists()
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"


# ------------------------------------------------------------------------------------------
# 5. out of memory
# ------------------------------------------------------------------------------------------
def test_oom_message_names_the_knobs_and_the_planner(char_data, tmp_path):
    from gpt2fit.config import parse_config
    from gpt2fit.train.command import oom_message

    cfg, _ = parse_config(tiny_flags(char_data, tmp_path / "r", optimizer="adamw8bit", grad_checkpointing="true",
                                     block_size=64, preset="gpt2-medium"))
    msg = oom_message(SimpleNamespace(cfg=cfg, micro=4))
    for fragment in ("out of GPU memory", "micro_batch_size=4", "block_size=64", "grad_checkpointing=True",
                     "optimizer=adamw8bit", "gpt2fit plan", "--micro_batch_size auto", "--model gpt2-medium"):
        assert fragment in msg, (fragment, msg)


def test_oom_during_training_becomes_a_clear_error(char_data, tmp_path, monkeypatch, capsys):
    import gpt2fit.train.command as command

    def oom(run, on_checkpoint=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(command, "fit", oom)
    rc, out, err = run_in_process(tiny_flags(char_data, tmp_path / "run", max_steps=3), capsys)
    assert rc == 2
    first = error_line(err)
    assert first == err.strip().splitlines()[0]
    assert first.startswith("error: out of GPU memory with micro_batch_size=4, block_size=32"), first
    assert "gpt2fit plan" in first


# ------------------------------------------------------------------------------------------
# 6. disk full while saving
# ------------------------------------------------------------------------------------------
def _page(n: int) -> int:
    return -(-n // 4096) * 4096


@pytest.fixture
def small_fs(tmp_path):
    """A 32 MiB tmpfs (root only): a disk that really fills up."""
    fs = tmp_path / "fs"
    fs.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(fs)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the in-process ENOSPC test still runs")
    yield fs
    for p in _LIVE:
        if p.p.poll() is None:
            p.p.kill()
            p.p.wait()
    subprocess.run(["umount", "-l", str(fs)], check=False)


@pytest.mark.parametrize("fails_in", ["model", "optimizer"])
def test_real_disk_full_during_a_save_keeps_the_previous_checkpoint(char_data, baselines, small_fs, tmp_path,
                                                                     fails_in):
    base = baselines.get(**FLAGS)
    sizes = {p.name: p.stat().st_size for p in ckpt.step_dir(base, 24).iterdir()}
    one_ckpt = sum(_page(s) for s in sizes.values())
    # room for the first checkpoint (step 3) and the logs, then the step-6 save runs out of space
    room = one_ckpt + 96 * 1024 + (_page(sizes["model.safetensors"]) if fails_in == "optimizer" else 0)
    filler = small_fs / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (shutil.disk_usage(small_fs).free - room))
    run = small_fs / "run"
    p = Proc(tiny_flags(char_data, run, **FLAGS), tmp_path, "full")
    assert p.wait() == 2, p.stderr()[-3000:]
    line = p.error_line()
    assert line.startswith("error: could not save checkpoint step 6: the disk is full"), p.stderr()[-3000:]
    assert f"the previous checkpoint {sdir(3)} is intact" in line
    assert sound_checkpoints(run) == [3]
    assert not list((run / "checkpoints").glob(".tmp-*")), "the half-written checkpoint was left behind"
    if fails_in == "optimizer":
        return  # the resume after freeing space is the same for both; run it once
    filler.unlink()  # the user frees space and continues
    p = Proc(tiny_flags(char_data, run, resume="auto", **FLAGS), tmp_path, "resume")
    assert p.wait() == 0, p.stderr()[-3000:]
    assert f"resuming from {ckpt.step_dir(run, 3)} at step 3" in p.stdout()
    assert_same_run(run, base)


def test_an_error_during_training_starts_its_own_line(char_data, tmp_path, monkeypatch, capsys):
    """Raised while the progress bar is drawn: the bar is closed first, so `error: ` begins a line."""
    import accelerate

    def full(self, output_dir=None, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(output_dir))

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    rc, out, err = run_in_process(tiny_flags(char_data, tmp_path / "run", max_steps=4, checkpoint_interval=2),
                                  capsys)
    assert rc == 2
    assert error_line(err, own_line=True).startswith("error: could not save checkpoint step 2: the disk is full")


def test_enospc_from_save_state_is_a_clear_error_and_resumable(char_data, tmp_path, monkeypatch, capsys):
    """The same path without a real small disk: save_state writes part of the files, then ENOSPC."""
    import accelerate

    orig = accelerate.Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            Path(output_dir, "model.safetensors").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir, "optimizer.bin")))
        return orig(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    run = tmp_path / "run"
    flags = dict(max_steps=8, checkpoint_interval=3)
    rc, out, err = run_in_process(tiny_flags(char_data, run, **flags), capsys)
    assert rc == 2
    first = error_line(err)
    assert first.startswith("error: could not save checkpoint step 6: the disk is full"), first
    assert f"the previous checkpoint {sdir(3)} is intact" in first and "--resume auto" in first
    assert sound_checkpoints(run) == [3]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(accelerate.Accelerator, "save_state", orig)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    rc, out, err = run_in_process(tiny_flags(char_data, run, resume="auto", **flags), capsys)
    assert rc == 0, err
    assert "at step 3" in out and [r["step"] for r in read_rows(run)] == list(range(1, 9))


# ------------------------------------------------------------------------------------------
# 7. security: safetensors weights, weights_only loads, no remote code, no secrets on disk
# ------------------------------------------------------------------------------------------
def test_checkpoints_and_final_hold_weights_only_as_safetensors(baselines):
    from accelerate.utils.other import load as accelerate_load
    from safetensors.torch import load_file

    base = baselines.get(**FLAGS)
    final = load_file(base / "final/model.safetensors")
    for c in ckpt.complete_checkpoints(base):
        assert sorted(p.name for p in c.iterdir()) == sorted([
            "MANIFEST.json", "trainer_state.json", "model.safetensors", "optimizer.bin", "scheduler.bin",
            "random_states_0.pkl"])
        weights = load_file(c / "model.safetensors")
        assert {k.removeprefix("lm.") for k in weights} >= {k for k in final if "lm_head" not in k}
        # the non-weight state is plain tensors and numbers: loadable with weights_only=True
        torch.load(c / "optimizer.bin", weights_only=True)
        torch.load(c / "scheduler.bin", weights_only=True)
        accelerate_load(c / "random_states_0.pkl")  # weights_only=True plus numpy's RNG arrays
    assert not [p for p in (base / "final").iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]


def test_resume_loads_every_pickle_with_weights_only(char_data, baselines, tmp_path, monkeypatch):
    base = baselines.get(**FLAGS)
    run = copy_unfinished(base, tmp_path / "run", drop_after=21)
    orig = torch.load
    calls = []

    def spy(f, *a, **kw):
        calls.append((Path(str(f)).name, kw.get("weights_only")))
        return orig(f, *a, **kw)  # raises if the file needs more than weights_only allows

    monkeypatch.setattr(torch, "load", spy)
    assert train_main(tiny_flags(char_data, run, resume="auto", **FLAGS)) == 0
    names = [n for n, _ in calls]
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(names), calls
    assert all(w is True for _, w in calls), calls
    assert "model.safetensors" not in names and not [n for n in names if "pytorch_model" in n]


def test_source_never_trusts_remote_code_or_unsafe_pickles():
    offenders = []
    for path in sorted((ROOT / "src" / "gpt2fit").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            flat = code.replace(" ", "")
            if ("trust_remote_code=True" in flat or "weights_only=False" in flat or "pickle.load" in code
                    or ("torch.load(" in code and "weights_only=True" not in flat)):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_refuse_pickled_weights(char_data, tmp_path, command, capsys):
    """A model dir whose weights exist only as pytorch_model.bin (a pickle) is never loaded."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2fit.prepare.tokenizers import load_tokenizer

    model_dir = tmp_path / "pickled"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=128)).save_pretrained(
        model_dir)
    load_tokenizer(str(char_data / "tokenizer")).save_pretrained(model_dir)
    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    args = [model_dir, "--prompt", "de", "--max_new_tokens", "3"] if command == "sample" else \
        [model_dir, "--data_dir", char_data, "--block_size", "32", "--max_windows", "2"]
    rc, out, err = cli_in_process(command, args, capsys)
    assert rc == 2, (rc, out[-500:], err[-2000:])
    first = error_line(err)
    assert first.startswith("error: ") and "safetensors" in first, first


def test_hf_token_is_never_written_or_printed(char_data, tmp_path, monkeypatch, capsys):
    secret = "hf_fakeSecretToken123456"
    env = dict(ENV, HF_TOKEN=secret, HUGGING_FACE_HUB_TOKEN=secret)
    run = tmp_path / "run"
    p = run_cli("train", *tiny_flags(char_data, run, max_steps=4, checkpoint_interval=2), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    rc, shown_out, shown_err = cli_in_process("train", [*tiny_flags(char_data, tmp_path / "o", max_steps=4),
                                                        "--print_config"], capsys)
    assert rc == 0 and "max_steps: 4" in shown_out
    files = [f for f in run.rglob("*") if f.is_file()]
    assert {"config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "optimizer.bin",
            "random_states_0.pkl"} <= {f.name for f in files}
    leaks = [str(f) for f in files if secret.encode() in f.read_bytes()]
    assert not leaks, leaks
    for text in (p.stdout, p.stderr, shown_out, shown_err):
        assert secret not in text
