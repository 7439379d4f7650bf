"""Evaluate a model the way the papers do: validation perplexity and zero-shot HellaSwag.

    gpt2fit eval out/my-run --data_dir data/fineweb10B --hellaswag Rowan/hellaswag
    accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py out/my-run --data_dir ...

Perplexity
    The token file is cut into non-overlapping windows of ``block_size + 1`` tokens that share
    their boundary token (window ``i`` is ``tokens[i*B : i*B + B + 1]``), so every token after
    the first is predicted exactly once, and the last, shorter window is included. The loss is
    the SUM of the per-token cross entropies divided by the number of predicted tokens: exact
    whatever the batch size, the partial last batch or the number of processes.

HellaSwag (zero-shot, as llm.c's ``dev/data/hellaswag.py`` scores GPT-2)
    The context is ``ctx`` exactly as the dataset gives it (no activity label, no bracket
    clean-up, no BOS token); each ending is tokenized as ``" " + ending`` and appended to the
    context tokens. An ending's score is the sum of the log-probabilities of its tokens given
    the context and the earlier ending tokens.

    * ``acc``           argmax of the sum
    * ``acc_norm``      argmax of the per-token mean (sum / number of ending tokens): llm.c's
                        convention, the one behind its GPT-2 124M figure (0.2955)
    * ``acc_norm_char`` argmax of sum / len(ending) in characters (the ending without the
                        leading space): lm-eval-harness's normalization (its ``acc_norm``); note
                        the harness also preprocesses the text differently, so its numbers are
                        not reproduced exactly, only its normalization.

    The 4 endings of an example are batched together with right padding and a mask. A context
    that does not fit ``n_positions`` together with the longest ending is truncated from the
    left (the same cut for all 4 endings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from gpt2fit.errors import ArgumentParser, UserError, positive_int
from gpt2fit.formats import EVAL_RESULTS, FINAL, META, SUMMARY, CONFIG, is_run_dir, resolve_model_path

HELLASWAG_NORMALIZATION = (
    "acc_norm = per-token mean log-prob (llm.c); "
    "acc_norm_char = log-prob sum / ending characters (lm-eval-harness)"
)
_DTYPES = ("float32", "bfloat16", "float16", "auto")


# --------------------------------------------------------------------------------------------
# model loading
# --------------------------------------------------------------------------------------------


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _torch_dtype(dtype):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def check_model_path(path_or_id) -> str:
    """The model dir to load (``resolve_model_path``), or a UserError for a local path that
    holds no model. A string that is not a local path is taken for a Hub id and returned."""
    path_or_id = os.fspath(path_or_id)
    p = Path(path_or_id)
    if is_run_dir(p) and not (p / FINAL / "config.json").is_file():
        raise UserError(
            f"run dir {p} has no {FINAL}/ model yet: wait for training to finish (it exports "
            f"{p / FINAL}), or pass a Hugging Face model dir"
        )
    model_path = resolve_model_path(path_or_id)
    looks_local = p.is_absolute() or path_or_id.startswith(".") or p.exists() or path_or_id.count("/") > 1
    if looks_local and not (Path(model_path) / "config.json").is_file():
        raise UserError(
            f"model {path_or_id} not found: pass a run dir (with {FINAL}/), a Hugging Face model "
            "dir with config.json, or a Hub id such as openai-community/gpt2"
        )
    return model_path


def load_model_and_tokenizer(path_or_id, device=None, dtype=None):
    """Load ``(model, tokenizer)`` from a run dir (its ``final/``), a model dir or a Hub id.

    ``dtype``: None means float32 (exact numbers), or "bfloat16" / "float16" / "auto" (the
    checkpoint's own dtype) / a torch.dtype. ``device``: None picks cuda, then mps, then cpu.
    The model is returned in eval mode. The tokenizer is None when the model has none (enough
    for perplexity, which reads token ids). Remote code is never trusted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path_or_id = os.fspath(path_or_id)
    model_path = check_model_path(path_or_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_torch_dtype(dtype),
                                                     use_safetensors=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load model {path_or_id}: {first}\n"
            f"pass a run dir (with {FINAL}/), a model dir with config.json, or a Hub id "
            "(offline? set HF_HUB_OFFLINE=0 or download it first)"
        ) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError, KeyError):  # no tokenizer files: fine for perplexity
        tokenizer = None
    model.to(device or default_device())
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# token files
# --------------------------------------------------------------------------------------------


