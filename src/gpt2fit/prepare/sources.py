"""Where prepare's documents come from: files, directories, globs, the stdlib, Hub datasets, as one or two ordered
``Stream``s: ``docs`` (a seeded val_fraction becomes validation), or ``val`` + ``train`` (a dataset's own split). Bad
UTF-8 is replaced (U+FFFD) and counted; a byte-order mark decodes; binary files in a directory or glob are skipped."""

import codecs
import glob
import io
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from gpt2fit.errors import UserError, first_line

BUILTIN_SOURCES = ("stdlib",)
Record = tuple  # (text: str | None, replaced: bool, units: float)
# longest first: UTF-32 LE's mark starts with UTF-16 LE's; the codecs read the mark (and so the byte order)
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
BINARY = "binary"


class BadInput(UserError):
    """Input that cannot be prepared as given. Fixing it changes the key: prepare deletes the shards it made."""


@dataclass
class Stream:
    """One ordered stream of documents. ``split``: 'docs' (seeded val_fraction), 'train' or 'val'."""

    split: str
    records: Callable[[], Iterator[Record]]  # a fresh iterator on each call (tokenizer training, then tokenizing)
    total: float | None  # progress units in the whole stream, when known
    unit: str  # "B" (bytes of local files) or "doc"


def documents(stream: Stream, max_docs: int | None = None, max_chars: int | None = None) -> Iterator[str]:
    """The non-empty documents of a stream, optionally capped (tokenizer training, the encoder check)."""
    docs = chars = 0
    for text, _, _ in stream.records():
        if not text or text.isspace():
            continue
        if (max_docs and docs >= max_docs) or (max_chars and chars >= max_chars):
            return
        docs += 1
        chars += len(text)
        yield text


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources (no tests): a corpus every Python has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    # tests, the IDE, vendored packages and the codec tables in encodings/ (mostly hex charmaps)
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "encodings"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def sniff(path: Path) -> str | None:
    """The codec a byte-order mark names; BINARY for a NUL byte in the first 8 KiB (git's test); else None."""
    if path.suffix.lower() == ".parquet":
        return None
    with open(path, "rb") as fh:
        head = fh.read(8192)
    return next((enc for bom, enc in BOMS if head.startswith(bom)), BINARY if b"\0" in head else None)


def expand_inputs(inputs: Iterable[str]) -> tuple[list[tuple[Path, str | None]], int]:
    """(file, its ``sniff``) for paths, directories and globs, in a stable order; and the binary files skipped."""
    out: list[tuple[Path, str | None]] = []
    skipped = 0
    for spec in inputs:
        p = Path(spec)
        if spec in BUILTIN_SOURCES:
            found = stdlib_files()
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(spec, recursive=True) if Path(q).is_file())
        elif p.is_file():
            found = [p]
        else:
            raise UserError(f"input {spec!r} {'is not a file or a directory' if p.exists() else 'does not exist'}; "
                            f"give a file, a directory, a glob or {'/'.join(BUILTIN_SOURCES)}.")
        if not found:
            raise UserError(f"input {spec!r} matched no files.")
        text = [(q, enc) for q, enc in ((q, sniff(q)) for q in found) if enc != BINARY]
        if not text:
            what = ("is a binary file (a NUL byte in its first 8 KiB)" if p.is_file()
                    else f"matched only binary files ({len(found)}, e.g. {found[0]})")
            raise UserError(f"input {spec!r} {what}, not text; give text, JSON (lines), CSV/TSV or Parquet "
                            "files (UTF-16/32 text needs its byte-order mark).")
        skipped += len(found) - len(text)
        out.extend(text)
    return out, skipped


