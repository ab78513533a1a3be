"""CPU time and peak memory of processes, read from /proc, and where the infrastructure's
processes and tools are (this checkout's .local/, or the main worktree's when this checkout is a
git worktree sharing the infrastructure that `make infra-up` started there)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from testsupport.processes import REPO

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat this bench uses, in clock ticks."""

    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime
    reaped_ticks: int  # cutime + cstime: the children it has waited for


def parse_proc_stat(text: str) -> ProcStat:
    # The command name (field 2) may hold spaces and parentheses: the fields after it are split
    # from its last ')'.
    pid, _, rest = text.partition(" (")
    fields = rest[rest.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return ProcStat(int(pid), int(fields[1]), utime + stime, cutime + cstime)


def read_proc_stats() -> dict[int, ProcStat]:
    """Every process's stat, by PID (processes that exit while being read are left out)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = parse_proc_stat((entry / "stat").read_text())
            except (OSError, ValueError):
                continue
    return stats


@dataclass(frozen=True)
class TreeSample:
    """CPU ticks of a process and its live descendants at one moment."""

    counted: Mapping[int, int]  # pid -> ticks, of the processes whose CPU counts
    all_children: Mapping[int, int]  # pid -> ticks, of the root's children, counted or not
    reaped: int  # the root's cutime + cstime


def sample_tree(root: int, stats: Mapping[int, ProcStat], left_out: Iterable[int]) -> TreeSample:
    """The root, its descendants, minus `left_out` (e.g. backends of other databases)."""
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    excluded = set(left_out)
    counted, pending = {}, [root]
    while pending:
        pid = pending.pop()
        if pid in stats and pid not in excluded:
            counted[pid] = stats[pid].cpu_ticks
        pending += children.get(pid, [])
    return TreeSample(
        counted=counted,
        all_children={pid: stats[pid].cpu_ticks for pid in children.get(root, [])},
        reaped=stats[root].reaped_ticks if root in stats else 0,
    )


@dataclass(frozen=True)
class CpuSpent:
    live_seconds: float  # by processes alive at the end
    reaped_seconds: float  # by children that exited and were waited for meanwhile

    @property
    def seconds(self) -> float:
        return self.live_seconds + self.reaped_seconds


def cpu_spent(start: TreeSample, end: TreeSample) -> CpuSpent:
    """CPU time between two samples. A child that exited in between has its whole life's CPU in
    the root's cutime: what it had spent before the start is taken off."""
    live = sum(ticks - start.counted.get(pid, 0) for pid, ticks in end.counted.items())
    gone_before = sum(t for pid, t in start.all_children.items() if pid not in end.all_children)
    reaped = end.reaped - start.reaped - gone_before
    return CpuSpent(live / CLOCK_TICKS_PER_SECOND, max(reaped, 0) / CLOCK_TICKS_PER_SECOND)


def resident_mb(pid: int) -> float:
    """VmRSS: the process's resident set now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@cache
def checkouts() -> tuple[Path, ...]:
    """This checkout, then the main worktree of its git repository if that is another one."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list", "--porcelain"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    main = next(
        (Path(line[len("worktree ") :]) for line in listed.stdout.splitlines() if line),
        REPO,
    )
    return (REPO,) if main.resolve() == REPO.resolve() else (REPO, main)


def local_tool(name: str) -> Path:
    """.local/bin/<name> of the first checkout that has it (of this one if none has)."""
    found = (checkout / ".local" / "bin" / name for checkout in checkouts())
    return next((path for path in found if path.exists()), REPO / ".local" / "bin" / name)


def kafka_pids() -> list[int]:
    """The JVMs that scripts/kafka.sh started, from its PID files (one per node)."""
    for checkout in checkouts():
        pids = []
        for pid_file in sorted((checkout / ".local" / "kafka").glob("*/node-*/kafka.pid")):
            pid = int(pid_file.read_text().split()[0])
            if "kafka.Kafka" in command_line(pid):
                pids.append(pid)
        if pids:
            return pids
    return []


def postmaster_of(backend_pid: int) -> int | None:
    """The postmaster is the parent of every backend: that of one of our own connections is
    the server we measure, whichever data directory it runs from."""
    try:
        parent = parse_proc_stat(Path(f"/proc/{backend_pid}/stat").read_text()).ppid
    except OSError:
        return None  # not on this machine's /proc (e.g. in a container)
    return parent if "postgres" in command_line(parent) else None
