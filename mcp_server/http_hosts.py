"""Exact Host and Origin matching (DNS-rebinding protection) for HTTP and SSE.

What is allowed:
- Host: the loopback names `127.0.0.1`, `localhost`, `[::1]` alone or with any
  numeric port; `http.host` (when it is a specific non-loopback address) alone
  or with the server's port; and each `http.allowed_hosts` entry: `name`
  (exactly that, no port), `name:PORT` (that port), `name:*` (any numeric port).
- Origin: none at all (not a browser's cross-origin request); `http://` plus a
  loopback name with any port; each `http.allowed_origins` entry:
  `scheme://name[:PORT]` or `scheme://name:*`.

How: a value is parsed, never prefix-matched. A port is 1-5 ASCII digits and
at most 65535 (`localhost:x.evil.com`, `localhost:80:80`, `localhost:٨٠` are
malformed). An Origin is split with `urllib.parse.urlsplit` and must be
exactly `scheme://host[:port]` (no user info, path, query or fragment); it is
compared by scheme, host (case-insensitive) and port (the scheme's default
when absent), so `http://127.0.0.1:80.evil.com` is refused.

The SDK keeps its own check (defence in depth), but its `name:*` rule only
tests a prefix. `sdk_settings` gives it lists that hold no `:*` entry and whose
membership test (`value in allowed_hosts`, the SDK's first check) is this
policy, so the prefix rule never applies and both layers agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from mcp.server.transport_security import TransportSecuritySettings

from .config import Settings

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_PORT = re.compile(r"[0-9]{1,5}")
_DEFAULT_PORT = {"http": 80, "https": 443}
ANY = -1  # a pattern's port: any numeric port

Port = int | None  # None: no port given


def split_host(value: str) -> tuple[str, Port] | None:
    """`name`, `name:port`, `[v6]`, `[v6]:port` -> (lower-case name, port); None when malformed."""
    if not value or value != value.strip():
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[:end + 1], value[end + 1:]
        if not rest:
            return name.lower(), None
        if not rest.startswith(":"):
            return None
        port = rest[1:]
    else:
        name, sep, port = value.partition(":")
        if not sep:
            return name.lower(), None
    if not name or not _PORT.fullmatch(port) or int(port) > 65535:
        return None
    return name.lower(), int(port)


def _split_pattern(value: str) -> tuple[str, Port] | None:
    if value.endswith(":*"):
        got = split_host(value[:-2])
        return (got[0], ANY) if got and got[1] is None else None
    return split_host(value)


def split_origin(value: str, pattern: bool = False) -> tuple[str, str, int] | None:
    """`scheme://host[:port]` -> (scheme, lower-case host, port or the scheme's default); None when malformed."""
    try:
        u = urlsplit(value)
    except ValueError:
        return None
    scheme = u.scheme.lower()
    if scheme not in _DEFAULT_PORT or u.path or u.query or u.fragment or "@" in u.netloc or "#" in value \
            or "?" in value or value != value.strip():
        return None
    got = (_split_pattern if pattern else split_host)(u.netloc)
    if got is None or not got[0]:
        return None
    name, port = got
    return scheme, name, _DEFAULT_PORT[scheme] if port is None else port


@dataclass(frozen=True)
class HostOriginPolicy:
    hosts: tuple[tuple[str, Port], ...]  # (name, port | None | ANY)
    origins: tuple[tuple[str, str, int], ...]  # (scheme, name, port | ANY)
    host_entries: tuple[str, ...]  # the same, written out (for the SDK's list)
    origin_entries: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings, port: int) -> HostOriginPolicy:
        http = settings.http
        host_entries: list[str] = []
        origin_entries: list[str] = []
        for name in LOOPBACK_HOSTS:
            host_entries += [name, f"{name}:*"]
            origin_entries += [f"http://{name}", f"http://{name}:*"]
        if http.host not in LOOPBACK_HOSTS and http.host not in ("0.0.0.0", "::") and split_host(http.host):
            host_entries += [http.host, f"{http.host}:{port}"]
        host_entries += http.allowed_hosts
        origin_entries += http.allowed_origins
        hosts = tuple(p for p in (_split_pattern(h) for h in host_entries) if p is not None)
        origins = tuple(p for p in (split_origin(o, pattern=True) for o in origin_entries) if p is not None)
        return cls(hosts, origins, tuple(host_entries), tuple(origin_entries))

    def host_ok(self, value: str | None) -> bool:
        got = split_host(value) if value else None
        if got is None:
            return False
        name, port = got
        return any(n == name and (p == port or (p == ANY and port is not None)) for n, p in self.hosts)

    def origin_ok(self, value: str | None) -> bool:
        if not value:
            return True
        got = split_origin(value)
        if got is None:
            return False
        scheme, name, port = got
        return any(s == scheme and n == name and p in (port, ANY) for s, n, p in self.origins)

    def sdk_settings(self) -> TransportSecuritySettings:
        """The SDK's own Host/Origin check, answering exactly as this policy does."""
        hosts = _PolicyList((h for h in self.host_entries if not h.endswith(":*")), self.host_ok)
        origins = _PolicyList((o for o in self.origin_entries if not o.endswith(":*")), self.origin_ok)
        # model_construct keeps the list objects (validation would copy them into plain lists)
        return TransportSecuritySettings.model_construct(enable_dns_rebinding_protection=True,
                                                         allowed_hosts=hosts, allowed_origins=origins)


class _PolicyList(list):
    """The exact entries (no `:*` pattern, so the SDK's prefix rule has nothing to act on); `in` asks the policy."""

    def __init__(self, entries: Iterable[str], allowed: Callable[[str | None], bool]) -> None:
        super().__init__(entries)
        self._allowed = allowed

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and self._allowed(value)
