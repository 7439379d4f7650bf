"""``gpt2fit prepare`` and ``prepare()``: sources -> tokenizer -> encoder -> shards -> a data dir. Shards are keyed by
the arguments (``.shards/manifest.json``), so an interrupted run resumes; ``meta.json`` is written last. OpenWebText:
datasets>=4 cannot run its loading script; ``--dataset_revision refs/convert/parquet`` reads the Hub's Parquet
conversion, partial for datasets over ~5 GB (for all of it, pass the archives)."""

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gpt2fit import formats, options
from gpt2fit.config import parse_count
from gpt2fit.errors import UserError
from gpt2fit.options import opt
from gpt2fit.prepare.encode import VERIFY_CHARS, choose_encoder
from gpt2fit.prepare.shards import CHUNK_CHARS, FORMAT, MANIFEST, SHARDS, SPLIT_COUNTS, Run, concat, disk_error
from gpt2fit.prepare.sources import BadInput, documents, hub_streams, local_streams
from gpt2fit.prepare.tokenizers import TOKENIZER_TRAIN_CHARS, eot_id, fingerprint, load_tokenizer, make_tokenizer
from gpt2fit.units import format_count, format_duration

PROG = "gpt2fit prepare"
DESCRIPTION = "Tokenize text into train.bin / val.bin / meta.json for training."
EPILOG = """Examples:
  gpt2fit prepare --input stdlib --tokenizer bpe --vocab_size 8192 --out_dir data/stdlib
  gpt2fit prepare --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT --streaming --max_tokens 1B \
--out_dir data/fineweb1b
  gpt2fit prepare --dataset Skylion007/openwebtext --dataset_revision refs/convert/parquet --streaming \
--val_fraction 0.0005 --out_dir data/openwebtext"""


@dataclass
class SourceOptions:
    """source (one of --input / --dataset)"""

    input: list[str] | None = opt(None, "Files, directories, globs (txt/md/py: one document per file; jsonl/json: "
                                        "one per record; parquet/csv/tsv: one per row), or 'stdlib' for Python's "
                                        "own standard library.")
    dataset: str | None = opt(None, "A Hugging Face dataset: a Hub id (HuggingFaceFW/fineweb-edu), a local directory "
                                    "of data files, or a builder name (json, parquet, csv, text) with "
                                    "--dataset_data_files.")
    dataset_config: str | None = opt(None, "The dataset's config (subset), e.g. sample-10BT.")
    dataset_split: str = opt("train", "The split to tokenize.")
    dataset_revision: str | None = opt(None, "A branch, tag or commit of the dataset repo; refs/convert/parquet "
                                             "reads the Hub's Parquet conversion of a loading-script dataset "
                                             "(Skylion007/openwebtext).")
    dataset_data_files: list[str] | None = opt(None, "Only these data files (globs) of the dataset, e.g. "
                                                     "'sample/10BT/00*.parquet'.")
    streaming: bool = opt(False, "Stream the dataset instead of downloading and converting all of it first.")
    text_column: str = opt("text", "Field holding the text in jsonl/json/parquet/csv or the dataset.")


@dataclass
class TokenizerOptions:
    """tokenizer"""

    tokenizer: str = opt("gpt2", "A Hub id or tokenizer dir (gpt2), 'bpe' to train a byte-level BPE on the input, "
                                 "or 'char' for a character-level tokenizer.")
    vocab_size: int = opt(8192, "Vocabulary size for --tokenizer bpe.")
    tokenizer_train_docs: str | None = opt(None, "Train --tokenizer bpe on at most this many documents (the first "
                                                 "ones; streamed).")
    tokenizer_train_chars: str | None = opt(format_count(TOKENIZER_TRAIN_CHARS), "Train --tokenizer bpe on at most "
                                            "this many characters (the first documents; streamed; none: all).")
    no_tiktoken: bool = opt(False, "Encode with the fast tokenizer even when tiktoken could (ids are the same; "
                                   "slower).")


