"""Publish a run on the Hugging Face Hub: a model card, a retrying upload, background pushes.

    gpt2fit push runs/quickstart --repo_id your-username/gpt2-quickstart [--private]
        [--revision BRANCH] [--include_checkpoints] [--license mit] [--endpoint URL]

What lands in the repo (one commit, repo root)::

    final/*             model.safetensors, config.json, generation_config.json, tokenizer files
    README.md           the model card, built from config.yaml / summary.json / eval_results.json
    loss.png            loss curves (embedded in the card), when the run has them
    eval_results.json   when `gpt2fit eval` wrote it
    checkpoints/step_N/ with --include_checkpoints: complete checkpoints, weights and data
                        position only (see CHECKPOINT_ALLOW)

Local files are never modified, on success or failure: the card is built in memory and
uploaded from bytes, the other files are read in place, all in one ``create_commit`` (model and
card land together or not at all). No README.md is written into final/, no staging copy is made.
Background pushes during training (:class:`BackgroundPusher`) first snapshot the folder with hard
links, because the trainer may delete a checkpoint while its upload is still running.

Tokens: the token comes from ``HF_TOKEN`` or the stored login (``hf auth login``), read by
huggingface_hub at request time. gpt2fit never writes it anywhere and has no ``--token`` flag
(a token on the command line ends up in shell history); error messages pass through
:func:`redact`.

Offline mode: huggingface_hub 2.x blocks *every* request while ``HF_HUB_OFFLINE=1`` (checked at
request time against ``huggingface_hub.constants.HF_HUB_OFFLINE``, read once at import), so a
push under offline mode fails fast with a UserError that says to unset it.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import http
import json
import logging
import math
import os
import queue
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gpt2fit import __version__
from gpt2fit import formats
from gpt2fit.errors import ArgumentParser, UserError

logger = logging.getLogger(__name__)

DEFAULT_LICENSE = "mit"
DEFAULT_RETRIES = 4  # retries after the first attempt: waits 2, 4, 8, 16 s with backoff=2.0
DEFAULT_BACKOFF = 2.0
MAX_BACKOFF_S = 60.0

# Files of checkpoints/step_N/ that are pushed with --include_checkpoints. An allowlist: the
# Accelerate state also holds optimizer.bin (2x the model), scheduler.bin and random_states_*.pkl,
# which are pickles (flagged by the Hub's scanner, unsafe to load from strangers) and only useful
# to resume on this machine. The completeness markers stay local too (MANIFEST.json would list
# files that are not pushed): a pushed checkpoint is weights + trainer state, not a resumable one.
CHECKPOINT_ALLOW = ("*.safetensors", "*.json", "*.yaml", "*.txt")
CHECKPOINT_IGNORE = ("MANIFEST.json", "COMPLETE")
# A checkpoint dir is complete when it holds one of these (checkpoint.py writes MANIFEST.json last
# and renames .tmp-step_N -> step_N; formats.py's contract names a COMPLETE marker).

# Extra files of the run dir pushed next to final/ (repo root).
RUN_EXTRAS = (formats.PLOT, formats.EVAL_RESULTS)

_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{10,}")
_SECRET_KEY_RE = re.compile(r"(^|_)(token|secret|password|passwd|api_key|apikey|credentials?)$", re.I)
_RETRY_STATUS = {408, 429}
_DONE_STATUSES = {"completed", "complete", "finished", "done", "success", "ok"}


def redact(text: Any) -> str:
    """``text`` with anything that looks like a Hugging Face token (``hf_...``) masked."""
    return _TOKEN_RE.sub("hf_***", str(text))


# --------------------------------------------------------------------------- reading a run dir


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): fix or delete it, then push again") from e
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict | None:
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix it, then push again") from e
    return data if isinstance(data, dict) else None


def _last_metrics(path: Path) -> dict[str, dict]:
    """The last row of each ``kind`` in metrics.jsonl (bad lines are skipped)."""
    last: dict[str, dict] = {}
    if not path.is_file():
        return last
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                last[str(row.get("kind", "train"))] = row
    return last


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _first(*values: Any) -> Any:
    for v in values:
        if _present(v):
            return v
    return None


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:g}"


def _fmt(value: Any) -> str:
    """A table cell: ints with separators, floats with 4 significant digits, text escaped."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return redact(value).replace("|", "\\|").replace("\n", " ")


def _fmt_duration(seconds: Any) -> str | None:
    s = _finite(seconds)
    if s is None or s < 0:
        return None
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {sec:02d}s" if m else f"{s:.1f}s")


_DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".csv", ".tsv", ".md", ".gz", ".zst", ".bin")


def _looks_like_hub_id(value: Any) -> bool:
    """True for 'namespace/name' strings that are not local paths (nor globs or data files)."""
    if not isinstance(value, str) or value.count("/") != 1 or value.startswith((".", "/", "~")):
        return False
    if any(ch in value for ch in "*?[") or value.lower().endswith(_DATA_SUFFIXES) or Path(value).exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _dataset_items(value: Any) -> list[str]:
    if isinstance(value, dict):
        value = _first(value.get("inputs"), value.get("name"), value.get("path"))
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if _present(v) and not isinstance(v, (dict, list))]
    return [str(value)] if _present(value) else []


