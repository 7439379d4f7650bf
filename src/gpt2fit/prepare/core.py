"""``gpt2fit prepare`` at scale: sources -> parallel tokenization -> resumable shards -> token files.

    # FineWeb-Edu, streamed from the Hub, GPT-2 tokenizer, the first ~1B tokens:
    gpt2fit prepare --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT --streaming \
        --tokenizer gpt2 --max_tokens 1000000000 --out_dir data/fineweb1b
    # OpenWebText (nanoGPT's corpus) from the Hub's Parquet conversion of Skylion007/openwebtext:
    gpt2fit prepare --dataset Skylion007/openwebtext --dataset_revision refs/convert/parquet \
        --streaming --tokenizer gpt2 --val_fraction 0.0005 --out_dir data/openwebtext
    # local files (txt/md/py: one document per file; jsonl/json/parquet/csv: one per record):
    gpt2fit prepare --input 'corpus/*.jsonl' --tokenizer bpe --vocab_size 16384 --out_dir data/mine

The flow, one function each:

1. ``local_streams`` / ``hub_streams``: one or two ordered streams of documents (``docs``: a seeded
   ``val_fraction`` of them is validation; or ``val`` + ``train`` when the dataset has its own
   validation split, ``--val_split_name``).
2. ``make_tokenizer``: load a pretrained tokenizer, or train a BPE / char tokenizer on a bounded
   sample of the stream (never the whole corpus in memory).
3. ``_Run.stream``: the main process reads documents in order and cuts them into chunks of about
   ``chunk_chars`` characters; ``workers`` processes tokenize chunks (GPT-2-style byte-level BPE
   through tiktoken, anything else through the fast tokenizer), append EOT after every document
   and write ``.shards/<chunk>.{train,val}.bin``; a ``<chunk>.done`` marker is written only after
   both files are complete and fsynced. The train/val assignment is drawn in the main process, in
   document order, so the output does not depend on the number of workers.
4. The shards are concatenated (streamed copy) into ``train.bin`` / ``val.bin``; ``tokenizer/``
   and then ``meta.json`` (atomic rename) are written last, and ``.shards/`` is removed.

A rerun with the same arguments after an interruption reuses every chunk that has a ``.done``
marker (``.shards/manifest.json`` records a key of the arguments; a different key starts over).

Documents are encoded as ordinary text: ``<|endoftext|>`` written inside a document is tokenized
like any other text (tiktoken's ``encode_ordinary``), so only gpt2fit's own EOT ends a document.

Notes. OpenWebText: datasets>=4 (5.2 here) no longer runs loading scripts, and the main branch of
``Skylion007/openwebtext`` holds one (``openwebtext.py``): ``load_dataset`` raises "Dataset scripts
are no longer supported", which ``prepare`` turns into a hint to add ``--dataset_revision
refs/convert/parquet``, the Hub's automatic Parquet conversion (its config is then ``default``).
That conversion is partial for datasets over ~5 GB (a ``partial-train`` split directory holding the
first few GB); for all 8M documents extract the original archives and pass them with ``--input``.
(Not checked against the Hub from here: no network.) A resume re-reads the source up to the first
incomplete chunk without tokenizing it (a streamed Hub dataset is downloaded again). Disk: the
shards and the final files coexist until the end, so about 2x the token bytes are needed.
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gpt2fit import formats
from gpt2fit.formats import dtype_for_vocab
from gpt2fit.prepare.sources import expand_inputs
from gpt2fit.errors import ArgumentParser, UserError

SHARDS = ".shards"
MANIFEST = "manifest.json"
FORMAT = 2  # of the shard layout / manifest key; bump when chunking or shard contents change
CHUNK_CHARS = 4_000_000  # ~1M GPT-2 tokens per chunk: 2-4 MB of ids per shard
CHUNK_RECORDS = 100_000  # also close a chunk after this many records (corpora of tiny documents)
TOKENIZER_TRAIN_CHARS = 200_000_000  # default sample for --tokenizer bpe (~50M tokens; plenty for 64k)
VERIFY_CHARS = 200_000  # tiktoken's ids are checked against the fast tokenizer's on this much text
CRASH_ENV = "GPT2FIT_PREPARE_CRASH_AFTER"  # testing aid: hard-exit after N newly tokenized chunks

# GPT-2's pre-tokenizer regex, as in tokenizers' ByteLevel pre-tokenizer and GPT-2's encoder.py
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ------------------------------------------------------------------------------------------
# Sources: each yields records (text or None, had_replaced_bytes, progress units)
# ------------------------------------------------------------------------------------------
Record = tuple  # (text: str | None, replaced: bool, units: float)


@dataclass
class Stream:
    """One ordered stream of documents. ``split``: 'docs' (seeded val_fraction), 'train' or 'val'."""

    split: str
    records: Callable[[], Iterator[Record]]  # a fresh iterator on each call (tokenizer training, then tokenizing)
    total: float | None  # progress units in the whole stream, when known
    unit: str  # "B" (bytes of local files) or "doc"


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _no_column(where, column, names) -> UserError:
    return UserError(f"{where}: no text column {column!r}; columns: {sorted(names)}. Pass --text_column NAME.")


def _iter_jsonl_lines(path: Path, column: str, lines) -> Iterator[Record]:
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        line, replaced = _decode(raw)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i + 1} is not valid JSON ({e.msg}); fix or remove the line.") from None
        if not isinstance(rec, dict) or column not in rec:
            raise _no_column(f"{path}: record {i}", column, rec if isinstance(rec, dict) else [])
        text = rec[column]
        text = text if isinstance(text, str) else ("" if text is None else str(text))
        if "\\ud" in line or "\\uD" in line:  # a JSON escape can smuggle in a lone surrogate
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text, replaced = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), True
        yield text, replaced, len(raw)


def _iter_json_file(path: Path, column: str) -> Iterator[Record]:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
        fh.seek(0)
        if not head.startswith(b"["):  # JSON lines in a .json file
            yield from _iter_jsonl_lines(path, column, fh)
            return
        text, replaced = _decode(fh.read())  # a JSON array has to be read whole
    records = json.loads(text)
    per = len(text) / max(len(records), 1)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or column not in rec:
            raise _no_column(f"{path}: record {i}", column, rec if isinstance(rec, dict) else [])
        yield ("" if rec[column] is None else str(rec[column])), replaced, per


def _iter_parquet(path: Path, column: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise _no_column(str(path), column, names)
    per = path.stat().st_size / max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for t in batch.column(0).to_pylist():
            yield t, False, per


def _iter_csv(path: Path, column: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:  # the text column is read as bytes and decoded here, so bad UTF-8 is replaced, not fatal
        reader = pcsv.open_csv(
            path, read_options=pcsv.ReadOptions(block_size=1 << 24),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(column_types={column: pa.binary()}))
    except pa.ArrowInvalid as e:
        raise UserError(f"{path}: cannot read as CSV ({e}).") from None
    names = reader.schema.names
    if column not in names:
        raise _no_column(str(path), column, names)
    idx = names.index(column)
    for batch in reader:
        for raw in batch.column(idx).to_pylist():
            if raw is None:
                yield None, False, 0
                continue
            text, replaced = _decode(raw)
            yield text, replaced, len(raw)  # progress counts the text bytes only (ETA a little low)


def _iter_local(files: list[Path], column: str) -> Iterator[Record]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            with open(path, "rb") as fh:
                yield from _iter_jsonl_lines(path, column, fh)
        elif suffix == ".json":
            yield from _iter_json_file(path, column)
        elif suffix == ".parquet":
            yield from _iter_parquet(path, column)
        elif suffix in (".csv", ".tsv"):
            yield from _iter_csv(path, column)
        else:  # txt, md, py, ...: the whole file is one document
            raw = path.read_bytes()
            text, replaced = _decode(raw)
            yield text, replaced, len(raw)


def local_streams(inputs: list[str], text_column: str) -> tuple[list[Stream], dict]:
    files = expand_inputs(inputs)
    total = float(sum(p.stat().st_size for p in files))
    stream = Stream("docs", lambda: _iter_local(files, text_column), total, "B")
    # the key covers the files' identity, so a changed corpus is never resumed from stale shards
    ident = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return [stream], {"inputs": list(inputs), "files": len(files), "_files": ident}


def _hub_error(dataset: str, e: Exception, config, revision) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    name = type(e).__name__
    if name == "DatasetNotFoundError" or "gated" in first.lower():
        return UserError(
            f"dataset {dataset!r} was not found on the Hugging Face Hub, or it needs a login: {first} "
            f"Check the id at https://huggingface.co/datasets/{dataset}; for a gated or private dataset run "
            "`hf auth login` (or set HF_TOKEN) and accept its terms on the dataset page.")
    if isinstance(e, ConnectionError) or name in ("OfflineModeIsEnabled", "ConnectError", "ConnectTimeout"):
        return UserError(
            f"cannot reach the Hugging Face Hub for dataset {dataset!r}: {first} Check the network (and "
            "unset HF_HUB_OFFLINE), or pass a local directory / --input files instead.")
    if "Dataset scripts are no longer supported" in first:
        return UserError(
            f"dataset {dataset!r} is a loading-script dataset, which datasets>=4 cannot run ({first}). Use "
            "the Hub's Parquet conversion: add --dataset_revision refs/convert/parquet.")
    if "BuilderConfig" in first or (config and "config" in first.lower()):
        return UserError(f"--dataset_config {config!r} is not a config of {dataset!r}: {first} "
                         "Pass one of the available names with --dataset_config.")
    if name == "RevisionNotFoundError" or (revision and "revision" in first.lower()):
        return UserError(f"--dataset_revision {revision!r} does not exist for {dataset!r}: {first}")
    if name in ("HfHubHTTPError", "HTTPStatusError") and ("401" in first or "403" in first):
        return UserError(f"the Hub refused access to dataset {dataset!r}: {first} Run `hf auth login` (or set "
                         "HF_TOKEN) with an account that can read it.")
    return UserError(f"cannot load dataset {dataset!r}: {name}: {first} Give a Hub id, a local directory of "
                     "data files, or a builder name (json, parquet, csv, text) with --dataset_data_files.")


def hub_streams(dataset: str, *, config=None, split="train", revision=None, data_files=None, streaming=False,
                val_split_name=None, text_column="text") -> tuple[list[Stream], dict]:
    """Streams from ``datasets.load_dataset`` (a Hub id, a local directory, or a builder + data_files)."""
    from datasets import load_dataset

    kwargs = {"name": config, "revision": revision, "streaming": streaming}
    if data_files:
        kwargs["data_files"] = list(data_files)
    try:
        dd = load_dataset(dataset, **kwargs)  # every split, so a missing one can be named with the choices
    except UserError:
        raise
    except Exception as e:  # datasets/huggingface_hub raise many types; each becomes one clear UserError
        raise _hub_error(dataset, e, config, revision) from None
    splits = list(dd.keys())
    if split not in dd:
        raise UserError(f"--dataset_split {split!r} is not a split of {dataset!r}; splits: {splits}.")
    val = None
    if val_split_name == "auto":
        val = next((s for s in ("validation", "valid", "val", "test") if s in dd and s != split), None)
    elif val_split_name:
        if val_split_name not in dd:
            raise UserError(f"--val_split_name {val_split_name!r} is not a split of {dataset!r}; splits: {splits}. "
                            "Leave it out to hold out a seeded --val_fraction of documents instead.")
        val = val_split_name

    def stream(name: str, role: str) -> Stream:
        ds = dd[name]
        names = ds.column_names
        if names is None:  # a streamed dataset without declared features: look at the first row
            names = list(next(iter(ds), {}).keys())
        if text_column not in names:
            raise _no_column(f"dataset {dataset!r} split {name!r}", text_column, names)
        ds = ds.select_columns([text_column])
        total = None
        if hasattr(ds, "__len__"):
            total = float(len(ds))
        elif ds.info.splits and name in ds.info.splits and ds.info.splits[name].num_examples:
            total = float(ds.info.splits[name].num_examples)

        def records():
            for batch in ds.iter(batch_size=1000):
                for t in batch[text_column]:
                    yield (t if isinstance(t, str) or t is None else str(t)), False, 1.0

        return Stream(role, records, total, "doc")

    streams = [stream(val, "val"), stream(split, "train")] if val else [stream(split, "docs")]
    info = {"dataset": dataset, "dataset_config": config, "dataset_split": split, "dataset_revision": revision,
            "dataset_data_files": list(data_files) if data_files else None, "streaming": streaming,
            "val_split": val}
    return streams, info


def _documents(stream: Stream, max_docs=None, max_chars=None) -> Iterator[str]:
    """The non-empty documents of a stream, optionally capped (for tokenizer training)."""
    docs = chars = 0
    for text, _, _ in stream.records():
        if not text or text.isspace():
            continue
        if (max_docs and docs >= max_docs) or (max_chars and chars >= max_chars):
            return
        docs += 1
        chars += len(text)
        yield text


# ------------------------------------------------------------------------------------------
# Tokenizers and encoders
# ------------------------------------------------------------------------------------------
def make_tokenizer(spec: str, vocab_size: int, streams: list[Stream] = (), *,
                   train_docs: int | None = None, train_chars: int | None = TOKENIZER_TRAIN_CHARS):
    """(tokenizer, kind): a Hub id / dir ('pretrained'), 'bpe' trained on a bounded sample of the
    train stream (the last of ``streams``), or 'char' over every character of every stream."""
    import itertools

    from gpt2fit.prepare import tokenizers as T

    if spec == "bpe":
        return T.train_bpe(_documents(streams[-1], train_docs, train_chars), vocab_size), "bpe"
    if spec == "char":  # every character must be seen, so the whole source is read (one pass)
        return T.build_char_tokenizer(itertools.chain.from_iterable(_documents(s) for s in streams)), "char"
    return T.load_tokenizer(spec), "pretrained"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=2)
def tiktoken_params(tokenizer_json: str) -> tuple[dict | None, str]:
    """``tiktoken.Encoding`` keyword arguments equivalent to a byte-level BPE tokenizer, or (None, why not).

    Eligible: a BPE model (no dropout, prefixes/suffixes or byte fallback), no normalizer, a ByteLevel
    pre-tokenizer with GPT-2's regex and no prefix space (or a Split regex + ByteLevel without regex),
    only special added tokens, and merges whose result ids increase in merge order, so that ranks =
    ids = merge priority, as tiktoken assumes. The vocabulary's own ids are the ranks.
    The result is cached and shared: do not modify it.
    """
    j = json.loads(tokenizer_json)
    m = j.get("model") or {}
    if m.get("type") != "BPE":
        return None, f"model is {m.get('type')}, not BPE"
    if m.get("dropout") or m.get("continuing_subword_prefix") or m.get("end_of_word_suffix") or m.get("byte_fallback"):
        return None, "BPE uses dropout, a subword prefix/suffix or byte fallback"
    if j.get("normalizer"):
        return None, f"has a normalizer ({j['normalizer'].get('type')})"
    pre = j.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pat = GPT2_PAT
    elif (pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2
          and pre["pretokenizers"][0].get("type") == "Split"
          and "Regex" in (pre["pretokenizers"][0].get("pattern") or {})
          and pre["pretokenizers"][0].get("behavior") == "Isolated" and not pre["pretokenizers"][0].get("invert")
          and pre["pretokenizers"][1].get("type") == "ByteLevel" and not pre["pretokenizers"][1].get("use_regex")
          and not pre["pretokenizers"][1].get("add_prefix_space")):
        pat = pre["pretokenizers"][0]["pattern"]["Regex"]
    else:
        return None, f"pre-tokenizer is not GPT-2's byte-level one ({pre.get('type')})"
    added = j.get("added_tokens") or []
    if any(not a.get("special") for a in added):
        return None, "has non-special added tokens"
    specials = {a["content"]: a["id"] for a in added}
    vocab: dict[str, int] = m["vocab"]
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
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


def tiktoken_encoding(tokenizer):
    """A ``tiktoken.Encoding`` for a tokenizer (PreTrainedTokenizerFast, tokenizers.Tokenizer, or its
    JSON), or None when it is not GPT-2-style byte-level BPE."""
    import tiktoken

    if hasattr(tokenizer, "backend_tokenizer"):
        tokenizer = tokenizer.backend_tokenizer
    if hasattr(tokenizer, "to_str"):
        tokenizer = tokenizer.to_str()
    params, _ = tiktoken_params(tokenizer)
    return tiktoken.Encoding(**params) if params else None


class Encoder:
    """Text -> ids as ordinary text (no special-token parsing): tiktoken when eligible, else tokenizers."""

    def __init__(self, tokenizer_json: str, kind: str):
        self.kind = kind
        if kind == "tiktoken":
            import tiktoken

            params, why = tiktoken_params(tokenizer_json)
            if params is None:
                raise ValueError(f"tokenizer is not tiktoken-eligible: {why}")
            self._core = tiktoken.Encoding(**params)._core_bpe
        else:
            from tokenizers import Tokenizer

            tk = Tokenizer.from_str(tokenizer_json)
            tk.encode_special_tokens = True  # "<|endoftext|>" in a document is text, as in encode_ordinary
            tk.no_truncation()
            tk.no_padding()
            self._tk = tk

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "tiktoken":
            out = []
            for t in texts:
                try:
                    out.append(self._core.encode_ordinary(t))
                except UnicodeEncodeError:  # lone surrogates: replaced, as tiktoken's own wrapper does
                    out.append(self._core.encode_ordinary(t.encode("utf-16", "surrogatepass").decode("utf-16", "replace")))
            return out
        return [e.ids for e in self._tk.encode_batch_fast(texts, add_special_tokens=False)]


def choose_encoder(tokenizer_json: str, sample: list[str], *, allow_tiktoken: bool = True) -> tuple[str, str]:
    """('tiktoken' | 'tokenizers', note). tiktoken only when eligible and its ids equal the fast
    tokenizer's on ``sample`` (a safety net for tokenizers whose merges tiktoken reads differently)."""
    if not allow_tiktoken:
        return "tokenizers", "tiktoken disabled"
    params, why = tiktoken_params(tokenizer_json)
    if params is None:
        return "tokenizers", why
    fast, tk = Encoder(tokenizer_json, "tiktoken"), Encoder(tokenizer_json, "tokenizers")
    picked, chars = [], 0
    for t in sample:
        picked.append(t[:VERIFY_CHARS])
        chars += len(picked[-1])
        if chars >= VERIFY_CHARS:
            break
    a, b = fast.encode(picked), tk.encode(picked)
    if a != b:
        bad = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        return "tokenizers", f"tiktoken ids differ from the tokenizer's on document {bad} of the sample"
    return "tiktoken", f"verified on {chars:,} characters"


