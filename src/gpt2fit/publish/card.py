"""The model card of a run dir: ``gather`` reads its facts through ``gpt2fit.formats``, ``build_model_card`` renders
them from ``card_template.md`` (metadata and model-index through ``ModelCardData``). Unknown values are left out,
local paths cut to their last component, tokens masked. The model-index holds what others can compare: lm-eval's
results, and the validation loss only on a Hub dataset. The license is the caller's."""

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from gpt2fit import formats
from gpt2fit.errors import UserError, first_line
from gpt2fit.units import format_count, format_duration

TEMPLATE = Path(__file__).with_name("card_template.md")

_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{10,}")
_SECRET_KEY_RE = re.compile(r"(^|_)(token|secret|password|passwd|api_key|apikey|credentials?)$", re.IGNORECASE)
_DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".csv", ".tsv", ".md", ".gz", ".zst", ".bin")

# Run settings of config.yaml that say nothing about the model: left out of the card.
_NOT_HPARAMS = {"out_dir", "resume", "overwrite", "report_to", "push_to_hub", "sample_prompt", "sample_tokens",
                "log_interval", "num_workers", "eval_before_training", "checkpoint_interval", "keep_checkpoints",
                "max_memory", "recipe"}
# Hyperparameters shown first, in this order; other scalar keys of config.yaml follow, sorted.
_HPARAM_ORDER = ("init_from", "preset", "n_layer", "n_head", "n_embd", "block_size", "data_dir", "learning_rate",
                 "min_lr", "warmup_steps", "max_steps", "max_tokens", "micro_batch_size", "grad_accum_steps",
                 "weight_decay", "optimizer", "mixed_precision", "seed")
# Old-style GPT-2 names accepted by from_pretrained -> their canonical Hub ids (for base_model).
_CANONICAL_IDS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
_CANONICAL_IDS["distilgpt2"] = "distilbert/distilgpt2"


def redact(text: Any) -> str:
    """``text`` with anything that looks like a Hugging Face token (``hf_...``) masked."""
    return _TOKEN_RE.sub("hf_***", str(text))


def _load(path: Path, parse) -> dict:
    """A JSON/YAML mapping file, {} when absent; a broken one is a UserError (the card would lie)."""
    if not path.is_file():
        return {}
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as e:
        raise UserError(f"{path} is not valid ({first_line(e)}): fix or delete it, then push again") from e
    return data if isinstance(data, dict) else {}