def _local_name(value: Any) -> str:
    """Only the last component of a local path: run dirs must not leak /home/<user>/..."""
    return Path(str(value)).name or str(value)


# --------------------------------------------------------------------------- model card

# Run settings of config.yaml that say nothing about the model: left out of the card.
_NOT_HPARAMS = {
    "out_dir", "resume", "overwrite", "report_to", "push_to_hub", "sample_prompt", "sample_tokens", "log_interval",
    "num_workers", "eval_before_training", "checkpoint_interval", "keep_checkpoints", "max_memory",
}  # fmt: skip

# Old-style GPT-2 names accepted by from_pretrained -> their canonical Hub ids (for base_model).
_CANONICAL_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}

# Hyperparameters shown first, in this order; other scalar keys of config.yaml follow, sorted.
_HPARAM_ORDER = (
    "init_from", "preset", "n_layer", "n_head", "n_embd", "block_size", "dataset", "data_dir",
    "learning_rate", "min_lr", "warmup_steps", "max_steps", "max_tokens", "micro_batch_size",
    "grad_accum_steps", "weight_decay", "optimizer", "mixed_precision", "seed",
)  # fmt: skip


def _public(value: Any, key: str = "") -> Any:
    """``value`` with local paths reduced to their last component (lists elementwise)."""
    if isinstance(value, (list, tuple)):
        return [_public(v, key) for v in value]
    if not isinstance(value, str):
        return value
    pathlike = value.startswith(("/", "~", "./", "../")) or key.endswith(("_dir", "_path", "_file"))
    if pathlike or (os.sep in value and not _looks_like_hub_id(value) and Path(value).exists()):
        return _local_name(value)
    return value


def _hparam_rows(config: dict) -> list[tuple[str, str]]:
    rows = []
    keys = [k for k in _HPARAM_ORDER if k in config] + sorted((k for k in config if k not in _HPARAM_ORDER), key=str)
    for raw_key in keys:
        key, value = str(raw_key), config[raw_key]
        if not _present(value) or _SECRET_KEY_RE.search(key) or key in _NOT_HPARAMS or key.startswith("hub_"):
            continue
        nested = isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list)) for v in value)
        if isinstance(value, dict) or nested:
            continue
        if key == "seed" or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10_000):
            value = str(value)  # no thousands separator on seeds and small counts
        rows.append((key, _fmt(_public(value, key))))
    return rows


@dataclasses.dataclass
class _RunFacts:
    """What the card says about a run, gathered from its files; None where unknown."""

    config: dict
    summary: dict
    init_from: Any
    base_model: str | None  # a Hub id, for the metadata
    dataset_hub_ids: list[str]  # for the `datasets:` metadata
    dataset_type: str | None  # model-index dataset type: the Hub id when there is exactly one
    dataset_label: str | None  # Hub ids, built-in corpus names, local names (never a full path)
    tokens: Any
    step: Any
    n_params: Any
    val_loss: float | None
    val_ppl: float | None
    val_tokens: Any
    split: str
    hellaswag: dict
    has_plot: bool


def _gather(run: Path) -> _RunFacts:
    config = _read_yaml(run / formats.CONFIG) or {}
    summary = _read_json(run / formats.SUMMARY) or {}
    evals = _read_json(run / formats.EVAL_RESULTS) or {}
    last = _last_metrics(run / formats.METRICS)
    train_row, eval_row = last.get("train", {}), last.get("eval", {})

    init_from = _first(summary.get("init_from"), config.get("init_from"))
    if isinstance(init_from, str) and init_from in _CANONICAL_IDS:
        base_model = _CANONICAL_IDS[init_from]
    else:
        base_model = init_from if _looks_like_hub_id(init_from) else None

    # `dataset` is a Hub id, a built-in corpus name, a local path or glob, or a list of those
    # (summary.json records the `gpt2fit prepare` inputs); data_dir is the fallback.
    items = _dataset_items(_first(summary.get("dataset"), config.get("dataset")))
    hub_ids = [d for d in items if _looks_like_hub_id(d)]
    labels = [d if d in hub_ids or ("/" not in d and os.sep not in d) else _local_name(d) for d in items]
    data_dir = _first(summary.get("data_dir"), config.get("data_dir"))
    if not labels and _present(data_dir):
        labels = [_local_name(data_dir)]
    dataset_label = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "") or None

    # An explicit `gpt2fit eval` (eval_results.json) wins over the numbers training ended with.
    ppl = evals.get("perplexity") if isinstance(evals.get("perplexity"), dict) else {}
    val_loss = _finite(_first(ppl.get("loss"), summary.get("final_val_loss"), eval_row.get("val_loss")))
    val_ppl = _finite(_first(ppl.get("ppl"), summary.get("final_val_ppl"), eval_row.get("val_ppl")))
    if val_ppl is None and val_loss is not None and val_loss < 50:
        val_ppl = math.exp(val_loss)
    split = str(ppl.get("split") or "val")
    split = {"val": "validation", "valid": "validation"}.get(split, split)

    return _RunFacts(
        config=config,
        summary=summary,
        init_from=init_from,
        base_model=base_model,
        dataset_hub_ids=hub_ids,
        dataset_type=hub_ids[0] if len(items) == 1 and hub_ids else None,
        dataset_label=dataset_label,
        tokens=_first(summary.get("tokens"), train_row.get("tokens")),
        step=_first(summary.get("step"), train_row.get("step")),
        n_params=summary.get("n_params"),
        val_loss=val_loss,
        val_ppl=val_ppl,
        val_tokens=ppl.get("tokens"),
        split=split,
        hellaswag=evals.get("hellaswag") if isinstance(evals.get("hellaswag"), dict) else {},
        has_plot=(run / formats.PLOT).is_file(),
    )