def read_meta(data_dir) -> dict:
    """``meta.json`` of a data dir, with UserErrors that say how to make one."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(
            f"data dir {d} does not exist: run `gpt2fit prepare --input YOUR_TEXT --out_dir {d}` "
            "first (see `gpt2fit prepare --help`), or pass the right --data_dir"
        )
    meta_path = d / META
    if not meta_path.is_file():
        raise UserError(
            f"{meta_path} is missing: {d} is not a prepared data dir; run `gpt2fit prepare --input "
            f"YOUR_TEXT --out_dir {d}` to create train.bin / val.bin / meta.json there"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}); re-run `gpt2fit prepare ...`") from e
    if not isinstance(meta, dict) or "dtype" not in meta:
        raise UserError(f"{meta_path} has no 'dtype' entry; re-run `gpt2fit prepare ...`")
    return meta


def load_tokens(data_dir, split: str = "val") -> np.ndarray:
    """Memory-map ``<data_dir>/<split>.bin`` with the dtype recorded in meta.json."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        have = sorted(q.stem for q in Path(data_dir).glob("*.bin"))
        raise UserError(
            f"token file {path} is missing (this data dir has: {', '.join(have) or 'no .bin files'}); "
            "pass --split with one of those, or run `gpt2fit prepare ...` first"
        )
    try:
        dtype = np.dtype(meta["dtype"])
    except TypeError as e:
        raise UserError(f"{Path(data_dir) / META}: unknown dtype {meta['dtype']!r}") from e
    if path.stat().st_size % dtype.itemsize:
        raise UserError(
            f"{path} is {path.stat().st_size} bytes, not a whole number of {dtype} tokens: the file "
            "is truncated or meta.json's dtype is wrong; re-run `gpt2fit prepare ...`"
        )
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; re-run `gpt2fit prepare ...` with more data")
    data = np.memmap(path, dtype=dtype, mode="r")
    expected = (meta.get("splits") or {}).get(split, {}).get("tokens")
    if expected is not None and int(expected) != len(data):
        warnings.warn(f"{path} holds {len(data)} tokens but meta.json says {expected}")
    return data


def window_starts(n_tokens: int, block_size: int, max_windows: int | None = None) -> np.ndarray:
    """Start offsets of the evaluation windows (see the module docstring).

    All ``ceil((n_tokens - 1) / block_size)`` windows, or ``max_windows`` of them evenly spaced
    (``np.linspace`` over the window indices, so the first and the last window are included).
    """
    n_windows = max(0, math.ceil((n_tokens - 1) / block_size))
    idx = np.arange(n_windows)
    if max_windows is not None and max_windows < n_windows:
        idx = np.unique(np.round(np.linspace(0, n_windows - 1, num=max_windows)).astype(np.int64))
    return idx * block_size


# --------------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------------


def _unwrap(model, accelerator):
    """The module to call: unwrap DDP (its forward would sync buffers), leave FSDP etc. as is."""
    import torch

    if accelerator is not None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return accelerator.unwrap_model(model)
    return model


def _config(model):
    m = model
    while not hasattr(m, "config") and hasattr(m, "module"):
        m = m.module
    return m.config


def _n_positions(model) -> int:
    cfg = _config(model)
    n = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if not n:
        raise UserError("the model config has no n_positions / max_position_embeddings; pass --block_size")
    return int(n)


def _rank_world(accelerator):
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def _device_of(model):
    return next(model.parameters()).device


