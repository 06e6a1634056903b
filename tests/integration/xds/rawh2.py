"""A minimal HTTP/2 client for tests: a gRPC stream whose flow-control window stays shut.

gRPC's own clients always take a message whose length they have seen (they open the window
for it), and a stopped process also stops answering pings, which keepalive then catches. What
is left for the server's send timeout is a peer that answers pings but never opens its
window: this client (SETTINGS_INITIAL_WINDOW_SIZE 0, PINGs and SETTINGS acknowledged, no
WINDOW_UPDATE ever). Headers go as HPACK literals without indexing (RFC 7541 §6.2.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING = 0, 1, 3, 4, 6
ACK = END_STREAM = 0x1
END_HEADERS = 0x4
INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def _literal(name: str, value: str) -> bytes:
    def string(text: str) -> bytes:
        data = text.encode()
        assert len(data) < 127, "a one-byte length prefix only"
        return bytes([len(data)]) + data

    return b"\x00" + string(name) + string(value)


class RawH2:
    """One connection; :meth:`open_stream` sends a gRPC request and leaves the stream open."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.frames: list[tuple[int, int, int, bytes]] = []  # (type, flags, stream, payload)
        self._task = asyncio.create_task(self._read(), name="raw-h2-read")

    @classmethod
    async def connect(cls, port: int) -> RawH2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # The server may send no DATA on any stream until a WINDOW_UPDATE that never comes.
        writer.write(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE, 0)))
        return cls(reader, writer)

    async def _read(self) -> None:
        while True:
            head = await self._reader.readexactly(9)
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = await self._reader.readexactly(int.from_bytes(head[:3], "big"))
            self.frames.append((kind, flags, stream, payload))
            if kind == SETTINGS and not flags & ACK:
                self._writer.write(frame(SETTINGS, ACK, 0, b""))
            elif kind == PING and not flags & ACK:
                self._writer.write(frame(PING, ACK, 0, payload))

    def open_stream(self, stream: int, path: str, message: bytes) -> None:
        block = b"".join(
            _literal(n, v)
            for n, v in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        self._writer.write(frame(HEADERS, END_HEADERS, stream, block))
        grpc_message = b"\x00" + len(message).to_bytes(4, "big") + message
        self._writer.write(frame(DATA, 0, stream, grpc_message))

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, asyncio.IncompleteReadError):
            await self._task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
