"""CPU time per test, for sizing the suite on a shared machine (not loaded by default).

    python -m pytest -p _cputime ...        # from the repository root (tests/ is on sys.path)

Wall time says little when other jobs share the cores; CPU time (user + system, of the test
process and of the subprocesses it waited for: CLI runs, servers) is what two pytest-xdist
workers have to share. Each phase (setup, call, teardown) is measured with getrusage in the
process that runs it (an xdist worker) and travels to the controller in the report, which
prints the tests that used the most CPU and the totals. ``TARDIS_CPUTIME_TOP`` sets how many
(default 40).
"""

from __future__ import annotations

import os
import resource
import time

import pytest


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _measured(item, when):
    t0, c0 = time.perf_counter(), _cpu()
    yield
    item.stash.setdefault(_KEY, {})[when] = (time.perf_counter() - t0, _cpu() - c0)


_KEY = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _measured(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _measured(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _measured(item, "teardown")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    wall_cpu = item.stash.get(_KEY, {}).get(call.when)
    if wall_cpu is not None:
        outcome.get_result().user_properties.append(("cputime", (call.when, *wall_cpu)))


_rows: list[tuple[str, str, float, float]] = []
_start = time.perf_counter()


def pytest_runtest_logreport(report):
    for key, value in report.user_properties:
        if key == "cputime":
            _rows.append((report.nodeid, *value))


def pytest_terminal_summary(terminalreporter):
    if not _rows or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    tr = terminalreporter
    wall = sum(r[2] for r in _rows)
    cpu = sum(r[3] for r in _rows)
    top = int(os.environ.get("TARDIS_CPUTIME_TOP", "40"))
    tr.section(f"CPU time per test phase (top {top})")
    for nodeid, when, w, c in sorted(_rows, key=lambda r: -r[3])[:top]:
        tr.write_line(f"{c:8.1f}s cpu {w:8.1f}s wall  {when:8s} {nodeid}")
    per_file: dict[str, list[float]] = {}
    for nodeid, _, w, c in _rows:
        acc = per_file.setdefault(nodeid.split("::")[0], [0.0, 0.0])
        acc[0] += w
        acc[1] += c
    tr.section("CPU time per file")
    for f, (w, c) in sorted(per_file.items(), key=lambda kv: -kv[1][1]):
        tr.write_line(f"{c:8.1f}s cpu {w:8.1f}s wall  {f}")
    tr.write_line(f"total: {cpu:.1f} s CPU, {wall:.1f} s of test phases (summed over workers), "
                  f"{time.perf_counter() - _start:.1f} s since the session started; "
                  f"CPU / test-phase time = {cpu / max(wall, 1e-9):.2f}")
