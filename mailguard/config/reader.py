"""Typed, validated access to one TOML table: the building block of every section's parser.

Every error is a :class:`ConfigError` whose ``str`` is one line naming the file and
the key as a dotted path.  A section's parser lives in its own module beside this
one and reads its table through a :class:`Reader`.  This module imports nothing
from Twisted.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Callable, Mapping

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is the one-line message."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
        self.source = source
        self.key = key
        self.message = message


class Reader:
    """Typed access to one TOML table, raising ConfigError with the dotted key."""

    def __init__(self, source: str, section: str, table: Any, defaults: Mapping[str, Any]) -> None:
        if not isinstance(table, dict):
            raise ConfigError(source, section, "must be a table")
        self.source = source
        self.section = section
        self.table = table
        self.defaults = defaults
        known = defaults
        for key in table:
            if key not in known:
                raise ConfigError(source, f"{section}.{key}", "unknown key")

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, f"{self.section}.{key}", message)

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        value = self.table.get(key, self.defaults[key])
        if kind is int and isinstance(value, bool):
            raise self.fail(key, f"must be an integer, not {value!r}")
        if not isinstance(value, kind):
            name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be {_KIND_NAMES.get(name, name)}, not {value!r}")
        return value

    def boolean(self, key: str) -> bool:
        return bool(self.get(key, bool))

    def integer(self, key: str, minimum: int = 0, maximum: int | None = None) -> int:
        value = int(self.get(key, int))
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise self.fail(key, f"must be {bound}, not {value}")
        return value

    def string(self, key: str) -> str:
        return str(self.get(key, str))

    def strings(self, key: str) -> list[str]:
        value = self.get(key, list)
        for item in value:
            if not isinstance(item, str):
                raise self.fail(key, f"must be a list of strings, not {item!r} in it")
        return list(value)

    def each(self, key: str, convert: Callable[[str], Any]) -> tuple[Any, ...]:
        out = []
        for item in self.strings(key):
            try:
                out.append(convert(item))
            except ValueError as e:
                raise self.fail(key, f"{item!r}: {e}") from None
        return tuple(out)


_KIND_NAMES = {"bool": "true or false", "int": "an integer", "str": "a string", "list": "a list"}


def network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text.strip(), strict=False)


def host_port(text: str, default_port: int) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``"host"`` -> (host, port).

    :raises ValueError: no host, or a port that is not 1-65535.
    """
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError("no host")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"bad port {port!r}")
    return host, int(port) if port else default_port


def path_in(base: Path, text: str) -> Path:
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else base / p
