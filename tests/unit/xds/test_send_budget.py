"""The bytes-in-flight budget of the ADS server (``SendBudget``) and the shared encoded
bodies (``Outgoing``): on fake loop time."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from aviator.xds.bodies import Body, Outgoing, ResponseBodies
from aviator.xds.server import SendBudget, ServerLimits


def _sotw_body() -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(
        version_info="v1",
        type_url="t",
        control_plane=base_pb2.ControlPlane(identifier="cp"),
        resources=[any_pb2.Any(type_url="t", value=b"x" * 100), any_pb2.Any(type_url="t")],
    )


@pytest.mark.parametrize(
    "message",
    [
        _sotw_body(),
        discovery_pb2.DeltaDiscoveryResponse(
            system_version_info="v2",
            type_url="t",
            removed_resources=["gone"],
            control_plane=base_pb2.ControlPlane(identifier="cp"),
        ),
    ],
)
def test_an_outgoing_response_is_the_body_with_the_stream_s_nonce(message: object) -> None:
    body = Body(message)  # type: ignore[type-var]
    one, two = Outgoing(body, "7-1"), Outgoing(body, "8-3")
    expected = type(message)()  # type: ignore[operator]
    expected.CopyFrom(message)
    expected.nonce = "7-1"
    assert type(message).FromString(one.encode()) == expected  # type: ignore[attr-defined]
    assert one.message() == expected
    assert two.message().nonce == "8-3"
    assert len(one) == len(body.encoded)
    # The body's bytes are shared, not copied per stream.
    assert one.body.encoded is two.body.encoded


def test_a_shared_body_carries_no_nonce() -> None:
    with pytest.raises(ValueError, match="nonce"):
        Body(discovery_pb2.DiscoveryResponse(nonce="1"))


def test_bodies_are_encoded_once_per_content() -> None:
    bodies = ResponseBodies(size=2)
    built: list[int] = []

    def build() -> discovery_pb2.DiscoveryResponse:
        built.append(1)
        return _sotw_body()

    first = bodies.get(("sotw", "t", "v1"), build)
    assert bodies.get(("sotw", "t", "v1"), build) is first
    assert built == [1]


@pytest.mark.looptime
async def test_responses_wait_their_turn_first_come_first_served() -> None:
    budget = SendBudget(100, slow_after=60)
    a = await budget.acquire(60)
    order: list[str] = []

    async def send(name: str, size: int) -> None:
        share = await budget.acquire(size)
        order.append(name)
        await asyncio.sleep(1)  # the write
        share.release()

    tasks = [asyncio.create_task(send("b", 50)), asyncio.create_task(send("c", 10))]
    await asyncio.sleep(0.5)
    # b does not fit yet, and c (which would fit) does not overtake it.
    assert order == []
    assert budget.in_flight == 60
    assert budget.waited == 2
    a.release()
    a.release()  # idempotent
    await asyncio.gather(*tasks)
    assert order == ["b", "c"]
    assert budget.in_flight == 0
    assert budget.peak == 60


@pytest.mark.looptime
async def test_a_response_larger_than_the_budget_goes_alone() -> None:
    budget = SendBudget(100, slow_after=60)
    small = await budget.acquire(10)
    big = asyncio.create_task(budget.acquire(1_000))
    await asyncio.sleep(1)
    assert not big.done()
    small.release()
    share = await big
    assert budget.in_flight == 100  # the whole budget, no more
    share.release()
    assert budget.in_flight == 0


@pytest.mark.looptime
async def test_a_slow_write_gives_its_share_back() -> None:
    budget = SendBudget(100, slow_after=2)
    stuck = await budget.acquire(100)  # a proxy that stopped reading
    loop = asyncio.get_running_loop()
    start = loop.time()
    other = await budget.acquire(100)
    assert loop.time() - start == pytest.approx(2)  # waited for the slow threshold, no more
    stuck.release()  # its write ends later: nothing more is given back
    assert budget.in_flight == 100
    other.release()
    assert budget.in_flight == 0


@pytest.mark.looptime
async def test_a_cancelled_waiter_leaves_the_queue_and_unblocks_the_next() -> None:
    budget = SendBudget(100, slow_after=60)
    held = await budget.acquire(50)
    blocked = asyncio.create_task(budget.acquire(80))  # waits for held
    await asyncio.sleep(0)
    after = asyncio.create_task(budget.acquire(40))  # fits, but queued behind ``blocked``
    await asyncio.sleep(1)
    assert not after.done()
    blocked.cancel()  # its stream ended
    share = await after
    assert budget.in_flight == 90
    share.release()
    held.release()
    assert budget.in_flight == 0
    with pytest.raises(asyncio.CancelledError):
        await blocked


def test_the_budget_is_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="max_bytes_in_flight"):
        ServerLimits(max_bytes_in_flight=0)
    with pytest.raises(ValueError, match="slow_send_s"):
        ServerLimits(slow_send_s=0)
    with pytest.raises(ValueError, match="limit"):
        SendBudget(0, 1.0)


@pytest.mark.looptime
async def test_a_waiter_cancelled_while_the_budget_is_given_back() -> None:
    budget = SendBudget(100, slow_after=60)
    held = await budget.acquire(100)
    blocked = asyncio.create_task(budget.acquire(100))
    await asyncio.sleep(0)
    blocked.cancel()  # its future is cancelled now, its task runs later
    held.release()  # drops the cancelled waiter from the queue first
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert budget.in_flight == 0
    assert (await budget.acquire(100)) is not None
