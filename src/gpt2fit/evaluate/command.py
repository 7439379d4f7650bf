"""`gpt2fit eval`: validation perplexity and zero-shot HellaSwag of a run dir, model dir or Hub id.

    gpt2fit eval out/my-run --data_dir data/fineweb10B --hellaswag Rowan/hellaswag
    accelerate launch --multi_gpu --num_processes 2 scripts/eval.py out/my-run --data_dir ...

Perplexity is ``perplexity.windowed_loss``, the estimator the training loop logs as val_loss;
HellaSwag is scored as ``hellaswag`` describes. Results merge into ``<run>/eval_results.json``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml
from accelerate import Accelerator

from gpt2fit import options
from gpt2fit.errors import UserError
from gpt2fit.evaluate.hellaswag import load_hellaswag, score_hellaswag
from gpt2fit.evaluate.model import DTYPES, check_model_path, load_model_and_tokenizer, n_positions, resolve_device
from gpt2fit.evaluate.perplexity import evaluate_perplexity
from gpt2fit.formats import CONFIG, EVAL_RESULTS, is_run_dir, open_split, read_summary, write_json_atomic
from gpt2fit.options import opt

DESCRIPTION = "Validation perplexity and zero-shot HellaSwag of a run dir, model dir or Hub id."
EPILOG = """examples:
  gpt2fit eval out/quickstart --data_dir data/shakespeare
  gpt2fit eval openai-community/gpt2 --hellaswag hellaswag_val.jsonl --output gpt2.json
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 scripts/eval.py out/run --data_dir data/x"""


@dataclass
class EvalOptions:
    """what to evaluate, on what data, how"""

    model: str = opt(None, "Run dir (uses its final/), Hugging Face model dir, or Hub id.", positional=True)
    data_dir: str | None = opt(None, "Prepared data dir (train.bin/val.bin + meta.json) for perplexity; for a run "
                                     "dir given neither --data_dir nor --hellaswag: the data_dir it was trained on.")
    split: str = opt("val", "Token file to score: <data_dir>/<split>.bin.")
    block_size: int | None = opt(None, "Tokens of context per window (default: the model's n_positions).",
                                 minimum=1)
    batch_size: int = opt(8, "Windows per forward for perplexity, examples (x4 endings) per forward for "
                             "HellaSwag.", minimum=1)
    max_windows: int | None = opt(None, "Score only this many evenly spaced windows (default: all, every "
                                        "token once).", minimum=1)
    hellaswag: str | None = opt(None, "HellaSwag validation set: hellaswag_val.jsonl (original schema) or a Hub "
                                      "id (Rowan/hellaswag).", metavar="PATH_OR_ID")
    hellaswag_limit: int | None = opt(None, "Score only the first N HellaSwag examples.", minimum=1)
    output: str | None = opt(None, f"Write results to this JSON file, merged into what it holds (default: "
                                   f"<run_dir>/{EVAL_RESULTS} when MODEL is a run dir, else print only).")
    device: str | None = opt(None, "cpu, cuda, cuda:1, mps (default: cuda > mps > cpu; ignored under "
                                   "accelerate launch).")
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
    """Merge ``update`` into the JSON object at ``path`` (a file that is not one is replaced)."""
    try:
        results = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        warnings.warn(f"{path} was not valid JSON; overwriting it")
        results = {}
    results = {**(results if isinstance(results, dict) else {}), **update}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results)


def main(argv=None) -> int:
    (o,), _ = options.parse(argv, [EvalOptions], prog="gpt2fit eval", description=DESCRIPTION, epilog=EPILOG)
    check_model_path(o.model)  # fail fast, before reading data
    run_dir = Path(o.model) if is_run_dir(o.model) else None
    data_dir, note = o.data_dir, ""
    if data_dir is None and o.hellaswag is None:
        data_dir = run_data_dir(run_dir) if run_dir is not None else None
        if data_dir is None:
            raise UserError(f"nothing to evaluate for {o.model}: pass --data_dir DIR (perplexity) and/or "
                            "--hellaswag PATH_OR_ID (HellaSwag)")
        note = f" (the run's data_dir, from {run_dir})"
    if data_dir is not None:
        open_split(data_dir, o.split)  # a bad data dir fails before the model loads
    examples = load_hellaswag(o.hellaswag)[: o.hellaswag_limit] if o.hellaswag is not None else None

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
        update["hellaswag"] = {**r, "source": str(o.hellaswag)}
        if is_main:
            print(f"hellaswag {o.hellaswag} ({r['n']:,} examples): acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f} "
                  f"(per-token, llm.c)  acc_norm_char {r['acc_norm_char']:.4f} (per-char, lm-eval-harness)")

    output = Path(o.output) if o.output else (run_dir / EVAL_RESULTS if run_dir is not None else None)
    if output is not None and is_main:
        write_results(output, update)
        print(f"wrote {output}")
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()  # destroys the process group cleanly
    return 0


if __name__ == "__main__":
    from gpt2fit.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
