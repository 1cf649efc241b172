"""Process trees we started, found and stopped by PID (Linux ``/proc``), never by name.

Flower's SuperLink and SuperNodes start SuperExec and app processes in new sessions, and Ray
starts daemons that re-parent; so a tree is the leader, every descendant, every process of the
leader's session, and whatever the caller saw earlier (``known``: pid -> start time, which tells a
live process from a recycled PID). :func:`stop_tree` is the one way the launcher, the sweeps and
the benchmarks stop what they started.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """Kernel start time of a process (guards against signalling a recycled PID)."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, start: int | None = None) -> bool:
    """True while ``pid`` runs (not a zombie) and, when ``start`` is given, is still that process."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and (start is None or int(fields[19]) == start)


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid``."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for c in children.read_text().split():
                    out.append(int(c))
                    todo.append(int(c))
    return out


def session_members(sid: int) -> list[int]:
    """PIDs of every process whose session id is ``sid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[3]) == sid:
                out.append(int(entry))
    return out


def process_tree(root: int) -> set[int]:
    """``root``, its descendants, and every process in its session (daemons that re-parented)."""
    return {p for p in {root, *descendants(root), *session_members(root)} if _stat(p) is not None}


def stop_tree(leader: int, *, known: Mapping[int, int | None] | None = None, timeout: float = 15.0,
              sig: int = signal.SIGTERM) -> list[int]:
    """Send ``sig`` to a process tree (the leader's group, descendants, session and ``known``), then
    SIGKILL whatever still runs after ``timeout`` seconds. Returns the PIDs that had to be killed."""
    targets = {p: start_time(p) for p in process_tree(leader)} | dict(known or {})
    targets.pop(os.getpid(), None)
    with contextlib.suppress(OSError):
        os.killpg(leader, sig)  # the leader's own process group (start_new_session=True)
    for p, s in targets.items():
        if alive(p, s):
            with contextlib.suppress(OSError):
                os.kill(p, sig)
    deadline = time.monotonic() + timeout
    while any(alive(p, s) for p, s in targets.items()) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = [p for p, s in targets.items() if alive(p, s)]
    for p in killed:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    return killed
