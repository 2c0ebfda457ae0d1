"""The ``[dkim]`` section: which selector signs, whether to sign, where the keys live.

This module imports nothing from Twisted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailguard.config.reader import Reader, path_in

DEFAULTS: dict[str, Any] = {"selector": "mail", "sign": True, "keys_dir": ""}

# A selector is one or more DNS labels (RFC 6376 section 3.1).
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?)*$")


@dataclass(frozen=True)
class DKIMConfig:
    """``selector`` signs; ``sign`` turns signing off; keys are read from ``keys_dir``."""

    selector: str = "mail"
    sign: bool = True
    keys_dir: Path = Path("var/dkim")


def check_selector(text: str) -> str:
    """The selector, lower-cased, or ValueError when it is not a DNS name."""
    selector = text.strip().lower()
    if not _SELECTOR.match(selector):
        raise ValueError(f"{text!r} is not a DNS selector (letters, digits, '-', '_', dots)")
    return selector


def parse(r: Reader, base: Path, data_dir: Path) -> DKIMConfig:
    """Validate ``[dkim]``; an empty ``keys_dir`` means ``data_dir/dkim``."""
    try:
        selector = check_selector(r.string("selector"))
    except ValueError as e:
        raise r.fail("selector", str(e)) from None
    keys = r.string("keys_dir")
    return DKIMConfig(selector, r.boolean("sign"), path_in(base, keys) if keys else data_dir / "dkim")
