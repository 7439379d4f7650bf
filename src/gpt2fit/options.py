"""One argument system for every command: option dataclasses -> argparse -> typed, checked values.

Every command declares its options as dataclasses whose fields carry their help text (``opt``),
and parses its argv with ``parse``. So every flag has help, a value is coerced to the field's
type the same way on the command line and in a YAML recipe, an unknown flag fails with a
suggestion, and `--help` is rendered from the same fields. (litgpt's argument dataclasses,
nanoGPT's habit of defaults with units in comments.)

    @dataclass
    class SampleOptions:
        model: str = opt(..., "Run dir, model dir or Hub id.", positional=True)
        temperature: float = opt(0.8, "Softmax temperature (> 0).", minimum=0, exclusive=True)

    (o,), explicit = parse(argv, [SampleOptions], prog="gpt2fit sample", description="...")

Field metadata understood by ``opt``: ``choices``; ``positional`` (with ``nargs``); ``aliases``
(other flag spellings that keep working); ``minimum`` / ``maximum`` with ``exclusive`` (range
checks, finiteness always); ``metavar``. A ``list[...]`` field takes one or more values.
"""

import argparse
import dataclasses
import math
import typing
from dataclasses import field
from typing import Any, Iterable, Sequence

from gpt2fit.errors import ArgumentParser, UserError, suggest

_NONE = ("none", "null")
_BOOLS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}


def opt(default, help, **meta):  # noqa: A002 - the field's --help text
    """A dataclass field with its help text and checks (see the module docstring)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def fields_of(sections: Iterable[type]) -> dict[str, tuple[type, dataclasses.Field, Any]]:
    """name -> (section, field, type hint) over every section; names must be unique."""
    out = {}
    for sec in sections:
        hints = typing.get_type_hints(sec)
        for fl in dataclasses.fields(sec):
            if fl.name in out:
                raise TypeError(f"option {fl.name!r} declared twice ({out[fl.name][0].__name__}, {sec.__name__})")
            out[fl.name] = (sec, fl, hints[fl.name])
    return out


def _parts(hint) -> tuple[type, bool, bool]:
    """(element type, optional, is a list) of a hint such as ``int | None`` or ``list[str]``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    inner = [a for a in args if a is not type(None)] if optional else [hint]
    base = inner[0] if inner else hint
    if typing.get_origin(base) in (list, tuple, Sequence):
        return (typing.get_args(base) or (str,))[0], optional, True
    return base, optional, False


def _one(key: str, value: Any, typ: type, source: str, example: Any) -> Any:
    try:
        if typ is bool:
            return value if isinstance(value, bool) else _BOOLS[str(value).lower()]
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError
        if typ is int:
            fv = float(value)
            if not math.isfinite(fv) or fv != int(fv):
                raise ValueError
            return int(fv)
        if typ is float:
            return float(value)  # PyYAML reads 6e-4 as a string; float() accepts it
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError, OverflowError, KeyError):
        raise UserError(f"{key}={value!r} in {source} is not a valid {typ.__name__}; "
                        f"e.g. --{key} {example!r}.") from None


def coerce(key: str, value: Any, source: str, fields: dict) -> Any:
    """Convert ``value`` (from YAML or the command line) to the field's type and check it."""
    _, fl, hint = fields[key]
    typ, optional, is_list = _parts(hint)
    example = fl.default if fl.default is not dataclasses.MISSING else "..."
    if value is None or (isinstance(value, str) and value.lower() in _NONE and optional):
        if not optional:
            raise UserError(f"{key} in {source} cannot be empty; give a value (default: {example!r}).")
        return None
    if is_list:
        values = value if isinstance(value, (list, tuple)) else [value]
        return [check(key, _one(key, v, typ, source, example), fl, source) for v in values]
    return check(key, _one(key, value, typ, source, example), fl, source)


