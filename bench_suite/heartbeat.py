"""Which ranks of a launch are still alive: a counter per rank in the process group's store.

When a rank dies (SIGKILL, OOM, a lost node), the others see it only as a failed collective with a
transport message ("Connection reset by peer", a timeout) that names an address, not a rank. Each rank
therefore bumps a counter in the rendezvous store every ``INTERVAL_S`` from a daemon thread; after a failed
collective, ``lost_ranks`` watches the counters for a few intervals and names the ranks whose counter
stopped. Counters, not timestamps, so clock skew between nodes does not matter.
"""

from __future__ import annotations

import threading
import time

import torch.distributed as tdist

INTERVAL_S = 1.0
KEY = "bench_suite/alive/{}"
_started: set = set()  # the stores this process beats into (one per process group)


def _store():
    """The rendezvous store itself (the group's store is a PrefixStore over it), so that the keys have the
    same names for every group and for an outside observer (the tests, an operator)."""
    store = tdist.distributed_c10d._get_default_store()
    while isinstance(store, tdist.PrefixStore):
        store = store.underlying_store
    return store


def start() -> None:
    """Start this rank's heartbeat (idempotent; a no-op without a process group)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    store, rank = _store(), tdist.get_rank()
    if id(store) in _started:
        return
    _started.add(id(store))

    def beat():
        n = 0
        while True:
            n += 1
            try:
                store.set(KEY.format(rank), str(n))
            except Exception:  # noqa: BLE001 - the store is gone (group destroyed, or its host died): stop
                return
            time.sleep(INTERVAL_S)

    threading.Thread(target=beat, name="bench_suite-heartbeat", daemon=True).start()


def lost_ranks(watch_s: float = 3 * INTERVAL_S) -> list[int] | None:
    """The ranks whose heartbeat stopped ([] when all beat, or without a process group); None when the store
    itself cannot be reached (it lives on rank 0's node, or with the launcher's agent)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return []
    world = tdist.get_world_size()
    try:
        store = _store()
        keys = [KEY.format(r) for r in range(world)]

        def counters():
            return [int(store.get(k)) if store.check([k]) else 0 for k in keys]

        before = counters()
        time.sleep(watch_s)
        after = counters()
    except Exception:  # noqa: BLE001 - any store failure means the store is unreachable
        return None
    return [r for r in range(world) if after[r] == before[r]]


def describe_loss(exc: BaseException) -> str | None:
    """A one-line diagnosis when ``exc`` (a failed collective) came from a lost rank; None if every rank lives."""
    lost = lost_ranks()
    if lost == []:
        return None
    me = f"rank {tdist.get_rank()} of {tdist.get_world_size()}"
    if lost is None:
        who = "the rendezvous store stopped answering (rank 0's node or the launcher is gone)"
    else:
        who = f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} stopped (killed or crashed)"
    return (f"{who}; {me} stops too ({type(exc).__name__} in a collective). Rerun the same command: "
            "finished work (shards, features, cells, checkpoints) is kept")