# ------------------------------------------------------------------------------------------
# Workers: tokenize one chunk, write its shards, then its done-marker
# ------------------------------------------------------------------------------------------
_W: dict = {}


def _init_worker(tokenizer_json: str, kind: str, eot: int, dtype: str, shard_dir: str, parent: int | None):
    if parent is not None:  # a worker process (not the in-process path)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker already
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    _W.update(enc=Encoder(tokenizer_json, kind), eot=eot, dtype=np.dtype(dtype), dir=Path(shard_dir))


def _exit_with_parent(parent: int) -> None:
    while True:  # a killed main process leaves no orphans blocked on the task queue
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _fsync_write(path: Path, data) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _disk_error(path: Path, e: OSError) -> UserError:
    return UserError(f"cannot write {path}: {e.strerror or e} (disk full?). Free space on that disk and rerun the "
                     "same command: completed chunks are kept and resumed, the incomplete one is redone.")


def tokenize_chunk(name: str, texts: list[str], val: np.ndarray, append_eot: bool = True) -> dict:
    """Encode documents, EOT after each (unless ``append_eot`` is False: pieces of one document cut
    at a character position, as --split chars does), split by ``val`` flags; write shards and marker."""
    eot, dtype, d = _W["eot"], _W["dtype"], _W["dir"]
    ids = _W["enc"].encode(texts)
    lens = np.fromiter((len(x) + append_eot for x in ids), dtype=np.int64, count=len(ids))
    out = {}
    for split, want in (("train", False), ("val", True)):
        flat: list[int] = []
        docs = 0
        for x, v in zip(ids, val):
            if bool(v) == want:
                flat.extend(x)
                if append_eot:
                    flat.append(eot)
                docs += 1
        path = d / f"{name}.{split}.bin"
        try:
            if flat:
                _fsync_write(path, np.array(flat, dtype=dtype).data)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:
            path.unlink(missing_ok=True)
            raise _disk_error(path, e) from None
        out[f"{split}_tokens"], out[f"{split}_docs"] = len(flat), docs
    marker = d / f"{name}.done"
    tmp = d / f"{name}.done.tmp"
    try:
        _fsync_write(tmp, json.dumps(out).encode())
        os.replace(tmp, marker)
        _fsync_dir(d)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        raise _disk_error(marker, e) from None
    out["lens"] = lens
    return out


