"""Peak resident memory of a block of work, for the benchmarks (Linux /proc)."""

from __future__ import annotations


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Resident-set high-water mark of this process during a block (Linux: reset via clear_refs)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak_kib = _status_kib("VmHWM")
        self.above_kib = max(0, self.peak_kib - self.base)

    def as_dict(self) -> dict:
        return {"peak_rss_mib": round(self.peak_kib / 1024, 1), "peak_above_start_mib": round(self.above_kib / 1024, 1),
                "peak_exact": self.resettable}
