"""Reading JSON that came from outside (model configs, metadata, our own small files): bounded, typed, named.

Every failure is a JsonFileError whose message names the file and says what is wrong with it, never a bare
``JSONDecodeError``, ``RecursionError`` or ``AttributeError: 'list' object has no attribute 'get'``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MAX_CONFIG_BYTES = 4 * 1024 * 1024  # real diffusers/transformers configs are a few KB
MAX_DEPTH = 64  # real configs nest 3 deep; a header or metadata value rarely more than 5


class JsonFileError(ValueError):
    """A JSON file (or JSON text inside a file) that cannot be used; the message is written for people."""


def parse_json(text: str | bytes, source: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` (from ``source``, named in messages), refusing nesting deeper than ``max_depth``."""
    try:
        value = json.loads(text)
    except RecursionError:  # the C parser gives up before Python's stack does; caught here, not above us
        raise JsonFileError(f"{source} is nested far too deeply to be a real file (damaged or made to crash "
                            "programs); replace it") from None
    except UnicodeDecodeError:
        raise JsonFileError(f"{source} is not text (it is not UTF-8); the file is damaged or not JSON") from None
    except json.JSONDecodeError as exc:
        raise JsonFileError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                            "fix or replace the file") from None
    if _depth(value, max_depth) > max_depth:
        raise JsonFileError(f"{source} nests more than {max_depth} levels deep, which no real file does; replace it")
    return value


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed value, counted without recursion and stopping once past ``limit``."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json_object(path: str | Path, *, what: str = "", max_bytes: int = MAX_CONFIG_BYTES,
                     max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The JSON object (``{...}``) in ``path``; raises JsonFileError naming the file for anything else.

    ``what`` says what the file is for messages ("the UNet configuration"); a file bigger than ``max_bytes``
    is refused before it is read.
    """
    path = Path(path)
    source = f"'{path}'" + (f" ({what})" if what else "")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise JsonFileError(f"{source} is {size:,} bytes, far more than such a file holds (at most "
                                f"{max_bytes:,}); it is damaged or not what it is named")
        data = path.read_bytes()
    except FileNotFoundError:
        raise JsonFileError(f"{source} is missing") from None
    except IsADirectoryError:
        raise JsonFileError(f"{source} is a folder, not a file") from None
    except OSError as exc:
        raise JsonFileError(f"{source} cannot be read ({exc.strerror or exc})") from None
    value = parse_json(data, source, max_depth=max_depth)
    if not isinstance(value, dict):
        raise JsonFileError(f"{source} must hold a JSON object ({{...}}), but holds {_kind(value)}; the file is "
                            "damaged or not a configuration")
    return value


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(type(value), "a number")


# ----------------------------------------------------------------------------------------------- typed values


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def int_or_ints(value: Any) -> bool:
    """A positive whole number, or a non-empty list/tuple of them (diffusers allows both for many fields)."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(positive_int(v) for v in value)
    return positive_int(value)


def positive_ints(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(positive_int(v) for v in value)


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def strings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) and v for v in value)


def field_problems(config: dict[str, Any], rules: dict[str, tuple[Any, str]], source: str) -> list[str]:
    """Sentences for each present field that breaks its rule: ``rules = {field: (check, 'what it must be')}``.

    Missing fields are left to the library's defaults; a present field of the wrong kind would otherwise crash
    it much later with a message that names neither the file nor the field.
    """
    problems = []
    for name, (check, expected) in rules.items():
        if name in config and not check(config[name]):
            problems.append(f"{source}: '{name}' must be {expected}, but is {json.dumps(config[name])[:60]}")
    return problems
