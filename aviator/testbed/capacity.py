"""How much open-loop load one load-generator process sustains on this machine.

``python -m aviator.testbed.capacity [--rates 500,1000,2000] [--duration 5]`` starts a fleet of
fast backends (in their own process), then runs the load generator in another process at each
rate straight at the backends (no Envoy) and prints offered rate, achieved rate, send lag and
latency. It prints figures; it asserts nothing. If the achieved rate falls short of the offered
rate (``keeping_up`` false), a benchmark at that rate would measure the generator, not the
balancer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from aviator.testbed.backend import BackendSpec
from aviator.testbed.fleet import Fleet
from aviator.testbed.fleetserver import FleetSpec
from aviator.testbed.loadgen import run_load_process
from aviator.testbed.loadspec import LoadSpec
from aviator.testbed.profile import Profile


async def measure(
    rates: Sequence[float], duration_s: float, backends: int, *, agent: bool = False
) -> None:
    # Fast, wide backends: 1 ms mean service, 256 slots each, so they are not the bottleneck.
    spec = FleetSpec(
        backends=tuple(
            BackendSpec(f"b{i}", Profile.constant(0.001, 256), seed=i) for i in range(backends)
        ),
        agent=agent,
    )
    async with Fleet(spec) as fleet:
        targets = tuple(fleet.backend_urls.values())
        print(
            f"{'offered':>8} {'achieved':>9} {'lag p99':>8} {'lag max':>8} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'p99.9':>7} {'errors':>6} keeping_up"
        )
        for rate in rates:
            load = LoadSpec(
                targets=targets, duration_s=duration_s, rate=rate, warmup_s=1.0, seed=int(rate)
            )
            r = await run_load_process(load)
            print(
                f"{r.offered_rate:8.0f} {r.achieved_rate:9.0f} {r.send_lag.p99_ms:8.2f} "
                f"{r.send_lag.max_ms:8.2f} {r.latency_all.p50_ms:7.2f} "
                f"{r.latency_all.p99_ms:7.2f} {r.latency_all.p999_ms:7.2f} "
                f"{sum(r.errors.values()):6d} {r.keeping_up}",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aviator.testbed.capacity")
    parser.add_argument("--rates", default="500,1000,1500,2000,3000")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--agent", action="store_true", help="backends report load (ORCA)")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    asyncio.run(measure(rates, args.duration, args.backends, agent=args.agent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
