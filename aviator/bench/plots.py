"""PNG plots of the latency benchmark (matplotlib, Agg backend: no display needed).

Per case: the percentiles of each policy (median bars, min-max whiskers, log scale), the
traffic share of each backend over time per policy, p99 per second per policy, and the
endpoint weights the first sidecar held over time (what CSWRR computed from ORCA, what
Aviator pushed over EDS).
matplotlib is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aviator.bench.records import RunRecord
from aviator.bench.report import PERCENTILE_LABELS, PERCENTILES, PolicySummary
from aviator.testbed.loadresult import NO_BACKEND

__all__ = ["percentile_plot", "representative", "share_plot", "timeline_plot", "weights_plot"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def representative(records: Sequence[RunRecord]) -> RunRecord | None:
    """The repetition whose p99 is the median one (the lower middle for an even count)."""
    done = sorted(
        (r for r in records if r.ok and r.load is not None),
        key=lambda r: r.load.latency_all.p99_ms if r.load else 0.0,
    )
    return done[(len(done) - 1) // 2] if done else None


def percentile_plot(
    path: Path,
    title: str,
    summaries: Mapping[str, PolicySummary],
    labels: Mapping[str, str],
) -> None:
    plt = _pyplot()
    names = [n for n, s in summaries.items() if s.runs > s.failed]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        spreads = [summaries[name].percentiles[p] for p in PERCENTILES]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(PERCENTILES))]
        medians = [max(s.median, 0.1) for s in spreads]
        errors = [
            [max(s.median - s.low, 0.0) for s in spreads],
            [max(s.high - s.median, 0.0) for s in spreads],
        ]
        ax.bar(xs, medians, width, label=labels.get(name, name), yerr=errors, capsize=3)
    ax.set_yscale("log")
    ax.set_xticks(range(len(PERCENTILES)), [PERCENTILE_LABELS[p] for p in PERCENTILES])
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(title)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def share_plot(
    path: Path,
    title: str,
    runs: Mapping[str, RunRecord],
    backends: Sequence[str],
    labels: Mapping[str, str],
) -> None:
    """Stacked share of requests per backend for each second of the measured window, one
    panel per policy (the representative repetition of each)."""
    plt = _pyplot()
    names = [n for n, r in runs.items() if r.load is not None]
    fig, axes = plt.subplots(
        len(names), 1, figsize=(8, 1.9 * max(len(names), 1) + 0.6), sharex=True, squeeze=False
    )
    for ax, name in zip(axes[:, 0], names, strict=True):
        load = runs[name].load
        assert load is not None
        buckets = list(load.per_second)
        if not buckets:
            continue
        # Each bucket covers [t, t+1): repeat the last one at its end so the steps show it.
        seconds = [b.t for b in buckets] + [buckets[-1].t + 1]
        buckets.append(buckets[-1])
        stacks = [
            [b.by_backend.get(backend, 0) / b.sent if b.sent else 0.0 for b in buckets]
            for backend in [*backends, NO_BACKEND]
        ]
        ax.stackplot(seconds, stacks, labels=[*backends, "no answer"], step="post")
        ax.set_ylim(0, 1)
        ax.set_xlim(seconds[0], seconds[-1])
        ax.set_ylabel("share")
        ax.set_title(labels.get(name, name), fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("second of the run (load time)")
    handles, texts = axes[0, 0].get_legend_handles_labels()
    # "no answer": timed out or failed before a backend answered (no x-testbed-backend).
    fig.legend(handles, texts, loc="lower center", fontsize=8, ncol=len(backends) + 1)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def timeline_plot(
    path: Path, title: str, runs: Mapping[str, RunRecord], labels: Mapping[str, str]
) -> None:
    """p99 of each second (by intended send time) per policy, log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, run in runs.items():
        if run.load is None:
            continue
        seconds = [b.t for b in run.load.per_second]
        ax.plot(
            seconds,
            [max(b.p99_ms, 0.1) for b in run.load.per_second],
            label=labels.get(name, name),
            drawstyle="steps-post",
        )
    ax.set_yscale("log")
    ax.set_xlabel("second of the run (load time)")
    ax.set_ylabel("p99 of the second (ms)")
    ax.set_title(title)
    ax.grid(which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def weights_plot(
    path: Path,
    title: str,
    runs: Mapping[str, RunRecord],
    backends: Sequence[str],
    labels: Mapping[str, str],
) -> None:
    """Each backend's share of the total endpoint weight in the first sidecar, per second,
    one panel per policy (equal shares = the policy sets no weights)."""
    plt = _pyplot()
    names = [n for n, r in runs.items() if r.weights]
    fig, axes = plt.subplots(
        len(names), 1, figsize=(8, 1.9 * max(len(names), 1) + 0.6), sharex=True, squeeze=False
    )
    for ax, name in zip(axes[:, 0], names, strict=True):
        samples = runs[name].weights
        ts = [s.t for s in samples]
        for backend in backends:
            shares = [
                s.weight.get(backend, 0) / total if (total := sum(s.weight.values())) else 0.0
                for s in samples
            ]
            ax.plot(ts, shares, label=backend, drawstyle="steps-post")
        ax.set_ylim(0, 1)
        ax.set_ylabel("weight share")
        ax.set_title(labels.get(name, name), fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("second of the run (load time)")
    handles, texts = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="lower center", fontsize=8, ncol=len(backends))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
