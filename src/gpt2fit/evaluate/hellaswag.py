"""Zero-shot HellaSwag, as llm.c's ``dev/data/hellaswag.py`` scores GPT-2.

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

import json
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2fit.errors import UserError
from gpt2fit.evaluate.model import eval_mode, n_positions, shards, sum_over_processes

HELLASWAG_NORMALIZATION = (
    "acc_norm = per-token mean log-prob (llm.c); "
    "acc_norm_char = log-prob sum / ending characters (lm-eval-harness)"
)


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


def _batch_scores(net, tokenizer, chunk, max_len: int, pad_id: int, device):
    """Per example of ``chunk``: (log-prob sums [4], ending token counts [4]), float64 on the CPU."""
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
    return (logp * mask).sum(1).view(-1, 4).double().cpu(), mask.sum(1).view(-1, 4).double().cpu()


def score_hellaswag(model, tokenizer, examples, *, batch_size: int = 8, device=None, accelerator=None,
                    return_details: bool = False) -> dict:
    """Zero-shot HellaSwag accuracy (see the module docstring for the exact conventions).

    ``batch_size`` is in examples (each contributes its 4 endings as 4 rows). Works on a model in
    training mode (switched to eval and back). With a multi-process ``accelerator`` the examples
    are sharded across ranks and the counts summed. ``return_details`` adds ``details``: per
    example (this process's share) the label, the 4 log-prob sums, token and char counts, and
    the three predictions.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer is None:
        raise UserError("HellaSwag needs a tokenizer, and this model dir has none; save one next to the model")
    examples = list(examples)
    if not examples:
        raise UserError("no HellaSwag examples to score")
    mine, n_batches = shards(examples, accelerator, batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    max_len = n_positions(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    correct = [0, 0, 0]
    details = []
    with eval_mode(model), torch.no_grad(), autocast:
        for b in range(n_batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            # a process out of examples still runs the forward (a dummy, counted nowhere)
            sums, ntok = _batch_scores(model, tokenizer, chunk or examples[:1], max_len, pad_id, device)
            for j, ex in enumerate(chunk):
                nchar = torch.tensor([max(1, len(e)) for e in ex["endings"]], dtype=torch.float64)
                preds = [int(sums[j].argmax()), int((sums[j] / ntok[j]).argmax()), int((sums[j] / nchar).argmax())]
                for k in range(3):
                    correct[k] += int(preds[k] == ex["label"])
                if return_details:
                    details.append({"label": ex["label"], "logprob_sum": sums[j].tolist(),
                                    "n_tokens": [int(x) for x in ntok[j].tolist()],
                                    "n_chars": [int(x) for x in nchar.tolist()],
                                    "pred": preds[0], "pred_norm": preds[1], "pred_norm_char": preds[2]})
    c0, c1, c2, total = sum_over_processes(
        torch.tensor(correct + [len(mine)], dtype=torch.float64, device=device), accelerator)
    total = int(round(total))
    out = {"acc": c0 / total, "acc_norm": c1 / total, "acc_norm_char": c2 / total, "n": total,
           "normalization": HELLASWAG_NORMALIZATION}
    if return_details:
        out["details"] = details
    return out
