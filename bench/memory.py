"""Resident memory of the current process, from /proc/self/status (Linux)."""
from __future__ import annotations


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process's own address space so far (VmHWM), MiB.

    Not ``ru_maxrss``: a child started by ``subprocess`` (vfork + exec) inherits its parent's high-water mark
    there, so every child would report at least the parent's peak.
    """
    return _status_mib("VmHWM")


def current_rss_mib() -> float:
    return _status_mib("VmRSS")
