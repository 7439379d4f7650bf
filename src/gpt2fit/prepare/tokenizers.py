"""Tokenizers: load a pretrained one, train a byte-level BPE, or build a char-level one. Each is a
``PreTrainedTokenizerFast`` saved as a Hugging Face tokenizer dir: stock ``AutoTokenizer`` loads it."""

import hashlib
import itertools
import json
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gpt2fit.errors import UserError, first_line
from gpt2fit.prepare.sources import Stream, documents

EOT = "<|endoftext|>"
TOKENIZER_TRAIN_CHARS = 200_000_000  # default sample for --tokenizer bpe (~50M tokens; plenty for 64k)


def load_tokenizer(name_or_path: str):
    """AutoTokenizer for a Hub id or local dir, with a clear error when it is missing or broken."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"cannot load tokenizer {name_or_path!r}: {first_line(e)} "
                        "Give a Hub id (gpt2), a tokenizer dir, or prepare with --tokenizer bpe.") from None
    except Exception as e:  # tokenizers raises a bare Exception on a corrupt tokenizer.json
        raise UserError(f"cannot load tokenizer {name_or_path!r}: corrupt tokenizer files ({e}).") from None


def make_tokenizer(spec: str, vocab_size: int, streams: list[Stream] = (), *,
                   train_docs: int | None = None, train_chars: int | None = TOKENIZER_TRAIN_CHARS):
    """(tokenizer, kind): a Hub id / dir ('pretrained'), 'bpe' trained on a bounded sample of the
    train stream (the last of ``streams``), or 'char' over every character of every stream."""
    if spec == "bpe":
        return train_bpe(documents(streams[-1], train_docs, train_chars), vocab_size), "bpe"
    if spec == "char":  # every character must be seen, so the whole source is read (one pass)
        return build_char_tokenizer(itertools.chain.from_iterable(documents(s) for s in streams)), "char"
    return load_tokenizer(spec), "pretrained"


def eot_id(tok) -> int:
    """The end-of-text id appended after every document."""
    for candidate in (tok.eos_token_id, tok.convert_tokens_to_ids(EOT) if EOT in tok.get_vocab() else None):
        if candidate is not None:
            return int(candidate)
    raise UserError(f"tokenizer {tok.name_or_path!r} has no end-of-text token ({EOT!r} or eos_token); "
                    "add one, or use --tokenizer bpe to train one that has it.")


def fingerprint(tok) -> str:
    """A short hash of the vocabulary (token -> id): equal tokenizers encode text identically."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def _wrap(tk: Tokenizer, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on streamed texts: 256 byte symbols, merges, ``<|endoftext|>`` last."""
    if vocab_size < 257 + 1:
        raise UserError(f"vocab_size={vocab_size} is too small for byte-level BPE; use at least 512.")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tk.train_from_iterator(texts, trainer=trainer)  # tokenizers batches the iterator itself
    tk.add_special_tokens([EOT])  # last id, like GPT-2's 50256
    return _wrap(tk)


def build_char_tokenizer(text_or_chars: Iterable[str]) -> PreTrainedTokenizerFast:
    """Char-level: ids = the distinct characters sorted (as nanoGPT), then ``<|endoftext|>``; text round-trips."""
    chars: set[str] = set()
    for piece in text_or_chars:
        chars.update(piece)
    if not chars:
        raise UserError("cannot build a char tokenizer from empty text.")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab[EOT] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOT))
    # every character is its own pre-token ([\s\S] matches newlines too)
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([EOT])
    return _wrap(tk)