@dataclass
class SplitOptions:
    """validation split and size"""

    split: str = opt("documents", "documents: a seeded val_fraction of documents is validation; chars: the last "
                                  "val_fraction of all characters (nanoGPT's split for one-document corpora; in "
                                  "memory).", choices=("documents", "chars"))
    val_split_name: str | None = opt(None, "Use this split of --dataset (e.g. validation, test) as val instead of a "
                                           "fraction of documents; 'auto' picks validation/valid/val/test when the "
                                           "dataset has one.")
    val_fraction: float = opt(0.05, "Fraction of documents held out for validation, in (0, 1) (with "
                                    "--val_split_name and --max_tokens: the val split's share of the cap).")
    seed: int = opt(1337, "Seed for the document split.")
    max_chars: str | None = opt(None, "Stop after this many characters of input (300k, 2.5M, 1e9...).")
    max_tokens: str | None = opt(None, "Stop after the document that brings train+val to this many tokens (EOTs "
                                       "included), e.g. 1B for a 1B-token subset of a streamed dataset.")


@dataclass
class RunOptions:
    """output and run"""

    out_dir: str | None = opt(None, "Where train.bin, val.bin, meta.json and tokenizer/ go (required).")
    workers: int | None = opt(None, "Tokenizer processes (default: the CPUs this process may use).", minimum=1)
    chunk_chars: str = opt(format_count(CHUNK_CHARS), "Characters per chunk, the unit of parallel work, of shard "
                                                      "files and of resume.")
    no_resume: bool = opt(False, "Start over instead of reusing the completed chunks of an interrupted run in "
                                 "<out_dir>/.shards.")
    overwrite: bool = opt(False, "Replace prepared data already in out_dir.")
    quiet: bool = opt(False, "No progress bar and no summary.")


SECTIONS = (SourceOptions, TokenizerOptions, SplitOptions, RunOptions)
COUNTS = ("tokenizer_train_docs", "tokenizer_train_chars", "max_chars", "max_tokens", "chunk_chars")