def _finite(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _present(value: Any) -> bool:
    return value not in (None, "", [], {})


def _looks_like_hub_id(value: Any) -> bool:
    """True for 'namespace/name' strings that are not local paths (nor globs or data files)."""
    if (not isinstance(value, str) or value.count("/") != 1 or value.startswith((".", "/", "~"))
            or any(ch in value for ch in "*?[") or value.lower().endswith(_DATA_SUFFIXES) or Path(value).exists()):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _local_name(value: Any) -> str:
    """Only the last component of a local path: run dirs must not leak /home/<user>/..."""
    return Path(str(value)).name or str(value)


def _public(value: Any, key: str) -> Any:
    """``value`` with local paths reduced to their last component (lists elementwise)."""
    if isinstance(value, (list, tuple)):
        return [_public(v, key) for v in value]
    if not isinstance(value, str):
        return value
    pathlike = value.startswith(("/", "~", "./", "../")) or key.endswith(("_dir", "_path", "_file"))
    local = pathlike or (os.sep in value and not _looks_like_hub_id(value) and Path(value).exists())
    return _local_name(value) if local else value


def _fmt(value: Any) -> str:
    """A table cell: ints with separators, floats with 4 significant digits, text escaped."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


@dataclass
class Facts:
    """What the card says about a run; None (or empty) where the run's files do not say."""

    config: dict  # config.yaml: the architecture and the hyperparameter table
    summary: dict  # summary.json: what training did
    base_model: str | None  # a Hub id, for the metadata
    dataset_ids: list[str]  # Hub ids, for the `datasets:` metadata
    dataset_type: str | None  # model-index dataset type: the Hub id when it is the only dataset
    dataset: str | None  # Hub ids, corpus names and local names (never a full path)
    val: dict  # validation loss / ppl / tokens / split: `gpt2fit eval`'s, else training's last
    hellaswag: dict  # the built-in scorer's
    lm_eval: dict  # task -> {metrics, version, num_fewshot, samples, dataset, limit, lm_eval_version}


def gather(run: Path) -> Facts:
    summary = formats.read_summary(run)
    evals = _load(run / formats.EVAL_RESULTS, json.loads)
    init_from = summary.get("init_from")
    base = _CANONICAL_IDS.get(str(init_from)) or (init_from if _looks_like_hub_id(init_from) else None)
    # summary's dataset: a Hub id, or the `gpt2fit prepare` inputs (paths, globs, corpus names)
    items = summary.get("dataset") or []
    items = [str(d) for d in ([items] if isinstance(items, str) else items) if _present(d)]
    ids = [d for d in items if _looks_like_hub_id(d)]
    labels = [d if d in ids else _local_name(d) for d in items]
    if not labels and _present(summary.get("data_dir")):
        labels = [_local_name(summary["data_dir"])]
    more = f" and {len(labels) - 3} more" if len(labels) > 3 else ""
    ppl = evals.get("perplexity") if isinstance(evals.get("perplexity"), dict) else None
    if ppl:  # an explicit `gpt2fit eval` wins over the numbers training ended with
        split = str(ppl.get("split") or "val")
        split = "validation" if split in ("val", "valid") else split
        val = {"loss": ppl.get("loss"), "ppl": ppl.get("ppl"), "tokens": ppl.get("tokens"), "split": split}
    else:
        val = {"loss": summary.get("final_val_loss"), "ppl": summary.get("final_val_ppl"), "split": "validation"}
    return Facts(
        config=_load(run / formats.CONFIG, yaml.safe_load), summary=summary, base_model=base, dataset_ids=ids,
        dataset_type=ids[0] if len(items) == 1 and ids else None, dataset=", ".join(labels[:3]) + more or None,
        # built-in HellaSwag without "text": an earlier scorer's, whose acc_norm was per token: left out
        val=val, hellaswag=evals["hellaswag"] if "text" in (evals.get("hellaswag") or {}) else {},
        lm_eval={k: v for k, v in (evals.get("lm_eval") or {}).items() if isinstance(v, dict)},
    )  # fmt: skip


def _eval_results(f: Facts) -> list[EvalResult]:
    """model-index entries: lm-eval's metrics on Hub datasets, validation loss/perplexity on a Hub dataset."""
    task = {"task_type": "text-generation", "task_name": "Text Generation"}
    rows = []
    if f.dataset_type:
        own = {**task, "dataset_type": f.dataset_type, "dataset_name": f.dataset, "dataset_split": f.val["split"]}
        rows += [(own, "loss", "validation loss", f.val["loss"], 4),
                 (own, "perplexity", "validation perplexity", f.val["ppl"], 3)]  # fmt: skip
    for name, t in f.lm_eval.items():
        if _looks_like_hub_id(t.get("dataset")) and not t.get("limit"):
            where = {**task, "dataset_type": t["dataset"], "dataset_name": f"{name} ({t.get('num_fewshot')}-shot)"}
            rows += [(where, k, f"{k} (lm-eval)", v, 4) for k, v in t.get("metrics", {}).items() if "stderr" not in k]
    return [EvalResult(**where, metric_type=kind, metric_name=name, metric_value=round(_finite(v), digits))
            for where, kind, name, v, digits in rows if _finite(v) is not None]  # fmt: skip


def _summary_line(f: Facts) -> str:
    c, n_params = f.config, _finite(f.summary.get("n_params"))
    shape = (("n_layer", "layers"), ("n_head", "heads"), ("n_embd", "hidden size"), ("block_size", "context"))
    arch = [f"context {c[k]}" if k == "block_size" else f"{c[k]} {label}" for k, label in shape if _present(c.get(k))]
    arch += [f"{format_count(n_params)} parameters"] if n_params else []
    init_from = f.summary.get("init_from")
    origin = (f"fine-tuned from [`{f.base_model}`](https://huggingface.co/{f.base_model})" if f.base_model else
              f"fine-tuned from a local model (`{_fmt(_local_name(init_from))}`)" if init_from else  # never a full path
              "trained from scratch")
    if f.dataset_type:
        origin += f" on [`{f.dataset_type}`](https://huggingface.co/datasets/{f.dataset_type})"
    elif f.dataset:
        origin += f" on `{_fmt(f.dataset)}`"
    return "A GPT-2 language model" + (f" ({', '.join(arch)})" if arch else "") + f", {origin} with gpt2fit."


def _training_facts(f: Facts) -> list[tuple[str, str]]:
    s = f.summary
    precision = s.get("mixed_precision") or (f.config.get("mixed_precision") not in ("auto", None) and
                                             f.config["mixed_precision"])  # what ran; else what was asked
    tokens, n_params, wall = _finite(s.get("tokens")), _finite(s.get("n_params")), _finite(s.get("wall_time_s"))
    procs = s.get("num_processes")
    flops = tokens and _finite(s.get("flops_per_token")) and tokens * s["flops_per_token"]
    gpu_hours = wall and str(s.get("device", "cpu")) not in ("cpu", "mps") and wall * (procs or 1) / 3600
    facts = [
        ("Base model", f"`{f.base_model}`" if f.base_model else
         "local model" if s.get("init_from") else "none (trained from scratch)"),
        ("Data", f.dataset and f"`{_fmt(f.dataset)}`"),
        ("Tokens seen", tokens and f"{_fmt(s['tokens'])} ({format_count(tokens)})"),
        ("Optimizer steps", _present(s.get("step")) and _fmt(s["step"])),
        ("Tokens per step", _present(s.get("tokens_per_step")) and _fmt(s["tokens_per_step"])),
        ("Parameters", n_params and f"{_fmt(s['n_params'])} ({format_count(n_params)})"),
        ("Hardware", _present(s.get("device")) and _fmt(s["device"])
         + (f" × {procs} processes" if isinstance(procs, int) and procs > 1 else "")),
        ("Precision", _present(precision) and ("fp32" if precision in ("no", False) else
                                              f"{_fmt(precision)} mixed precision")),
        ("Training time", wall is not None and wall >= 0 and format_duration(wall)),
        ("Compute", ", ".join(x for x in (flops and f"{flops:.3g} FLOPs (model FLOPs per token × tokens)",
                                          gpu_hours and f"{gpu_hours:.3g} GPU hours") if x)),
        ("Status", _present(s.get("status")) and _fmt(s["status"])),
    ]  # fmt: skip
    return [(k, v) for k, v in facts if v]


def _hparam_rows(config: dict) -> list[tuple[str, str]]:
    rows = []
    for key in [k for k in _HPARAM_ORDER if k in config] + sorted(set(config) - set(_HPARAM_ORDER), key=str):
        key, value = str(key), config[key]
        nested = isinstance(value, dict) or isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
        if (not _present(value) or _SECRET_KEY_RE.search(key) or key in _NOT_HPARAMS or key.startswith("hub_")
                or nested or (isinstance(value, float) and not math.isfinite(value))):
            continue  # fmt: skip
        if key == "seed" or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10_000):
            value = str(value)  # no thousands separator on seeds and small counts
        rows.append((key, _fmt(_public(value, key))))
    return rows


