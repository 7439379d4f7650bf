"""The resumable, parallel part of prepare: streams -> chunks -> shard files -> train.bin / val.bin. The main process
cuts documents into chunks of ~``chunk_chars`` and draws the train/val split in document order (the output does not
depend on the number of workers); workers tokenize chunks, append EOT after every document, write
``.shards/<chunk>.{train,val}.bin`` and, once both are fsynced, a ``<chunk>.done`` marker that a rerun trusts (the
source is re-read, not re-tokenized). Shards and final files coexist until the end: ~2x the disk."""

import itertools
import json
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from gpt2fit import formats
from gpt2fit.errors import UserError
from gpt2fit.prepare.encode import encoder
from gpt2fit.prepare.sources import Stream
from gpt2fit.units import format_count

SHARDS = ".shards"
MANIFEST = "manifest.json"
FORMAT = 2  # of the shard layout / manifest key; bump when chunking or shard contents change
CHUNK_CHARS = 4_000_000  # ~1M GPT-2 tokens per chunk: 2-4 MB of ids per shard
CHUNK_RECORDS = 100_000  # also close a chunk after this many records (corpora of tiny documents)
CRASH_ENV = "GPT2FIT_PREPARE_CRASH_AFTER"  # testing aid: hard-exit after N newly tokenized chunks
SPLIT_COUNTS = ("train_tokens", "val_tokens", "train_docs", "val_docs")


def disk_error(path: Path, e: OSError) -> UserError:
    return UserError(f"cannot write {path}: {e.strerror or e} (disk full?). Free space on that disk and rerun the "
                     "same command: completed chunks are kept and resumed, the incomplete one is redone.")


_W: dict = {}  # a worker's encoder, EOT, dtype and shard dir (init_worker): it tokenizes chunks, writes their shards


def init_worker(tokenizer_json: str, kind: str, eot: int, dtype: str, shard_dir: str, worker: bool = False):
    if worker:  # a pool process (not the in-process path)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker already
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _W.update(enc=encoder(tokenizer_json, kind), eot=eot, dtype=np.dtype(dtype), dir=Path(shard_dir))


def _exit_with_parent(parent: int) -> None:
    while True:  # a killed main process (and so its forkserver) leaves no orphans blocked on the task queue
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _counts(lens: np.ndarray, val: np.ndarray) -> dict:
    """Tokens and documents per split, from each document's token count and val flag."""
    val = np.asarray(val, dtype=bool)
    return {"train_tokens": int(lens[~val].sum()), "val_tokens": int(lens[val].sum()),
            "train_docs": int((~val).sum()), "val_docs": int(val.sum())}


def tokenize_chunk(name: str, texts: list[str], val: np.ndarray, append_eot: bool = True) -> dict:
    """Encode, EOT after each document (not after --split chars's pieces), split by ``val``; write shards, marker."""
    ids = [x + [_W["eot"]] if append_eot else x for x in _W["enc"](texts)]
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    for split, want in (("train", False), ("val", True)):
        path = _W["dir"] / f"{name}.{split}.bin"
        flat = np.fromiter(itertools.chain.from_iterable(x for x, v in zip(ids, val) if bool(v) == want),
                           dtype=_W["dtype"])
        try:
            if len(flat):
                formats.write_atomic(path, flat.data)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:  # (write_atomic leaves no partial file)
            raise disk_error(path, e) from None
    out = _counts(lens, val)
    marker = _W["dir"] / f"{name}.done"
    try:
        formats.write_json_atomic(marker, out)
        formats.fsync(marker.parent)
    except OSError as e:
        marker.unlink(missing_ok=True)
        raise disk_error(marker, e) from None
    return {**out, "lens": lens}


