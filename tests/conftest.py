"""Shared fixtures: tiny corpora, prepared data dirs and tiny training configs (CPU, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GPT2_TOKENIZER = SHARED / "gpt2-tokenizer"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only beside the project's own checkout)")
    return path


@pytest.fixture(autouse=True)
def _reset_accelerate():
    """Each in-process run gets a fresh Accelerate state (mixed precision etc. are singletons)."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def corpus_text() -> str:
    """~300 kB of English-ish text that every machine has: the stdlib's docstrings and comments."""
    from gpt2fit.prepare.sources import stdlib_files

    parts, total = [], 0
    for f in stdlib_files()[:80]:
        t = f.read_text(errors="replace")
        parts.append(t)
        total += len(t)
        if total > 300_000:
            break
    return "".join(parts)


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """A char-level prepared data dir (vocab < 256, fast to train on)."""
    from gpt2fit.prepare import prepare

    d = tmp_path_factory.mktemp("data")
    src = d / "corpus.txt"
    src.write_text(corpus_text())
    out = d / "char"
    prepare([str(src)], str(out), tokenizer="char", split="chars", val_fraction=0.1, quiet=True)
    return out


def tiny_flags(data_dir: Path, out_dir: Path, **over) -> list[str]:
    flags = dict(data_dir=data_dir, out_dir=out_dir, n_layer=2, n_head=2, n_embd=32, block_size=32,
                 micro_batch_size=4, grad_accum_steps=1, max_steps=20, learning_rate="1e-2", min_lr="1e-3",
                 warmup_steps=2, eval_interval=10, eval_batches=4, log_interval=1, mixed_precision="no",
                 seed=7, report_to="none")
    flags.update(over)
    out = []
    for k, v in flags.items():
        if v is not None:  # None drops a default flag
            out += [f"--{k}", str(v)]
    return out


def read_rows(run_dir: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def run_cli(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m gpt2fit.cli ARGS` in a fresh process (exit codes and stderr as users see them)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "gpt2fit.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=cwd)