def _evaluation_rows(f: Facts) -> tuple[list[tuple[str, str]], str]:
    split, hs = f.val["split"], f.hellaswag
    loss, ppl, tokens = _finite(f.val["loss"]), _finite(f.val["ppl"]), _finite(f.val.get("tokens"))
    rows = [(f"{split} loss", loss is not None and f"{loss:.4f}"), (f"{split} perplexity", ppl and f"{ppl:.3f}"),
            (f"{split} tokens evaluated", tokens and _fmt(f.val["tokens"]))]  # fmt: skip
    rows += [(f"HellaSwag {k} (built-in scorer)", f"{_finite(hs[k]):.4f}")
             for k in ("acc", "acc_norm", "acc_norm_token") if _finite(hs.get(k)) is not None]  # fmt: skip
    note = hs and (f"Built-in HellaSwag scorer: {_fmt(hs.get('n'))} examples, {_fmt(hs.get('text'))} text; acc and "
                   "acc_norm (per character) as lm-eval computes them, acc_norm_token the per-token mean (llm.c).")
    return [(k, v) for k, v in rows if v], note or ""


def _lm_eval_rows(f: Facts) -> list[list[str]]:
    """task, version, n-shot, examples, metric, value, stderr: one row per lm-eval metric."""
    return [[_fmt(name), _fmt(t.get("version")), _fmt(t.get("num_fewshot")), _fmt(t.get("samples")), _fmt(k),
             f"{v:.4f}", f"{m[k + '_stderr']:.4f}" if _finite(m.get(k + "_stderr")) is not None else ""]
            for name, t in f.lm_eval.items() for m in [t.get("metrics") or {}] for k, v in m.items()
            if "stderr" not in k and _finite(v) is not None]  # fmt: skip


def build_model_card(run_dir: str | os.PathLike, *, repo_id: str | None = None, license: str | None = None,
                     revision: str | None = None, checkpoints: list[str] | tuple[str, ...] = ()) -> ModelCard:
    """The model card of a run dir (nothing is written); ``checkpoints``: the branches checkpoints were pushed to."""
    run = Path(run_dir)
    f = gather(run)
    name = (repo_id.split("/")[-1] if repo_id else None) or run.resolve().name or "gpt2fit-model"
    data = ModelCardData(base_model=f.base_model, datasets=f.dataset_ids or None, license=license or None,
                         library_name="transformers", pipeline_tag="text-generation", model_name=name,
                         tags=["gpt2", "gpt2fit", "text-generation"], eval_results=_eval_results(f) or None)
    status, step = f.summary.get("status"), f.summary.get("step")
    evaluation, hellaswag_note = _evaluation_rows(f)
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE), model_name=name, summary=_summary_line(f), facts=_training_facts(f),
        unfinished=_fmt(status) if _present(status) and status != "completed" else None,
        step=_fmt(step) if _present(step) else None, ref=repo_id or "path/to/this/model",
        revision=revision if revision != "main" else None, hparams=_hparam_rows(f.config), evaluation=evaluation,
        hellaswag_note=hellaswag_note, plot=formats.PLOT if (run / formats.PLOT).is_file() else None,
        checkpoints=list(checkpoints), lm_eval=_lm_eval_rows(f),
        lm_eval_note=", ".join(sorted({f"lm-eval {t.get('lm_eval_version')}" for t in f.lm_eval.values()} | {
            f"{name}: the first {t['limit']} examples only, not comparable" for name, t in f.lm_eval.items()
            if t.get("limit")})),
    )  # fmt: skip
    return ModelCard(redact(str(card)))