def _eval_results(f: _RunFacts) -> list:
    """model-index entries: validation loss/perplexity on the run's data, HellaSwag acc/acc_norm."""
    from huggingface_hub import EvalResult

    task = {"task_type": "text-generation", "task_name": "Text Generation"}
    own = {**task, "dataset_type": f.dataset_type or f.dataset_label or "custom",
           "dataset_name": f.dataset_label or "custom text", "dataset_split": f.split}  # fmt: skip
    hs = {**task, "dataset_type": "Rowan/hellaswag", "dataset_name": "HellaSwag", "dataset_split": "validation"}
    results = []
    if f.val_loss is not None:
        results.append(EvalResult(**own, metric_type="loss", metric_name="validation loss",
                                  metric_value=round(f.val_loss, 4)))  # fmt: skip
    if f.val_ppl is not None:
        results.append(EvalResult(**own, metric_type="perplexity", metric_name="validation perplexity",
                                  metric_value=round(f.val_ppl, 3)))  # fmt: skip
    for key, label in (("acc", "accuracy"), ("acc_norm", "normalized accuracy")):
        v = _finite(f.hellaswag.get(key))
        if v is not None:
            results.append(EvalResult(**hs, metric_type=key, metric_name=label, metric_value=round(v, 4)))
    return results


def _summary_line(f: _RunFacts) -> str:
    shape = (("n_layer", "layers"), ("n_head", "heads"), ("n_embd", "hidden size"))
    arch = [f"{f.config[k]} {label}" for k, label in shape if _present(f.config.get(k))]
    if _present(f.config.get("block_size")):
        arch.append(f"context {f.config['block_size']}")
    if isinstance(f.n_params, (int, float)) and f.n_params > 0:
        arch.append(f"{_human(f.n_params)} parameters")
    what = "A GPT-2 language model" + (f" ({', '.join(arch)})" if arch else "")
    if f.base_model:
        origin = f"fine-tuned from [`{f.base_model}`](https://huggingface.co/{f.base_model})"
    elif _present(f.init_from):
        origin = f"fine-tuned from a local model (`{_fmt(_local_name(f.init_from))}`)"  # never a full path
    else:
        origin = "trained from scratch"
    if f.dataset_type:
        on = f" on [`{f.dataset_type}`](https://huggingface.co/datasets/{f.dataset_type})"
    else:
        on = f" on `{_fmt(f.dataset_label)}`" if f.dataset_label else ""
    return f"{what}, {origin}{on} with gpt2fit."


def _training_facts(f: _RunFacts) -> list[str]:
    facts = []
    if f.base_model:
        facts.append(("Base model", f"`{f.base_model}`"))
    else:
        facts.append(("Base model", "local model" if _present(f.init_from) else "none (trained from scratch)"))
    if f.dataset_label:
        facts.append(("Data", f"`{_fmt(f.dataset_label)}`"))
    if isinstance(f.tokens, (int, float)):
        facts.append(("Tokens seen", f"{_fmt(f.tokens)} ({_human(float(f.tokens))})"))
    elif _present(f.tokens):
        facts.append(("Tokens seen", _fmt(f.tokens)))
    if _present(f.step):
        facts.append(("Optimizer steps", _fmt(f.step)))
    if isinstance(f.summary.get("tokens_per_step"), int):
        facts.append(("Tokens per step", _fmt(f.summary["tokens_per_step"])))
    if isinstance(f.n_params, (int, float)) and f.n_params > 0:
        facts.append(("Parameters", f"{_fmt(f.n_params)} ({_human(f.n_params)})"))
    hardware = _first(f.summary.get("device"), f.summary.get("hardware"))
    if _present(hardware):
        procs = f.summary.get("num_processes")
        many = f" × {procs} processes" if isinstance(procs, int) and procs > 1 else ""
        facts.append(("Hardware", _fmt(hardware) + many))
    precision = f.config.get("mixed_precision")
    if _present(precision):
        facts.append(("Precision", "fp32" if precision in ("no", False) else f"{_fmt(precision)} mixed precision"))
    wall = _fmt_duration(f.summary.get("wall_time_s"))
    if wall:
        facts.append(("Training time", wall))
    if _present(f.summary.get("status")):
        facts.append(("Status", _fmt(f.summary["status"])))
    return [f"- **{k}:** {v}" for k, v in facts]


