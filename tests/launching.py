"""Run a multi-process launch in a test, again on a fresh port when its rendezvous port was taken meanwhile.

A free port is only free when it is picked: between that and the launcher's bind, a process of the other pytest
worker (a gloo mesh opens dozens of connections, each on an ephemeral port) can take it, and the launch then
fails with EADDRINUSE. That is the test machine's race, not the code under test, so only that failure is retried.
"""

from __future__ import annotations

import subprocess
from typing import Callable

from bench_suite.runtime import free_port

PORT_TAKEN = ("eaddrinuse", "address already in use")  # matched against the lower-cased stderr


def run_launch(command: Callable[[int], list[str]], attempts: int = 3, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command(port), capture_output=True, text=True, **kwargs)`` with a free port; rerun (up to
    ``attempts`` in all) only when the run failed because a port was taken."""
    for _ in range(attempts):
        res = subprocess.run(command(free_port()), capture_output=True, text=True, **kwargs)
        if res.returncode == 0 or not any(s in res.stderr.lower() for s in PORT_TAKEN):
            return res
    return res