def _sum_reduce(values, accelerator, device):
    """Sum a list of numbers over all processes (float64, so token counts stay exact)."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def evaluate_perplexity(
    model,
    data_dir,
    *,
    split: str = "val",
    block_size: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    accelerator=None,
) -> dict:
    """Token-weighted loss and perplexity of ``model`` on ``<data_dir>/<split>.bin``.

    Returns ``{"loss", "ppl", "tokens", "windows"}`` where tokens is the number of predicted
    tokens. With an ``accelerate.Accelerator`` running several processes, the windows are
    sharded across ranks and (loss_sum, count) is all-reduced: the same answer as one process.
    Works on a model in training mode too (it is switched to eval and back).
    """
    import torch
    import torch.nn.functional as F

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"max_windows must be >= 1 (or None for all windows), got {max_windows}")
    n_pos = _n_positions(model)
    block_size = n_pos if block_size is None else int(block_size)
    if not 1 <= block_size <= n_pos:
        raise UserError(f"block_size {block_size} must be between 1 and the model's n_positions ({n_pos})")

    data = load_tokens(data_dir, split)
    n = len(data)
    if n < 2:
        raise UserError(f"{Path(data_dir) / (split + '.bin')} holds {n} token(s); at least 2 are needed")
    starts = window_starts(n, block_size, max_windows)

    # Vocab check over exactly the tokens that will be read, identical on every rank.
    if max_windows is None:
        max_id = int(data.max())
    else:
        max_id = max(int(data[s : s + block_size + 1].max()) for s in starts)
    vocab = int(_config(model).vocab_size)
    if max_id >= vocab:
        raise UserError(
            f"token file {Path(data_dir) / (split + '.bin')} has token id {max_id} but the model's "
            f"vocab_size is {vocab}: this data was tokenized for another model; evaluate the model "
            "trained on it, or re-run `gpt2fit prepare` with this model's tokenizer"
        )

    rank, world = _rank_world(accelerator)
    mine = starts[rank::world]
    full = [int(s) for s in mine if s + block_size + 1 <= n]
    partial = [int(s) for s in mine if s + block_size + 1 > n]  # at most the very last window
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in partial]
    if world > 1:
        # Same number of forwards on every rank (sharded models need it); extras count nothing.
        per_rank = [starts[r::world] for r in range(world)]
        n_batches = max(
            math.ceil(sum(s + block_size + 1 <= n for s in ws) / batch_size) + sum(s + block_size + 1 > n for s in ws)
            for ws in per_rank
        )
        batches += [None] * (n_batches - len(batches))

    net = _unwrap(model, accelerator)
    device = _device_of(net)
    was_training = net.training
    net.eval()
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    loss_sum, count = 0.0, 0
    try:
        with torch.no_grad(), autocast:
            for batch in batches:
                dummy = batch is None
                if dummy:
                    batch = [0]
                w = np.stack([np.asarray(data[s : min(s + block_size + 1, n)], dtype=np.int64) for s in batch])
                w = torch.from_numpy(w).to(device)
                logits = net(input_ids=w[:, :-1], use_cache=False).logits
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum"
                )
                if not dummy:
                    loss_sum += loss.item()
                    count += w[:, 1:].numel()
    finally:
        net.train(was_training)

    loss_sum, count = _sum_reduce([loss_sum, count], accelerator, device)
    count = int(round(count))
    mean = loss_sum / count
    return {"loss": mean, "ppl": math.exp(mean), "tokens": count, "windows": int(len(starts))}


# --------------------------------------------------------------------------------------------
# HellaSwag
# --------------------------------------------------------------------------------------------


def _normalize_hellaswag(row, where: str) -> dict:
    try:
        ctx, endings, label = row["ctx"], list(row["endings"]), row["label"]
    except (KeyError, TypeError) as e:
        raise UserError(f"{where}: not a HellaSwag example (needs ctx, endings, label): missing {e}") from e
    if label == "" or label is None:
        raise UserError(f"{where}: example has no label (the test split is unlabeled; use validation)")
    try:
        label = int(label)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: label {label!r} is not an integer") from e
    if len(endings) != 4 or not 0 <= label < 4 or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: expected 4 string endings and a label in 0..3, got {len(endings)} / {label}")
    return {"ctx": str(ctx), "endings": endings, "label": label}


def load_hellaswag(source) -> list[dict]:
    """HellaSwag validation examples as ``[{"ctx", "endings", "label"}]``.

    ``source``: a local ``.jsonl`` file in the original rowanz/hellaswag schema
    (``hellaswag_val.jsonl``: ind, activity_label, ctx_a, ctx_b, ctx, endings, label (int),
    split, split_type, source_id); or a Hub dataset id such as ``Rowan/hellaswag`` (label is a
    string there) or a local dataset dir, loaded with ``datasets.load_dataset(source,
    split="validation")``.
    """
    source = os.fspath(source)
    p = Path(source)
    if p.is_file():
        examples = []
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{p}:{i}: not valid JSON ({e}); expected hellaswag_val.jsonl lines") from e
                examples.append(_normalize_hellaswag(row, f"{p}:{i}"))
        if not examples:
            raise UserError(f"{p} holds no examples")
        return examples
    if not p.is_dir() and (p.is_absolute() or source.startswith(".") or source.endswith((".jsonl", ".json"))):
        raise UserError(
            f"HellaSwag file {source} not found: pass the path of hellaswag_val.jsonl "
            "(github.com/rowanz/hellaswag/tree/master/data) or a Hub id such as Rowan/hellaswag"
        )
    try:
        import datasets

        ds = datasets.load_dataset(source, split="validation")
    except Exception as e:  # datasets raises many types (offline, missing, no split)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load HellaSwag from {source!r}: {first}\n"
            "pass a local hellaswag_val.jsonl, or check the Hub id and your network"
        ) from e
    return [_normalize_hellaswag(row, f"{source}[{i}]") for i, row in enumerate(ds)]


def hellaswag_subset(examples, n: int, seed: int = 0) -> list[dict]:
    """A deterministic subset of ``n`` examples (in their original order), for periodic evals."""
    if n is None or n >= len(examples):
        return list(examples)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(examples), size=int(n), replace=False))
    return [examples[i] for i in idx]


def encode_hellaswag_example(tokenizer, example, max_len: int):
    """``(ctx_ids, [ending_ids x4])`` with llm.c's preprocessing, cut to fit ``max_len``."""
    ctx = tokenizer.encode(example["ctx"], add_special_tokens=False)
    ends = [tokenizer.encode(" " + e, add_special_tokens=False) for e in example["endings"]]
    if not ctx:  # nothing to condition on: start from EOT so the first ending token is scored
        eos = tokenizer.eos_token_id
        ctx = [eos if eos is not None else 0]
    longest = max(len(e) for e in ends)
    if len(ctx) + longest > max_len:
        keep = max(1, max_len - longest)
        ctx = ctx[-keep:]
        ends = [e[: max_len - keep] for e in ends]
    return ctx, ends


