"""The two on-disk contracts, each with one writer and one reader: the data dir and the run dir.

Data dir ``<data_dir>/`` (written by ``gpt2fit prepare``, read by train, eval and bench)::

    train.bin, val.bin   flat token ids (dtype from meta.json); EOT after every document
    meta.json            format_version, dtype, tokenizer {name_or_path, kind, vocab_size, eot_id,
                         fingerprint}, splits {train: {tokens, documents}, val: {...}}, source {...}
    tokenizer/           the tokenizer used, as a Hugging Face tokenizer dir

Run dir ``<out_dir>/`` (written by ``gpt2fit train``; read by eval, plot, push)::

    config.yaml          resolved training config (flat mapping of the train flags; no secrets)
    metrics.jsonl        one JSON object per line; ``kind`` is "train", "eval", "hellaswag" or "skip":
                           train: step, tokens, loss, lr, grad_norm, tokens_per_s, mfu,
                                  peak_mem_bytes, time_s
                           eval:  step, tokens, val_loss, val_ppl
                           hellaswag: step, tokens, acc, acc_norm (per character, as lm-eval),
                                      acc_norm_token (per token, as llm.c), n
    summary.json         written when training ends: status, step, tokens, final_val_loss, ...
    eval_results.json    written by `gpt2fit eval`: perplexity, hellaswag, lm_eval (per task)
    checkpoints/step_<N>/  Accelerate state + trainer_state.json + MANIFEST.json (atomic rename)
    final/               Hugging Face model dir: model.safetensors, config.json,
                         generation_config.json, tokenizer files
    loss.png             loss curves

Imports nothing from gpt2fit but ``errors``.
"""

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from gpt2fit.errors import UserError

# -- names ------------------------------------------------------------------------------------
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVAL_RESULTS = "eval_results.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
PLOT = "loss.png"
META = "meta.json"
TOKENIZER_DIR = "tokenizer"
CKPT_STATE = "trainer_state.json"  # step, data position, counters
CKPT_MANIFEST = "MANIFEST.json"  # every file of a checkpoint and its size; written last
META_FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")


def write_atomic(path: str | os.PathLike, data: str | bytes | memoryview) -> None:
    """Write ``path`` so a reader (or a kill) sees the old file or the new one, never half of one:
    write a temporary file, fsync it, rename it over the old one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w" if isinstance(data, str) else "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a kill: leave no half-written .tmp behind
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries (a rename in it), to disk. (Windows cannot open
    a directory and needs no such step.)"""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- data dir ---------------------------------------------------------------------------------
def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def make_meta(*, dtype: str, tokenizer: dict, splits: dict[str, dict], source: dict, **extra) -> dict:
    """meta.json's content; ``tokenizer`` holds name_or_path, kind, vocab_size, eot_id, fingerprint."""
    missing = {"name_or_path", "vocab_size", "eot_id"} - set(tokenizer)
    if missing:
        raise ValueError(f"meta.json tokenizer entry lacks {sorted(missing)}")
    return {"format_version": META_FORMAT_VERSION, "dtype": dtype, "tokenizer": tokenizer,
            "splits": splits, "source": source, **extra}


def write_meta(data_dir: str | os.PathLike, meta: dict) -> None:
    write_json_atomic(Path(data_dir) / META, meta)


def read_meta(data_dir: str | os.PathLike) -> dict:
    """``meta.json`` of a data dir, with errors that say how to make one."""
    d = Path(data_dir)
    meta_path = d / META
    if not d.is_dir():
        raise UserError(f"data_dir {str(d)!r} does not exist; prepare it first, e.g. "
                        f"`gpt2fit prepare --input stdlib --tokenizer bpe --out_dir {d}`.")
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing; {str(d)!r} is not a prepared data dir. "
                        "Run `gpt2fit prepare ... --out_dir` on it.")
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["tokenizer"]["vocab_size"]), meta["splits"]["train"]["tokens"]  # noqa: B018 - shape check
        np.dtype(meta.get("dtype", "uint16"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{meta_path} is corrupt ({type(e).__name__}: {e}); prepare the data again.") from None
    return meta


def open_split(data_dir: str | os.PathLike, split: str, meta: dict | None = None) -> np.memmap:
    """Memory-map ``<split>.bin`` after checking its size against meta.json (a mismatch is an error)."""
    meta = meta or read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"{path} is missing; prepare the data again.")
    dtype = np.dtype(meta.get("dtype", "uint16"))
    size = path.stat().st_size
    expected = meta["splits"].get(split, {}).get("tokens")
    if size == 0 or expected == 0:
        raise UserError(f"{path} is empty; the {split} split has no tokens. Add data or lower val_fraction.")
    if size % dtype.itemsize or (expected is not None and size // dtype.itemsize != expected):
        raise UserError(f"{path} holds {size} bytes but meta.json says {expected} {dtype.name} tokens; the "
                        "file is truncated or from another prepare run. Prepare the data again.")
    return np.memmap(path, dtype=dtype, mode="r")


def check_token_ids(path: str | os.PathLike, data: np.ndarray, vocab_size: int, chunk: int = 1 << 26) -> None:
    """Refuse a token file holding an id the model has no embedding for (a chunked max over the
    memmap: one sequential read, 64M tokens at a time)."""
    top = max((int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)), default=-1)
    if top >= vocab_size:
        raise UserError(f"{path} holds token id {top} but the model's vocabulary has {vocab_size} ids; the data "
                        "was prepared with another tokenizer or meta.json's vocab_size is wrong. Prepare the "
                        "data again with the model's tokenizer.")


# -- run dir ----------------------------------------------------------------------------------
def resolve_model_path(path_or_id: str) -> str:
    """A run dir resolves to its ``final/``; a model dir or a Hub id is returned as is."""
    final = Path(path_or_id) / FINAL
    return str(final) if (final / "config.json").is_file() else os.fspath(path_or_id)


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG).is_file() or (Path(path) / METRICS).is_file()


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def complete_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints (a ``step_<N>`` dir holding its manifest), oldest first: the one rule."""
    root = Path(run_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
             if (m := _STEP_RE.match(p.name)) and (p / CKPT_MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def read_summary(run_dir) -> dict:
    """summary.json, or {} for a run that has not finished."""
    path = Path(run_dir) / SUMMARY
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def read_metrics(run_dir) -> dict[str, list[dict]]:
    """Rows of ``<run_dir>/metrics.jsonl`` by kind: ``{"train": [...], "eval": [...], "hellaswag": [...],
    <other kinds>: [...]}`` (no kind: train). Invalid JSON is skipped: silently on the last line (what a
    killed run leaves), with a warning elsewhere. When a resumed run logs a step at or before one
    already read, the older rows from that step on are dropped: the curve shows what the resumed run did."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{path} not found: {run_dir} is not a run dir (or its training has not logged yet); "
                        "pass the --out_dir of a `gpt2fit train` run")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out: dict[str, list[dict]] = {k: [] for k in ("train", "eval", "hellaswag")}
    bad = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i != len(lines):
                bad.append(i)
            continue
        if not isinstance(row, dict):
            bad.append(i)
            continue
        rows = out.setdefault(row.get("kind", "train"), [])
        step = row.get("step")
        if isinstance(step, (int, float)) and rows and isinstance(rows[-1].get("step"), (int, float)):
            if step <= rows[-1]["step"]:
                rows[:] = [r for r in rows if not (isinstance(r.get("step"), (int, float)) and r["step"] >= step)]
        rows.append(row)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s): {bad[:5]}")
    return out