def _evaluation_table(f: _RunFacts) -> list[str]:
    rows = []
    if f.val_loss is not None:
        rows.append((f"{f.split} loss", f"{f.val_loss:.4f}"))
    if f.val_ppl is not None:
        rows.append((f"{f.split} perplexity", f"{f.val_ppl:.3f}"))
    if _present(f.val_tokens):
        rows.append((f"{f.split} tokens evaluated", _fmt(f.val_tokens)))
    hs = f.hellaswag
    for key, label in (("acc", "HellaSwag accuracy"), ("acc_norm", "HellaSwag accuracy (normalized)")):
        v = _finite(hs.get(key))
        if v is not None:
            rows.append((label, f"{v:.4f}"))
    if not rows:
        return []
    lines = ["## Evaluation", "", "| metric | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    notes = []
    if _present(hs.get("n")):
        notes.append(f"{_fmt(hs['n'])} examples")
    if _present(hs.get("normalization")):
        notes.append(f"normalization: {_fmt(hs['normalization'])}")
    if notes and any(_finite(hs.get(k)) is not None for k in ("acc", "acc_norm")):
        lines += [f"HellaSwag: {', '.join(notes)}.", ""]
    return lines


def build_model_card(
    run_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    license: str | None = DEFAULT_LICENSE,
    revision: str | None = None,
    checkpoints: list[str] | tuple[str, ...] = (),
):
    """The model card (a ``huggingface_hub.ModelCard``) of a run dir; nothing is written.

    Reads config.yaml, summary.json, eval_results.json and metrics.jsonl (each optional) and
    embeds loss.png when present. ``repo_id`` goes into the usage snippet and names the
    model-index; ``checkpoints`` lists pushed ``checkpoints/step_N`` folders. Unknown values are
    left out (never printed as None or nan); local paths are reduced to their last component.
    """
    from huggingface_hub import ModelCard, ModelCardData

    run = Path(run_dir)
    f = _gather(run)
    name = (repo_id.split("/")[-1] if repo_id else None) or run.resolve().name or "gpt2fit-model"
    eval_results = _eval_results(f)
    card_data = ModelCardData(
        base_model=f.base_model,
        datasets=f.dataset_hub_ids or None,
        license=license or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gpt2", "gpt2fit", "text-generation"],
        model_name=name,
        eval_results=eval_results or None,
    )

    lines = [f"# {name}", "", _summary_line(f), ""]
    status = f.summary.get("status")
    if _present(status) and str(status).lower() not in _DONE_STATUSES:
        where = f" at step {_fmt(f.step)}" if _present(f.step) else ""
        lines += [f"> **Note:** training status is `{_fmt(status)}`{where}; the planned schedule did not finish.", ""]

    ref = repo_id or "path/to/this/model"
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    lines += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{ref}"{rev})',
        f'model = AutoModelForCausalLM.from_pretrained("{ref}"{rev})',
        'generator = pipeline("text-generation", model=model, tokenizer=tokenizer)',
        'print(generator("Once upon a time", max_new_tokens=50, do_sample=True)[0]["generated_text"])',
        "```",
        "",
        "## Training",
        "",
        *_training_facts(f),
        "",
    ]
    hparams = _hparam_rows(f.config)
    if hparams:
        lines += ["### Hyperparameters", "", "| name | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in hparams] + [""]
    lines += _evaluation_table(f)
    if f.has_plot:
        lines += ["## Loss curve", "", f"![training and validation loss]({formats.PLOT})", ""]
    if checkpoints:
        note = "Intermediate weights (same config and tokenizer as the root; optimizer state not included):"
        lines += ["## Checkpoints", "", note, ""]
        lines += [f"- `{c}/`" for c in checkpoints] + [""]

    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(redact(content))


# --------------------------------------------------------------------------- pushing a folder


def check_repo_id(repo_id: str | None) -> str:
    """'namespace/name' or a UserError; the training loop calls this before its first step."""
    if not repo_id:
        raise UserError("--repo_id is required, e.g. --repo_id your-username/my-gpt2")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        example = repo_id.strip("/").split("/")[-1] or "my-gpt2"
        raise UserError(f"repo id {repo_id!r} must be 'namespace/name', e.g. 'your-username/{example}'")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"invalid repo id {repo_id!r}: {str(e).splitlines()[0]}") from e
    return repo_id