def score_hellaswag(
    model,
    tokenizer,
    examples,
    *,
    batch_size: int = 8,
    device=None,
    accelerator=None,
    return_details: bool = False,
) -> dict:
    """Zero-shot HellaSwag accuracy (see the module docstring for the exact conventions).

    ``batch_size`` is in examples (each contributes its 4 endings as 4 rows). Works on a model in
    training mode (switched to eval and back). With a multi-process ``accelerator`` the examples
    are sharded across ranks and the counts summed. ``return_details`` adds ``details``: per
    example (this process's share) the label, the 4 log-prob sums, token and char counts, and
    the three predictions.
    """
    import torch
    import torch.nn.functional as F

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer is None:
        raise UserError("HellaSwag needs a tokenizer, and this model dir has none; save one next to the model")
    examples = list(examples)
    if not examples:
        raise UserError("no HellaSwag examples to score")
    rank, world = _rank_world(accelerator)
    mine = examples[rank::world]
    n_batches = math.ceil(len(mine) / batch_size)
    if world > 1:
        n_batches = max(math.ceil(len(examples[r::world]) / batch_size) for r in range(world))

    net = _unwrap(model, accelerator)
    device = torch.device(device) if device is not None else _device_of(net)
    max_len = _n_positions(net)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = net.training
    net.eval()
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    correct = [0, 0, 0]
    details = []
    try:
        with torch.no_grad(), autocast:
            for b in range(n_batches):
                chunk = mine[b * batch_size : (b + 1) * batch_size]
                dummy = not chunk
                if dummy:
                    chunk = examples[:1]
                rows, spans = [], []  # spans: (first ending position, end) in each row
                for ex in chunk:
                    ctx, ends = encode_hellaswag_example(tokenizer, ex, max_len)
                    for e in ends:
                        rows.append(ctx + e)
                        spans.append((len(ctx), len(ctx) + len(e)))
                T = max(len(r) for r in rows)
                ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
                attn = torch.zeros((len(rows), T), dtype=torch.long)
                mask = torch.zeros((len(rows), T - 1), dtype=torch.float32)
                for i, (r, (a, z)) in enumerate(zip(rows, spans)):
                    ids[i, : len(r)] = torch.tensor(r)
                    attn[i, : len(r)] = 1
                    mask[i, a - 1 : z - 1] = 1.0  # logits at t predict token t+1
                ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
                logits = net(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
                logp = -F.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
                ).view(len(rows), T - 1)
                sums = (logp * mask).sum(1).view(-1, 4).double().cpu()
                ntok = mask.sum(1).view(-1, 4).double().cpu()
                if dummy:
                    continue
                for j, ex in enumerate(chunk):
                    nchar = torch.tensor([max(1, len(e)) for e in ex["endings"]], dtype=torch.float64)
                    preds = [int(sums[j].argmax()), int((sums[j] / ntok[j]).argmax()), int((sums[j] / nchar).argmax())]
                    for k in range(3):
                        correct[k] += int(preds[k] == ex["label"])
                    if return_details:
                        details.append(
                            {
                                "label": ex["label"],
                                "logprob_sum": sums[j].tolist(),
                                "n_tokens": [int(x) for x in ntok[j].tolist()],
                                "n_chars": [int(x) for x in nchar.tolist()],
                                "pred": preds[0],
                                "pred_norm": preds[1],
                                "pred_norm_char": preds[2],
                            }
                        )
    finally:
        net.train(was_training)

    c0, c1, c2, total = _sum_reduce(correct + [len(mine)], accelerator, device)
    total = int(round(total))
    out = {
        "acc": c0 / total,
        "acc_norm": c1 / total,
        "acc_norm_char": c2 / total,
        "n": total,
        "normalization": HELLASWAG_NORMALIZATION,
    }
    if return_details:
        out["details"] = details
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="gpt2fit eval",
        description="Validation perplexity and zero-shot HellaSwag of a run dir, model dir or Hub id.",
        epilog=(
            "examples:\n"
            "  gpt2fit eval out/quickstart --data_dir data/shakespeare\n"
            "  gpt2fit eval openai-community/gpt2 --hellaswag hellaswag_val.jsonl --output gpt2.json\n"
            "  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 "
            "scripts/evaluate.py out/run --data_dir data/x"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="run dir (uses its final/), Hugging Face model dir, or Hub id")
    p.add_argument(
        "--data_dir",
        help="prepared data dir (train.bin/val.bin + meta.json) for perplexity; default for a run dir "
        "with neither --data_dir nor --hellaswag: the data_dir it was trained on",
    )
    p.add_argument("--split", default="val", help="token file to score: <data_dir>/<split>.bin (default: val)")
    p.add_argument(
        "--block_size", type=positive_int, default=None, help="tokens of context per window (default: model n_positions)"
    )
    p.add_argument(
        "--batch_size",
        type=positive_int,
        default=8,
        help="windows per forward for perplexity, examples (x4 endings) per forward for HellaSwag (default: 8)",
    )
    p.add_argument(
        "--max_windows",
        type=positive_int,
        default=None,
        help="score only this many evenly spaced windows (default: all, every token once)",
    )
    p.add_argument(
        "--hellaswag",
        metavar="PATH_OR_ID",
        help="HellaSwag validation set: hellaswag_val.jsonl (original schema) or a Hub id (Rowan/hellaswag)",
    )
    p.add_argument("--hellaswag_limit", type=positive_int, default=None, help="score only the first N HellaSwag examples")
    p.add_argument(
        "--output",
        help=f"write results to this JSON file, merged into what it holds (default: <run_dir>/{EVAL_RESULTS} "
        "when MODEL is a run dir, else print only)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda > mps > cpu; ignored under accelerate launch)"
    )
    p.add_argument(
        "--dtype",
        choices=_DTYPES,
        default="float32",
        help="weights dtype for evaluation (default: float32; auto = the checkpoint's own dtype)",
    )
    return p


