"""The control plane's probe → estimate → weight loop on fake time (looptime), no sockets.

A real :class:`ControlPlane` (its prober, estimator, weigher and snapshot builder) is given a
:class:`ClusterState` by ``apply_state`` and probes three pods through an in-memory transport
whose answers are a function of the pod and the loop time; the test calls ``reweigh`` as
the control plane's own loop does and records what it decides. Every answer carries the
agent's load report (RIF 0): probe round trips alone give equal weights (issue 13, do no
harm), and these tests are about the weights the measurements give.

- Issue 9, item 3: at every allowed ``pingInterval`` (10 ms to 5 m), steady measurements give
  steady weights and no push (``reweigh`` returns ``changed=False``) once they have settled;
  before the fix, an interval above the estimator's fixed 30 s staleness made every endpoint
  go stale (neutral weight) between probes and come back, a push each way.
- Issue 9, item 8: a pod that fails every probe for a minute and then answers is back to a
  normal weight within ``recovery_bound`` (the prober's back-off cap plus one confirming
  probe, with jitter, plus a second of weigher smoothing); before the fix it took ~15-20 s at
  a 1 s interval (back-off up to 10 s, then the 2 s-half-life decay of the penalised
  latency).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aviator_agent.orca import ORCA_HEADER

from aviator.controlplane import ControlPlane, Settings
from aviator.k8s.objects import parse_pod, parse_workload
from aviator.k8s.policy import PING_INTERVAL_RANGE, parse_policy
from aviator.k8s.state import ClusterState
from aviator.probing.results import ProbeTarget
from aviator.probing.transport import ProbeConnectError, ProbeResponse
from aviator.source.store import Store
from tests.unit.k8s.builders import pod_doc, policy_doc, workload_doc

pytestmark = pytest.mark.looptime

# Pod IP → probe latency, all within latencyThreshold (the same weight) and below the 10 ms
# probe timeout of the smallest interval.
PODS = {"10.0.0.1": 0.0005, "10.0.0.2": 0.003, "10.0.0.3": 0.008}
THRESHOLD = "20ms"
# For the steady weights, three different ones: beyond the 2 ms threshold the slowest is hot
# (floor: it stands out from the median, 4 ms, by more than standOut) and the middle one,
# cold, has a weight of its own, smoothed towards (2.2 / 4.2) of the fastest's (τ = 0.2 ms).
STEADY_PODS = {"10.0.0.1": 0.0005, "10.0.0.2": 0.004, "10.0.0.3": 0.008}
STEADY_THRESHOLD = "2ms"
REWEIGH_S = 0.1  # the control plane's default reweigh_interval
JITTER = 0.1  # the prober's default jitter

# Whether a pod answers at loop time t, and its latency then (None: connection refused).
Behaviour = Callable[[str, float], float | None]


class FakeNetwork:
    """Transports whose answers come from ``behaviour``, with ±3% deterministic noise."""

    def __init__(self, behaviour: Behaviour, seed: int = 1) -> None:
        self.behaviour = behaviour
        self.rng = random.Random(seed)
        self.probes = 0

    def factory(self, target: ProbeTarget) -> FakeTransport:
        return FakeTransport(self)


class FakeTransport:
    def __init__(self, network: FakeNetwork) -> None:
        self.network = network

    async def get(self, target: ProbeTarget) -> ProbeResponse:
        net = self.network
        net.probes += 1
        latency = net.behaviour(target.ip, asyncio.get_running_loop().time())
        if latency is None:
            raise ProbeConnectError("connection refused")
        await asyncio.sleep(latency * (1 + net.rng.uniform(-0.03, 0.03)))
        return ProbeResponse(200, {ORCA_HEADER: "TEXT named_metrics.rif=0"})

    async def aclose(self) -> None:
        pass


def state(
    ping_interval: str, pods: dict[str, float] = PODS, threshold: str = THRESHOLD
) -> ClusterState:
    policy = parse_policy(
        policy_doc(
            latencyThreshold=threshold, pingInterval=ping_interval, created="2024-05-01T00:00:00Z"
        )
    )
    parsed = [parse_pod(pod_doc(f"web-{i}", ip)) for i, ip in enumerate(pods, start=1)]
    return ClusterState.build([policy, parse_workload(workload_doc()), *parsed])


@dataclass
class Record:
    """What each reweigh decided: (loop time, changed, weights by pod IP)."""

    steps: list[tuple[float, bool, dict[str, int]]] = field(default_factory=list)

    def after(self, t: float) -> list[tuple[float, bool, dict[str, int]]]:
        return [s for s in self.steps if s[0] >= t]


class NoSource:
    """A state source that publishes nothing: the test calls ``apply_state`` itself."""

    name = "none"

    async def run(self, store: Store) -> None:
        await asyncio.Event().wait()


@asynccontextmanager
async def control_plane(
    network: FakeNetwork, ping_interval: str, seed: int = 0, cluster: ClusterState | None = None
) -> AsyncIterator[ControlPlane]:
    """``seed``: the prober's jitter (when each pod's first probe lands, and each later one);
    ``cluster``: the state applied (default: ``state(ping_interval)``)."""
    cp = ControlPlane(
        Settings(source="none", reweigh_interval=REWEIGH_S),
        source=NoSource(),
        transport_factory=network.factory,
        rng=random.Random(seed),
    )
    cp.apply_state(cluster or state(ping_interval))
    prober = asyncio.create_task(cp.prober.run())
    try:
        yield cp
    finally:
        await cp.prober.close()
        await prober


async def reweigh_for(cp: ControlPlane, seconds: float, step: float, record: Record) -> None:
    """Call ``reweigh`` every ``step`` seconds of loop time for ``seconds``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        await asyncio.sleep(step)
        now = loop.time()
        changed = cp.reweigh(now)
        (workload,) = cp.workloads()  # the weights reweigh just decided
        weights = {e.address.ip: e.weight for e in workload.endpoints}
        record.steps.append((now, changed, weights))