def _utf8(path: Path, enc: str | None) -> BinaryIO:
    """The file as UTF-8 bytes after any byte-order mark; UTF-16/32 (PowerShell's) is decoded whole."""
    if enc in (None, "utf-8-sig"):
        fh = open(path, "rb")
        fh.seek(len(codecs.BOM_UTF8) if enc else 0)
        return fh
    return io.BytesIO(path.read_bytes().decode(enc).encode("utf-8"))


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _no_column(where, column, names) -> UserError:
    return BadInput(f"{where}: no text column {column!r}; columns: {sorted(names)}. Pass --text_column NAME.")


def _field(where: str, rec, column: str) -> str:
    """The text of one JSON record ('' for null)."""
    if not isinstance(rec, dict) or column not in rec:
        raise _no_column(where, column, rec if isinstance(rec, dict) else [])
    text = rec[column]
    return text if isinstance(text, str) else ("" if text is None else str(text))


def _iter_json(path: Path, column: str, enc: str | None) -> Iterator[Record]:
    """A JSON array of records (read whole), or JSON lines (streamed) in a .json or .jsonl file."""
    with _utf8(path, enc) as fh:
        start = fh.tell()
        if fh.read(4096).lstrip().startswith(b"["):
            fh.seek(start)
            text, replaced = _decode(fh.read())
            records = json.loads(text)
            for i, rec in enumerate(records):
                yield _field(f"{path}: record {i}", rec, column), replaced, len(text) / len(records)
            return
        fh.seek(start)
        for i, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            line, replaced = _decode(raw)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:  # an unfinished line fails past its newline: say its end
                column_no = min(e.pos, len(line.rstrip("\r\n"))) + 1
                raise BadInput(f"{path}: line {i}, column {column_no} is not valid JSON ({e.msg}); fix or remove "
                               "the line.") from None
            text = _field(f"{path}: line {i}", rec, column)
            if "\\ud" in line or "\\uD" in line:  # a JSON escape can smuggle in a lone surrogate
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    text, replaced = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), True
            yield text, replaced, len(raw)