def _check_online() -> None:
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        raise UserError(
            "pushing needs the network but HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) is set — "
            "unset it for this command, e.g. `env -u HF_HUB_OFFLINE gpt2fit push ...`"
        )


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _is_retryable(exc: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    status = _status_of(exc)
    if status is not None:
        return status >= 500 or status in _RETRY_STATUS
    try:
        import httpx2

        if isinstance(exc, httpx2.TransportError):
            return True
    except ImportError:  # pragma: no cover - huggingface_hub 2.x depends on httpx2
        pass
    # Truncated / non-JSON answers (a proxy's HTML error page) are transient too.
    return isinstance(exc, (ConnectionError, TimeoutError, json.JSONDecodeError))


def _explain(
    exc: BaseException, repo_id: str, *, revision: str | None, endpoint: str, attempts: int, have_token: bool = True
) -> str:
    """A UserError message: first line = what failed and the fix; then the server's words."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    target = f"push to {repo_id!r}" + (f" (branch {revision!r})" if revision and revision != "main" else "")
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    status = _status_of(exc)
    if isinstance(exc, OfflineModeIsEnabled):
        head = f"{target} failed: HF_HUB_OFFLINE=1 is set — unset it to push"
    elif status is not None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        namespace = repo_id.split("/")[0]
        fix = {
            401: "set HF_TOKEN or run `hf auth login` ("
            + ("the token was rejected; use a valid token with write access)" if have_token else "no token was found)"),
            403: f"your token cannot write to {namespace!r}: use a write token "
                 "(https://huggingface.co/settings/tokens) or a namespace you own",
            404: "the repo or branch does not exist or your token cannot see it; check --repo_id and --revision",
            429: "rate limited by the Hub; wait a few minutes and push again",
        }.get(status, "the Hub is having trouble; push again later" if status >= 500 else "the Hub refused it")
        head = f"{target} failed{tries}: {status} {phrase} — {fix}"
    elif _is_retryable(exc):
        head = f"{target} failed{tries}: cannot reach {endpoint} ({type(exc).__name__}) — check your connection"
    else:
        head = f"{target} failed: {type(exc).__name__}"
    detail = str(exc).strip()
    return redact(f"{head}\n{detail}" if detail else head)


def _hub_api(token: str | None, endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="gpt2fit", library_version=__version__)


def _ensure_repo(api, repo_id: str, *, private: bool, revision: str | None) -> None:
    # private=None (not False) when not asked: a new repo then follows the namespace's default
    # visibility (organizations can default to private), and an existing repo is left alone.
    api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)


def _with_retries(
    attempt_fn: Callable[[], Any],
    *,
    api,
    repo_id: str,
    revision: str | None,
    token: str | None,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None],
):
    """Run ``attempt_fn`` (the whole create-repo + commit sequence) until it succeeds.

    Retries ``retries`` times with exponential backoff (``backoff * 2**i`` s, at most 60) on
    network errors, 5xx, 408 and 429; 401/403/404 and other 4xx fail at once. Hub and network
    failures become a UserError whose first line names the fix; bugs are re-raised as they are.
    """
    from huggingface_hub.errors import HfHubHTTPError

    attempt = 0
    while True:
        try:
            return attempt_fn()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            retryable = _is_retryable(exc)
            if retryable and attempt < retries:
                wait = min(backoff * (2**attempt), MAX_BACKOFF_S)
                attempt += 1
                logger.warning("push to %s: %s; retry %d/%d in %.1fs", repo_id, redact(_short(exc)), attempt,
                               retries, wait)  # fmt: skip
                sleep(wait)
                continue
            if not (retryable or isinstance(exc, (HfHubHTTPError, ValueError, OSError)) or _status_of(exc)):
                raise
            have_token = _status_of(exc) != 401 or bool(token) or _stored_token_exists()
            message = _explain(
                exc, repo_id, revision=revision, endpoint=api.endpoint, attempts=attempt + 1, have_token=have_token
            )
            raise UserError(message) from exc


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    path_in_repo: str | None = None,
    commit_message: str = "Upload with gpt2fit",
    token: str | None = None,
    endpoint: str | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
):
    """Upload ``folder`` to ``repo_id`` (created if missing, the ``revision`` branch too).

    ``create_repo(exist_ok=True)`` [+ ``create_branch(exist_ok=True)``] + ``upload_folder``,
    retried as a whole on network errors, 5xx, 408 and 429 (see :func:`_with_retries`); 401,
    403, 404 fail at once. Failures raise a UserError whose first line names the fix. Returns
    huggingface_hub's ``CommitInfo``. Only reads ``folder``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"nothing to push: {folder} is not a directory")
    check_repo_id(repo_id)
    _check_online()
    api = _hub_api(token, endpoint)

    def attempt():
        _ensure_repo(api, repo_id, private=private, revision=revision)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            revision=revision,
            commit_message=commit_message,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
        )

    return _with_retries(attempt, api=api, repo_id=repo_id, revision=revision, token=token, retries=retries,
                         backoff=backoff, sleep=sleep)  # fmt: skip


def _stored_token_exists() -> bool:
    """Whether huggingface_hub finds a token (HF_TOKEN or `hf auth login`); the token is not kept."""
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # noqa: BLE001 - e.g. a failing OIDC exchange: just say we found none
        return False


def _short(exc: BaseException) -> str:
    status = _status_of(exc)
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return f"{status} {first}" if status else first


# --------------------------------------------------------------------------- run files and snapshots


def _matches(rel: str, patterns) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _walk(src: Path, *, allow=None, ignore=()) -> list[str]:
    """Relative paths of the files under ``src`` that pass the allow / ignore patterns, sorted."""
    found = []
    for path in sorted(src.rglob("*")):
        if path.is_file():
            rel = path.relative_to(src).as_posix()
            if not ((allow and not _matches(rel, allow)) or _matches(rel, ignore)):
                found.append(rel)
    return found