def _context():
    """Never a fork of this process (it holds tokenizer threads). forkserver where the OS has it (workers fork from
    one process that imported this module and torch once: seconds and hundreds of MB apiece); else spawn."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


@dataclass(eq=False)  # compared by identity (it holds arrays)
class Chunk:
    name: str
    texts: list[str] | None
    val: np.ndarray  # per document: True = validation
    chars: np.ndarray  # per document
    empty_before: list[int]  # for each skipped empty record: documents of this chunk before it
    replaced: list[int]  # documents of this chunk that had undecodable bytes
    units: float
    result: dict | None = None  # from its done-marker (resumed) or its tokenization
    job: object = None  # its pool task

    def ready(self) -> bool:
        return self.result is not None or (self.job is not None and self.job.ready())


def _chunks(stream: Stream, chunk_chars: int, rng, val_fraction: float, max_chars: int | None) -> Iterator[Chunk]:
    texts, empty, replaced = [], [], []
    units, n_chars, records, index, total_chars = 0.0, 0, 0, 0, 0

    def cut() -> Chunk:
        # drawn here, in document order: the same split for any number of workers
        val = (rng.random(len(texts)) < val_fraction if stream.split == "docs"
               else np.full(len(texts), stream.split == "val"))
        chars = np.array([len(t) for t in texts], dtype=np.int64)
        return Chunk(f"{stream.split[0]}{index:06d}", texts, val, chars, empty, replaced, units)

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
            n_chars += len(text)
            total_chars += len(text)
        if n_chars >= chunk_chars or records >= CHUNK_RECORDS:
            yield cut()
            index += 1
            texts, empty, replaced, units, n_chars, records = [], [], [], 0.0, 0, 0
    if texts or empty:
        yield cut()


@dataclass
class Run:
    shard_dir: Path
    tokenizer_json: str
    encoder: str
    eot: int
    dtype: str
    workers: int
    resume: bool
    quiet: bool
    pool: object = None
    waiting: list = field(default_factory=list)  # chunks not yet given to a pool
    tokenized: int = 0
    resumed: int = 0

    def __post_init__(self):
        self.init_args = (self.tokenizer_json, self.encoder, self.eot, self.dtype, str(self.shard_dir))
        init_worker(*self.init_args)

    def marker(self, name: str) -> dict | None:
        try:
            m = json.loads((self.shard_dir / f"{name}.done").read_text())
        except (OSError, ValueError):
            return None
        for split in ("train", "val"):  # a marker counts only when its shard files are whole
            f = self.shard_dir / f"{name}.{split}.bin"
            if (f.stat().st_size if f.exists() else 0) != m.get(f"{split}_tokens", -1) * np.dtype(self.dtype).itemsize:
                return None
        return m

    # the pool is started for the second chunk, so one-chunk corpora never pay for it
    def submit(self, chunk: Chunk) -> Chunk:
        chunk.result = self.marker(chunk.name) if self.resume else None
        if chunk.result is not None:
            self.resumed += 1
        elif self.workers > 1:
            self.waiting.append(chunk)
            if self.pool is None and len(self.waiting) >= 2:
                self.pool = _context().Pool(self.workers, initializer=init_worker, initargs=(*self.init_args, True))
            if self.pool is not None:
                for c in self.waiting:
                    c.job = self.pool.apply_async(tokenize_chunk, (c.name, c.texts, c.val))
                    c.texts = None  # the task holds them until it is sent; a cut uses the returned lens
                self.waiting = []
        return chunk

    def get(self, c: Chunk) -> dict:
        if c.result is None:
            if c.job is None:  # never handed to a pool: tokenize here
                if c in self.waiting:
                    self.waiting.remove(c)
                c.result = tokenize_chunk(c.name, c.texts, c.val)
            else:
                c.result = c.job.get()
            self.tokenized += 1
            crash_after = int(os.environ.get(CRASH_ENV) or 0)
            if crash_after and self.tokenized >= crash_after:
                os._exit(3)  # testing aid (CRASH_ENV): die like a killed process, no cleanup
        return c.result

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            self.pool.close() if ok else self.pool.terminate()
            self.pool.join()
            self.pool = None

    def stream(self, stream: Stream, *, chunk_chars: int, rng, val_fraction: float, max_chars: int | None,
               max_tokens: int | None) -> list[dict]:
        """Tokenize a stream; the used part of each chunk, in order. The bar counts units, or tokens with a cap."""
        bar = tqdm(total=max_tokens or stream.total, unit="tok" if max_tokens else stream.unit, unit_scale=True,
                   desc={"docs": "tokenize"}.get(stream.split, stream.split), disable=True if self.quiet else None,
                   mininterval=1.0, dynamic_ncols=True)
        used: list[dict] = []
        pending: deque[Chunk] = deque()
        chunks = _chunks(stream, chunk_chars, rng, val_fraction, max_chars)
        t0, total, docs = time.time(), 0, 0
        try:
            for chunk in itertools.chain(chunks, [None]):  # None: the end, collect what is pending
                if chunk is not None:
                    pending.append(self.submit(chunk))
                while pending and (chunk is None or len(pending) > 2 * self.workers or pending[0].ready()):
                    c = pending.popleft()
                    used.append(u := self._use(c, total, max_tokens))
                    n = u["train_tokens"] + u["val_tokens"]
                    total, docs, dt = total + n, docs + u["source_docs"], max(time.time() - t0, 1e-9)
                    # with a cap the bar counts tokens, and the last document may overshoot it
                    bar.update(min(n, bar.total - bar.n) if max_tokens else c.units)
                    bar.set_postfix_str(f"{format_count(docs / dt)} docs/s, {format_count(total / dt)} tok/s",
                                        refresh=False)
                    if max_tokens and total >= max_tokens:
                        return used
            return used
        finally:
            chunks.close()
            bar.close()
            # past a --max_tokens cut: not needed (completed ones stay for a longer rerun)
            self.waiting = [c for c in self.waiting if c not in pending]

    def _use(self, c: Chunk, total: int, max_tokens: int | None) -> dict:
        """What a chunk contributes: all of it, or the documents up to the one that reaches ``max_tokens``."""
        r = self.get(c)
        keep = len(c.val)
        if max_tokens and total + r["train_tokens"] + r["val_tokens"] >= max_tokens:
            # a resumed chunk has no lengths in its marker: it is encoded again for them
            lens = r["lens"] if "lens" in r else np.array([len(x) + 1 for x in _W["enc"](c.texts)])
            keep = int(np.searchsorted(np.cumsum(lens), max_tokens - total, side="left")) + 1
            r = _counts(lens[:keep], c.val[:keep])
        return {"name": c.name, **{k: r[k] for k in SPLIT_COUNTS}, "source_docs": r["train_docs"] + r["val_docs"],
                "chars": int(c.chars[:keep].sum()), "replaced": sum(1 for i in c.replaced if i < keep),
                "empty": sum(1 for e in c.empty_before if e < keep or keep == len(c.val))}

    def chars(self, stream: Stream, val_fraction: float, max_chars: int | None) -> list[dict]:
        """nanoGPT's split of one text (in memory): the first (1 - val_fraction) of the characters train."""
        records = [(t, rep) for t, rep, _ in stream.records()]
        docs = [(t, rep) for t, rep in records if t and not t.isspace()]
        text = "".join(t for t, _ in docs)[:max_chars or None]
        cut = int(len(text) * (1 - val_fraction))
        pieces = [(p, v) for p, v in ((text[:cut], False), (text[cut:], True)) if p]
        if not pieces:
            return []
        # the cut is not a document boundary: no EOT after either part (so Tiny Shakespeare with the
        # GPT-2 tokenizer gives nanoGPT's exact 301,966 / 36,059 tokens)
        r = tokenize_chunk("c000000", [p for p, _ in pieces], np.array([v for _, v in pieces]), append_eot=False)
        return [{"name": "c000000", **{k: r[k] for k in SPLIT_COUNTS}, "source_docs": len(docs), "chars": len(text),
                 "replaced": sum(rep for _, rep in docs), "empty": len(records) - len(docs)}]


def concat(shard_dir: Path, used: list[dict], split: str, dst: Path, dtype: str) -> None:
    """``dst`` = the used part of every chunk's ``split`` shard (each a few MB, read whole), via a temp file."""
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            for u in used:
                n, src = u[f"{split}_tokens"], shard_dir / f"{u['name']}.{split}.bin"
                ids = np.fromfile(src, dtype=dtype, count=n) if n else np.zeros(0, dtype)
                if len(ids) < n:
                    raise UserError(f"{src} is shorter than its done-marker says; delete {shard_dir} and rerun.")
                fh.write(ids.data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise disk_error(dst, e) from None
        raise