def _iter_parquet(path: Path, column: str, enc: None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise _no_column(str(path), column, pf.schema_arrow.names)
    per = path.stat().st_size / max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for t in batch.column(0).to_pylist():
            yield t, False, per


def _iter_csv(path: Path, column: str, enc: str | None) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    # the text column is read as bytes and decoded here, so bad UTF-8 is replaced, not fatal
    reader = pcsv.open_csv(  # pyarrow skips a UTF-8 byte-order mark itself
        path if enc in (None, "utf-8-sig") else _utf8(path, enc), read_options=pcsv.ReadOptions(block_size=1 << 24),
        parse_options=pcsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                                        newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(column_types={column: pa.binary()}))
    names = reader.schema.names
    if column not in names:
        raise _no_column(str(path), column, names)
    for batch in reader:
        for raw in batch.column(names.index(column)).to_pylist():
            if raw is None:
                yield None, False, 0
            else:  # progress counts the text bytes only (ETA a little low)
                yield *_decode(raw), len(raw)


def _iter_text(path: Path, column: str, enc: str | None) -> Iterator[Record]:
    with _utf8(path, enc) as fh:
        raw = fh.read()  # txt, md, py, ...: the whole file is one document
    yield *_decode(raw), len(raw)


_READERS = {".jsonl": _iter_json, ".json": _iter_json, ".parquet": _iter_parquet, ".csv": _iter_csv, ".tsv": _iter_csv}


def _iter_local(files: list[tuple[Path, str | None]], column: str) -> Iterator[Record]:
    for path, enc in files:
        n = 0
        try:
            for n, record in enumerate(_READERS.get(path.suffix.lower(), _iter_text)(path, column, enc), 1):
                yield record
        except (ValueError, OSError) as e:  # how json, pyarrow and the codecs report a damaged file
            raise BadInput(f"cannot read {path} after {n:,} records ({e}); fix the file or write it again.") from None


def local_streams(inputs: list[str], text_column: str) -> tuple[list[Stream], dict]:
    files, binary = expand_inputs(inputs)
    for file in files:  # a damaged Parquet file or a missing column is refused before anything is written
        if file[0].suffix.lower() == ".parquet":
            next(_iter_local([file], text_column), None)
    stats = [p.stat() for p, _ in files]
    stream = Stream("docs", lambda: _iter_local(files, text_column), float(sum(s.st_size for s in stats)), "B")
    # the key covers the files' identity, so a changed corpus is never resumed from stale shards
    ident = [(str(p), s.st_size, s.st_mtime_ns) for (p, _), s in zip(files, stats)]
    return [stream], {"inputs": list(inputs), "files": len(files), "binary_skipped": binary,
                      "decoded_from_bom": sum(enc is not None for _, enc in files), "_files": ident}


def _hub_error(dataset: str, e: Exception, config, revision) -> UserError:
    first, name = first_line(e), type(e).__name__
    if name == "DatasetNotFoundError" or "gated" in first.lower():
        return UserError(f"dataset {dataset!r} was not found on the Hugging Face Hub, or it needs a login: {first} "
                         f"Check the id at https://huggingface.co/datasets/{dataset}; for a gated or private dataset "
                         "run `hf auth login` (or set HF_TOKEN) and accept its terms on the dataset page.")
    if isinstance(e, ConnectionError) or name in ("OfflineModeIsEnabled", "ConnectError", "ConnectTimeout"):
        return UserError(f"cannot reach the Hugging Face Hub for dataset {dataset!r}: {first} Check the network "
                         "(and unset HF_HUB_OFFLINE), or pass a local directory / --input files instead.")
    # datasets>=4 no longer runs loading scripts (Skylion007/openwebtext's main branch holds one)
    if "Dataset scripts are no longer supported" in first:
        return UserError(f"dataset {dataset!r} is a loading-script dataset, which datasets>=4 cannot run ({first}). "
                         "Use the Hub's Parquet conversion: add --dataset_revision refs/convert/parquet.")
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

    data_files = list(data_files) if data_files else None
    try:  # every split, so a missing one can be named with the choices
        dd = load_dataset(dataset, name=config, revision=revision, streaming=streaming, data_files=data_files)
    except Exception as e:  # datasets/huggingface_hub raise many types; each becomes one clear UserError
        raise _hub_error(dataset, e, config, revision) from None
    splits = list(dd.keys())
    if split not in dd:
        raise UserError(f"--dataset_split {split!r} is not a split of {dataset!r}; splits: {splits}.")
    val = val_split_name
    if val == "auto":
        val = next((s for s in ("validation", "valid", "val", "test") if s in dd and s != split), None)
    elif val and val not in dd:
        raise UserError(f"--val_split_name {val!r} is not a split of {dataset!r}; splits: {splits}. "
                        "Leave it out to hold out a seeded --val_fraction of documents instead.")

    def stream(name: str, role: str) -> Stream:
        ds = dd[name]
        # a streamed dataset without declared features: look at the first row
        names = ds.column_names if ds.column_names is not None else list(next(iter(ds), {}).keys())
        if text_column not in names:
            raise _no_column(f"dataset {dataset!r} split {name!r}", text_column, names)
        ds = ds.select_columns([text_column])
        known = ds.info.splits[name].num_examples if ds.info.splits and name in ds.info.splits else None
        total = float(len(ds)) if hasattr(ds, "__len__") else (float(known) if known else None)

        def records():
            for batch in ds.iter(batch_size=1000):
                for t in batch[text_column]:
                    yield (t if isinstance(t, str) or t is None else str(t)), False, 1.0

        return Stream(role, records, total, "doc")

    streams = [stream(val, "val"), stream(split, "train")] if val else [stream(split, "docs")]
    info = {"dataset": dataset, "dataset_config": config, "dataset_split": split, "dataset_revision": revision,
            "dataset_data_files": data_files, "streaming": streaming, "val_split": val}
    return streams, info