def snapshot(src: str | os.PathLike, dst: str | os.PathLike, *, allow=None, ignore=()) -> list[str]:
    """Hard-link (copy where links fail) the files of ``src`` into ``dst``; returns their formats.

    A hard link survives the trainer deleting or renaming the original (checkpoint rotation),
    costs no disk space, and never writes to ``src``. It does not protect against a file being
    rewritten *in place*; gpt2fit writes new checkpoint dirs rather than overwriting files.
    Links need ``dst`` on the same file system (else it copies): see BackgroundPusher's tmp_dir.
    """
    src, dst = Path(src), Path(dst)
    files = _walk(src, allow=allow, ignore=ignore)
    for rel in files:
        _link_or_copy(src / rel, dst / rel)
    return files


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _check_run_dir(run_dir: str | os.PathLike) -> Path:
    run = Path(run_dir)
    if not run.exists():
        raise UserError(f"run dir {str(run)!r} does not exist — pass the --out_dir of a `gpt2fit train` run")
    if not run.is_dir():
        raise UserError(f"{str(run)!r} is not a directory — pass the run dir written by `gpt2fit train`")
    if not (run / formats.FINAL / "config.json").is_file():
        if (run / "config.json").is_file():
            raise UserError(f"{run} is a model dir, not a run dir — push it with `hf upload REPO_ID {run}`")
        raise UserError(
            f"{run} has no final/ model — run `gpt2fit train ...` to completion first (final/ is written when it ends)"
        )
    return run


@dataclasses.dataclass
class PushResult:
    repo_id: str
    url: str  # the repo page (its branch page with a revision)
    commit_url: str | None
    files: list[tuple[str, int]]  # (path in repo, bytes)
    card: str  # the README.md that was (or, with dry_run, would be) pushed


def run_files(run_dir: str | os.PathLike, *, include_checkpoints: bool = False) -> list[tuple[str, Path]]:
    """(path in repo, local file) for everything a push of ``run_dir`` uploads, except README.md."""
    run = Path(run_dir)
    files = [(rel, run / formats.FINAL / rel) for rel in _walk(run / formats.FINAL, ignore=("README.md",))]
    files += [(extra, run / extra) for extra in RUN_EXTRAS if (run / extra).is_file()]
    for ckpt in formats.complete_checkpoints(run) if include_checkpoints else []:
        prefix = f"{formats.CHECKPOINTS}/{ckpt.name}"
        files += [(f"{prefix}/{rel}", ckpt / rel) for rel in _walk(ckpt, allow=CHECKPOINT_ALLOW, ignore=CHECKPOINT_IGNORE)]
    return files


def push_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    include_checkpoints: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    license: str | None = DEFAULT_LICENSE,
    commit_message: str | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    dry_run: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> PushResult:
    """Push a finished run as one commit: final/ at the repo root, README.md, loss.png, eval_results.json.

    The model card is built in memory and uploaded from bytes; every other file is read in place
    (``create_commit`` with one ``CommitOperationAdd`` per file). Nothing is written anywhere, so
    the run dir is untouched whether the push succeeds or fails, and there is no staging copy.
    With ``include_checkpoints`` complete ``checkpoints/step_N/`` go up too, weights and data
    position only (CHECKPOINT_ALLOW). Retries as :func:`push_folder`. ``dry_run``: no network.
    """
    run = _check_run_dir(run_dir)
    check_repo_id(repo_id)
    files = run_files(run, include_checkpoints=include_checkpoints)
    ckpt_dirs = sorted({path.rsplit("/", 1)[0] for path, _ in files if path.startswith(formats.CHECKPOINTS + "/")})
    card = str(build_model_card(run, repo_id=repo_id, license=license, revision=revision, checkpoints=ckpt_dirs))
    card_bytes = card.encode("utf-8")
    listing = sorted([(path, local.stat().st_size) for path, local in files] + [("README.md", len(card_bytes))])
    url = repo_url(endpoint, repo_id, revision)
    if dry_run:
        return PushResult(repo_id, url, None, listing, card)
    _check_online()
    api = _hub_api(token, endpoint)

    def attempt():
        from huggingface_hub import CommitOperationAdd

        _ensure_repo(api, repo_id, private=private, revision=revision)
        # fresh operations per attempt: huggingface_hub mutates them and refuses to reuse them
        ops = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local)) for path, local in files]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_bytes))
        message = commit_message or f"gpt2fit: push {run.resolve().name}"
        return api.create_commit(repo_id, operations=ops, commit_message=message, revision=revision)

    info = _with_retries(attempt, api=api, repo_id=repo_id, revision=revision, token=token, retries=retries,
                         backoff=backoff, sleep=sleep)  # fmt: skip
    return PushResult(repo_id, url, getattr(info, "commit_url", None), listing, card)


def repo_url(endpoint: str | None, repo_id: str, revision: str | None) -> str:
    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    url = f"{endpoint.rstrip('/')}/{repo_id}"
    return f"{url}/tree/{revision}" if revision and revision != "main" else url


# --------------------------------------------------------------------------- background pushes


@dataclasses.dataclass
class Failure:
    """One upload that did not happen, and how to do it by hand."""

    folder: str
    path_in_repo: str | None
    error: str  # first line of the error, redacted
    command: str  # a shell command that pushes it later


def _push_command(
    folder: Path, repo_id: str, path_in_repo: str | None, private: bool, revision: str | None, is_run: bool = False
) -> str:
    flags = ["--repo_id", repo_id] + (["--private"] if private else [])
    flags += ["--revision", revision] if revision else []
    if is_run:
        return shlex.join(["gpt2fit", "push", str(folder), *flags])
    if folder.name == formats.FINAL:
        return shlex.join(["gpt2fit", "push", str(folder.parent), *flags])
    if folder.parent.name == formats.CHECKPOINTS:
        return shlex.join(["gpt2fit", "push", str(folder.parent.parent), *flags, "--include_checkpoints"])
    hf = ["hf", "upload", repo_id, str(folder)] + ([path_in_repo] if path_in_repo else [])
    return shlex.join(hf + (["--revision", revision] if revision else []) + (["--private"] if private else []))


