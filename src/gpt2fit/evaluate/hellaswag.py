"""Zero-shot HellaSwag scored as lm-evaluation-harness scores its ``hellaswag`` task, fast enough for training.
Text: "lm_eval" (default) is lm-eval's ``process_docs``; "raw" is the dataset's ``ctx`` and endings (llm.c's).
Tokens: each (context, " " + ending) pair is encoded and cut as lm-eval's HFLM does (the last n_positions + 1).
Score: the sum of the ending's token log-probs; ``acc``: argmax of the sum, ``acc_norm``: of sum / characters
(lm-eval's), ``acc_norm_token``: of sum / tokens (llm.c's: GPT-2 124M 0.2955 on raw text). With the lm_eval text,
acc and acc_norm equal lm-eval's item by item (tests/test_evaluate.py)."""

import json
import os
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2fit.errors import UserError, first_line
from gpt2fit.evaluate.model import eval_mode, n_positions, shards, sum_over_processes

TEXTS = ("lm_eval", "raw")


def preprocess(text: str) -> str:
    """lm-eval's ``tasks/hellaswag/utils.py: preprocess``, character for character."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _example(row, where: str, text: str) -> dict:
    need = ("activity_label", "ctx_a", "ctx_b") if text == "lm_eval" else ("ctx",)
    missing = [k for k in (*need, "endings", "label") if not isinstance(row, dict) or k not in row]
    if missing:
        raise UserError(f"{where}: HellaSwag example without {', '.join(missing)}; the {text} text needs "
                        f"{', '.join(need)}, endings and label (hellaswag_val.jsonl or Rowan/hellaswag)")
    label, endings = row["label"], row["endings"]
    if label in ("", None):
        raise UserError(f"{where}: example has no label (the test split is unlabeled; use validation)")
    if not str(label).isdigit() or int(label) > 3 or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: expected 4 string endings and a label in 0..3, got {len(endings)} / {label!r}")
    raw = text == "raw"
    ctx = str(row["ctx"]) if raw else preprocess(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    endings = list(endings) if raw else [preprocess(e) for e in endings]
    return {"ctx": ctx, "endings": endings, "label": int(label), "where": where}


def load_hellaswag(source, text: str = "lm_eval") -> list[dict]:
    """Validation examples ``[{"ctx", "endings", "label", "where"}]`` from hellaswag_val.jsonl, a Hub id or a dir."""
    if text not in TEXTS:
        raise UserError(f"HellaSwag text {text!r} is not one of {', '.join(TEXTS)}")
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
                examples.append(_example(row, f"{p}:{i}", text))
        if not examples:
            raise UserError(f"{p} holds no examples")
        return examples
    if not p.is_dir() and (p.is_absolute() or source.startswith(".") or source.endswith((".jsonl", ".json"))):
        raise UserError(f"HellaSwag file {source} not found: pass the path of hellaswag_val.jsonl "
                        "(github.com/rowanz/hellaswag/tree/master/data) or a Hub id such as Rowan/hellaswag")
    try:
        import datasets

        ds = datasets.load_dataset(source, split="validation")
    except Exception as e:  # datasets raises many types (offline, missing, no split)
        raise UserError(f"cannot load HellaSwag from {source!r}: {first_line(e)}\n"
                        "pass a local hellaswag_val.jsonl, or check the Hub id and your network") from e
    return [_example(row, f"{source}[{i}]", text) for i, row in enumerate(ds)]


def hellaswag_subset(examples, n: int, seed: int = 0) -> list[dict]:
    """A deterministic subset of ``n`` examples (in their original order), for periodic evals."""
    if n is None or n >= len(examples):
        return list(examples)
    return [examples[i] for i in np.sort(np.random.default_rng(seed).choice(len(examples), size=int(n), replace=False))]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's ``LM._encode_pair`` makes them (trailing spaces move to the
    continuation; the whole string is encoded, split after the context's tokens; empty context: EOT)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        return [tokenizer.eos_token_id], tokenizer.encode(continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context)
    return ctx, tokenizer.encode(context + continuation)[len(ctx):]


def encode_example(tokenizer, example: dict, max_len: int) -> list[tuple[list[int], int]]:
    """Per ending: (the tokens fed, cut to max_len + 1 as lm-eval cuts them; how many end it)."""
    rows = []
    for i, ending in enumerate(example["endings"]):
        ctx, cont = encode_pair(tokenizer, example["ctx"], " " + ending)
        if len(cont) > max_len:
            raise UserError(f"HellaSwag {example.get('where', 'example')}: ending {i} is {len(cont)} tokens, more "
                            f"than the model's {max_len} positions; leave this example out")
        rows.append(((ctx + cont)[-(max_len + 1):], len(cont)))
    return rows


def _batch_scores(net, rows, pad_id: int, device) -> torch.Tensor:
    """For each (tokens, n) of ``rows``: the log-prob sum of its last n tokens, float64 on the CPU."""
    T = max(len(r) for r, _ in rows) - 1
    ids = torch.full((len(rows), T + 1), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, (r, n) in enumerate(rows):  # right padding: causal attention keeps it out of real positions
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r) - 1] = 1
        mask[i, len(r) - 1 - n : len(r) - 1] = 1.0  # the logits at t predict token t+1
    ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
    logits = net(input_ids=ids[:, :-1], attention_mask=attn, use_cache=False).logits
    logp = -F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return (logp.view(len(rows), T) * mask).sum(1).double().cpu()


def score_hellaswag(model, tokenizer, examples, *, batch_size: int = 8, device=None, accelerator=None,
                    return_details: bool = False) -> dict:
    """``{"acc", "acc_norm", "acc_norm_token", "n"}``; ``batch_size`` in examples (4 rows each); sharded over a
    multi-process ``accelerator``. ``return_details``: per example of this process, sums, counts, predictions."""
    if tokenizer is None:
        raise UserError("HellaSwag needs a tokenizer, and this model dir has none; save one next to the model")
    examples = list(examples)
    if not examples:
        raise UserError("no HellaSwag examples to score")
    max_len = n_positions(model)
    mine, n_batches = shards(examples, accelerator, batch_size)
    encoded = [encode_example(tokenizer, ex, max_len) for ex in mine]  # every ending checked before any forward
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    correct = np.zeros(3)
    details = []
    with eval_mode(model), torch.no_grad(), autocast:
        for b in range(n_batches):
            chunk = list(zip(mine, encoded))[b * batch_size : (b + 1) * batch_size]
            # a process out of examples still runs the forward (a dummy, counted nowhere)
            rows = [row for _, rows in chunk for row in rows] or encode_example(tokenizer, examples[0], max_len)
            sums = _batch_scores(model, rows, pad_id, device).view(-1, 4)
            for j, (ex, ex_rows) in enumerate(chunk):
                ntok = torch.tensor([n for _, n in ex_rows], dtype=torch.float64)
                nchar = torch.tensor([max(1, len(e)) for e in ex["endings"]], dtype=torch.float64)
                preds = [int(s.argmax()) for s in (sums[j], sums[j] / nchar, sums[j] / ntok)]
                correct += [p == ex["label"] for p in preds]
                if return_details:
                    details.append({"label": ex["label"], "logprob_sum": sums[j].tolist(),
                                    "n_tokens": [int(n) for n in ntok], "n_chars": [int(n) for n in nchar],
                                    "pred": preds[0], "pred_norm": preds[1], "pred_norm_token": preds[2]})
    *hits, total = sum_over_processes(torch.tensor([*correct, len(mine)], dtype=torch.float64, device=device),
                                      accelerator)
    out = {"acc": hits[0] / total, "acc_norm": hits[1] / total, "acc_norm_token": hits[2] / total, "n": int(total)}
    return {**out, "details": details} if return_details else out
