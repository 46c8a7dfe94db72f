"""fusionlm.serve.media: data: URLs, file: URLs under one directory, and checked http(s) fetches.

No test connects outside 127.0.0.0/8: refusals of other addresses are shown to happen before any
connection, with a fake resolver and a connector that fails the test if it is ever called. Servers
are asyncio servers on 127.0.0.1 in the event loop of the fetch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from fusionlm.errors import FusionError
from fusionlm.serve.media import MediaError, MediaPolicy, decode_data_url, fetch, refused_address

PARAM = "messages[0].content[1].image_url"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PUBLIC = "93.184.216.34"
LAB = MediaPolicy(allow_private=True)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def answer(status: int = 200, body: bytes = b"", *headers: tuple[str, str]) -> bytes:
    """One raw HTTP/1.1 response with a Content-Length."""
    lines = [f"HTTP/1.1 {status} Status", f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def redirect(location: str, status: int = 302) -> bytes:
    return answer(status, b"", ("Location", location))


class Site:
    """A loopback HTTP server's handler: answers each request by its path from ``routes``, 404 when absent."""

    def __init__(self, routes: dict[str, bytes] | None = None):
        self.routes = routes or {}
        self.connections = 0
        self.requests: list[bytes] = []

    @property
    def paths(self) -> list[str]:
        return [head.split(b" ", 2)[1].decode() for head in self.requests]

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        writer.write(self.routes.get(self.paths[-1], answer(404)))
        await writer.drain()


@contextlib.asynccontextmanager
async def loopback(handle: Handler) -> AsyncIterator[int]:
    """A server on 127.0.0.1 running ``handle`` for each connection; yields its port. On leaving it
    waits for the handlers, which end when the client's end of their connection closes."""
    handlers: set[asyncio.Task] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connected, "127.0.0.1", 0)
    try:
        async with server:
            yield server.sockets[0].getsockname()[1]
    finally:
        await asyncio.wait_for(asyncio.gather(*handlers), 2)


async def fetch_from(handle: Handler, path: str = "/", policy: MediaPolicy = LAB) -> bytes:
    async with loopback(handle) as port:
        return await fetch(f"http://127.0.0.1:{port}{path}", policy, param=PARAM)


def refusal(coroutine: Awaitable[bytes], status: int) -> str:
    """The message of the MediaError ``coroutine`` raises, checked to have ``status`` and name PARAM."""
    with pytest.raises(MediaError) as caught:
        asyncio.run(coroutine)
    assert caught.value.status == status and caught.value.param == PARAM
    assert str(caught.value).startswith(f"{PARAM}: ")
    return str(caught.value)


class Fakes:
    """A resolver answering from ``names``, and a connector that records each call and connects to
    127.0.0.1:``port`` instead, or fails the test when there is no port."""

    def __init__(self, names: dict[str, list[str]] | None = None, port: int | None = None):
        self.names = names or {}
        self.port = port
        self.resolved: list[str] = []
        self.connects: list[tuple[str, int, ssl.SSLContext | None, str | None]] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.resolved.append(host)
        return self.names[host]

    async def connect(self, ip: str, port: int, ssl_context: ssl.SSLContext | None, server_hostname: str | None):
        self.connects.append((ip, port, ssl_context, server_hostname))
        if self.port is None:
            raise AssertionError(f"connected to {ip}")
        return await asyncio.open_connection("127.0.0.1", self.port)

    def fetch(self, url: str, policy: MediaPolicy = MediaPolicy()) -> Awaitable[bytes]:
        return fetch(url, policy, param=PARAM, resolve=self.resolve, connect=self.connect)


def test_media_error_carries_status_and_param():
    error = MediaError("x: too large", status=413, param="x")
    assert isinstance(error, FusionError) and (error.status, error.param) == (413, "x")
    assert MediaError("y").status == 400