def check(key: str, out: Any, fl: dataclasses.Field, source: str) -> Any:
    """Finiteness, choices and range of one value of field ``fl``."""
    meta = fl.metadata
    if isinstance(out, float) and not math.isfinite(out):
        raise UserError(f"{key}={out!r} in {source} is not a finite number; give a real value.")
    choices = meta.get("choices")
    if choices and out not in choices:
        raise UserError(f"{key}={out!r} in {source} is not one of {', '.join(map(str, choices))}."
                        f"{suggest(str(out), [str(c) for c in choices])}")
    lo, hi, excl = meta.get("minimum"), meta.get("maximum"), meta.get("exclusive", False)
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        if lo is not None and (out < lo or (excl and out == lo)):
            want = {(1, False): "a positive integer" if isinstance(out, int) else ">= 1",
                    (0, False): "not negative"}.get((lo, excl), f"{'>' if excl else '>='} {lo}")
            raise UserError(f"{key}={out!r} must {'not be negative' if want == 'not negative' else 'be ' + want}.")
        if hi is not None and out > hi:
            raise UserError(f"{key}={out!r} must be <= {hi}.")
    return out


def make_parser(prog: str, sections: Sequence[type], *, description: str, epilog: str | None = None) -> ArgumentParser:
    """One argument per field, grouped by section (unset flags stay absent: argparse.SUPPRESS)."""
    p = ArgumentParser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = fields_of(sections)
    for sec in sections:
        g = p.add_argument_group((sec.__doc__ or sec.__name__).strip().splitlines()[0])
        for fl in dataclasses.fields(sec):
            meta = fl.metadata
            typ, _, is_list = _parts(fields[fl.name][2])
            shown = fl.default if fl.default is not dataclasses.MISSING else (
                fl.default_factory() if fl.default_factory is not dataclasses.MISSING else None)
            # argparse %-formats help strings: a literal % (as in "~75% less") must be doubled
            text = meta["help"] if meta.get("positional") or shown in (None, [], "") else \
                f"{meta['help']} (default: {shown})"
            kw: dict[str, Any] = dict(help=text.replace("%", "%%"), metavar=meta.get("metavar", fl.name.upper()))
            if meta.get("positional"):
                kw["nargs"] = meta.get("nargs", "+" if is_list else None)
                if kw["nargs"] in ("?", "*"):
                    kw["default"] = shown
                g.add_argument(fl.name, **kw)
                continue
            kw["default"] = argparse.SUPPRESS
            if typ is bool and not is_list:
                kw.update(nargs="?", const="true", metavar="BOOL")
            elif is_list:
                kw.update(nargs="+", action="extend")  # --ref a b and --ref a --ref b
            if meta.get("choices"):
                kw["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
            g.add_argument(f"--{fl.name}", *meta.get("aliases", ()), dest=fl.name, **kw)
    return p


def parse(argv: Sequence[str] | None, sections: Sequence[type], *, prog: str, description: str,
          epilog: str | None = None, renamed: dict[str, str] | None = None,
          parser: ArgumentParser | None = None) -> tuple[list[Any], set[str]]:
    """argv -> (one instance per section, the names given explicitly). ``renamed`` maps an earlier
    flag spelling to its replacement, so an old command line fails with a message naming the new flag."""
    fields = fields_of(sections)
    parser = parser or make_parser(prog, sections, description=description, epilog=epilog)
    ns, unknown = parser.parse_known_args(list(argv or []))
    for tok in sorted(unknown, key=lambda t: not t.startswith("-")):  # the first unknown flag, else stray value
        if tok.startswith("-"):
            flag = tok.split("=", 1)[0]
            if renamed and flag in renamed:
                raise UserError(f"{flag} is now {renamed[flag]}. See `{prog} --help`.")
            raise UserError(f"unknown flag {flag}.{suggest(flag.lstrip('-'), fields)} See `{prog} --help`.")
        raise UserError(f"unexpected argument {tok!r}. See `{prog} --help`.")
    given = [key for key in fields if hasattr(ns, key)]  # in field order: the first bad value is reported
    values = {key: coerce(key, getattr(ns, key), "the command line", fields) for key in given}
    return build(sections, values, fields), set(given)


def build(sections: Sequence[type], values: dict[str, Any], fields: dict | None = None) -> list[Any]:
    """One instance per section from flat ``values`` (absent keys keep their defaults)."""
    fields = fields or fields_of(sections)
    per = {sec: {} for sec in sections}
    for key, value in values.items():
        per[fields[key][0]][key] = value
    try:
        return [sec(**kw) for sec, kw in per.items()]
    except TypeError as e:  # a required field (no default) was not given
        raise UserError(f"{e}".replace("__init__() ", "")) from None
