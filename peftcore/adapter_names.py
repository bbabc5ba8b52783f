"""Which strings can name an adapter, checked where an adapter is created (not when it is saved).

A name is a key of the per-adapter ``ModuleDict``s (so no ``.``), the name of the
sub-folder ``save_pretrained`` writes it to (so nothing a file system reads as a
path: no separators, no drive colon, no control characters, a bounded length),
and must not shadow a ``torch.nn.Module`` attribute.
"""

from __future__ import annotations

import unicodedata

from torch import nn

from peftcore.layer import BASE_ADAPTER

MAX_ADAPTER_NAME_LENGTH = 128  # characters; also at most 255 bytes in UTF-8, a file name's limit
_FORBIDDEN = {".": "'.' (it separates module paths)", "/": "a path separator '/'", "\\": "a path separator '\\'",
              ":": "':' (a drive or stream separator on Windows)"}
_MODULE_ATTRIBUTES = frozenset(dir(nn.Module()))


def adapter_name_problem(adapter_name: object) -> str | None:
    """Why ``adapter_name`` cannot name an adapter, or None when it can."""
    if not isinstance(adapter_name, str):
        return f"it is a {type(adapter_name).__name__}, not a string"
    if not adapter_name:
        return "it is empty"
    if adapter_name == BASE_ADAPTER:
        return f"{BASE_ADAPTER!r} marks batch rows that use no adapter"
    for char, what in _FORBIDDEN.items():
        if char in adapter_name:
            return f"it contains {what}"
    control = next((c for c in adapter_name if unicodedata.category(c) in ("Cc", "Cf", "Cs")), None)
    if control is not None:
        return f"it contains the control or format character U+{ord(control):04X}"
    if len(adapter_name) > MAX_ADAPTER_NAME_LENGTH or len(adapter_name.encode("utf-8")) > 255:
        return f"it is {len(adapter_name)} characters long; the limit is {MAX_ADAPTER_NAME_LENGTH} (and 255 bytes)"
    if adapter_name in _MODULE_ATTRIBUTES:
        return "it clashes with the torch.nn.Module attribute of that name"
    return None


def check_adapter_name(adapter_name: object) -> None:
    problem = adapter_name_problem(adapter_name)
    if problem is not None:
        raise ValueError(f"Invalid adapter name {adapter_name!r}: {problem}")
