"""Simulated ADS clients of ``aviator bench xds``: many streams in one asyncio process.

Run as ``python -m aviator.bench.xds_clients``; commands arrive one JSON object per line on
stdin (see :mod:`aviator.bench.xds_child`):

- ``{"op": "connect", "port": p, "streams": n, "kind": "sotw" | "delta", "workloads": W,
  "first": i, "per_channel": c}``: open ``n`` ADS streams (``c`` per gRPC channel, each channel
  its own TCP connection), each behaving like an Envoy: subscribe to CDS (legacy wildcard), then
  to the EDS name of every cluster received, and ACK every response with its version and nonce.
  Reply ``{"synced": n, "setup_s": ...}`` once every stream holds all ``W`` CLAs.
- ``{"op": "expect", "seq": k, "needles": [hex, ...], "timeout": s}``: from now on, look for
  the needles (serialised CLAs of change ``k``) in what each stream receives; reply
  ``{"ready": k}`` at once, then, when every stream has received every needle (or after
  ``timeout`` seconds), send ``{"held": k, "times": [...], ...}`` with the ``time.time()`` at
  which each stream received the last of them (``null``: never).
- ``{"op": "usage"}``: this process's CPU seconds and memory.

Cheap by design, so one process keeps up with 1,000 streams: responses arrive as raw bytes (no
Python-side message objects for the resources), are parsed once in C (upb) for the envelope,
and the needles are found with a byte search. A SotW ACK carries every subscribed name, as
Envoy's do: its bytes are the stream's subscription, serialised once, followed by the version
and nonce fields (concatenated protobuf fields merge into one message).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from aviator.bench.xds_child import ParentLink, proc_usage, raise_nofile_limit

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
_SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"

_cluster_names: dict[bytes, str] = {}  # serialised Cluster → its name (streams share bytes)


def _cluster_name(data: bytes) -> str:
    name = _cluster_names.get(data)
    if name is None:
        cluster = cluster_pb2.Cluster.FromString(data)
        eds = cluster.eds_cluster_config.service_name
        name = _cluster_names[data] = eds or cluster.name
    return name


class _Expectation:
    """One change being waited for: which needles each stream still has to receive."""

    def __init__(self, seq: int, needles: list[bytes], streams: int) -> None:
        self.seq = seq
        self.remaining: list[list[bytes]] = [needles] * streams
        self.times: list[float | None] = [None] * streams
        self.left = streams
        self.responses = 0
        self.bytes = 0
        self.timer: asyncio.TimerHandle | None = None


class Pool:
    """The streams of this process and the change they are waiting for."""

    def __init__(self, link: ParentLink) -> None:
        self._link = link
        self.streams: list[_Stream] = []
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.synced = 0
        self.errors: list[str] = []
        self._all_synced = asyncio.Event()
        self._expectation: _Expectation | None = None

    async def connect(self, command: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        n, per_channel = int(command["streams"]), max(1, int(command.get("per_channel", 1)))
        target = f"127.0.0.1:{int(command['port'])}"
        kind = str(command["kind"])
        cls: type[_Stream] = {"sotw": _SotwStream, "delta": _DeltaStream}[kind]
        workloads, first = int(command["workloads"]), int(command.get("first", 0))
        for i in range(n):
            if i % per_channel == 0:
                # A local subchannel pool: each channel its own TCP connection, like separate
                # Envoys (gRPC would otherwise share one connection between equal channels).
                self.channels.append(
                    grpc.aio.insecure_channel(
                        target,
                        options=[
                            ("grpc.use_local_subchannel_pool", 1),
                            ("grpc.max_receive_message_length", -1),
                        ],
                    )
                )
            stream = cls(self, i, f"bench-{kind}-{first + i}", self.channels[-1], workloads)
            self.streams.append(stream)
            self.tasks.append(asyncio.create_task(self._run(stream), name=f"stream-{i}"))
        await self._all_synced.wait()
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} streams failed: {self.errors[0]}")
        return {"synced": self.synced, "setup_s": time.perf_counter() - started}

    async def _run(self, stream: _Stream) -> None:
        try:
            await stream.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed stream is reported, the others go on
            self.errors.append(f"stream {stream.index}: {type(exc).__name__}: {exc}")
            self._all_synced.set()

    def stream_synced(self) -> None:
        self.synced += 1
        if self.synced == len(self.streams) and len(self.streams) == len(self.tasks):
            self._all_synced.set()

    def expect(self, seq: int, needles: list[bytes], timeout: float) -> None:
        if self._expectation is not None:
            self._finish()
        exp = _Expectation(seq, needles, len(self.streams))
        exp.timer = asyncio.get_running_loop().call_later(timeout, self._finish)
        self._expectation = exp

    def received(self, index: int, raw: bytes, at: float) -> None:
        """A stream received an EDS response: does it complete the change it waits for?"""
        exp = self._expectation
        if exp is None:
            return
        exp.responses += 1
        exp.bytes += len(raw)
        if exp.times[index] is not None:
            return
        remaining = [needle for needle in exp.remaining[index] if needle not in raw]
        if remaining:
            exp.remaining[index] = remaining
            return
        exp.times[index] = at
        exp.left -= 1
        if exp.left == 0:
            self._finish()

    def _finish(self) -> None:
        exp, self._expectation = self._expectation, None
        if exp is None:
            return
        if exp.timer is not None:
            exp.timer.cancel()
        self._link.send(
            {
                "held": exp.seq,
                "times": exp.times,
                "responses": exp.responses,
                "bytes": exp.bytes,
                "errors": len(self.errors),
            }
        )

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for channel in self.channels:
            await channel.close()


class _Stream:
    method = ""

    def __init__(
        self, pool: Pool, index: int, node_id: str, channel: grpc.aio.Channel, workloads: int
    ) -> None:
        self.pool = pool
        self.index = index
        self.node_id = node_id
        self.workloads = workloads
        self.eds_received = 0
        self.synced = False
        # No (de)serialisers: requests go out as the bytes built here, responses come in raw.
        self._call_factory = channel.stream_stream(_SERVICE + self.method)

    async def run(self) -> None:
        call = self._call_factory()
        try:
            await call.write(self.first_request())
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    raise RuntimeError("the server ended the stream")
                at = time.time()
                for request in self.handle(raw, at):
                    await call.write(request)
        finally:
            call.cancel()

    def first_request(self) -> bytes:
        raise NotImplementedError

    def handle(self, raw: bytes, at: float) -> list[bytes]:
        raise NotImplementedError

    def _count_eds(self, resources: int) -> None:
        self.eds_received += resources
        if not self.synced and self.eds_received >= self.workloads:
            self.synced = True
            self.pool.stream_synced()


class _SotwStream(_Stream):
    """Plays Envoy on ``StreamAggregatedResources``."""

    method = "StreamAggregatedResources"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._eds_names: list[str] = []
        self._eds_base = b""

    def first_request(self) -> bytes:
        request = discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id=self.node_id, cluster="bench"), type_url=CLUSTER_TYPE
        )
        data: bytes = request.SerializeToString()
        return data

    def handle(self, raw: bytes, at: float) -> list[bytes]:
        resp = discovery_pb2.DiscoveryResponse.FromString(raw)
        ack = discovery_pb2.DiscoveryRequest(
            version_info=resp.version_info, response_nonce=resp.nonce
        ).SerializeToString()
        if resp.type_url == ENDPOINT_TYPE:
            self.pool.received(self.index, raw, at)
            self._count_eds(len(resp.resources))
            return [self._eds_base + ack]
        if resp.type_url != CLUSTER_TYPE:
            return []
        out = []
        names = sorted(_cluster_name(a.value) for a in resp.resources)
        if names != self._eds_names:
            # Like Envoy: the EDS subscription follows the clusters held; every SotW EDS
            # request (ACKs included) lists every name.
            self._eds_names = names
            self._eds_base = discovery_pb2.DiscoveryRequest(
                type_url=ENDPOINT_TYPE, resource_names=names
            ).SerializeToString()
            out.append(self._eds_base)
        cds = discovery_pb2.DiscoveryRequest(type_url=CLUSTER_TYPE).SerializeToString()
        out.append(cds + ack)
        return out


class _DeltaStream(_Stream):
    """Plays Envoy on ``DeltaAggregatedResources``."""

    method = "DeltaAggregatedResources"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._subscribed: set[str] = set()
        self._eds_nonce = ""

    def first_request(self) -> bytes:
        request = discovery_pb2.DeltaDiscoveryRequest(
            node=base_pb2.Node(id=self.node_id, cluster="bench"), type_url=CLUSTER_TYPE
        )
        data: bytes = request.SerializeToString()
        return data

    def handle(self, raw: bytes, at: float) -> list[bytes]:
        resp = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
        ack: bytes = discovery_pb2.DeltaDiscoveryRequest(
            type_url=resp.type_url, response_nonce=resp.nonce
        ).SerializeToString()
        if resp.type_url == ENDPOINT_TYPE:
            self._eds_nonce = resp.nonce
            self.pool.received(self.index, raw, at)
            self._count_eds(len(resp.resources))
            return [ack]
        if resp.type_url != CLUSTER_TYPE:
            return []
        names = {_cluster_name(r.resource.value) for r in resp.resources}
        gone = set(resp.removed_resources) & self._subscribed
        new = names - self._subscribed
        out = [ack]
        if new or gone:
            self._subscribed = (self._subscribed | new) - gone
            out.append(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=ENDPOINT_TYPE,
                    resource_names_subscribe=sorted(new),
                    resource_names_unsubscribe=sorted(gone),
                    response_nonce=self._eds_nonce,
                ).SerializeToString()
            )
        return out


async def _main() -> None:
    link = await ParentLink.open()
    raise_nofile_limit()
    pool = Pool(link)
    try:
        async for command in link.commands():
            op = command["op"]
            try:
                if op == "connect":
                    link.send(await pool.connect(command))
                elif op == "expect":
                    needles = [bytes.fromhex(n) for n in command["needles"]]
                    pool.expect(int(command["seq"]), needles, float(command["timeout"]))
                    link.send({"ready": command["seq"]})
                elif op == "usage":
                    link.send({"errors": len(pool.errors), **proc_usage()})
                else:
                    link.send({"error": f"unknown command {op!r}"})
            except Exception as exc:
                link.send({"error": f"{op}: {type(exc).__name__}: {exc}"})
    finally:
        await pool.close()


def main() -> None:
    asyncio.run(_main())


if __name__ == "__main__":
    main()
