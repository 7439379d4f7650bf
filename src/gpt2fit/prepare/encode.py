"""Text -> ids: tiktoken for GPT-2-style byte-level BPE (several times faster), else the fast tokenizer,
both as ordinary text (``<|endoftext|>`` inside a document is text: only gpt2fit's own EOT ends one).
tiktoken is used only when ``choose_encoder`` has checked that its ids equal the fast tokenizer's."""

import functools
import json
from typing import Callable, Iterable

import tiktoken
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from gpt2fit.units import format_count

VERIFY_CHARS = 200_000  # tiktoken's ids are checked against the fast tokenizer's on this much text
# GPT-2's pre-tokenizer regex, as in tokenizers' ByteLevel pre-tokenizer and GPT-2's encoder.py
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=2)
def tiktoken_params(tokenizer_json: str) -> tuple[dict | None, str]:
    """``tiktoken.Encoding`` keyword arguments equivalent to a byte-level BPE tokenizer, or (None, why not); merge
    result ids must increase in merge order (tiktoken: ranks = ids = priority). Cached and shared: do not modify."""
    j = json.loads(tokenizer_json)
    m = j.get("model") or {}
    if m.get("type") != "BPE":
        return None, f"model is {m.get('type')}, not BPE"
    if m.get("dropout") or m.get("continuing_subword_prefix") or m.get("end_of_word_suffix") or m.get("byte_fallback"):
        return None, "BPE uses dropout, a subword prefix/suffix or byte fallback"
    if j.get("normalizer"):
        return None, f"has a normalizer ({j['normalizer'].get('type')})"
    pre = j.get("pre_tokenizer") or {}
    # ByteLevel with its built-in regex, or the same written as Split(regex) + ByteLevel(use_regex=False)
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    split, byte_level = parts if len(parts) == 2 else ({}, {})
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pat = GPT2_PAT
    elif (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
          and "Regex" in (split.get("pattern") or {}) and byte_level.get("type") == "ByteLevel"
          and not byte_level.get("use_regex") and not byte_level.get("add_prefix_space")):
        pat = split["pattern"]["Regex"]
    else:
        return None, f"pre-tokenizer is not GPT-2's byte-level one ({pre.get('type')})"
    added = j.get("added_tokens") or []
    if any(not a.get("special") for a in added):
        return None, "has non-special added tokens"
    specials = {a["content"]: a["id"] for a in added}
    vocab: dict[str, int] = m["vocab"]
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    if any(c not in vocab or vocab[c] in specials.values() for c in byte_of):
        return None, "the vocabulary lacks some of the 256 byte symbols"
    merges = [tuple(x.split(" ", 1)) if isinstance(x, str) else tuple(x) for x in m.get("merges", [])]
    last, results = -1, set()
    for a, b in merges:
        rid = vocab.get(a + b)
        if rid is None or rid <= last or (a + b) in results:
            return None, "merge results are not in increasing id order (ranks != ids)"
        last = rid
        results.add(a + b)
    ranks: dict[bytes, int] = {}
    for tok, i in vocab.items():
        if tok in specials:
            continue
        if len(tok) > 1 and tok not in results:
            return None, f"vocabulary token {tok!r} is not the result of a merge"
        try:
            ranks[bytes(byte_of[c] for c in tok)] = i
        except KeyError:
            return None, f"vocabulary token {tok!r} is not byte-level"
    if len(set(ranks.values())) != len(ranks):
        return None, "two vocabulary tokens share an id"
    return {"name": "gpt2fit-bpe", "pat_str": pat, "mergeable_ranks": ranks, "special_tokens": specials}, ""


def tiktoken_encoding(tokenizer) -> tiktoken.Encoding | None:
    """A ``tiktoken.Encoding`` for a tokenizer (fast, tokenizers.Tokenizer or its JSON), or None when ineligible."""
    if hasattr(tokenizer, "backend_tokenizer"):
        tokenizer = tokenizer.backend_tokenizer
    if hasattr(tokenizer, "to_str"):
        tokenizer = tokenizer.to_str()
    params, _ = tiktoken_params(tokenizer)
    return tiktoken.Encoding(**params) if params else None


def encoder(tokenizer_json: str, kind: str) -> Callable[[list[str]], list[list[int]]]:
    """Texts -> ids as ordinary text (no special-token parsing) with ``kind`` 'tiktoken' or 'tokenizers'."""
    if kind == "tiktoken":
        enc = tiktoken_encoding(tokenizer_json)
        return lambda texts: [enc.encode_ordinary(t) for t in texts]  # it replaces lone surrogates itself
    tk = Tokenizer.from_str(tokenizer_json)
    tk.encode_special_tokens = True  # "<|endoftext|>" in a document is text, as in encode_ordinary
    tk.no_truncation()
    tk.no_padding()
    return lambda texts: [e.ids for e in tk.encode_batch_fast(texts, add_special_tokens=False)]


def choose_encoder(tokenizer_json: str, sample: Iterable[str], *, allow_tiktoken: bool = True) -> tuple[str, str]:
    """('tiktoken' | 'tokenizers', note): tiktoken if eligible and its ids equal the fast tokenizer's on ``sample``."""
    if not allow_tiktoken:
        return "tokenizers", "tiktoken disabled"
    params, why = tiktoken_params(tokenizer_json)
    if params is None:
        return "tokenizers", why
    picked = [t[:VERIFY_CHARS] for t in sample]  # the caller bounds the sample to about VERIFY_CHARS
    a, b = (encoder(tokenizer_json, kind)(picked) for kind in ("tiktoken", "tokenizers"))
    if a != b:
        bad = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        return "tokenizers", f"tiktoken ids differ from the tokenizer's on document {bad} of the sample"
    return "tiktoken", f"verified on {format_count(sum(map(len, picked)))} characters"
