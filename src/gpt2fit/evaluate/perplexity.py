"""The one validation-loss estimator: the training loop's val loss and `gpt2fit eval` both call
``windowed_loss``, so metrics.jsonl and eval_results.json hold the same number for the same
weights and windows.

The window rule
    The token file is cut into non-overlapping windows of ``block_size + 1`` tokens that share
    their boundary token (window ``i`` is ``tokens[i*B : i*B + B + 1]``): ``ceil((n - 1) / B)``
    windows, the last one shorter when ``B`` does not divide ``n - 1``, so all of them predict
    every token after the first exactly once. ``max_windows`` keeps that many, evenly spaced
    over the window indices (``round(linspace(0, n_windows - 1, max_windows))``: the first and
    the last window are always in). The training loop validates ``eval_batches * micro_batch``
    windows (0 = all), the same ones at every eval.

The estimate
    SUM of the per-token cross entropies over all predicted tokens, divided by their number:
    exact whatever the batch size, a partial last window or batch, or the number of processes
    (windows are dealt round-robin to ranks, and (sum, count) is all-reduced). Every batch has
    the same shape: a short window, a short last batch and a rank's extra batches are padded
    with targets of -100, which ``F.cross_entropy`` and the training loss ignore.
"""

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from gpt2fit.errors import UserError
from gpt2fit.evaluate.model import eval_mode, n_positions, shards, sum_over_processes
from gpt2fit.formats import check_token_ids, open_split

IGNORE = -100  # a target that counts nothing (ignore_index of F.cross_entropy and lm_loss)


def window_starts(n_tokens: int, block_size: int, max_windows: int | None = None) -> np.ndarray:
    """Start offsets of the evaluation windows (see the module docstring); 0/None: all."""
    n_windows = max(0, math.ceil((n_tokens - 1) / block_size))
    if max_windows and max_windows < n_windows:
        return np.linspace(0, n_windows - 1, max_windows).round().astype(np.int64) * block_size
    return np.arange(n_windows, dtype=np.int64) * block_size


class HFLossSum(torch.nn.Module):
    """``loss_sum_fn`` for a Hugging Face causal LM: summed cross entropy over float32 logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")


def windowed_loss(loss_sum_fn, data, block_size: int, *, batch_size: int, max_windows: int | None = None,
                  accelerator=None, device=None) -> dict:
    """``{"loss", "tokens", "windows"}``: the token-weighted mean loss over the windows of ``data``.

    ``loss_sum_fn(x, y)`` returns the SUM of the token cross entropies of a [B, T] batch as a 0-d
    tensor, ignoring targets of -100 (the training ``CausalLM`` does; wrap a Hugging Face model
    in ``HFLossSum``). When it is a module it runs in eval mode, and every submodule's mode is
    restored after. ``accelerator``: shard over its processes, on its device.
    """
    n, T = len(data), int(block_size)
    starts = window_starts(n, T, max_windows)
    if not len(starts):
        raise UserError(f"the token file holds {n} token(s); at least 2 are needed to predict one")
    mine, n_batches = shards(list(starts), accelerator, batch_size)
    device = accelerator.device if accelerator is not None else torch.device(device or "cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    with eval_mode(loss_sum_fn), torch.no_grad(), autocast:
        for b in range(n_batches):
            w = np.full((batch_size, T + 1), IGNORE, dtype=np.int64)
            for i, s in enumerate(mine[b * batch_size:(b + 1) * batch_size]):
                piece = data[s:s + T + 1]
                w[i, :len(piece)] = piece
            count += int((w[:, 1:] != IGNORE).sum())
            w = torch.from_numpy(w).to(device)
            # padded inputs read as token 0: causal attention keeps them out of the real positions
            total += loss_sum_fn(w[:, :-1].clamp(min=0), w[:, 1:]).double()
    loss_sum, tokens = sum_over_processes(torch.stack([total, total.new_tensor(count)]), accelerator)
    return {"loss": loss_sum / tokens, "tokens": int(tokens), "windows": int(len(starts))}


def evaluate_perplexity(model, data_dir, *, split: str = "val", block_size: int | None = None, batch_size: int = 8,
                        max_windows: int | None = None, accelerator=None) -> dict:
    """``windowed_loss`` of a Hugging Face causal LM on ``<data_dir>/<split>.bin``, plus ``ppl``."""
    n_pos = n_positions(model)
    block_size = n_pos if block_size is None else int(block_size)
    if not 1 <= block_size <= n_pos:
        raise UserError(f"block_size {block_size} must be between 1 and the model's n_positions ({n_pos})")
    data = open_split(data_dir, split)
    check_token_ids(data.filename, data, int(model.config.vocab_size))
    r = windowed_loss(HFLossSum(model), data, block_size, batch_size=batch_size, max_windows=max_windows,
                      accelerator=accelerator, device=next(model.parameters()).device)
    return {**r, "ppl": math.exp(r["loss"])}
