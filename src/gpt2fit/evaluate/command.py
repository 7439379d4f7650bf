"""`gpt2fit eval` (examples: EPILOG): perplexity is ``perplexity.windowed_loss`` (the training loop's val_loss);
HellaSwag as ``hellaswag`` describes; ``--tasks`` runs lm-evaluation-harness (the ``eval`` extra) through its ``HFLM``,
keeping what a comparison needs: metrics under lm-eval's names (a filter other than "none" stays in the name), task
version, n-shot, examples, dataset, lm-eval's version. Results merge into ``<run>/eval_results.json``."""

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml
from accelerate import Accelerator

from gpt2fit import options
from gpt2fit.errors import UserError, suggest
from gpt2fit.evaluate.hellaswag import TEXTS, load_hellaswag, score_hellaswag
from gpt2fit.evaluate.model import DTYPES, check_model_path, load_model_and_tokenizer, n_positions, resolve_device
from gpt2fit.evaluate.perplexity import evaluate_perplexity
from gpt2fit.formats import CONFIG, EVAL_RESULTS, is_run_dir, open_split, read_summary, write_json_atomic
from gpt2fit.options import opt

DESCRIPTION = "Validation perplexity, zero-shot HellaSwag and lm-eval tasks of a run dir, model dir or Hub id."
EPILOG = """examples:
  gpt2fit eval out/quickstart --data_dir data/shakespeare
  gpt2fit eval openai-community/gpt2 --hellaswag hellaswag_val.jsonl --output gpt2.json
  gpt2fit eval out/quickstart --tasks hellaswag,lambada_openai,arc_easy       # pip install 'gpt2fit[eval]'
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 scripts/eval.py out/run --data_dir data/x"""


@dataclass
class EvalOptions:
    """what to evaluate, on what data, how"""

    model: str = opt(None, "Run dir (uses its final/), Hugging Face model dir, or Hub id.", positional=True)
    data_dir: str | None = opt(None, "Prepared data dir (train.bin/val.bin + meta.json) for perplexity; for a run "
                                     "dir given none of --data_dir, --hellaswag, --tasks: the data_dir it trained on.")
    split: str = opt("val", "Token file to score: <data_dir>/<split>.bin.")
    block_size: int | None = opt(None, "Tokens of context per window (default: the model's n_positions).", minimum=1)
    batch_size: int = opt(8, "Windows per forward for perplexity, examples (x4 endings) per forward for "
                             "HellaSwag, requests per forward for lm-eval.", minimum=1)
    max_windows: int | None = opt(None, "Score only this many evenly spaced windows (default: all, every token "
                                        "once).", minimum=1)
    hellaswag: str | None = opt(None, "HellaSwag validation set: hellaswag_val.jsonl (original schema) or a Hub "
                                      "id (Rowan/hellaswag).", metavar="PATH_OR_ID")
    hellaswag_text: str = opt("lm_eval", "HellaSwag text: lm_eval = lm-eval's preprocessing (its numbers, item by "
                                         "item); raw = the dataset's ctx and endings (llm.c).", choices=TEXTS)
    tasks: str | None = opt(None, "lm-evaluation-harness tasks, comma-separated (hellaswag,lambada_openai,arc_easy) "
                                  "or task YAML paths; needs pip install 'gpt2fit[eval]'.")
    num_fewshot: int | None = opt(None, "Few-shot examples per lm-eval task (default: each task's own, mostly 0).",
                                  minimum=0)
    include_path: str | None = opt(None, "A dir of lm-eval task YAMLs of your own, for --tasks.")
    limit: int | None = opt(None, "Score only the first N examples of HellaSwag and of each lm-eval task (a quick "
                                  "look, not a comparable number).", minimum=1, aliases=("--hellaswag_limit",))
    output: str | None = opt(None, f"Write results to this JSON file, merged into what it holds (default: "
                                   f"<run_dir>/{EVAL_RESULTS} when MODEL is a run dir, else print only).")
    device: str | None = opt(None, "cpu, cuda, cuda:1, mps (default: cuda > mps > cpu; ignored under accelerate "
                                   "launch).")
    dtype: str = opt("float32", "Weights dtype for evaluation (auto = the checkpoint's own dtype).", choices=DTYPES)


def run_data_dir(run_dir: Path) -> str | None:
    """The data_dir a run was trained on, from summary.json or else config.yaml."""
    d = read_summary(run_dir).get("data_dir")
    if not d and (run_dir / CONFIG).is_file():
        try:
            d = (yaml.safe_load((run_dir / CONFIG).read_text()) or {}).get("data_dir")
        except (yaml.YAMLError, AttributeError):
            d = None
    return str(d) if d else None


