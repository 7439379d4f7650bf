"""Sources of text for prepare: local files, directories, globs and the built-in stdlib corpus."""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path
from typing import Iterable

from gpt2fit.errors import UserError

BUILTIN_SOURCES = ("stdlib",)


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources (no tests): a corpus every Python has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    # tests, the IDE, vendored packages and the codec tables in encodings/ (mostly hex charmaps)
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "encodings"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files named by paths, directories (recursively) and globs, in a stable order."""
    out: list[Path] = []
    for spec in inputs:
        if spec in BUILTIN_SOURCES:
            out.extend(stdlib_files())
            continue
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(spec, recursive=True) if Path(q).is_file())
        elif p.is_file():
            found = [p]
        else:
            raise UserError(f"input {spec!r} does not exist; give a file, a directory, a glob or "
                            f"{'/'.join(BUILTIN_SOURCES)}.")
        if not found:
            raise UserError(f"input {spec!r} matched no files.")
        out.extend(found)
    return out
