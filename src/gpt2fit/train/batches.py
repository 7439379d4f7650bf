"""Training batches from token files: fixed windows of block_size+1 tokens in a seeded order.

Batches are a pure function of (seed, micro-batch index, rank): resuming at micro-batch k yields
exactly the batches an uninterrupted run would have seen, with no sampler state to save.
"""

import functools
import itertools

import numpy as np
import torch

from gpt2fit.errors import UserError


class WindowBatches:
    """Micro-batch ``k`` of this rank: ``B`` windows of ``T+1`` tokens (input = w[:-1], target = w[1:]).

    shuffle: each epoch visits every non-overlapping window once, in a seeded permutation, with a
    seeded phase shift so window boundaries move between epochs. random: each window starts at an
    independent seeded random offset (nanoGPT's ``get_batch``).
    """

    def __init__(self, data: np.ndarray, block_size: int, micro_batch: int, *, seed: int, rank: int = 0,
                 world: int = 1, sampling: str = "shuffle"):
        n = len(data)
        if n < block_size + 2:
            raise UserError(f"train split has {n} tokens, fewer than block_size+1={block_size + 1}; use a "
                            "smaller --block_size or more data.")
        self.data, self.T, self.B = data, block_size, micro_batch
        self.seed, self.rank, self.world, self.sampling = seed, rank, world, sampling
        # windows per epoch, valid for any phase in [0, T) when the data allows a phase shift
        self.shift = (n - 1) // block_size >= 2
        self.windows = (n - 1) // block_size - (1 if self.shift else 0)

    @functools.lru_cache(maxsize=4)  # (the permutation and phase of the epochs being read)
    def _epoch(self, e: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, e])
        return rng.permutation(self.windows), int(rng.integers(self.T)) if self.shift else 0

    def starts(self, k: int) -> np.ndarray:
        first = (k * self.world + self.rank) * self.B  # global sample index of this batch's first row
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, k, self.rank])
            return rng.integers(0, len(self.data) - self.T - 1, size=self.B)
        out = np.empty(self.B, dtype=np.int64)
        for j in range(self.B):
            e, i = divmod(first + j, self.windows)
            perm, phase = self._epoch(e)
            out[j] = phase + perm[i] * self.T
        return out

    def __getitem__(self, k: int):
        idx = self.starts(k)[:, None] + np.arange(self.T + 1)[None, :]
        w = torch.from_numpy(self.data[idx].astype(np.int64))
        return w[:, :-1], w[:, 1:]


def make_loader(batches: WindowBatches, start: int, num_workers: int, pin_memory: bool):
    """A DataLoader yielding micro-batches start, start+1, ... (in order; iterate it once)."""
    # its own generator: otherwise creating the iterator draws from the global torch RNG, and a resumed
    # run (which creates it after restoring RNG state) would see different dropout masks
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=itertools.count(start), pin_memory=pin_memory,
                                       num_workers=num_workers, persistent_workers=num_workers > 0,
                                       generator=torch.Generator().manual_seed(0))