def parse_args(argv) -> dict:
    """argv -> ``prepare``'s keyword arguments (counts such as 10B read as training reads them)."""
    sections, _ = options.parse(argv, SECTIONS, prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    kw = {k: v for s in sections for k, v in asdict(s).items()}
    for key in COUNTS:
        if kw[key] is not None:
            kw[key] = parse_count(kw[key], f"--{key}")
    if not kw["out_dir"]:
        raise UserError("--out_dir is required: the directory where train.bin, val.bin and meta.json go.")
    kw["inputs"], kw["use_tiktoken"], kw["resume"] = kw.pop("input"), not kw.pop("no_tiktoken"), not kw.pop("no_resume")
    return kw


def main(argv=None) -> int:
    prepare(**parse_args(argv))
    return 0


def prepare(inputs: list[str] | None, out_dir: str, *, tokenizer: str = "gpt2", vocab_size: int = 8192,
            text_column: str = "text", split: str = "documents", val_fraction: float = 0.05,
            seed: int = 1337, max_chars: int | None = None, overwrite: bool = False, quiet: bool = False,
            dataset: str | None = None, dataset_config: str | None = None, dataset_split: str = "train",
            dataset_revision: str | None = None, dataset_data_files: list[str] | None = None,
            streaming: bool = False, val_split_name: str | None = None, max_tokens: int | None = None,
            workers: int | None = None, chunk_chars: int = CHUNK_CHARS, tokenizer_train_docs: int | None = None,
            tokenizer_train_chars: int | None = TOKENIZER_TRAIN_CHARS, resume: bool = True,
            use_tiktoken: bool = True) -> dict:
    """Tokenize ``inputs`` (or a ``dataset``) into ``out_dir`` (options: ``gpt2fit prepare --help``); returns the meta.
    ``split='chars'`` runs in one process, the text in memory; ``'documents'`` streams with bounded memory."""
    t0 = time.time()
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.05).")
    if split not in ("documents", "chars"):
        raise UserError(f"split={split!r} must be 'documents' or 'chars'.")
    if bool(inputs) == bool(dataset):
        raise UserError("give exactly one source: --input FILES... or --dataset ID (got "
                        f"{'both' if inputs else 'neither'}).")
    # the CPUs this process may use (a container's or a job's share), where the OS says
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    for key, value in (("max_tokens", max_tokens), ("chunk_chars", chunk_chars), ("workers", workers)):
        if value is not None and value < 1:
            raise UserError(f"{key}={value} must be at least 1 (or left out for the default).")
    out = Path(out_dir)
    here = next(p for p in (out, *out.parents) if p.exists())  # "." or "/" at the latest
    if not here.is_dir():
        raise UserError(f"--out_dir {out}: {here} is a file, not a directory; choose a directory for the data.")
    if formats.is_run_dir(out) or any((out / name).is_dir() for name in (formats.CHECKPOINTS, formats.FINAL)):
        raise UserError(f"--out_dir {out} is a training run directory ({formats.CONFIG}, {formats.METRICS}, "
                        f"{formats.CHECKPOINTS}/); put the prepared data in a directory of its own, e.g. data/NAME.")
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

    key_args = {"format": FORMAT, "source": source, "tokenizer": tokenizer, "vocab_size": vocab_size,
                "tokenizer_train_docs": tokenizer_train_docs, "tokenizer_train_chars": tokenizer_train_chars,
                "text_column": text_column, "split": split, "val_fraction": val_fraction, "seed": seed,
                "max_chars": max_chars, "chunk_chars": chunk_chars, "use_tiktoken": use_tiktoken}
    key = hashlib.sha256(json.dumps(key_args, sort_keys=True, default=str).encode()).hexdigest()[:16]
    shard_dir = out / SHARDS
    try:
        manifest = json.loads((shard_dir / MANIFEST).read_text()) if resume else None
    except (OSError, ValueError):
        manifest = None
    resuming = bool(manifest and manifest.get("key") == key and (shard_dir / formats.TOKENIZER_DIR).is_dir())
    if resuming:
        tok, kind = load_tokenizer(str(shard_dir / formats.TOKENIZER_DIR)), manifest["kind"]
    else:
        tok, kind = make_tokenizer(tokenizer, vocab_size, streams, train_docs=tokenizer_train_docs,
                                   train_chars=tokenizer_train_chars)
    eot, dtype, tok_json = eot_id(tok), formats.dtype_for_vocab(len(tok)), tok.backend_tokenizer.to_str()
    # the encoder is chosen on the first documents, identically on every (re)run, before anything is written
    encoder, encoder_note = choose_encoder(tok_json, documents(streams[0], max_docs=256, max_chars=VERIFY_CHARS),
                                           allow_tiktoken=use_tiktoken)
    if not resuming:
        try:
            shutil.rmtree(shard_dir, ignore_errors=True)
            shard_dir.mkdir(parents=True)
            tok.save_pretrained(shard_dir / formats.TOKENIZER_DIR)
            formats.write_json_atomic(shard_dir / MANIFEST, {"key": key, "kind": kind, "args": key_args})
        except OSError as e:
            raise disk_error(shard_dir, e) from None
    rng = np.random.default_rng(seed)
    run = Run(shard_dir, tok_json, encoder, eot, dtype, workers if split == "documents" else 1, resume, quiet)
    used: list[dict] = []
    ok = False
    try:
        if split == "chars":
            used = run.chars(streams[-1], val_fraction, max_chars)
        else:
            for s in streams:
                own_val = s.split == "val"  # a source's own val split gets val_fraction of the caps
                used += run.stream(s, chunk_chars=chunk_chars, rng=rng, val_fraction=val_fraction,
                                   max_chars=int(max_chars * val_fraction) if own_val and max_chars else max_chars,
                                   max_tokens=max(1, int(max_tokens * val_fraction)) if own_val and max_tokens
                                   else max_tokens)
        n = {k: sum(u[k] for u in used) for k in (*SPLIT_COUNTS, "source_docs", "chars", "empty", "replaced")}
        if n["source_docs"] == 0:
            raise BadInput(f"no text found in {dataset or ', '.join(inputs)} (empty files?); nothing was written.")
        if len(streams) > 1 and n["val_docs"] == 0:
            raise BadInput(f"the val split {source['val_split']!r} of {dataset!r} has no text; choose another "
                           "--val_split_name or leave it out to hold out a --val_fraction of documents.")
        if split == "documents" and n["val_docs"] == 0 and n["train_docs"] > 1:
            raise BadInput(f"no document landed in the val split ({n['train_docs']} documents, "
                           f"val_fraction={val_fraction}); raise --val_fraction or use --split chars.")
        ok = True
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(list(shard_dir.glob('*.done')))} chunks are complete in {shard_dir}; rerun "
              "the same command to resume.", file=sys.stderr)
        raise
    except BadInput:  # fixing it changes the key: what this run wrote is of no use
        run.close(False)  # first, so that no worker writes a shard while they are deleted
        shutil.rmtree(shard_dir, ignore_errors=True)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # made by this run and still empty
        raise
    finally:
        run.close(ok)

    if overwrite:  # from here on the old data is being replaced: never leave it looking valid
        (out / formats.META).unlink(missing_ok=True)
    for s in ("train", "val"):
        concat(shard_dir, used, s, out / f"{s}.bin", dtype)
    tok_dir = out / formats.TOKENIZER_DIR
    shutil.rmtree(tok_dir, ignore_errors=True)
    shutil.copytree(shard_dir / formats.TOKENIZER_DIR, tok_dir)
    source.pop("_files", None)
    bpe = kind == "bpe"
    meta = formats.make_meta(
        dtype=dtype, splits={s: {"tokens": n[f"{s}_tokens"], "documents": n[f"{s}_docs"]} for s in ("train", "val")},
        tokenizer={"name_or_path": tokenizer if kind == "pretrained" else str(tok_dir), "kind": kind,
                   "vocab_size": len(tok), "eot_id": eot, "fingerprint": fingerprint(tok)},
        source={**source, "text_column": text_column, "split": split, "val_fraction": val_fraction, "seed": seed,
                "max_chars": max_chars, "max_tokens": max_tokens, "chars": n["chars"], "documents": n["source_docs"],
                "eot_after_documents": split != "chars", "empty_skipped": n["empty"], "documents_with_replaced_bytes":
                n["replaced"], "tokenizer_train_docs": tokenizer_train_docs if bpe else None,
                "tokenizer_train_chars": tokenizer_train_chars if bpe else None},
        encoder={"kind": encoder, "note": encoder_note, "workers": run.workers, "chunk_chars": chunk_chars,
                 "chunks": len(used), "chunks_tokenized": run.tokenized, "chunks_resumed": run.resumed},
        seconds=round(time.time() - t0, 2))
    try:
        formats.write_meta(out, meta)
    except OSError as e:
        raise disk_error(out / formats.META, e) from None
    shutil.rmtree(shard_dir, ignore_errors=True)
    if not quiet:
        print(summary(out, meta))
    return meta


