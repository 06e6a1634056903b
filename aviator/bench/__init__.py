"""``aviator bench``: the benchmarks. Each one is a module with ``configure(parser)`` and
``run(args) -> int``, printing its figures and writing JSON/Markdown (and plots) where asked."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "probe": ("aviator.bench.probe", "probes per second one core sustains, CPU per probe"),
    "latency": ("aviator.bench.latency", "tail latency: Aviator against Envoy's own balancers"),
    "xds": ("aviator.bench.xds", "xDS fan-out: change-to-held latency, CPU, memory"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_bench_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            sp.set_defaults(_bench_missing=True)
            continue
        module.configure(sp)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_bench_missing", False):
        print(f"aviator bench: '{args.benchmark}' is not available in this build")
        return 2
    code: int = importlib.import_module(args._bench_module).run(args)
    return code
