"""Environment variables read on every op call, at the cost of a dictionary lookup.

``os.environ.get`` costs about 1 us on this project's CPU (it encodes the key, looks it up
and decodes the value), as much as the rest of an op's backend choice. On POSIX systems
``os.environ`` keeps the encoded variables in a plain dict that every change made through
``os.environ`` (``monkeypatch.setenv`` included) updates; :func:`get` reads that dict and
decodes only a value that is set. Elsewhere it is ``os.environ.get``. Changes made behind
``os.environ``'s back (``os.putenv``) are invisible to both, as for any Python code.
"""

from __future__ import annotations

import os

_data = getattr(os.environ, "_data", None)
_encode = getattr(os.environ, "encodekey", None)
_decode = getattr(os.environ, "decodevalue", None)
_FAST = isinstance(_data, dict) and callable(_encode) and callable(_decode)
_keys: dict[str, object] = {}
_values: dict[object, str] = {}  # decoded values, by their encoded form


def get(name: str) -> str | None:
    """``os.environ.get(name)``."""
    if not _FAST:
        return os.environ.get(name)
    key = _keys.get(name)
    if key is None:
        key = _keys[name] = _encode(name)
    raw = _data.get(key)
    if raw is None:
        return None
    value = _values.get(raw)
    if value is None:
        if len(_values) > 64:
            _values.clear()
        value = _values[raw] = _decode(raw)
    return value