def _fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` durable (POSIX; Windows cannot open a directory and needs no such step)."""
    if os.name == "nt":
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------
# Chunks, the pool, resume
# ------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    name: str
    texts: list[str]
    val: np.ndarray  # per document: True = validation
    chars: np.ndarray  # per document
    empty_before: list[int]  # for each skipped empty record: documents of this chunk before it
    replaced: list[int]  # documents of this chunk that had undecodable bytes
    units: float


def _chunks(stream: Stream, prefix: str, chunk_chars: int, rng, val_fraction: float,
            max_chars: int | None) -> Iterator[Chunk]:
    texts: list[str] = []
    chars: list[int] = []
    empty: list[int] = []
    replaced: list[int] = []
    units = 0.0
    n_chars = records = index = total_chars = 0

    def cut() -> Chunk:
        if stream.split == "docs":  # drawn in document order: the same split for any number of workers
            val = rng.random(len(texts)) < val_fraction
        else:
            val = np.full(len(texts), stream.split == "val")
        return Chunk(f"{prefix}{index:06d}", texts, val, np.array(chars, dtype=np.int64), empty, replaced, units)

    for text, rep, u in stream.records():
        units += u
        records += 1
        if not text or text.isspace():
            empty.append(len(texts))
        else:
            if max_chars and total_chars >= max_chars:
                break
            if rep:
                replaced.append(len(texts))
            texts.append(text)
            chars.append(len(text))
            n_chars += len(text)
            total_chars += len(text)
        if n_chars >= chunk_chars or records >= CHUNK_RECORDS:
            yield cut()
            index += 1
            texts, chars, empty, replaced, units, n_chars, records = [], [], [], [], 0.0, 0, 0
    if texts or empty:
        yield cut()


class _Handle:
    def __init__(self, run: "_Run", chunk: Chunk, marker: dict | None):
        self.run, self.chunk, self.marker, self.job, self.result = run, chunk, marker, None, None

    def ready(self) -> bool:
        return self.marker is not None or self.result is not None or (self.job is not None and self.job.ready())

    def get(self) -> dict:
        if self.marker is not None:
            return self.marker
        if self.result is None:
            if self.job is None:  # never handed to a pool: tokenize here
                if self in self.run.waiting:
                    self.run.waiting.remove(self)
                self.result = tokenize_chunk(self.chunk.name, self.chunk.texts, self.chunk.val)
            else:
                self.result = self.job.get()
            self.run.tokenized += 1
            self.run.maybe_crash()
        return self.result


@dataclass
class _Used:
    """What a chunk contributes to the output (all of it, or the documents before a --max_tokens cut)."""

    name: str
    train_tokens: int
    val_tokens: int
    train_docs: int
    val_docs: int
    chars: int
    empty: int
    replaced: int
    source_docs: int = -1  # input documents behind it (differs from train_docs + val_docs for --split chars)

    def __post_init__(self):
        if self.source_docs < 0:
            self.source_docs = self.train_docs + self.val_docs


@dataclass
class _Run:
    out: Path
    shard_dir: Path
    tokenizer_json: str
    encoder: str
    eot: int
    dtype: str
    workers: int
    resume: bool
    quiet: bool
    pool: object = None
    waiting: list = field(default_factory=list)
    tokenized: int = 0
    resumed: int = 0
    crash_after: int = field(default_factory=lambda: int(os.environ.get(CRASH_ENV, "0") or 0))

    def __post_init__(self):
        _init_worker(self.tokenizer_json, self.encoder, self.eot, self.dtype, str(self.shard_dir), None)

    # -- resume ----------------------------------------------------------------------------
    def marker(self, name: str) -> dict | None:
        if not self.resume:
            return None
        p = self.shard_dir / f"{name}.done"
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        item = np.dtype(self.dtype).itemsize
        for split in ("train", "val"):  # a marker counts only when its shard files are whole
            f = self.shard_dir / f"{name}.{split}.bin"
            size = f.stat().st_size if f.exists() else 0
            if size != m.get(f"{split}_tokens", -1) * item:
                return None
        return m

    def maybe_crash(self) -> None:
        if self.crash_after and self.tokenized >= self.crash_after:
            os._exit(3)  # testing aid (CRASH_ENV): die like a killed process, no cleanup

    # -- the pool: started for the second chunk, so one-chunk corpora never pay for it -------
    def submit(self, chunk: Chunk) -> _Handle:
        h = _Handle(self, chunk, self.marker(chunk.name))
        if h.marker is not None:
            self.resumed += 1
            return h
        if self.workers > 1:
            self.waiting.append(h)
            if self.pool is None and len(self.waiting) >= 2:
                import multiprocessing as mp

                ctx = mp.get_context("spawn")  # no fork of a process holding tokenizer threads
                self.pool = ctx.Pool(self.workers, initializer=_init_worker,
                                     initargs=(self.tokenizer_json, self.encoder, self.eot, self.dtype,
                                               str(self.shard_dir), os.getpid()))
            if self.pool is not None:
                for w in self.waiting:
                    w.job = self.pool.apply_async(tokenize_chunk, (w.chunk.name, w.chunk.texts, w.chunk.val))
                    w.chunk.texts = None  # the task holds them until it is sent; a cut uses the returned lens
                self.waiting = []
        return h

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None

    # -- one stream ------------------------------------------------------------------------
    def stream(self, stream: Stream, prefix: str, *, chunk_chars: int, rng, val_fraction: float,
               max_chars: int | None, max_tokens: int | None, bar) -> list[_Used]:
        """Tokenize a stream in order; return the used part of each chunk, in order."""
        used: list[_Used] = []
        pending: deque[_Handle] = deque()
        limit = 2 * max(self.workers, 1)
        total = 0
        chunks = _chunks(stream, prefix, chunk_chars, rng, val_fraction, max_chars)
        try:
            for chunk in chunks:
                pending.append(self.submit(chunk))
                while pending and (len(pending) > limit or pending[0].ready()):
                    total = self._collect(pending.popleft(), used, total, max_tokens, bar)
                    if max_tokens and total >= max_tokens:
                        return used
            while pending:
                total = self._collect(pending.popleft(), used, total, max_tokens, bar)
                if max_tokens and total >= max_tokens:
                    return used
            return used
        finally:
            chunks.close()
            for h in pending:  # past a --max_tokens cut: not needed (completed ones stay for a longer rerun)
                if h in self.waiting:
                    self.waiting.remove(h)

    def _collect(self, h: _Handle, used: list[_Used], total: int, max_tokens, bar) -> int:
        r, c = h.get(), h.chunk
        n = r["train_tokens"] + r["val_tokens"]
        keep = len(c.val)
        if max_tokens and total + n >= max_tokens:  # stop after the document that reaches the cap
            lens = r.get("lens")
            if lens is None:
                lens = np.array([len(x) + 1 for x in Encoder(self.tokenizer_json, self.encoder).encode(c.texts)])
            keep = int(np.searchsorted(np.cumsum(lens), max_tokens - total, side="left")) + 1
            val, ln = c.val[:keep], lens[:keep]
            r = {"train_tokens": int(ln[~val].sum()), "val_tokens": int(ln[val].sum()),
                 "train_docs": int((~val).sum()), "val_docs": int(val.sum())}
        u = _Used(c.name, r["train_tokens"], r["val_tokens"], r["train_docs"], r["val_docs"],
                  int(c.chars[:keep].sum()), sum(1 for e in c.empty_before if e < keep or keep == len(c.val)),
                  sum(1 for i in c.replaced if i < keep))
        used.append(u)
        if bar is not None:
            bar.advance(c.units, u.train_docs + u.val_docs, u.train_tokens + u.val_tokens)
        return total + u.train_tokens + u.val_tokens


class _Progress:
    """tqdm bar over the stream's units (bytes or documents) or, with --max_tokens, tokens."""

    def __init__(self, stream: Stream, max_tokens: int | None, desc: str, quiet: bool):
        from tqdm.auto import tqdm

        self.by_tokens = bool(max_tokens)
        total = max_tokens if self.by_tokens else stream.total
        unit = "tok" if self.by_tokens else stream.unit
        self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=True if quiet else None,
                        mininterval=1.0, dynamic_ncols=True)
        self.t0, self.docs, self.tokens = time.time(), 0, 0

    def advance(self, units: float, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        dt = max(time.time() - self.t0, 1e-9)
        if self.by_tokens:  # tqdm shows tokens/s itself; the last document may overshoot the cap
            self.bar.update(max(min(tokens, self.bar.total - self.bar.n), 0))
            self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s", refresh=False)
        else:
            self.bar.update(units)
            self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------
# Output: concatenate shards, write tokenizer/ and meta.json
# ------------------------------------------------------------------------------------------
def _copy_range(src: Path, dst_fd: int, nbytes: int) -> None:
    """Append the first ``nbytes`` of ``src`` to the file descriptor ``dst_fd`` (in-kernel when possible)."""
    with open(src, "rb", buffering=0) as s:
        left = nbytes
        try:
            while left > 0:
                n = os.copy_file_range(s.fileno(), dst_fd, min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
        except AttributeError:  # not Linux: the loop below copies
            pass
        except OSError as e:  # another filesystem or no kernel support: the loop below copies
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        while left > 0:
            buf = s.read(min(left, 8 << 20))
            if not buf:
                raise UserError(f"{src} is shorter than its done-marker says; delete {src.parent} and rerun.")
            view = memoryview(buf)
            while view:  # a short write happens when the disk fills up; the next one raises ENOSPC
                view = view[os.write(dst_fd, view):]
            left -= len(buf)


def _concat(shard_dir: Path, used: list[_Used], split: str, dst: Path, dtype: str) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    item = np.dtype(dtype).itemsize
    try:
        with open(tmp, "wb", buffering=0) as fh:
            for u in used:
                n = getattr(u, f"{split}_tokens")
                if n:
                    _copy_range(shard_dir / f"{u.name}.{split}.bin", fh.fileno(), n * item)
            os.fsync(fh.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(dst, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)


def _key(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# prepare
# ------------------------------------------------------------------------------------------
def prepare(inputs: list[str] | None, out_dir: str, *, tokenizer: str = "gpt2", vocab_size: int = 8192,
            text_column: str = "text", split: str = "documents", val_fraction: float = 0.05,
            seed: int = 1337, max_chars: int | None = None, overwrite: bool = False, quiet: bool = False,
            dataset: str | None = None, dataset_config: str | None = None, dataset_split: str = "train",
            dataset_revision: str | None = None, dataset_data_files: list[str] | None = None,
            streaming: bool = False, val_split_name: str | None = None, max_tokens: int | None = None,
            workers: int | None = None, chunk_chars: int = CHUNK_CHARS, tokenizer_train_docs: int | None = None,
            tokenizer_train_chars: int | None = TOKENIZER_TRAIN_CHARS, resume: bool = True,
            use_tiktoken: bool = True) -> dict:
    """Tokenize ``inputs`` (or a ``dataset``) into ``out_dir``; returns the meta dict.

    See ``build_prepare_parser`` for every option. ``split='chars'`` (nanoGPT's cut of one long text)
    runs in one process and holds the text in memory; ``'documents'`` streams with bounded memory.
    """
    from gpt2fit.prepare.tokenizers import eot_id, fingerprint

    t0 = time.time()
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.05).")
    if split not in ("documents", "chars"):
        raise UserError(f"split={split!r} must be 'documents' or 'chars'.")
    if bool(inputs) == bool(dataset):
        raise UserError("give exactly one source: --input FILES... or --dataset ID (got "
                        f"{'both' if inputs else 'neither'}).")
    if max_tokens is not None and max_tokens <= 0:
        raise UserError(f"max_tokens={max_tokens} must be positive (or left out for the whole source).")
    if chunk_chars < 1:
        raise UserError(f"chunk_chars={chunk_chars} must be positive (default {CHUNK_CHARS:,}).")
    workers = workers or _cpu_count()
    if workers < 1:
        raise UserError(f"workers={workers} must be at least 1.")
    out = Path(out_dir)
    if (out / formats.META).exists() and not overwrite:
        raise UserError(f"{out} already holds prepared data; pass --overwrite to replace it or choose "
                        "another --out_dir.")

    if dataset:
        streams, source = hub_streams(dataset, config=dataset_config, split=dataset_split,
                                      revision=dataset_revision, data_files=dataset_data_files,
                                      streaming=streaming, val_split_name=val_split_name, text_column=text_column)
    else:
        if val_split_name and val_split_name != "auto":
            raise UserError(f"--val_split_name {val_split_name!r} needs a --dataset with that split; local files "
                            "use a seeded --val_fraction of documents.")
        streams, source = local_streams(list(inputs), text_column)
    if split == "chars" and len(streams) > 1:
        raise UserError("--split chars cuts one text in two; it cannot be combined with --val_split_name.")
    train_stream = streams[-1]

    key_args = {"format": FORMAT, "source": source, "tokenizer": tokenizer, "vocab_size": vocab_size,
                "tokenizer_train_docs": tokenizer_train_docs, "tokenizer_train_chars": tokenizer_train_chars,
                "text_column": text_column, "split": split, "val_fraction": val_fraction, "seed": seed,
                "max_chars": max_chars, "chunk_chars": chunk_chars, "use_tiktoken": use_tiktoken}
    key = _key(key_args)
    shard_dir = out / SHARDS
    manifest = _read_manifest(shard_dir) if resume else None
    if manifest and manifest.get("key") == key and (shard_dir / formats.TOKENIZER_DIR).is_dir():
        from gpt2fit.prepare.tokenizers import load_tokenizer

        tok, kind = load_tokenizer(str(shard_dir / formats.TOKENIZER_DIR)), manifest["kind"]
        resuming = True
    else:
        tok, kind = make_tokenizer(tokenizer, vocab_size, streams, train_docs=tokenizer_train_docs,
                                   train_chars=tokenizer_train_chars)
        resuming = False
    eot = eot_id(tok)
    dtype = dtype_for_vocab(len(tok))
    tok_json = tok.backend_tokenizer.to_str()
    if not resuming:
        if shard_dir.exists():
            shutil.rmtree(shard_dir)
        shard_dir.mkdir(parents=True)
        tok.save_pretrained(shard_dir / formats.TOKENIZER_DIR)
        _write_json(shard_dir / MANIFEST, {"key": key, "kind": kind, "args": key_args})
    if overwrite:  # from here on the old data is being replaced: never leave it looking valid
        (out / formats.META).unlink(missing_ok=True)

    # the encoder is chosen on the first documents, identically on every (re)run
    sample = list(_documents(streams[0], max_docs=256, max_chars=VERIFY_CHARS))
    encoder, encoder_note = choose_encoder(tok_json, sample, allow_tiktoken=use_tiktoken)
    del sample

    rng = np.random.default_rng(seed)
    run = _Run(out, shard_dir, tok_json, encoder, eot, dtype, workers if split == "documents" else 1,
               resume, quiet)
    used: list[_Used] = []
    ok = False
    try:
        if split == "chars":
            used = _prepare_chars(run, train_stream, val_fraction, max_chars)
        else:
            for s in streams:
                cap = max_tokens
                if cap and s.split == "val":  # a source's own val split gets its share of the cap
                    cap = max(1, int(max_tokens * val_fraction))
                prefix = {"docs": "d", "train": "t", "val": "v"}[s.split]
                bar = _Progress(s, cap, {"docs": "tokenize", "train": "train", "val": "val"}[s.split], quiet)
                try:
                    used += run.stream(s, prefix, chunk_chars=chunk_chars, rng=rng, val_fraction=val_fraction,
                                       max_chars=max_chars if s.split != "val" else
                                       (int(max_chars * val_fraction) if max_chars else None),
                                       max_tokens=cap, bar=bar)
                finally:
                    bar.close()
        ok = True
    except KeyboardInterrupt:
        done = len(list(shard_dir.glob("*.done")))
        print(f"\ninterrupted: {done} chunks are complete in {shard_dir}; rerun the same command to resume.",
              file=sys.stderr)
        raise
    finally:
        run.close(ok)

    docs = sum(u.source_docs for u in used)
    tr = {s: sum(getattr(u, f"{s}_tokens") for u in used) for s in ("train", "val")}
    nd = {s: sum(getattr(u, f"{s}_docs") for u in used) for s in ("train", "val")}
    if docs == 0:
        shutil.rmtree(shard_dir, ignore_errors=True)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # made by this run and still empty
        where = dataset or ", ".join(inputs)
        raise UserError(f"no text found in {where} (empty files?); nothing was written.")
    if len(streams) > 1 and nd["val"] == 0:
        raise UserError(f"the val split {source['val_split']!r} of {dataset!r} has no text; choose another "
                        "--val_split_name or leave it out to hold out a --val_fraction of documents.")
    if split == "documents" and nd["val"] == 0 and nd["train"] > 1:
        raise UserError(f"no document landed in the val split ({nd['train']} documents, "
                        f"val_fraction={val_fraction}); raise --val_fraction or use --split chars.")

    for s in ("train", "val"):
        _concat(shard_dir, used, s, out / f"{s}.bin", dtype)
    tok_dir = out / formats.TOKENIZER_DIR
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    shutil.copytree(shard_dir / formats.TOKENIZER_DIR, tok_dir)
    seconds = time.time() - t0
    source.pop("_files", None)
    meta = {
        "format_version": 1,
        "dtype": dtype,
        "tokenizer": {"name_or_path": tokenizer if kind == "pretrained" else str(tok_dir), "kind": kind,
                      "vocab_size": len(tok), "eot_id": eot, "fingerprint": fingerprint(tok)},
        "splits": {s: {"tokens": tr[s], "documents": nd[s]} for s in ("train", "val")},
        "source": {**source, "text_column": text_column, "split": split, "val_fraction": val_fraction,
                   "seed": seed, "max_chars": max_chars, "max_tokens": max_tokens,
                   "chars": sum(u.chars for u in used), "documents": docs, "eot_after_documents": split != "chars",
                   "empty_skipped": sum(u.empty for u in used),
                   "documents_with_replaced_bytes": sum(u.replaced for u in used),
                   "tokenizer_train_docs": tokenizer_train_docs if kind == "bpe" else None,
                   "tokenizer_train_chars": tokenizer_train_chars if kind == "bpe" else None},
        "encoder": {"kind": encoder, "note": encoder_note, "workers": run.workers, "chunk_chars": chunk_chars,
                    "chunks": len(used), "chunks_tokenized": run.tokenized, "chunks_resumed": run.resumed},
        "seconds": round(seconds, 2),
    }
    _write_json(out / formats.META, meta)
    shutil.rmtree(shard_dir, ignore_errors=True)
    if not quiet:
        print(summary(out, meta))
    return meta


def _prepare_chars(run: _Run, stream: Stream, val_fraction: float, max_chars: int | None) -> list[_Used]:
    """nanoGPT's split of one text: the first (1 - val_fraction) of the characters train, the rest val."""
    empty = replaced = 0
    parts = []
    for text, rep, _ in stream.records():
        if not text or text.isspace():
            empty += 1
            continue
        replaced += rep
        parts.append(text)
    n_docs, text = len(parts), "".join(parts)
    del parts
    if max_chars:
        text = text[:max_chars]
    cut = int(len(text) * (1 - val_fraction))
    pieces = [(p, v) for p, v in ((text[:cut], False), (text[cut:], True)) if p]
    if not pieces:
        return []
    # the cut is not a document boundary: no EOT after either part (so Tiny Shakespeare with the
    # GPT-2 tokenizer gives nanoGPT's exact 301,966 / 36,059 tokens)
    r = tokenize_chunk("c000000", [p for p, _ in pieces], np.array([v for _, v in pieces]), append_eot=False)
    return [_Used("c000000", r["train_tokens"], r["val_tokens"], r["train_docs"], r["val_docs"], len(text),
                  empty, replaced, n_docs)]


def summary(out: Path, meta: dict) -> str:
    s, src, enc = meta["splits"], meta["source"], meta["encoder"]
    tokens = s["train"]["tokens"] + s["val"]["tokens"]
    docs = s["train"]["documents"] + s["val"]["documents"]
    sec = max(meta["seconds"], 1e-9)
    lines = [
        f"prepared {out} in {sec:.1f}s: {docs:,} documents, {tokens:,} tokens "
        f"({tokens / max(docs, 1):,.1f} tokens/document), vocab {meta['tokenizer']['vocab_size']:,} "
        f"({meta['tokenizer']['kind']}), {meta['dtype']}",
        f"  train {s['train']['tokens']:,} tokens / {s['train']['documents']:,} documents; "
        f"val {s['val']['tokens']:,} tokens / {s['val']['documents']:,} documents",
        f"  {tokens / sec:,.0f} tokens/s, {docs / sec:,.0f} documents/s with {enc['kind']} x {enc['workers']} "
        f"worker(s); {enc['chunks']} chunks ({enc['chunks_resumed']} resumed)",
        f"  skipped {src['empty_skipped']:,} empty documents; {src['documents_with_replaced_bytes']:,} documents "
        "had non-UTF-8 bytes (replaced by U+FFFD)",
    ]
    return "\n".join(lines)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        _fsync_write(tmp, json.dumps(obj, indent=2).encode())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, e) from None


def _read_manifest(shard_dir: Path) -> dict | None:
    try:
        return json.loads((shard_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def _count(s: str) -> int:
    """A positive count: 1000, 1e9, 300k, 2.5M, 10B (plan.parse_count, as train's --max_tokens)."""
    from gpt2fit.units import parse_count

    try:
        v = parse_count(s)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {s!r}")
    return v


def build_prepare_parser(prog="gpt2fit prepare") -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog, description="Tokenize text into train.bin / val.bin / meta.json for training.",
        epilog="Examples:\n"
               "  gpt2fit prepare --input stdlib --tokenizer bpe --vocab_size 8192 --out_dir data/stdlib\n"
               "  gpt2fit prepare --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT --streaming "
               "--max_tokens 1B --out_dir data/fineweb1b\n"
               "  gpt2fit prepare --dataset Skylion007/openwebtext --dataset_revision refs/convert/parquet "
               "--streaming --val_fraction 0.0005 --out_dir data/openwebtext",
        formatter_class=_Formatter)
    src = p.add_argument_group("source (one of --input / --dataset)")
    src.add_argument("--input", nargs="+", default=None,
                     help="Files, directories, globs (txt/md/py: one document per file; jsonl/json: one per "
                          "record; parquet/csv/tsv: one per row), or 'stdlib' for Python's own standard library.")
    src.add_argument("--dataset", default=None,
                     help="A Hugging Face dataset: a Hub id (HuggingFaceFW/fineweb-edu), a local directory of data "
                          "files, or a builder name (json, parquet, csv, text) with --dataset_data_files.")
    src.add_argument("--dataset_config", default=None, help="The dataset's config (subset), e.g. sample-10BT.")
    src.add_argument("--dataset_split", default="train", help="The split to tokenize.")
    src.add_argument("--dataset_revision", default=None,
                     help="A branch, tag or commit of the dataset repo; refs/convert/parquet reads the Hub's "
                          "Parquet conversion of a loading-script dataset (Skylion007/openwebtext).")
    src.add_argument("--dataset_data_files", nargs="+", default=None,
                     help="Only these data files (globs) of the dataset, e.g. 'sample/10BT/00*.parquet'.")
    src.add_argument("--streaming", action="store_true",
                     help="Stream the dataset instead of downloading and converting all of it first.")
    src.add_argument("--text_column", default="text", help="Field holding the text in jsonl/json/parquet/csv "
                                                           "or the dataset.")
    p.add_argument("--out_dir", required=True, help="Where train.bin, val.bin, meta.json and tokenizer/ go.")
    t = p.add_argument_group("tokenizer")
    t.add_argument("--tokenizer", default="gpt2",
                   help="A Hub id or tokenizer dir (gpt2), 'bpe' to train a byte-level BPE on the input, or "
                        "'char' for a character-level tokenizer.")
    t.add_argument("--vocab_size", type=int, default=8192, help="Vocabulary size for --tokenizer bpe.")
    t.add_argument("--tokenizer_train_docs", type=_count, default=None,
                   help="Train --tokenizer bpe on at most this many documents (the first ones; streamed).")
    t.add_argument("--tokenizer_train_chars", type=_count, default=TOKENIZER_TRAIN_CHARS,
                   help="Train --tokenizer bpe on at most this many characters (the first documents; streamed).")
    t.add_argument("--no_tiktoken", dest="use_tiktoken", action="store_false",
                   help="Encode with the fast tokenizer even when tiktoken could (ids are the same; slower).")
    v = p.add_argument_group("validation split and size")
    v.add_argument("--split", default="documents", choices=("documents", "chars"),
                   help="documents: a seeded val_fraction of documents is validation; chars: the last "
                        "val_fraction of all characters (nanoGPT's split for one-document corpora; in memory).")
    v.add_argument("--val_split_name", default=None,
                   help="Use this split of --dataset (e.g. validation, test) as val instead of a fraction of "
                        "documents; 'auto' picks validation/valid/val/test when the dataset has one.")
    v.add_argument("--val_fraction", type=float, default=0.05,
                   help="Fraction of documents held out for validation (with --val_split_name and --max_tokens: "
                        "the val split's share of the cap).")
    v.add_argument("--seed", type=int, default=1337, help="Seed for the document split.")
    v.add_argument("--max_chars", type=_count, default=None, help="Stop after this many characters of input.")
    v.add_argument("--max_tokens", type=_count, default=None,
                   help="Stop after the document that brings train+val to this many tokens (EOTs included), "
                        "e.g. 1e9 for a 1B-token subset of a streamed dataset.")
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=_count, default=None,
                   help="Tokenizer processes (default: the CPUs this process may use).")
    r.add_argument("--chunk_chars", type=_count, default=CHUNK_CHARS,
                   help="Characters per chunk, the unit of parallel work, of shard files and of resume.")
    r.add_argument("--no_resume", dest="resume", action="store_false",
                   help="Start over instead of reusing the completed chunks of an interrupted run in "
                        "<out_dir>/.shards.")
    r.add_argument("--overwrite", action="store_true", help="Replace prepared data already in out_dir.")
    r.add_argument("--quiet", action="store_true", help="No progress bar and no summary.")
    return p


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def main(argv=None) -> int:
    a = build_prepare_parser().parse_args(argv)
    prepare(a.input, a.out_dir, tokenizer=a.tokenizer, vocab_size=a.vocab_size, text_column=a.text_column,
            split=a.split, val_fraction=a.val_fraction, seed=a.seed, max_chars=a.max_chars,
            overwrite=a.overwrite, quiet=a.quiet, dataset=a.dataset, dataset_config=a.dataset_config,
            dataset_split=a.dataset_split, dataset_revision=a.dataset_revision,
            dataset_data_files=a.dataset_data_files, streaming=a.streaming, val_split_name=a.val_split_name,
            max_tokens=a.max_tokens, workers=a.workers, chunk_chars=a.chunk_chars,
            tokenizer_train_docs=a.tokenizer_train_docs, tokenizer_train_chars=a.tokenizer_train_chars,
            resume=a.resume, use_tiktoken=a.use_tiktoken)
    return 0


if __name__ == "__main__":
    from gpt2fit.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
