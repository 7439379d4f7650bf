"""The one validation-loss estimator: the training loop's val loss and `gpt2fit eval` both call ``windowed_loss``.
Windows: non-overlapping, ``block_size + 1`` tokens sharing their boundary token (window ``i`` is ``tokens[i*B :
i*B + B + 1]``, the last one shorter), so every token after the first is predicted once; ``max_windows`` keeps that
many, evenly spaced (first and last always in). The estimate: the SUM of the per-token cross entropies over their
number, exact whatever the batch size or number of processes ((sum, count) is all-reduced; padding: -100 targets)."""

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
    """``{"loss", "tokens", "windows"}``, the token-weighted mean over ``data``'s windows, sharded over ``accelerator``.
    ``loss_sum_fn(x, y)``: a [B, T] batch's summed cross entropy, -100 targets ignored (``HFLossSum``: an HF LM's)."""
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