def summary(out: Path, meta: dict) -> str:
    s, src, enc, tk = meta["splits"], meta["source"], meta["encoder"], meta["tokenizer"]
    tokens, docs = (s["train"][k] + s["val"][k] for k in ("tokens", "documents"))
    sec = max(meta["seconds"], 1e-9)
    return "\n".join([
        f"prepared {out} in {format_duration(sec)}: {docs:,} documents, {tokens:,} tokens "
        f"({tokens / max(docs, 1):,.1f} tokens/document), vocab {tk['vocab_size']:,} ({tk['kind']}), {meta['dtype']}",
        f"  train {s['train']['tokens']:,} tokens / {s['train']['documents']:,} documents; "
        f"val {s['val']['tokens']:,} tokens / {s['val']['documents']:,} documents",
        f"  {format_count(tokens / sec)} tokens/s, {format_count(docs / sec)} documents/s with {enc['kind']} x "
        f"{enc['workers']} worker(s); {enc['chunks']} chunks ({enc['chunks_resumed']} resumed)",
        f"  skipped {src['empty_skipped']:,} empty documents and {src.get('binary_skipped', 0):,} binary files; "
        f"{src['documents_with_replaced_bytes']:,} documents had non-UTF-8 bytes (replaced by U+FFFD)",
    ])
