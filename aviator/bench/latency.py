"""``aviator bench latency``: tail latency of Aviator against Envoy's own balancers.

Backends with private capacity report ORCA load; a fleet of Envoy sidecars (``--sidecars``,
default 3) shares an open-loop Poisson load; each request has a 5 s deadline from its intended
send time. For every *case* (a scenario at one load) and every repetition, each policy runs
once, in an order rotated per repetition (interleaved, so drift of the machine hits every
policy alike), on a fresh fleet, fresh Envoys and, for Aviator, a fresh control plane.

Writes ``latency.json`` (every run and the summaries), ``latency.md`` (tables, goals) and PNG
plots (``latency-<case>-percentiles.png``, ``-share.png``, ``-p99.png``, ``-weights.png``)
into ``--out`` (default ``docs/benchmarks``). The JSON is rewritten after every run, so an
interrupted benchmark keeps what it measured.

Capacity: ``Σ slots_i / mean_service_i`` (lowest over the run, see
:mod:`aviator.bench.scenarios`); offered rate = ``--load * capacity``. The default fleet
(6 backends of 4 slots, 20 ms mean) has 1,200 req/s nominal capacity, within what one load
generator process sustains on a 2-core machine; every run checks that the achieved send rate
matched the offered one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import structlog

from aviator.bench.controlplane import ControlPlaneSettings
from aviator.bench.plots import (
    percentile_plot,
    representative,
    share_plot,
    timeline_plot,
    weights_plot,
)
from aviator.bench.policies import POLICIES, Policy, parse_policies
from aviator.bench.reaction import STAGES, TRACE_EVERY_S, Reaction, summarize_reactions
from aviator.bench.records import RunRecord
from aviator.bench.report import case_key, evaluate_goals, markdown, summarize
from aviator.bench.runner import run_once
from aviator.bench.scenarios import (
    QUICK_SHAPE,
    SCENARIOS,
    FleetShape,
    RunPlan,
    parse_scenarios,
    plan,
)

__all__ = ["Case", "Settings", "configure", "run", "settings_from_args"]

log = structlog.get_logger(__name__)

LABELS: Final = {name: p.label for name, p in POLICIES.items()}
_DEFAULTS: Final = {"duration": 30.0, "repeat": 5}
_QUICK: Final = {"duration": 5.0, "repeat": 1}


def _loads(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--load takes numbers like 0.7 or 0.7,0.9: {text!r}"
        ) from None
    if not values or any(not 0 < v <= 2 for v in values):
        raise argparse.ArgumentTypeError(f"each load must be in (0, 2]: {text!r}")
    return tuple(dict.fromkeys(values))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        default="all",
        help=f"scenario name, comma list, or all (default): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma list of policies in run order (default {','.join(POLICIES)})",
    )
    parser.add_argument(
        "--load",
        type=_loads,
        default=(0.7,),
        help="offered load as a fraction of capacity; a comma list runs each (default 0.7)",
    )
    parser.add_argument("--repeat", type=int, help="repetitions per case (default 5; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds of load per run (default 30)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds at the start of a run")
    parser.add_argument("--out", default="docs/benchmarks", help="output directory")
    parser.add_argument(
        "--quick", action="store_true", help="tiny run (4 small backends, 5 s, 1 repetition)"
    )
    parser.add_argument("--sidecars", type=int, default=3, help="Envoy sidecars (default 3)")
    parser.add_argument("--backends", type=int, help="backends (default 6; quick 4)")
    parser.add_argument("--slots", type=int, help="requests each backend serves at once")
    parser.add_argument("--mean-ms", type=float, help="mean service time in ms (default 20)")
    parser.add_argument("--deadline", type=float, default=5.0, help="request deadline in s")
    parser.add_argument("--seed", type=int, default=1, help="base seed (arrivals, service)")
    parser.add_argument(
        "--ping-interval-ms", type=int, default=100, help="Aviator: spec.pingInterval"
    )
    parser.add_argument(
        "--latency-threshold-ms", type=int, default=100, help="Aviator: spec.latencyThreshold"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--traces",
        action="store_true",
        help="also write latency-traces.json: each Aviator run's 50 ms polls of the control "
        "plane's /debug/endpoints and the first sidecar's weights",
    )
    parser.add_argument(
        "--thinning",
        type=int,
        default=1,
        help="k6 lattice at this many times the rate, thinned at random (1: uniform "
        "arrivals, the default; larger: closer to Poisson, more work for k6)",
    )


@dataclass(frozen=True, slots=True)
class Case:
    """A scenario at one load: the unit whose policies are compared side by side."""

    key: str
    plan: RunPlan


@dataclass(frozen=True, slots=True)
class Settings:
    cases: tuple[Case, ...]
    policies: tuple[Policy, ...]
    repeat: int
    sidecars: int
    deadline_s: float
    seed: int
    shape: FleetShape
    control_plane: ControlPlaneSettings
    out: Path
    plots: bool
    quick: bool
    thinning: int = 1
    traces: bool = False


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validate the options into :class:`Settings`; ValueError with the reason otherwise."""
    quick = bool(args.quick)
    base = _QUICK if quick else _DEFAULTS
    duration = float(args.duration if args.duration is not None else base["duration"])
    repeat = int(args.repeat if args.repeat is not None else base["repeat"])
    warmup = (
        float(args.warmup)
        if args.warmup is not None
        else (1.5 if quick else min(5.0, duration / 5))
    )
    if repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {repeat}")
    if args.thinning < 1:
        raise ValueError(f"--thinning must be >= 1, got {args.thinning}")
    if args.sidecars < 1:
        raise ValueError(f"--sidecars must be >= 1, got {args.sidecars}")
    if not args.deadline > 0:
        raise ValueError(f"--deadline must be > 0, got {args.deadline}")
    default_shape = QUICK_SHAPE if quick else FleetShape()
    shape = FleetShape(
        backends=args.backends or default_shape.backends,
        capacity=args.slots or default_shape.capacity,
        mean_service_s=(args.mean_ms / 1000.0) if args.mean_ms else default_shape.mean_service_s,
    )
    scenarios = parse_scenarios(args.scenario)
    cases: list[Case] = []
    for scenario in scenarios:
        # A ramp brings its own loads: run it once, whatever --load lists.
        loads = args.load[:1] if scenario.ramp else args.load
        for load in loads:
            p = plan(scenario, shape, load=load, duration_s=duration, warmup_s=warmup)
            cases.append(Case(case_key(scenario.name, p.load, scenario.ramp is not None), p))
    return Settings(
        cases=tuple(cases),
        policies=parse_policies(args.policies),
        repeat=repeat,
        sidecars=args.sidecars,
        deadline_s=float(args.deadline),
        seed=int(args.seed),
        shape=shape,
        control_plane=ControlPlaneSettings(
            ping_interval_ms=args.ping_interval_ms,
            latency_threshold_ms=args.latency_threshold_ms,
            probe_timeout_ms=min(args.ping_interval_ms, 100),
        ),
        out=Path(args.out),
        plots=not args.no_plots,
        quick=quick,
        thinning=int(args.thinning),
        traces=bool(args.traces),
    )


