"""prepare/: text -> tokens. ``sources`` (files, globs, Hub datasets) -> ``tokenizers`` (load or
train) -> ``encode`` (tiktoken or the fast tokenizer) -> ``shards`` (parallel, resumable) -> a data
dir (formats.py). ``command`` is ``gpt2fit prepare`` and holds ``prepare()``, the whole flow."""

from gpt2fit.prepare.command import main, prepare

__all__ = ["main", "prepare"]
