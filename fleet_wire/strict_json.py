"""Strict JSON: what both sides accept, on MQTT and over HTTP alike."""
from __future__ import annotations

import json
import re

from .protocol import INT64_MAX, INT64_MIN, WireError

# Python's json module accepts more than a database can store or another parser can read:
# NaN and Infinity, lone surrogates (from "\ud800" escapes), NUL bytes, integers of any size
# (and raises ValueError past 4,300 digits) and nesting as deep as the stack (RecursionError).
# `load_json` refuses each of these, naming where it is, so a bad message is refused when it
# is read instead of failing later where it is stored.

MAX_JSON_DEPTH = 32  # objects and arrays inside each other; Fleet's own documents need fewer than 8
_UNSTORABLE_CHARACTER = re.compile("[\x00\ud800-\udfff]")


class UnstorableJSON(WireError):
    """JSON that breaks a rule of `load_json`; `path` is the dotted path of the value at fault ("" for the whole)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class _OutOfRange:
    """Stands for an integer literal too large to store until the check after parsing names where it is."""

    def __init__(self, literal: str):
        self.digits = len(literal.lstrip("-"))


def _bounded_int(literal: str):
    # Checked on the literal first: int() itself raises ValueError past 4,300 digits.
    if len(literal) > 20:
        return _OutOfRange(literal)
    value = int(literal)
    return value if INT64_MIN <= value <= INT64_MAX else _OutOfRange(literal)


_STRICT_DECODER = json.JSONDecoder(parse_int=_bounded_int)


def load_json(data: bytes | str):
    """Parse JSON text by Fleet's rules: UnstorableJSON (a WireError) names the first value that breaks one.

    Refused: text that is not UTF-8 or not JSON, NaN/Infinity (and numbers too large for a
    float), integers outside signed 64 bits, strings (keys included) holding a NUL byte or a
    lone surrogate, and nesting deeper than MAX_JSON_DEPTH.
    """
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnstorableJSON("", f"not UTF-8: byte {exc.object[exc.start]:#04x} at position {exc.start}") from None
    try:
        document = _STRICT_DECODER.decode(data)
    except RecursionError:
        raise UnstorableJSON("", f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # json.JSONDecodeError among them
        raise UnstorableJSON("", f"not JSON: {exc}") from None
    # ASCII text without a \u escape holds no NUL (json refuses raw control characters) and no
    # surrogate: its strings need no look, which halves the walk over a telemetry batch.
    check_storable(document, strings=not data.isascii() or "\\u" in data)
    return document


def check_storable(document, strings: bool = True) -> None:
    """Raise UnstorableJSON naming the first value of `document` that `load_json` would refuse.

    Walks containers with a stack of its own, so a deep document cannot exhaust Python's. The
    usual values (ASCII text, finite floats) are passed inline: a telemetry batch holds thousands.
    `strings=False` skips looking into text known to be clean.
    """
    _check_scalar(document, ())
    pending = [(document, ())] if type(document) in _CONTAINERS and document else []
    while pending:
        node, path = pending.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise UnstorableJSON(_dotted(path), f"nested deeper than {MAX_JSON_DEPTH} levels")
        if type(node) is dict:
            items = node.items()
            for key in node if strings else ():
                if type(key) is str and (not key.isascii() or "\x00" in key):
                    _check_text(key, (*path, key.encode("unicode_escape").decode()), "a key")
        else:
            items = enumerate(node)
        for key, value in items:
            kind = type(value)
            if kind is str:
                if strings and (not value.isascii() or "\x00" in value):
                    _check_text(value, (*path, key), "text")
            elif kind is float:
                if value - value != 0.0:  # true of NaN and of ±Infinity only
                    _check_scalar(value, (*path, key))
            elif kind in _CONTAINERS:
                if value:
                    pending.append((value, (*path, key)))
            elif kind is not bool and value is not None:
                _check_scalar(value, (*path, key))


_CONTAINERS = frozenset((dict, list, tuple))
_INFINITY = float("inf")


def _check_scalar(value, path: tuple) -> None:
    """UnstorableJSON if the scalar `value` at `path` breaks a rule (containers are the walk's)."""
    kind = type(value)
    if kind is str:
        _check_text(value, path, "text")
    elif kind is float:
        if value != value or value in (_INFINITY, -_INFINITY):
            raise UnstorableJSON(_dotted(path), "NaN, Infinity and numbers beyond a float's range are not JSON numbers")
    elif kind is _OutOfRange:
        raise UnstorableJSON(_dotted(path), f"an integer of {value.digits} digits is outside signed 64 bits")
    elif kind is int and not INT64_MIN <= value <= INT64_MAX:
        raise UnstorableJSON(_dotted(path), "an integer outside signed 64 bits")


def _check_text(text: str, path: tuple, what: str) -> None:
    found = _UNSTORABLE_CHARACTER.search(text)
    if found is not None:
        character = found.group()
        problem = "a NUL byte" if character == "\x00" else (
            f"a lone surrogate ({character.encode('unicode_escape').decode()})")
        raise UnstorableJSON(_dotted(path), f"{what} holding {problem}, which cannot be stored")


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)
