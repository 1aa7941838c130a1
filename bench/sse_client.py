"""A lean HTTP/1.1 client for streamed responses on loopback: asyncio streams, one keep-alive connection per
load worker, chunked or Content-Length bodies, lines out as they arrive.

The load generator shares two cores with the server it measures, so its own CPU per token is taken from that
server. httpx spends ~120 µs per streamed token here (httpcore, anyio cancel scopes and a selector
register/unregister per read); this client a fraction of that, and every server gets the same one.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

READ_LIMIT = 1 << 20  # longest line (status, header, chunk size) a StreamReader accepts
MAX_ERROR_BODY = 64 * 1024


class HttpProtocolError(ValueError):
    """The server's answer was not HTTP/1.1 as this client reads it."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path_prefix: str  # e.g. "/v1", no trailing slash
    api_key: str | None = None  # sent as `Authorization: Bearer KEY` when set

    @staticmethod
    def from_base_url(base_url: str, api_key: str | None = None) -> Endpoint:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only plain http:// base URLs are supported, got {base_url!r}")
        return Endpoint(parts.hostname, parts.port or 80, parts.path.rstrip("/"), api_key)


def request_bytes(endpoint: Endpoint, method: str, path: str, body: bytes, accept: str) -> bytes:
    head = (
        f"{method} {endpoint.path_prefix}{path} HTTP/1.1\r\n"
        f"Host: {endpoint.host}:{endpoint.port}\r\n"
        f"Accept: {accept}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        + (f"Authorization: Bearer {endpoint.api_key}\r\n" if endpoint.api_key else "")
        + "\r\n"
    )
    return head.encode("ascii") + body


def parse_head(lines: list[bytes]) -> Response:
    """Status line and header lines (CRLF stripped) of a response."""
    parts = lines[0].split(None, 2) if lines else []
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpProtocolError(f"not an HTTP/1.x status line: {lines[0][:80] if lines else b''!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise HttpProtocolError(f"bad header line: {line[:80]!r}")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return Response(int(parts[1]), headers)


class Connection:
    """One keep-alive connection, opened on first use and again after the server closed it."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.n_opened = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port, limit=READ_LIMIT)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader, self._writer = reader, writer
        self.n_opened += 1
        return reader, writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def _read_head(self, reader: asyncio.StreamReader) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)
            line = line.rstrip(b"\r\n")
            if not line:
                return lines
            lines.append(line)

    async def request(
        self, method: str, path: str, body: bytes, accept: str = "text/event-stream"
    ) -> tuple[Response, AsyncIterator[bytes]]:
        """Send one request; return the response head and an iterator over its body's pieces as they come.

        The body must be read to its end (or the connection closed) before the next request. A kept-alive
        connection the server has closed meanwhile is reopened once, transparently.
        """
        data = request_bytes(self.endpoint, method, path, body, accept)
        for attempt in (0, 1):
            reused = self._writer is not None and not self._writer.is_closing()
            reader, writer = (self._reader, self._writer) if reused else await self._open()
            assert reader is not None and writer is not None
            try:
                writer.write(data)
                head = await self._read_head(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if reused and attempt == 0:
                    continue  # the server dropped an idle keep-alive connection: one fresh try
                raise
            response = parse_head(head)
            return response, self._body(reader, response)
        raise AssertionError("unreachable")

    async def _body(self, reader: asyncio.StreamReader, response: Response) -> AsyncIterator[bytes]:
        keep_alive = response.headers.get("connection", "").lower() != "close"
        try:
            if "chunked" in response.headers.get("transfer-encoding", "").lower():
                while True:
                    size_line = await reader.readline()
                    try:
                        size = int(size_line.split(b";", 1)[0].strip(), 16)
                    except ValueError:
                        raise HttpProtocolError(f"bad chunk size line: {size_line[:40]!r}") from None
                    if size == 0:
                        while (await reader.readline()).strip():  # trailers, then the empty line
                            pass
                        break
                    piece = await reader.readexactly(size)
                    await reader.readexactly(2)  # the chunk's CRLF
                    yield piece
            elif "content-length" in response.headers:
                remaining = int(response.headers["content-length"])
                while remaining > 0:
                    piece = await reader.read(min(remaining, 65536))
                    if not piece:
                        raise asyncio.IncompleteReadError(piece, remaining)
                    remaining -= len(piece)
                    yield piece
            else:  # delimited by the connection's end
                keep_alive = False
                while piece := await reader.read(65536):
                    yield piece
        except BaseException:
            self.close()  # a half-read body leaves the connection unusable
            raise
        if not keep_alive:
            self.close()


async def read_lines(
    body: AsyncIterator[bytes], on_line: Callable[[str, float], bool], clock: Callable[[], float] = time.perf_counter
) -> None:
    """Feed the body's lines (without their line end) to on_line(line, arrival time) until it returns True;
    the rest of the body is still read, so the connection can serve the next request."""
    pending = b""
    stopped = False
    async for piece in body:
        if stopped:
            continue
        now = clock()
        *lines, pending = (pending + piece).split(b"\n")
        for line in lines:
            if on_line(line.rstrip(b"\r").decode("utf-8", errors="replace"), now):
                stopped = True
                break
    if pending and not stopped:
        on_line(pending.rstrip(b"\r").decode("utf-8", errors="replace"), clock())


async def read_all(body: AsyncIterator[bytes], limit: int = MAX_ERROR_BODY) -> bytes:
    collected = bytearray()
    async for piece in body:
        if len(collected) < limit:
            collected += piece[: limit - len(collected)]
    return bytes(collected)