# ---------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "address, why",
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "unique local"),
        ("fd12::1", "unique local"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback (IPv4-mapped 127.0.0.1)"),
        ("::ffff:169.254.169.254", "link-local (IPv4-mapped 169.254.169.254)"),
        ("64:ff9b::a9fe:a9fe", "link-local (NAT64 169.254.169.254)"),
        ("2002:a9fe:a9fe::1", "link-local (6to4 169.254.169.254)"),
        ("::7f00:1", "IPv4-compatible"),
        ("2001::1", "Teredo"),
        ("2001:db8::1", "documentation"),
        ("4000::1", "reserved"),  # outside 2000::/3, the global unicast block
    ],
)
def test_refused_address_names_why(address, why):
    assert why in refused_address(ipaddress.ip_address(address))


# the embedded forms of a public IPv4 address stand for that public address
@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_public_addresses_are_allowed(address):
    assert refused_address(ipaddress.ip_address(address)) is None


# ---------------------------------------------------------------------------------------- refused before connecting


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://example.com\\@169.254.169.254/", "backslash"),
        ("http://example.com/a\\b", "backslash"),
        ("http://user@example.com/", "user name"),
        ("http://user:secret@example.com/", "user name"),
        ("http://[::ffff:7f00:1]/x", "is loopback (IPv4-mapped 127.0.0.1)"),
        ("http://[::1]:8080/", "address ::1 is loopback"),
        ("http://169.254.169.254/latest/meta-data/", "address 169.254.169.254 is link-local"),
        ("HTTP://127.0.0.1/", "address 127.0.0.1 is loopback"),
        ("http://0x7f000001/", "address 127.0.0.1 is loopback"),  # resolved, then checked
        ("http://mixed.example.com/", "address 10.0.0.7 is private"),  # one public, one private address
        ("http://example.com /x", "whitespace"),
        ("http://exa\tmple.com/", "whitespace"),
        ("http://example.com/\x00", "control character"),
        ("ftp://x/", "only data:, http:, https: and file:"),
        ("gopher://x/", "only data:, http:, https: and file:"),
        ("javascript:alert(1)", "only data:, http:, https: and file:"),
        ("//example.com/x.png", "only data:, http:, https: and file:"),
        ("http:///x", "no valid host"),
        ("http://%31%32%37.0.0.1/", "no valid host"),
        ("http://[not-an-address]/", "host or port is not valid"),
        ("http://example.com:0/", "port is not in 1..65535"),
        ("http://example.com:65536/", "host or port is not valid"),
    ],
)
def test_url_refused_before_connecting(url, why):
    fakes = Fakes({"example.com": [PUBLIC], "0x7f000001": ["127.0.0.1"], "mixed.example.com": [PUBLIC, "10.0.0.7"]})
    assert why in refusal(fakes.fetch(url), 400)
    assert fakes.connects == []


def test_ip_literal_is_not_resolved():
    fakes = Fakes()
    refusal(fakes.fetch("http://10.0.0.1/"), 400)
    assert fakes.resolved == [] and fakes.connects == []


def test_default_policy_refuses_a_loopback_server_before_connecting():
    site = Site({"/": answer(200, PNG)})

    async def main():
        async with loopback(site) as port:
            await fetch(f"http://127.0.0.1:{port}/", MediaPolicy(), param=PARAM)

    assert "address 127.0.0.1 is loopback" in refusal(main(), 400)
    assert site.connections == 0


def test_connects_to_the_checked_address_with_tls_for_https():
    fakes = Fakes({"img.example.com": [PUBLIC]})

    async def refused(ip, port, ssl_context, server_hostname):
        fakes.connects.append((ip, port, ssl_context, server_hostname))
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")

    url = "https://img.example.com/cat.png"
    message = refusal(fetch(url, MediaPolicy(), param=PARAM, resolve=fakes.resolve, connect=refused), 422)
    assert message == f"{PARAM}: cannot connect to img.example.com (connection refused)"
    [(ip, port, context, hostname)] = fakes.connects
    assert (ip, port, hostname) == (PUBLIC, 443, "img.example.com") and isinstance(context, ssl.SSLContext)


