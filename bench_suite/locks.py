"""Lock files for work folders that two runs may share (two users, or a requeued job beside its old copy).

A lock is a file created with ``O_EXCL`` that names its owner (pid, host, time). A lock whose process is
gone (same host), or that is older than ``STALE_S`` (any host), is stale and taken over, so a killed run
never blocks the next one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from bench_suite.atomic import process_alive

log = logging.getLogger(__name__)

STALE_S = 6 * 3600
POLL_S = 1.0


def owner(lock: Path) -> dict | None:
    try:
        return json.loads(Path(lock).read_text())
    except (OSError, ValueError):
        return None


def is_stale(lock: Path) -> bool:
    who = owner(lock)
    try:
        age = time.time() - Path(lock).stat().st_mtime
    except OSError:
        return False  # released meanwhile
    if age > STALE_S:
        return True
    if who is None:
        return age > 60  # a lock left half-written by a killed process
    if who.get("host") == socket.gethostname():
        try:
            return not process_alive(int(who["pid"]))
        except (ValueError, KeyError, TypeError):
            return False
    return False


def try_lock(lock) -> bool:
    """Take ``lock`` if it is free or stale; False while another live process holds it."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not is_stale(lock):
                return False
            log.warning("taking over the stale lock %s (%s)", lock, owner(lock))
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, fh)
        return True
    return False


def release(lock) -> None:
    Path(lock).unlink(missing_ok=True)


@contextmanager
def held(lock, what: str = ""):
    """Hold ``lock`` for the block, waiting (and saying so once) while another run holds it."""
    said = False
    while not try_lock(lock):
        if not said:
            log.info("waiting for another run that holds %s%s (%s)", lock, f" ({what})" if what else "", owner(lock))
            said = True
        time.sleep(POLL_S)
    try:
        yield
    finally:
        release(lock)
