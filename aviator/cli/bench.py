"""``aviator bench``: the benchmarks. Each one is a module of :mod:`aviator.bench` with
``configure(parser)`` and ``run(args) -> int``, printing its figures and writing JSON/Markdown
(and plots) where asked."""

from __future__ import annotations

import argparse

from aviator.cli import add_subcommands

BENCHMARKS: dict[str, tuple[str, str, str | None]] = {
    "probe": ("aviator.bench.probe", "probes per second one core sustains, CPU per probe", "bench"),
    "latency": (
        "aviator.bench.latency",
        "tail latency: Aviator against Envoy's own balancers",
        "bench",
    ),
    "xds": ("aviator.bench.xds", "xDS fan-out: change-to-held latency, CPU, memory", "bench"),
    "source": ("aviator.bench.source", "big or hostile manifest directories: freeze, CPU", "bench"),
    "k8s": (
        "aviator.bench.k8s",
        "a real API server: policy and pod Ready to Envoy; CPU, memory with 1k/10k pods",
        "bench",
    ),
}


def configure(parser: argparse.ArgumentParser) -> None:
    add_subcommands(parser, BENCHMARKS, dest="benchmark", key="benchmark_module")


def run(args: argparse.Namespace) -> int:
    code: int = args.benchmark_module.run(args)
    return code