def test_connect_timeout():
    async def hangs(ip, port, ssl_context, server_hostname):
        await asyncio.sleep(10)

    policy = MediaPolicy(allow_private=True, connect_timeout=0.1)
    message = refusal(fetch("http://127.0.0.1:9/", policy, param=PARAM, connect=hangs), 422)
    assert "cannot connect to 127.0.0.1 (no answer within 0.1 s)" in message


# ---------------------------------------------------------------------------------------- allowed domains

ONLY_EXAMPLE = MediaPolicy(allowed_domains=("example.com",))


@pytest.mark.parametrize("host", ["example.com", "img.example.com", "a.b.example.com", "IMG.Example.COM."])
def test_allowed_domains_accept_the_domain_and_subdomains(host):
    site = Site({"/cat.png": answer(200, PNG)})
    fakes = Fakes({host.lower(): [PUBLIC]})

    async def main():
        async with loopback(site) as fakes.port:
            return await fakes.fetch(f"http://{host}/cat.png", ONLY_EXAMPLE)

    assert asyncio.run(main()) == PNG
    assert [connect[:2] for connect in fakes.connects] == [(PUBLIC, 80)]
    assert f"Host: {host.lower()}\r\n".encode() in site.requests[0]


@pytest.mark.parametrize("url", ["http://example.com.evil.net/", "http://notexample.com/", f"http://{PUBLIC}/"])
def test_allowed_domains_refuse_other_hosts_before_resolving(url):
    fakes = Fakes()
    assert "is not in the allowed domains" in refusal(fakes.fetch(url, ONLY_EXAMPLE), 400)
    assert fakes.resolved == [] and fakes.connects == []


# ---------------------------------------------------------------------------------------- data: URLs


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def test_data_url_round_trip():
    assert decode_data_url(data_url(PNG), MediaPolicy(), param=PARAM) == PNG
    assert asyncio.run(fetch(data_url(PNG, "IMAGE/PNG"), MediaPolicy(), param=PARAM)) == PNG
    assert decode_data_url("data:image/svg+xml,%3Csvg%2F%3E", MediaPolicy(), param=PARAM) == b"<svg/>"


@pytest.mark.parametrize(
    "url, why",
    [
        ("data:image/png;base64,iVBOR*w0K", "not valid base64"),
        ("data:image/png;base64,iVBORw0", "not valid base64"),
        ("data:text/html;base64,PHNjcmlwdD4=", "image/* type, not 'text/html'"),
        ("data:;base64,iVBORw0K", "image/* type, not 'none'"),
        ("data:image/png;base64", "not a valid data URL"),
    ],
)
def test_bad_data_urls(url, why):
    with pytest.raises(MediaError) as caught:
        decode_data_url(url, MediaPolicy(), param=PARAM)
    assert caught.value.status == 400 and why in str(caught.value) and str(caught.value).startswith(PARAM)


@pytest.mark.parametrize("size", [998, 999, 1000])
def test_data_url_at_the_cap(size):
    assert len(decode_data_url(data_url(bytes(size)), MediaPolicy(max_bytes=1000), param=PARAM)) == size


@pytest.mark.parametrize("size", [1001, 1002, 1003])
def test_data_url_over_the_cap(size):
    with pytest.raises(MediaError) as caught:
        decode_data_url(data_url(bytes(size)), MediaPolicy(max_bytes=1000), param=PARAM)
    assert caught.value.status == 413