def _interval_text(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


INTERVALS = [
    PING_INTERVAL_RANGE[0].seconds,  # 10 ms, the lowest allowed
    0.1,
    1.0,
    10.0,
    29.0,
    31.0,
    60.0,
    120.0,
    PING_INTERVAL_RANGE[1].seconds,  # 5 m, the highest allowed
]


# Jitter seeds: where each pod's first probe lands decides the order in which the weights
# settle. Before the weigher's "settled" rule, each of these (found among 120) left a
# half-smoothed weight held by the dead band, until probe noise alone pushed it on much later
# (at 1 s and 10 s: seeds 53, 60, 84; at 60 s: seed 6; a CI run failed so at 31 s while the
# jitter was unseeded). All 120 pass now.
SEEDS = [0, 6, 53, 60, 84]


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("interval", INTERVALS, ids=_interval_text)
async def test_steady_measurements_give_steady_weights_and_no_push_at_every_interval(
    interval: float, seed: int
) -> None:
    network = FakeNetwork(lambda ip, t: STEADY_PODS[ip])
    cluster = state(_interval_text(interval), STEADY_PODS, STEADY_THRESHOLD)
    record = Record()
    # Reweigh ten times per interval (at least every second: often enough to see an endpoint
    # go stale between two probes, seldom enough to keep 5 m intervals quick), for at least
    # 10 probe rounds (3 s at the smallest intervals).
    step = min(max(interval / 10, 0.001), 1.0)
    async with control_plane(network, _interval_text(interval), seed, cluster) as cp:
        loop = asyncio.get_running_loop()
        start = loop.time()
        # Warm-up: every pod probed once (first probes spread over the first interval), then
        # smoothing settles (a push per reweigh at most).
        await reweigh_for(cp, interval * 1.2 + 20 * step, step, record)
        settled = loop.time()
        await reweigh_for(cp, max(10 * interval, 3.0), step, record)
        stats = [cp.estimator.stats(k, loop.time()) for k in cp.prober.targets]
    steady = record.after(settled)
    assert len(steady) >= 20
    assert network.probes >= 3 * 10, network.probes
    pushes = [(round(t - start, 3), w) for t, changed, w in steady if changed]
    assert pushes == [], f"{len(pushes)} pushes without a change in the measurements: {pushes[:4]}"
    assert len({tuple(sorted(w.items())) for _, _, w in steady}) == 1
    # And the weights are the measurements', not the neutral weight of endpoints without data.
    assert all(s is not None for s in stats)
    (weights,) = {tuple(sorted(w.items())) for _, _, w in steady}
    by_ip = dict(weights)
    assert by_ip["10.0.0.1"] > by_ip["10.0.0.2"] > by_ip["10.0.0.3"], by_ip


def recovery_bound(interval: float) -> float:
    """How long after a pod answers again it must be back to a normal weight: the prober's
    back-off cap (3 intervals, at most 10 s, never below one interval) and one confirming
    probe, each stretched by the jitter, then a second of reweighs (smoothing)."""
    cap = max(interval, min(3 * interval, 10.0))
    return (cap + interval) * (1 + JITTER) + 1.0


@pytest.mark.parametrize("interval", [0.1, 1.0, 5.0], ids=_interval_text)
async def test_a_pod_that_failed_for_a_minute_is_back_to_a_normal_weight_promptly(
    interval: float,
) -> None:
    # A few probe rounds before the failure, so that the weights have settled whatever the
    # probes' jitter (one round at 5 s left the 'normal before' check to chance).
    down_from, down_for = max(5.0, 4 * interval), 60.0
    failing = "10.0.0.2"
    t0 = asyncio.get_running_loop().time()

    def behaviour(ip: str, t: float) -> float | None:
        if ip == failing and down_from <= t - t0 < down_from + down_for:
            return None
        return PODS[ip]

    record = Record()
    async with control_plane(FakeNetwork(behaviour), _interval_text(interval)) as cp:
        await reweigh_for(cp, down_from + down_for + 30.0, REWEIGH_S, record)

    def normal(weights: dict[str, int]) -> bool:
        others = [w for ip, w in weights.items() if ip != failing]
        return weights[failing] >= 0.8 * min(others)

    # Before: normal. While down: the floor (the test can tell the two apart).
    before = [w for t, _, w in record.steps if t - t0 < down_from]
    assert before
    assert normal(before[-1])
    floor = min(w[failing] for t, _, w in record.steps if t - t0 < down_from + down_for)
    assert floor == math.ceil(1000 / 20)  # the default maxWeightRatio's floor
    late_down = [w for t, _, w in record.steps if down_from + 10 < t - t0 < down_from + down_for]
    assert late_down
    assert all(not normal(w) for w in late_down)
    # After: back to normal within the bound, and stays there.
    back_at = t0 + down_from + down_for
    after = record.after(back_at)
    recovered = next(t for t, _, w in after if normal(w)) - back_at
    print(f"interval {interval}s: normal weight {recovered:.2f}s after the pod answered again")
    assert recovered <= recovery_bound(interval), (recovered, recovery_bound(interval))
    assert all(normal(w) for t, _, w in after if t - back_at > recovery_bound(interval))