def _ramps(settings: Settings) -> list[str]:
    """The names of the ramp scenarios (their cases are keyed without a load)."""
    return [c.plan.scenario.name for c in settings.cases if c.plan.scenario.ramp]


def case_control_plane(settings: Settings, case: Case) -> ControlPlaneSettings:
    """The control plane's knobs for ``case``: the scenario's threshold (a multiple of the
    mean service time) where it has one, else the benchmark's."""
    x = case.plan.scenario.threshold_x
    if x is None:
        return settings.control_plane
    ms = max(1, round(x * case.plan.shape.mean_service_s * 1000))
    return replace(settings.control_plane, latency_threshold_ms=ms)


def _envoy_version() -> str:
    from aviator.envoy.process import find_envoy

    try:
        out = subprocess.run(
            [str(find_envoy()), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    # "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    match = re.search(r"version: \S+?/(\d+\.\d+\.\d+)/", out)
    return match[1] if match else out.strip() or "unknown"


def _file_key(case: str) -> str:
    return case.replace("@", "-")


def _run_line(case: str, r: RunRecord) -> str:
    if r.load is None:
        return f"{case:<16} rep {r.repeat}  {r.policy:<8} FAILED: {r.error}"
    lr = r.load
    ratio = lr.achieved_rate / lr.offered_rate if lr.offered_rate else 1.0
    return (
        f"{case:<16} rep {r.repeat}  {r.policy:<8} offered {lr.offered_rate:7.1f}/s "
        f"achieved/offered {ratio:5.3f}  p50 {lr.latency_all.p50_ms:7.1f}  "
        f"p99 {lr.latency_all.p99_ms:7.1f}  p99.9 {lr.latency_all.p999_ms:7.1f} ms  "
        f"errors {sum(lr.errors.values()):5d}  dropped {lr.dropped}  "
        f"lag p99 {lr.send_lag.p99_ms:5.1f} ms  kept up {'yes' if lr.keeping_up else 'NO'}  "
        f"({r.wall_s:.0f} s)"
    )


def _document(
    settings: Settings,
    records: Sequence[RunRecord],
    started: str,
    envoy_version: str,
    plots: dict[str, list[str]],
    complete: bool,
) -> tuple[dict[str, Any], str]:
    ramps = _ramps(settings)
    summary = summarize(records, ramps)
    goals = evaluate_goals(summary, settings.sidecars)
    shape = settings.shape
    setup = [
        f"{started}, {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}, Envoy {envoy_version}"
        + (" — `--quick` (a smoke run, not a measurement)" if settings.quick else "")
        + ("" if complete else " — **incomplete: interrupted or still running**"),
        f"{shape.backends} backends × {shape.capacity} slots, mean service "
        f"{shape.mean_service_s * 1000:g} ms (exponential, sd = mean, sleeping): nominal "
        f"capacity {shape.nominal_capacity:.0f} req/s; each backend reports ORCA load "
        "(RIF, RIF/slots, rps) in `endpoint-load-metrics`, except in the scenarios marked "
        "*no agent*",
        f"{settings.sidecars} Envoy sidecars (`--concurrency 1`), requests split round "
        "robin across them; load from k6 1.1.0 (`constant-arrival-rate`, open loop, "
        + (
            "uniform arrivals"
            if settings.thinning == 1
            else f"a lattice at {settings.thinning}x the rate thinned at random"
        )
        + ", VUs = peak rate × deadline × 1.1), latency from the intended send time (k6's "
        "start lag + the request's whole time; HDR histograms), deadline "
        f"{settings.deadline_s:g} s",
        f"{settings.repeat} repetition(s) per case; per repetition every policy runs once, "
        "order rotated, everything restarted between runs; "
        f"{settings.cases[0].plan.duration_s:g} s of load per run, the first "
        f"{settings.cases[0].plan.warmup_s:g} s unmeasured",
        "policies: "
        + "; ".join(f"**{p.label}** (`{p.name}`): {p.description}" for p in settings.policies),
        f"Aviator knobs: pingInterval {settings.control_plane.ping_interval_ms} ms, "
        f"latencyThreshold {settings.control_plane.latency_threshold_ms} ms",
    ]
    notes = {
        c.key: (
            f"{c.plan.scenario.title}: {c.plan.scenario.description}"
            + ("" if c.plan.scenario.agent else " (*no agent*)")
            + f"; Aviator's latencyThreshold "
            f"{case_control_plane(settings, c).latency_threshold_ms} ms. Capacity "
            f"{c.plan.capacity:.0f} req/s, mean offered {c.plan.mean_rate:.0f} req/s"
            + (
                f" (ramp {c.plan.scenario.ramp[0]:.0%} → {c.plan.scenario.ramp[1]:.0%})."
                if c.plan.scenario.ramp
                else f" ({c.plan.load:.0%})."
            )
        )
        for c in settings.cases
    }
    page = markdown(
        summary,
        goals,
        title="Latency benchmark: Aviator against Envoy's own balancers",
        setup=setup,
        case_notes=notes,
        plots=plots,
        labels=LABELS,
    )
    reaction = _reaction_by_case(settings, records)
    page += _reaction_markdown(reaction, settings.control_plane.ping_interval_ms)
    doc = {
        "benchmark": "latency",
        "started": started,
        "complete": complete,
        "machine": {
            "cpus": os.cpu_count(),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "envoy": envoy_version,
        },
        "settings": {
            "policies": [p.name for p in settings.policies],
            "repeat": settings.repeat,
            "sidecars": settings.sidecars,
            "deadline_s": settings.deadline_s,
            "seed": settings.seed,
            "quick": settings.quick,
            "generator": "k6",
            "thinning": settings.thinning,
            "shape": shape.to_json(),
            "control_plane": settings.control_plane.to_json(),
        },
        "cases": {
            c.key: {**c.plan.to_json(), "scenario_spec": c.plan.scenario.to_json()}
            for c in settings.cases
        },
        "summary": {
            case: {p: s.to_json() for p, s in by_policy.items()}
            for case, by_policy in summary.items()
        },
        "goals": [g.to_json() for g in goals],
        "reaction": reaction,
        "runs": [r.to_json() for r in records],
    }
    return doc, page


def _reaction_by_case(
    settings: Settings, records: Sequence[RunRecord]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per case: each reaction stage's delays over every slowdown of every Aviator run."""
    ramps = _ramps(settings)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for case in settings.cases:
        mine = [
            Reaction(r["backend"], r["start_s"], r["delays_ms"])
            for rec in records
            if rec.policy == "aviator"
            and case_key(rec.scenario, rec.load_fraction, rec.scenario in ramps) == case.key
            for r in rec.reaction
        ]
        if mine:
            out[case.key] = summarize_reactions(mine)
    return out


def _reaction_markdown(by_case: dict[str, dict[str, dict[str, Any]]], ping_ms: int) -> str:
    if not by_case:
        return ""
    target = 2 * ping_ms + 100
    out = [
        "## Reaction: backend slows → Envoy holds the new weight",
        "",
        "Delay from the slowdown's start to each stage, in ms, over every slowdown of every "
        "Aviator run: median (min–max), and how many slowdowns showed the stage. Polled every "
        f"{TRACE_EVERY_S * 1000:g} ms (control plane `/debug/endpoints`, sidecar `/clusters`): "
        "each figure is within one poll of the truth. *floored* is also when the control "
        "plane publishes (the same reweigh step). Target (issue 13): Envoy within 2 ping "
        f"intervals + 100 ms = {target} ms.",
        "",
        "| case | signal (first probe that saw it) | estimator crossed | weigher floored / "
        "published | Envoy holds it | target met |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for case, stages in by_case.items():
        cells = [case]
        for stage in STAGES:
            st = stages[stage]
            if st["median_ms"] is None:
                cells.append(f"– (0/{st['of']})")
            else:
                cells.append(
                    f"{st['median_ms']:.0f} ({st['min_ms']:.0f}–{st['max_ms']:.0f}) "
                    f"{st['seen']}/{st['of']}"
                )
        envoy = stages["envoy"]
        met = envoy["median_ms"] is not None and envoy["median_ms"] <= target
        cells.append("yes (median)" if met else "**no**")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return "\n".join(out)


def _side_by_side(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Per case, every policy's p50 / p99 / errors and Aviator's ratios to least request."""
    lines = ["", "per case (medians over the repetitions; ratios Aviator / least request):"]
    for case, by_policy in summary.items():
        cells = []
        for name, s in by_policy.items():
            p = s["percentiles"]
            cells.append(
                f"{name} p50 {p['p50_ms']['median']:.1f} p99 {p['p99_ms']['median']:.1f} "
                f"err {s['errors_total']}{'' if s['keeping_up'] else ' (lagged)'}"
            )
        ratio = ""
        if "aviator" in by_policy and "lr" in by_policy:
            a, b = by_policy["aviator"]["percentiles"], by_policy["lr"]["percentiles"]
            if b["p99_ms"]["median"] > 0 and b["p50_ms"]["median"] > 0:
                ratio = (
                    f"  | aviator/lr p50 x{a['p50_ms']['median'] / b['p50_ms']['median']:.2f} "
                    f"p99 x{a['p99_ms']['median'] / b['p99_ms']['median']:.2f}"
                )
        lines.append(f"{case:<22} " + " | ".join(cells) + ratio)
    return "\n".join(lines)


def _write(
    settings: Settings, doc: dict[str, Any], page: str | None, records: Sequence[RunRecord]
) -> None:
    settings.out.mkdir(parents=True, exist_ok=True)
    files = {"latency.json": doc}
    if settings.traces:
        ramps = _ramps(settings)
        files["latency-traces.json"] = {
            "runs": [
                {
                    "case": case_key(r.scenario, r.load_fraction, r.scenario in ramps),
                    "policy": r.policy,
                    "repeat": r.repeat,
                    "traces": list(r.traces),
                }
                for r in records
                if r.traces
            ]
        }
    for name, content in files.items():
        tmp = settings.out / (name + ".tmp")
        tmp.write_text(json.dumps(content, indent=1) + "\n")
        tmp.replace(settings.out / name)
    if page is not None:
        (settings.out / "latency.md").write_text(page)


def _plot(settings: Settings, records: Sequence[RunRecord]) -> dict[str, list[str]]:
    ramps = _ramps(settings)
    summary = summarize(records, ramps)
    written: dict[str, list[str]] = {}
    for case in settings.cases:
        summaries = summary.get(case.key)
        if not summaries:
            continue
        mine = [
            r
            for r in records
            if case_key(r.scenario, r.load_fraction, r.scenario in ramps) == case.key
        ]
        reps = {
            p.name: rep
            for p in settings.policies
            if (rep := representative([r for r in mine if r.policy == p.name])) is not None
        }
        stem = f"latency-{_file_key(case.key)}"
        title = f"{case.plan.scenario.title} ({case.key})"
        names = [
            f"{stem}-percentiles.png",
            f"{stem}-share.png",
            f"{stem}-p99.png",
            f"{stem}-weights.png",
        ]
        percentile_plot(settings.out / names[0], title, summaries, LABELS)
        backends = [f"b{i}" for i in range(settings.shape.backends)]
        share_plot(settings.out / names[1], f"traffic share: {title}", reps, backends, LABELS)
        timeline_plot(settings.out / names[2], f"p99 per second: {title}", reps, LABELS)
        weights_plot(settings.out / names[3], f"endpoint weights: {title}", reps, backends, LABELS)
        written[case.key] = names
    return written


async def _run_all(settings: Settings) -> list[RunRecord]:
    records: list[RunRecord] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    envoy_version = _envoy_version()
    total = len(settings.cases) * settings.repeat * len(settings.policies)
    print(
        f"aviator bench latency: {len(settings.cases)} case(s) × {settings.repeat} "
        f"repetition(s) × {len(settings.policies)} policies = {total} runs "
        f"of {settings.cases[0].plan.duration_s:g} s; output in {settings.out}",
        flush=True,
    )
    try:
        for index, case in enumerate(settings.cases):
            print(
                f"-- {case.key}: capacity {case.plan.capacity:.0f} req/s, "
                f"offered {case.plan.mean_rate:.0f} req/s",
                flush=True,
            )
            for rep in range(settings.repeat):
                # Same seed for every policy of a repetition: same arrivals, same profiles.
                seed = settings.seed * 10_000 + index * 100 + rep
                k = rep % len(settings.policies)
                order = settings.policies[k:] + settings.policies[:k]
                for policy in order:
                    record = await run_once(
                        case.plan,
                        policy,
                        repeat=rep,
                        seed=seed,
                        sidecars=settings.sidecars,
                        deadline_s=settings.deadline_s,
                        control_plane=case_control_plane(settings, case),
                        thinning=settings.thinning,
                        keep_traces=settings.traces,
                    )
                    records.append(record)
                    print(_run_line(case.key, record), flush=True)
                    doc, _ = _document(settings, records, started, envoy_version, {}, False)
                    _write(settings, doc, None, records)
    finally:
        plots = _plot(settings, records) if settings.plots and records else {}
        complete = len(records) == total
        doc, page = _document(settings, records, started, envoy_version, plots, complete)
        _write(settings, doc, page, records)
    print(_side_by_side(doc["summary"]))
    for case, stages in doc["reaction"].items():
        text = ", ".join(
            f"{k} {v['median_ms']:.0f} ms ({v['seen']}/{v['of']})"
            if v["median_ms"] is not None
            else f"{k} – (0/{v['of']})"
            for k, v in stages.items()
        )
        print(f"reaction [{case}]: {text}")
    for goal in doc["goals"]:
        status = {True: "met", False: "NOT MET", None: "not judged"}[goal["met"]]
        print(f"goal [{goal['case']}] {goal['goal']}: {goal['measured']} → {status}")
    print(f"wrote {settings.out / 'latency.json'} and {settings.out / 'latency.md'}")
    return records


def run(args: argparse.Namespace) -> int:
    """0 when every run completed (whatever the goals say), 1 when a run failed, 2 for bad
    options."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"aviator bench latency: {exc}")
        return 2
    records = asyncio.run(_run_all(settings))
    failed = [r for r in records if not r.ok]
    if failed:
        print(f"{len(failed)} run(s) failed; see the 'error' of each in latency.json")
        return 1
    return 0