def test_data_url_size_is_checked_before_decoding(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(base64, "b64decode", never)
    started = time.perf_counter()
    message = refusal(fetch("data:image/png;base64," + "A" * 10_000_000, MediaPolicy(max_bytes=1000), param=PARAM), 413)
    assert time.perf_counter() - started < 1
    assert message == f"{PARAM}: the medium is larger than 1000 bytes"


# ---------------------------------------------------------------------------------------- file: URLs


@pytest.fixture
def allowed(tmp_path):
    """A directory of allowed files (holding cat.png) inside tmp_path, with secret.png beside it."""
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(b"secret")
    return tmp_path / "allowed"


def test_file_urls_refused_without_an_allowed_directory(allowed):
    message = refusal(fetch((allowed / "cat.png").as_uri(), MediaPolicy(), param=PARAM), 400)
    assert message == f"{PARAM}: file: URLs are not allowed"


def test_file_url_under_the_allowed_directory(allowed):
    policy = MediaPolicy(allowed_local_path=str(allowed))
    assert asyncio.run(fetch((allowed / "cat.png").as_uri(), policy, param=PARAM)) == PNG
    assert asyncio.run(fetch(f"file://localhost{allowed}/cat.png", policy, param=PARAM)) == PNG


def test_file_urls_outside_the_allowed_directory(allowed):
    (allowed / "link.png").symlink_to(allowed.parent / "secret.png")
    policy = MediaPolicy(allowed_local_path=str(allowed))
    for url in ["file:///etc/passwd", f"file://{allowed}/../secret.png", (allowed / "link.png").as_uri()]:
        assert "outside the allowed directory" in refusal(fetch(url, policy, param=PARAM), 400)


@pytest.mark.parametrize(
    "name, why", [("missing.png", "no such file"), ("", "no such file"), ("cat%00.png", "cannot be read")]
)
def test_unreadable_file_urls(allowed, name, why):
    policy = MediaPolicy(allowed_local_path=str(allowed))
    assert why in refusal(fetch(f"file://{allowed}/{name}", policy, param=PARAM), 400)


def test_file_url_naming_a_host(allowed):
    policy = MediaPolicy(allowed_local_path=str(allowed))
    assert "must not name a host" in refusal(fetch(f"file://elsewhere{allowed}/cat.png", policy, param=PARAM), 400)


def test_file_over_the_cap(allowed):
    policy = MediaPolicy(allowed_local_path=str(allowed), max_bytes=len(PNG) - 1)
    refusal(fetch((allowed / "cat.png").as_uri(), policy, param=PARAM), 413)


# ---------------------------------------------------------------------------------------- loopback servers


def test_fetch_returns_the_body_and_asks_plainly():
    site = Site({"/cat.png?size=2": answer(200, PNG, ("Content-Type", "image/png"))})
    assert asyncio.run(fetch_from(site, "/cat.png?size=2#fragment")) == PNG
    [head] = site.requests
    assert head.startswith(b"GET /cat.png?size=2 HTTP/1.1\r\n")
    for header in [b"host: 127.0.0.1:", b"user-agent: fusionlm", b"accept: image/*", b"connection: close"]:
        assert header in head.lower()


def test_body_over_the_cap_stops_the_fetch():
    async def main():
        done = asyncio.Event()

        async def streams(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n")  # no Content-Length: the body ends when the connection does
            try:
                while not reader.at_eof():
                    writer.write(bytes(16 * 1024))
                    await writer.drain()
                    await asyncio.sleep(0)
            finally:
                done.set()

        async with loopback(streams) as port:
            with pytest.raises(MediaError) as caught:
                await fetch(f"http://127.0.0.1:{port}/", replace(LAB, max_bytes=100_000), param=PARAM)
            await asyncio.wait_for(done.wait(), 2)  # the client closed its end: the server stops
        return caught.value

    assert asyncio.run(main()).status == 413


def test_content_length_over_the_cap_is_refused_before_the_body():
    async def promises(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")  # and never sends the body
        await reader.read()

    started = time.perf_counter()
    refusal(fetch_from(promises, policy=MediaPolicy(allow_private=True, max_bytes=1000)), 413)
    assert time.perf_counter() - started < 1


def test_not_found():
    assert refusal(fetch_from(Site()), 422) == f"{PARAM}: the server answered 404"


def test_redirect_chain_of_two():
    site = Site({"/a": redirect("/b"), "/c": answer(200, PNG)})

    async def main():
        async with loopback(site) as port:
            site.routes["/b"] = redirect(f"http://127.0.0.1:{port}/c", 301)
            return await fetch(f"http://127.0.0.1:{port}/a", LAB, param=PARAM)

    assert asyncio.run(main()) == PNG
    assert site.paths == ["/a", "/b", "/c"]


def chain(redirects: int) -> Site:
    """A site where /0 redirects to /1 and so on, and /``redirects`` is the picture."""
    routes = {f"/{n}": redirect(f"/{n + 1}", status) for n, status in zip(range(redirects), [301, 302, 303, 307, 308])}
    return Site(routes | {f"/{redirects}": answer(200, PNG)})


@pytest.mark.parametrize("redirects", [0, 3])
def test_redirects_up_to_the_limit(redirects):
    assert asyncio.run(fetch_from(chain(redirects), "/0")) == PNG


def test_too_many_redirects():
    site = chain(4)
    assert "too many redirects" in refusal(fetch_from(site, "/0"), 422)
    assert site.paths == ["/0", "/1", "/2", "/3"]


@pytest.mark.parametrize(
    "location, why",
    [
        ("http://169.254.169.254/latest/meta-data/", "address 169.254.169.254 is link-local"),
        ("http://internal.example.com/", "address 10.1.2.3 is private"),
        ("//[::1]/", "address ::1 is loopback"),
        ("http://img.example.com\\@169.254.169.254/", "backslash"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
def test_redirect_is_checked_like_a_new_url(location, why):
    site = Site({"/start": redirect(location)})
    fakes = Fakes({"img.example.com": [PUBLIC], "internal.example.com": ["10.1.2.3"]})

    async def main():
        async with loopback(site) as fakes.port:
            await fakes.fetch("http://img.example.com/start")

    assert why in refusal(main(), 400)
    assert [connect[:2] for connect in fakes.connects] == [(PUBLIC, 80)]


QUICK = MediaPolicy(allow_private=True, total_timeout=0.5)


def test_server_that_never_answers():
    async def silent(reader, writer):
        await reader.read()

    started = time.perf_counter()
    assert refusal(fetch_from(silent, policy=QUICK), 422) == f"{PARAM}: no answer within 0.5 s"
    assert time.perf_counter() - started < 1.5


def test_server_that_trickles_is_cut_by_the_total_timeout():
    async def trickles(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        while not reader.at_eof():
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.2)

    started = time.perf_counter()
    assert "no answer within 0.5 s" in refusal(fetch_from(trickles, policy=QUICK), 422)
    assert time.perf_counter() - started < 1.5


def test_cancelling_the_fetch_closes_the_connection():
    async def main():
        arrived, closed = asyncio.Event(), asyncio.Event()

        async def hangs(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            arrived.set()
            await reader.read()  # until the client's end closes
            closed.set()

        writers = []

        async def connect(ip, port, ssl_context, server_hostname):
            reader, writer = await asyncio.open_connection(ip, port)
            writers.append(writer)
            return reader, writer

        async with loopback(hangs) as port:
            task = asyncio.create_task(fetch(f"http://127.0.0.1:{port}/", LAB, param=PARAM, connect=connect))
            await asyncio.wait_for(arrived.wait(), 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert writers[0].is_closing()  # closed by the fetch, not left to the garbage collector
            await asyncio.wait_for(closed.wait(), 2)

    asyncio.run(main())


@pytest.mark.parametrize(
    "reply",
    [
        b"hello there\r\n\r\n",
        b"",  # closed without answering
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",  # closed mid-body
    ],
)
def test_bad_http(reply):
    async def garbles(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)

    assert refusal(fetch_from(garbles), 422) == f"{PARAM}: the server's answer is not valid HTTP"


def test_connection_refused():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    message = refusal(fetch(f"http://127.0.0.1:{port}/", LAB, param=PARAM), 422)
    assert message == f"{PARAM}: cannot connect to 127.0.0.1 (connection refused)"


def test_tls_failure_is_one_line():
    async def not_tls(reader, writer):
        writer.write(answer(400))

    async def main():
        async with loopback(not_tls) as port:
            await fetch(f"https://127.0.0.1:{port}/", LAB, param=PARAM)

    message = refusal(main(), 422)
    assert message.startswith(f"{PARAM}: cannot connect to 127.0.0.1 (TLS error: ") and "\n" not in message
