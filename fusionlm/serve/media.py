"""The media of chat requests, fetched safely: ``data:`` URLs decoded, ``file:`` URLs read from one
allowed directory, ``http(s):`` URLs fetched over asyncio, speaking HTTP/1.1 through h11.

Safe by default. An http(s) URL is parsed once (``urlsplit``) and that parse alone gives the
connection, the request target and the Host header. Its host is resolved once, every address is
checked (``refused_address``) before any connection, and the checked address itself is connected
to, so no second DNS answer can differ from the checked one. Each redirect is checked as a new
URL. Bodies are read under a running byte cap, the whole fetch runs under one timeout, and
cancelling the fetching task stops the fetch and closes its connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import ipaddress
import os
import re
import socket
import ssl
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote, unquote_to_bytes, urljoin, urlsplit

import h11

from ..errors import FusionError, first_line

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Resolve = Callable[[str, int], Awaitable[list[str]]]
Connect = Callable[[str, int, ssl.SSLContext | None, str | None], Awaitable[Streams]]


class MediaError(FusionError):
    """A media part refused or unreadable; ``status`` is the HTTP status it maps to, ``param`` the request field."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class MediaPolicy:
    """What may be fetched, and how much and how long."""

    allowed_domains: tuple[str, ...] = ()  # non-empty: only these hosts (and their subdomains)
    allow_private: bool = False  # lab opt-in: private/loopback/link-local etc. allowed
    allowed_local_path: str | None = None  # file:// only for files under this directory (resolved, no symlink escape)
    max_bytes: int = 20 * 2**20  # cap on any one medium (data: decoded size, http body, file size)
    connect_timeout: float = 5.0
    total_timeout: float = 20.0
    max_redirects: int = 3


def _refuse(param: str, text: str, status: int = 400) -> MediaError:
    return MediaError(f"{param}: {text}", status=status, param=param)


def _too_large(param: str, max_bytes: int) -> MediaError:
    return _refuse(param, f"the medium is larger than {max_bytes} bytes", status=413)


def _capped(data: bytes, max_bytes: int, param: str) -> bytes:
    if len(data) > max_bytes:
        raise _too_large(param, max_bytes)
    return data


_ODD_CHARACTER = re.compile(r"[\\\s\x00-\x1f\x7f]")


def _check_characters(url: str, param: str) -> None:
    if _ODD_CHARACTER.search(url):
        raise _refuse(param, "the URL holds a backslash, whitespace or a control character")


# ---------------------------------------------------------------------------------------- addresses


_Table = tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...]


def _networks(*rows: tuple[str, str]) -> _Table:
    return tuple((ipaddress.ip_network(network), why) for network, why in rows)