def write_results(path: Path, update: dict) -> None:
    """Merge ``update`` into the JSON object at ``path`` (else replaced); lm-eval's task by task, so runs add up."""
    try:
        results = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        warnings.warn(f"{path} was not valid JSON; overwriting it")
        results = {}
    results = results if isinstance(results, dict) else {}
    if isinstance(results.get("lm_eval"), dict) and "lm_eval" in update:
        update = {**update, "lm_eval": {**results["lm_eval"], **update["lm_eval"]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**results, **update})


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager, once every task name is known to it (checked before a model loads)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--tasks runs the lm-evaluation-harness, which is not installed: "
                        "pip install 'gpt2fit[eval]' (or pip install lm_eval)") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include_path {include_path}: no such directory; give the dir of your task YAMLs")
    logging.getLogger("lm_eval.tasks").setLevel(logging.ERROR)  # index notes would stand before our error
    manager = TaskManager(include_path=include_path)
    for task in tasks:
        if task not in manager.all_tasks and not Path(task).is_file():
            raise UserError(f"unknown lm-eval task {task!r}.{suggest(task, manager.all_tasks)} `lm_eval ls tasks` "
                            "lists them; for a task YAML of your own pass its path or --include_path DIR")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], manager, *, num_fewshot: int | None = None,
              limit: int | None = None, batch_size: int = 8) -> dict:
    """``{task: {"metrics", "version", "num_fewshot", "samples", "dataset", "limit", "lm_eval_version"}}``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False)
    return {name: {"metrics": {key.removesuffix(",none"): v for key, v in res.items() if "," in key
                               and isinstance(v, (int, float)) and math.isfinite(v)},
                   "version": out["versions"].get(name), "num_fewshot": out["n-shot"].get(name),
                   "samples": out["n-samples"].get(name, {}).get("effective"), "limit": limit,
                   "dataset": out["configs"].get(name, {}).get("dataset_path"), "lm_eval_version": lm_eval.__version__}
            for name, res in out["results"].items()}


def main(argv=None) -> int:
    (o,), _ = options.parse(argv, [EvalOptions], prog="gpt2fit eval", description=DESCRIPTION, epilog=EPILOG)
    check_model_path(o.model)  # fail fast, before reading data
    run_dir = Path(o.model) if is_run_dir(o.model) else None
    data_dir, note = o.data_dir, ""
    tasks = [t.strip() for t in (o.tasks or "").split(",") if t.strip()]
    if tasks and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--tasks runs in one process: drop `accelerate launch` for it (lm-eval shards by itself "
                        "under `accelerate launch -m lm_eval`)")
    if data_dir is None and o.hellaswag is None and not tasks:
        data_dir = run_data_dir(run_dir) if run_dir is not None else None
        if data_dir is None:
            raise UserError(f"nothing to evaluate for {o.model}: pass --data_dir DIR (perplexity), --hellaswag "
                            "PATH_OR_ID (HellaSwag) and/or --tasks hellaswag,... (lm-eval)")
        note = f" (the run's data_dir, from {run_dir})"
    if data_dir is not None:
        open_split(data_dir, o.split)  # a bad data dir fails before the model loads
    examples = load_hellaswag(o.hellaswag, o.hellaswag_text)[: o.limit] if o.hellaswag is not None else None
    manager = task_manager(tasks, o.include_path) if tasks else None  # unknown tasks fail before the model loads

    # several processes under `accelerate launch`: windows and examples are sharded
    accelerator = Accelerator() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    device = accelerator.device if accelerator is not None else resolve_device(o.device)
    model, tokenizer = load_model_and_tokenizer(o.model, device=device, dtype=o.dtype)
    is_main = accelerator is None or accelerator.is_main_process
    if accelerator is not None and is_main:
        print(f"evaluating on {accelerator.num_processes} processes ({accelerator.device.type})")

    update = {"model": o.model}
    if data_dir is not None:
        r = evaluate_perplexity(model, data_dir, split=o.split, block_size=o.block_size, batch_size=o.batch_size,
                                max_windows=o.max_windows, accelerator=accelerator)
        block = o.block_size or n_positions(model)
        update["perplexity"] = {"split": o.split, **r, "block_size": block, "data_dir": str(data_dir)}
        if is_main:
            print(f"perplexity {data_dir}/{o.split}.bin{note}: loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  "
                  f"({r['tokens']:,} tokens in {r['windows']:,} windows of {block})")
    if examples is not None:
        r = score_hellaswag(model, tokenizer, examples, batch_size=o.batch_size, accelerator=accelerator)
        update["hellaswag"] = {**r, "source": str(o.hellaswag), "text": o.hellaswag_text}
        if is_main:
            print(f"hellaswag {o.hellaswag} ({r['n']:,} examples, {o.hellaswag_text} text): acc {r['acc']:.4f}  "
                  f"acc_norm {r['acc_norm']:.4f} (per character, lm-eval's)  acc_norm_token {r['acc_norm_token']:.4f} "
                  "(per token, llm.c's)")
    if tasks:
        update["lm_eval"] = run_tasks(model, tokenizer, tasks, manager, num_fewshot=o.num_fewshot, limit=o.limit,
                                      batch_size=o.batch_size)
        for name, r in update["lm_eval"].items():
            scores = "  ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items() if not k.endswith("_stderr"))
            shots = f"version {r['version']}, {r['num_fewshot']}-shot, {r['samples']} examples"
            print(f"lm-eval {name} ({shots}): {scores}")

    output = Path(o.output) if o.output else (run_dir / EVAL_RESULTS if run_dir is not None else None)
    if output is not None and is_main:
        write_results(output, update)
        print(f"wrote {output}")
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()  # destroys the process group cleanly
    return 0