class BackgroundPusher:
    """Uploads folders on one worker thread so training never waits on the network.

    ``submit()`` snapshots the folder at once (hard links into a temp dir; see :func:`snapshot`)
    so the trainer may rotate or delete it right after, then queues the upload. Nothing the
    worker does raises into the caller: failures are recorded, logged (redacted) and returned by
    ``finish()``; ``report()`` says what was not pushed and the command to push it later.
    The worker is a daemon thread: call ``finish()`` (or use ``with``) before the process exits,
    or queued uploads are dropped. Uploads run one at a time, in submission order.

        pusher = BackgroundPusher("you/my-gpt2", private=True)
        pusher.submit(ckpt_dir, path_in_repo=f"checkpoints/{ckpt_dir.name}")
        ...
        pusher.finish()
        print(pusher.report())
    """

    def __init__(
        self,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        token: str | None = None,
        endpoint: str | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        tmp_dir: str | os.PathLike | None = None,
        license: str | None = DEFAULT_LICENSE,
    ):
        self.repo_id = check_repo_id(repo_id)  # fail before training starts, not at the first push
        self.license = license
        self.private, self.revision = private, revision
        self._token, self._endpoint = token, endpoint
        self._retries, self._backoff = retries, backoff
        self._tmp_dir = os.fspath(tmp_dir) if tmp_dir is not None else None
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[dict] = []
        self._failures: list[Failure] = []
        self.pushed: list[str] = []  # path_in_repo (or folder) of each successful push
        self._thread: threading.Thread | None = None
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()
        return False

    @property
    def failures(self) -> list[Failure]:
        with self._lock:
            return list(self._failures)

    def _fail(self, job: dict, error: str) -> None:
        folder = Path(job["folder"])
        failure = Failure(
            folder=str(folder), path_in_repo=job.get("path_in_repo"), error=redact(error),
            command=_push_command(folder, self.repo_id, job.get("path_in_repo"), self.private, self.revision,
                                  is_run=job.get("run_dir", False)),
        )  # fmt: skip
        with self._lock:
            self._failures.append(failure)
        logger.warning("push of %s to %s failed: %s", folder, self.repo_id, failure.error)

    def submit(
        self,
        folder: str | os.PathLike,
        path_in_repo: str | None = None,
        commit_message: str | None = None,
        *,
        allow_patterns: list[str] | tuple[str, ...] | None = None,
        run_dir: bool = False,
    ) -> bool:
        """Queue an upload of ``folder`` (snapshotted now). True if queued; never raises.

        ``run_dir=True``: ``folder`` is a finished run dir; what `gpt2fit push` sends goes up
        (final/ at the repo root, README.md model card, loss.png, eval_results.json), with the
        card built now. Otherwise the folder's files go to ``path_in_repo`` (default: the root).
        ``allow_patterns`` limits the files (default: all; for a folder inside checkpoints/,
        CHECKPOINT_ALLOW minus CHECKPOINT_IGNORE, so optimizer state, pickles and the manifest
        stay local; pass ``["*"]`` to push everything).
        """
        job = {"folder": os.fspath(folder), "path_in_repo": None if run_dir else path_in_repo, "run_dir": run_dir,
               "message": commit_message or f"gpt2fit: upload {path_in_repo or Path(folder).name}"}  # fmt: skip
        if self._closed:
            self._fail(job, "submitted after finish(); not pushed")
            return False
        ignore: tuple[str, ...] = ()
        if allow_patterns is None and Path(folder).parent.name == formats.CHECKPOINTS:
            allow_patterns, ignore = CHECKPOINT_ALLOW, CHECKPOINT_IGNORE
        if not Path(folder).is_dir():
            self._fail(job, f"{folder} is not a directory")
            return False
        try:
            job["snapshot"] = tmp = tempfile.mkdtemp(prefix="gpt2fit-push-", dir=self._tmp_dir)
            data = Path(tmp) / "data"
            if run_dir:
                self._snapshot_run(Path(folder), data)
            else:
                snapshot(folder, data, allow=allow_patterns, ignore=ignore)
            data.mkdir(exist_ok=True)
        except Exception as e:  # noqa: BLE001 - never raise into training (e.g. rotated away mid-snapshot)
            first = str(e).strip().splitlines()
            self._fail(job, f"could not snapshot {folder}: {first[0] if first else type(e).__name__}")
            if job.get("snapshot"):
                shutil.rmtree(job["snapshot"], ignore_errors=True)
            return False
        with self._lock:  # enqueue under the lock: finish() may be closing the queue meanwhile
            closed = self._closed
            if not closed:
                self._pending.append(job)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._work, name="gpt2fit-hub-push", daemon=True)
                    self._thread.start()
                self._queue.put(job)
        if closed:
            shutil.rmtree(job["snapshot"], ignore_errors=True)
            self._fail(job, "submitted after finish(); not pushed")
            return False
        return True

    def _snapshot_run(self, run: Path, dst: Path) -> None:
        run = _check_run_dir(run)
        for path, local in run_files(run):
            _link_or_copy(local, dst / path)
        card = build_model_card(run, repo_id=self.repo_id, license=self.license, revision=self.revision)
        (dst / "README.md").write_text(str(card), encoding="utf-8")

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.get("abandoned"):  # finish() timed out and already reported it
                shutil.rmtree(job["snapshot"], ignore_errors=True)
                continue
            try:
                push_folder(
                    Path(job["snapshot"]) / "data", self.repo_id, private=self.private, revision=self.revision,
                    path_in_repo=job["path_in_repo"], commit_message=job["message"], token=self._token,
                    endpoint=self._endpoint, retries=self._retries, backoff=self._backoff,
                )  # fmt: skip
                with self._lock:
                    self.pushed.append(job["path_in_repo"] or job["folder"])
            except BaseException as e:  # noqa: BLE001 - recorded, never raised into training
                first = str(e).strip().splitlines()
                if not job.get("abandoned"):
                    self._fail(job, first[0] if first else type(e).__name__)
            finally:
                shutil.rmtree(job["snapshot"], ignore_errors=True)
                with self._lock:
                    if job in self._pending:
                        self._pending.remove(job)

    def finish(self, timeout: float | None = None) -> list[Failure]:
        """Wait for queued uploads (at most ``timeout`` s); returns what failed or did not finish.

        Later ``submit()`` calls are refused (and recorded). On timeout, the upload in flight may
        still complete in the background, but it is reported as not pushed.
        """
        with self._lock:
            if not self._closed and self._thread is not None:
                self._queue.put(None)
            self._closed = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                with self._lock:
                    unfinished = list(self._pending)
                for job in unfinished:  # the worker skips (or finishes quietly) what is reported here
                    job["abandoned"] = True
                    self._fail(job, f"not pushed: finish() stopped waiting after {timeout}s")
        return self.failures

    def report(self) -> str:
        """Plain text: what was pushed, what was not, and the command to push it later."""
        failures = self.failures
        lines = [f"hub: {len(self.pushed)} upload(s) to {self.repo_id} succeeded, {len(failures)} not pushed"]
        for f in failures:
            where = f" -> {f.path_in_repo}" if f.path_in_repo else ""
            gone = "" if Path(f.folder).exists() else " (the folder no longer exists locally)"
            lines.append(f"  not pushed: {f.folder}{where}{gone}: {f.error}")
            lines.append(f"    push it later with: {f.command}")
        if any(c.command.startswith("gpt2fit push") for c in failures):
            lines.append("  (`python scripts/push_to_hub.py RUN_DIR --repo_id ...` is the same command)")
        return redact("\n".join(lines))


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2fit push",
        description="Push a finished run (final/ model, model card, loss.png, eval_results.json) to the "
        "Hugging Face Hub as one commit. The token comes from HF_TOKEN or `hf auth login`.",
        epilog="example: gpt2fit push runs/quickstart --repo_id your-username/gpt2-quickstart --private",
    )
    p.add_argument("run_dir", help="run dir written by `gpt2fit train` (its --out_dir); must contain final/")
    p.add_argument("--repo_id", help="Hub model repo as namespace/name, e.g. your-username/gpt2-tinystories; "
                   "created if missing")  # fmt: skip
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")  # fmt: skip
    p.add_argument("--revision", default=None, help="branch to push to, created from main if missing (default: main)")
    p.add_argument("--include_checkpoints", action="store_true",
                   help="also push complete checkpoints/step_N/ (weights and data position; "
                   "optimizer/RNG pickles stay local)")  # fmt: skip
    p.add_argument("--license", default=DEFAULT_LICENSE,
                   help=f"license id for the model card metadata, e.g. apache-2.0 (default: {DEFAULT_LICENSE})")  # fmt: skip
    p.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--commit_message", default=None, help="commit message (default: 'gpt2fit: push <run name>')")
    p.add_argument("--dry_run", action="store_true",
                   help="print the model card and the files that would be pushed; no network")  # fmt: skip
    return p


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run = _check_run_dir(args.run_dir)
    check_repo_id(args.repo_id)
    branch = args.revision or "main"
    if not args.dry_run:
        _check_online()
        print(f"pushing {run} to {args.repo_id} ({branch}) ...", flush=True)
    result = push_run(
        run, args.repo_id, private=args.private, revision=args.revision, include_checkpoints=args.include_checkpoints,
        endpoint=args.endpoint, license=args.license, commit_message=args.commit_message, dry_run=args.dry_run,
    )  # fmt: skip
    total = sum(size for _, size in result.files)
    if args.dry_run:
        print(result.card)
        print(f"dry run: would push {len(result.files)} files ({_size(total)}) to {result.url}")
    else:
        print(f"pushed {len(result.files)} files ({_size(total)}):")
    for path, size in result.files:
        print(f"  {path:<40} {_size(size):>10}")
    if not args.dry_run:
        print(f"model: {result.url}")
        if result.commit_url:
            print(f"commit: {result.commit_url}")
    return 0


if __name__ == "__main__":
    from gpt2fit.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