def _run_data_dir(run_dir: Path) -> str | None:
    """The data_dir a run was trained on, from summary.json or config.yaml."""
    try:
        d = json.loads((run_dir / SUMMARY).read_text()).get("data_dir")
        if d:
            return str(d)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import yaml

        d = (yaml.safe_load((run_dir / CONFIG).read_text()) or {}).get("data_dir")
        if d:
            return str(d)
    except (OSError, ValueError, AttributeError, ImportError):
        pass
    return None


def _write_results(path: Path, update: dict) -> None:
    results = {}
    if path.is_file():
        try:
            results = json.loads(path.read_text())
            if not isinstance(results, dict):
                results = {}
        except ValueError:
            warnings.warn(f"{path} was not valid JSON; overwriting it")
    results.update(update)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model_arg = args.model
    check_model_path(model_arg)  # fail fast, before reading data
    run_dir = Path(model_arg) if is_run_dir(model_arg) else None

    data_dir = args.data_dir
    data_dir_note = ""
    if data_dir is None and args.hellaswag is None:
        data_dir = _run_data_dir(run_dir) if run_dir is not None else None
        if data_dir is None:
            raise UserError(
                f"nothing to evaluate for {model_arg}: pass --data_dir DIR (perplexity) and/or "
                "--hellaswag PATH_OR_ID (HellaSwag)"
            )
        data_dir_note = f" (the run's data_dir, from {run_dir})"
    if data_dir is not None:
        read_meta(data_dir)  # fail on a bad data dir before loading the model
        if not (Path(data_dir) / f"{args.split}.bin").is_file():
            load_tokens(data_dir, args.split)  # raises the UserError that names the fix
    examples = None
    if args.hellaswag is not None:
        examples = load_hellaswag(args.hellaswag)
        if args.hellaswag_limit is not None:
            examples = examples[: args.hellaswag_limit]

    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator()
    device = accelerator.device if accelerator is not None else args.device
    model, tokenizer = load_model_and_tokenizer(model_arg, device=device, dtype=args.dtype)
    is_main = accelerator is None or accelerator.is_main_process
    if accelerator is not None and is_main:
        print(f"evaluating on {accelerator.num_processes} processes ({accelerator.device.type})")

    update = {"model": model_arg}
    if data_dir is not None:
        r = evaluate_perplexity(
            model,
            data_dir,
            split=args.split,
            block_size=args.block_size,
            batch_size=args.batch_size,
            max_windows=args.max_windows,
            accelerator=accelerator,
        )
        block = args.block_size or _n_positions(model)
        update["perplexity"] = {"split": args.split, **r, "block_size": block, "data_dir": str(data_dir)}
        if is_main:
            print(
                f"perplexity {data_dir}/{args.split}.bin{data_dir_note}: loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  "
                f"({r['tokens']:,} tokens in {r['windows']:,} windows of {block})"
            )
    if examples is not None:
        r = score_hellaswag(model, tokenizer, examples, batch_size=args.batch_size, accelerator=accelerator)
        update["hellaswag"] = {**r, "source": str(args.hellaswag)}
        if is_main:
            print(
                f"hellaswag {args.hellaswag} ({r['n']:,} examples): acc {r['acc']:.4f}  "
                f"acc_norm {r['acc_norm']:.4f} (per-token, llm.c)  "
                f"acc_norm_char {r['acc_norm_char']:.4f} (per-char, lm-eval-harness)"
            )

    output = Path(args.output) if args.output else (run_dir / EVAL_RESULTS if run_dir is not None else None)
    if output is not None and is_main:
        _write_results(output, update)
        print(f"wrote {output}")
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()  # destroys the process group cleanly
    return 0


if __name__ == "__main__":
    from gpt2fit.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