_REFUSED_V4 = _networks(
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved for IETF protocols"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),  # before 240.0.0.0/4, which holds it
    ("240.0.0.0/4", "reserved"),
)
# IPv4-mapped, NAT64 and 6to4 addresses are judged by the IPv4 address they hold (_embedded_v4)
_REFUSED_V6 = _networks(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2001:2::/48", "benchmarking"),
    ("2001::/23", "reserved for IETF protocols"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("fc00::/7", "private (unique local)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refused_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why this address may not be fetched by default (None: it is public)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _first_match(ip, _REFUSED_V4)
    return _refused_v6(ip)


def _first_match(ip: IPAddress, table: _Table) -> str | None:
    return next((why for network, why in table if ip in network), None)


def _refused_v6(ip: ipaddress.IPv6Address) -> str | None:
    embedded = _embedded_v4(ip)
    if embedded is not None:
        form, v4 = embedded
        why = _first_match(v4, _REFUSED_V4)
        return f"{why} ({form} {v4})" if why else None
    why = _first_match(ip, _REFUSED_V6)
    if why is None and ip not in _GLOBAL_UNICAST:
        return "reserved"
    return why


def _embedded_v4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv4-mapped, NAT64 or 6to4 address stands for, with the form's name."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    return None


# ---------------------------------------------------------------------------------------- data: and file:

_IMAGE_TYPE = re.compile(r"image/[a-z0-9.+-]+")


def decode_data_url(url: str, policy: MediaPolicy, *, param: str) -> bytes:
    """``data:[<mime>][;base64],<payload>``: mime must be image/* (400 otherwise), the base64 length is checked
    against max_bytes BEFORE decoding (413), bad base64 -> 400 ("not valid base64"); never echo the payload."""
    head, comma, payload = url.partition(",")
    if not comma or head[:5].lower() != "data:":
        raise _refuse(param, "not a valid data URL")
    mime, *options = head[5:].split(";")
    mime = mime.strip().lower()
    if not _IMAGE_TYPE.fullmatch(mime):
        raise _refuse(param, f"a data URL must hold an image/* type, not {mime[:40] or 'none'!r}")
    if options and options[-1].strip().lower() == "base64":
        return _decode_base64(payload, policy.max_bytes, param)
    return _capped(unquote_to_bytes(payload), policy.max_bytes, param)


def _decode_base64(payload: str, max_bytes: int, param: str) -> bytes:
    decoded_size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if decoded_size > max_bytes:
        raise _too_large(param, max_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise _refuse(param, "the data URL's payload is not valid base64") from None


async def _read_local(url: str, policy: MediaPolicy, param: str) -> bytes:
    path = _local_path(url, policy, param)
    return await asyncio.to_thread(_read_file, path, policy.max_bytes, param)


def _local_path(url: str, policy: MediaPolicy, param: str) -> Path:
    """The real path a file: URL names, when it lies under ``policy.allowed_local_path``."""
    if policy.allowed_local_path is None:
        raise _refuse(param, "file: URLs are not allowed")
    _check_characters(url, param)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _refuse(param, "a file: URL must not name a host")
    try:
        root = Path(policy.allowed_local_path).resolve()
        path = Path(unquote(parts.path)).resolve()
    except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop
        raise _refuse(param, "the file cannot be read") from None
    if not path.is_relative_to(root):
        raise _refuse(param, "the file is outside the allowed directory")
    return path


def _read_file(path: Path, max_bytes: int, param: str) -> bytes:
    if not path.is_file():  # also keeps open() from blocking on a FIFO
        raise _refuse(param, "no such file")
    try:
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise _refuse(param, f"the file cannot be read ({_phrase(exc)})") from None
    return _capped(data, max_bytes, param)


# ---------------------------------------------------------------------------------------- http(s): URLs

_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*(?=:)")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class _Target:
    """One checked http(s) URL, from one parse: where to connect and what to ask for."""

    url: str
    scheme: str
    host: str  # lower case; an IPv6 literal without its brackets
    port: int
    path: str  # the request target: path and query, never the fragment

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


class _Redirect(NamedTuple):
    url: str


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _parse_http_url(url: str, param: str) -> _Target:
    _check_characters(url, param)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bad port, or brackets around something that is not an IPv6 address
        raise _refuse(param, "the URL's host or port is not valid") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise _refuse(param, "only http and https URLs can be fetched")
    if "@" in parts.netloc:
        raise _refuse(param, "the URL must not hold a user name or password")
    host = parts.hostname
    if not host or not (_HOST_NAME.fullmatch(host) or _ip_literal(host)):
        raise _refuse(param, "the URL has no valid host")
    if port is not None and not 1 <= port <= 65535:
        raise _refuse(param, "the URL's port is not in 1..65535")
    port = port or _DEFAULT_PORTS[parts.scheme]
    return _Target(url, parts.scheme, host, port, _request_target(parts.path, parts.query))


def _request_target(path: str, query: str) -> str:
    """Path and query, with anything outside printable ASCII percent-encoded."""
    target = (path or "/") + (f"?{query}" if query else "")
    return quote(target, safe=string.punctuation)


def _check_domain(host: str, policy: MediaPolicy, param: str) -> None:
    name = host.rstrip(".")
    if policy.allowed_domains and not any(_in_domain(name, domain) for domain in policy.allowed_domains):
        raise _refuse(param, f"host {host} is not in the allowed domains")


def _in_domain(name: str, domain: str) -> bool:
    domain = domain.strip(".").lower()
    return name == domain or name.endswith(f".{domain}")


async def _checked_addresses(target: _Target, policy: MediaPolicy, param: str, resolve: Resolve) -> list[str]:
    """The addresses of the target's host, once each, when none of them is refused."""
    literal = _ip_literal(target.host)
    addresses = [literal] if literal is not None else await _resolved(target, param, resolve)
    if not policy.allow_private:
        _refuse_any_private(addresses, param)
    return [str(ip) for ip in addresses]


def _refuse_any_private(addresses: list[IPAddress], param: str) -> None:
    for ip in addresses:
        why = refused_address(ip)
        if why is not None:
            raise _refuse(param, f"address {ip} is {why}")


async def _resolved(target: _Target, param: str, resolve: Resolve) -> list[IPAddress]:
    try:
        answers = await resolve(target.host, target.port)
    except OSError:
        raise _refuse(param, f"host {target.host} could not be resolved", status=422) from None
    if not answers:
        raise _refuse(param, f"host {target.host} has no address", status=422)
    return [ipaddress.ip_address(answer) for answer in dict.fromkeys(answers)]


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def _open(ip: str, port: int, ssl_context: ssl.SSLContext | None, server_hostname: str | None) -> Streams:
    return await asyncio.open_connection(ip, port, ssl=ssl_context, server_hostname=server_hostname)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _phrase(exc: OSError) -> str:
    """A short phrase for a network or file error, without library internals."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or 'handshake failed'}"
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return first_line(exc)


async def _connect(ips: list[str], target: _Target, policy: MediaPolicy, param: str, connect: Connect) -> Streams:
    """A connection to the first of the checked addresses that answers within ``connect_timeout``."""
    tls = _tls_context() if target.scheme == "https" else None
    server_hostname = target.host if tls else None
    failure = ""
    for ip in ips:
        try:
            async with asyncio.timeout(policy.connect_timeout):
                return await connect(ip, target.port, tls, server_hostname)
        except TimeoutError:
            failure = f"no answer within {policy.connect_timeout:g} s"
        except OSError as exc:
            failure = _phrase(exc)
    raise _refuse(param, f"cannot connect to {target.host} ({failure})", status=422)


def _request(target: _Target) -> h11.Request:
    headers = [("Host", target.host_header), ("User-Agent", "fusionlm"), ("Accept", "image/*"), ("Connection", "close")]
    return h11.Request(method="GET", target=target.path, headers=headers)


def _header(response: h11.Response, name: bytes) -> bytes | None:
    return next((value for key, value in response.headers if key == name), None)


async def _next_event(http: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
    while (event := http.next_event()) is h11.NEED_DATA:
        http.receive_data(await reader.read(_CHUNK))  # b"" at the end: h11 sees the close
    return event


async def _response_head(http: h11.Connection, reader: asyncio.StreamReader) -> h11.Response:
    """The final response, past any 1xx ones; h11 raises when the server closes before it."""
    while isinstance(event := await _next_event(http, reader), h11.InformationalResponse):
        pass
    return event


async def _body(http: h11.Connection, reader: asyncio.StreamReader, max_bytes: int, param: str) -> bytes:
    body = bytearray()
    while isinstance(event := await _next_event(http, reader), h11.Data):
        body += event.data
        if len(body) > max_bytes:
            raise _too_large(param, max_bytes)
    return bytes(body)


async def _exchange(streams: Streams, target: _Target, policy: MediaPolicy, param: str) -> bytes | _Redirect:
    """One GET: the body of a 200, or where a redirect points."""
    reader, writer = streams
    http = h11.Connection(h11.CLIENT)
    writer.write(http.send(_request(target)) + http.send(h11.EndOfMessage()))
    await writer.drain()
    response = await _response_head(http, reader)
    location = _header(response, b"location")
    if response.status_code in _REDIRECTS and location:
        return _Redirect(urljoin(target.url, location.decode("utf-8", "replace")))
    if response.status_code != 200:
        raise _refuse(param, f"the server answered {response.status_code}", status=422)
    length = _header(response, b"content-length")
    if length is not None and int(length) > policy.max_bytes:
        raise _too_large(param, policy.max_bytes)
    return await _body(http, reader, policy.max_bytes, param)


async def _get(url: str, policy: MediaPolicy, param: str, resolve: Resolve, connect: Connect) -> bytes | _Redirect:
    """One URL checked, connected to and asked for, its connection closed whatever happens."""
    target = _parse_http_url(url, param)
    _check_domain(target.host, policy, param)
    ips = await _checked_addresses(target, policy, param, resolve)
    streams = await _connect(ips, target, policy, param, connect)
    try:
        return await _exchange(streams, target, policy, param)
    except h11.ProtocolError:
        raise _refuse(param, "the server's answer is not valid HTTP", status=422) from None
    except OSError as exc:
        raise _refuse(param, f"the connection failed ({_phrase(exc)})", status=422) from None
    finally:
        streams[1].close()


async def _follow(url: str, policy: MediaPolicy, param: str, resolve: Resolve, connect: Connect) -> bytes:
    for _ in range(policy.max_redirects + 1):
        answer = await _get(url, policy, param, resolve, connect)
        if not isinstance(answer, _Redirect):
            return answer
        url = answer.url
    raise _refuse(param, f"too many redirects (more than {policy.max_redirects})", status=422)


async def _fetch_http(url: str, policy: MediaPolicy, param: str, resolve: Resolve, connect: Connect) -> bytes:
    try:
        async with asyncio.timeout(policy.total_timeout):
            return await _follow(url, policy, param, resolve, connect)
    except TimeoutError:
        raise _refuse(param, f"no answer within {policy.total_timeout:g} s", status=422) from None


async def fetch(
    url: str, policy: MediaPolicy, *, param: str, resolve: Resolve | None = None, connect: Connect | None = None
) -> bytes:
    """The bytes of one medium. data: -> decode_data_url; file: -> only under policy.allowed_local_path (else 400);
    http/https -> checked fetch. Anything else -> 400."""
    match = _SCHEME.match(url) if isinstance(url, str) else None
    scheme = match.group().lower() if match else ""
    if scheme == "data":
        return decode_data_url(url, policy, param=param)
    if scheme == "file":
        return await _read_local(url, policy, param)
    if scheme in _DEFAULT_PORTS:
        return await _fetch_http(url, policy, param, resolve or _resolve, connect or _open)
    raise _refuse(param, "only data:, http:, https: and file: URLs are accepted")
