"""The runtime context: rank, world, the rank's device, and the collectives; one object to pass around.

A thin layer over torch.distributed that works the same under ``torchrun``, ``accelerate launch`` and
SLURM ``srun`` (env:// rendezvous; under srun the SLURM_* variables are mapped onto
RANK/WORLD_SIZE/LOCAL_RANK). With no process group it is a one-process no-op, so library code never
branches on "am I distributed". Each CLI builds it once (``init_from_env``) and passes it down.

The one device rule of the project (``resolve_device``): ``auto`` is the rank's node-local GPU
(``cuda:LOCAL_RANK``) when torch sees one, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as given.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as tdist

from bench_suite import heartbeat
from bench_suite.errors import BadInputError, BenchError

log = logging.getLogger(__name__)


class RankFailedError(BenchError):
    """Another rank of the launch failed; this one stops too (the message names the rank and the error)."""


def collective_timeout() -> timedelta:
    """How long a collective waits for a lost rank before failing: $BENCH_SUITE_COLLECTIVE_TIMEOUT seconds,
    default 120 (a rank killed mid-run makes the others exit with an error instead of hanging)."""
    try:
        return timedelta(seconds=float(os.environ.get("BENCH_SUITE_COLLECTIVE_TIMEOUT", "120")))
    except ValueError as exc:
        raise BadInputError("BENCH_SUITE_COLLECTIVE_TIMEOUT must be a number of seconds") from exc


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec=None, *, what: str = "device") -> torch.device:
    """``auto``/None -> this rank's local GPU when there is one, else cpu; ``cpu`` / ``cuda`` / ``cuda:N`` as given.

    ``what`` names the option in the error (e.g. ``"kmeans: option device"``).
    """
    name = "auto" if spec is None else str(spec)
    if name == "auto":
        if not torch.cuda.is_available() or _launch_on_cpu:
            return torch.device("cpu")
        # one process per GPU: each rank takes its node-local GPU (all on cuda:0 would collide under NCCL)
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise BadInputError(f"{what}={name!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"{what}={name!r} but torch sees no CUDA GPU (use auto or cpu)")
    return dev


_CPU_GROUP = None  # a gloo group beside an NCCL one, for object collectives (created on first use)


@dataclass
class Runtime:
    """This process's place in the launch: rank, world size, its device, and the collectives."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: resolve_device("auto"))

    @classmethod
    def of_accelerator(cls, accelerator, *, distributed: bool = True) -> "Runtime":
        """The Runtime of an ``accelerate`` launch; ``distributed=False``: this process alone (a table cell)."""
        if not distributed:
            return cls(0, 1, accelerator.device)
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device)

    @property
    def active(self) -> bool:
        return self.world > 1 and tdist.is_available() and tdist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (sum/max/min); identity on one process. A CPU tensor under NCCL (which only
        takes GPU tensors) is reduced on this rank's device and copied back."""
        if self.active:
            red = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}[op]
            if tensor.device.type == "cpu" and tdist.get_backend() == "nccl":
                on_device = tensor.to(self.device)
                tdist.all_reduce(on_device, op=red)
                tensor.copy_(on_device.cpu())
            else:
                tdist.all_reduce(tensor, op=red)
        return tensor

    def _object_group(self):
        """Object collectives go over gloo (CPU), so large pickled payloads never pass through GPU memory."""
        global _CPU_GROUP
        if tdist.get_backend() == "gloo":
            return None
        if _CPU_GROUP is None:
            _CPU_GROUP = tdist.new_group(backend="gloo")
        return _CPU_GROUP

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj, group=self._object_group())
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src, group=self._object_group())
        return box[0]

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def on_main(self, fn):
        """Run ``fn()`` on rank 0 only and give every rank its result.

        For the methods that need the whole pool in one process. Whatever rank 0 raises, every rank raises
        too (a ``BenchError`` as it is; anything else as a ``RankFailedError`` naming it on the other ranks,
        while rank 0 raises the original), so no rank waits forever for a broadcast that never comes.
        """
        if not self.active:
            return fn()
        payload, failure = None, None
        if self.is_main:
            try:
                payload = ("ok", fn())
            except BenchError as exc:
                payload = ("error", exc)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks were told
                failure = exc
                payload = ("error", RankFailedError(f"rank 0 failed: {type(exc).__name__}: {exc}"))
        kind, value = self.broadcast_object(payload)
        if failure is not None:
            raise failure
        if kind == "error":
            raise value
        return value

    def shard(self, n: int) -> slice:
        """The contiguous rows [start, stop) of an N-row pool that this rank owns (sizes differ by <= 1)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


def current() -> Runtime:
    """The Runtime of the live process group, or a one-process Runtime."""
    if tdist.is_available() and tdist.is_initialized():
        return Runtime(tdist.get_rank(), tdist.get_world_size())
    return Runtime()


def _map_slurm_env() -> None:
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_PORT", "29512")
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = first_host(os.environ.get("SLURM_JOB_NODELIST", socket.gethostname()))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``n[1-2],m3`` -> ``n1``, ``gpu[007,009-010]`` -> ``gpu007``."""
    head = re.match(r"[^,\[]*(\[[^\]]*\])?", nodelist.strip()).group(0)
    if "[" not in head:
        return head
    prefix, ranges = head[:-1].split("[", 1)
    return prefix + ranges.split(",")[0].split("-")[0]


# set by make_accelerator when a launch has more processes on this node than GPUs: the whole launch, "auto"
# devices included, then runs on the CPU
_launch_on_cpu = False


def processor_name(device: torch.device | None = None) -> str:
    """The model of the processor that computes on ``device``: the GPU's name, else the CPU's (/proc/cpuinfo)."""
    import platform

    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def threads_told() -> int | None:
    """``BENCH_SUITE_THREADS`` (None: not set; 0: leave torch's setting), which wins over every thread rule."""
    want = os.environ.get("BENCH_SUITE_THREADS")
    return None if want is None else int(want)


def use_the_cpu_cores(on_cpu: bool | None = None) -> int:
    """Torch's CPU threads for this process; returns the count set (0: left as it was).

    ``accelerate launch`` exports OMP_NUM_THREADS=1 unless given ``--num_cpu_threads_per_process`` (its
    "values were not passed" warning says so), so the default run used one of a 2-core laptop's cores.
    On a machine without a GPU, under accelerate, each local process now takes cpu_count / local processes
    threads. ``BENCH_SUITE_THREADS=N`` sets N instead (0: leave torch's setting, OMP_NUM_THREADS).
    """
    if on_cpu is None:  # the launch runs on the CPU (make_accelerator says so; else: no GPU seen)
        on_cpu = not torch.cuda.is_available()
    told = threads_told()
    if told is not None:
        n = told
    elif not on_cpu or "ACCELERATE_MIXED_PRECISION" not in os.environ or os.environ.get("OMP_NUM_THREADS") != "1":
        n = 0
    else:
        n = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if n > 0 and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def make_accelerator():
    """The ``accelerate`` Accelerator of a launch, with the collective timeout. On the CPU when torch sees no
    GPU, or when the node runs more processes than it has GPUs (the shipped ``accelerate.yaml`` starts two, for
    a laptop's cores; a warning says how to use the GPU instead)."""
    global _launch_on_cpu
    from accelerate import Accelerator  # noqa: PLC0415 - accelerate is heavy; only the launches need it
    from accelerate.utils import InitProcessGroupKwargs  # noqa: PLC0415

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    on_cpu = gpus == 0 or here > gpus
    if gpus and on_cpu:
        _launch_on_cpu = True
        if local_rank() == 0:
            log.warning("%d processes on this node but %d GPU%s: running on the CPU (for the GPU, launch with "
                        "--num_processes %d)", here, gpus, "" if gpus == 1 else "s", gpus)
    use_the_cpu_cores(on_cpu)

    acc = Accelerator(cpu=on_cpu,
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout())])
    heartbeat.start()
    return acc


def init_from_env(backend: str | None = None) -> Runtime:
    """Join the process group that the launcher described in the environment (no-op for one process)."""
    _map_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not tdist.is_initialized():
        # BENCH_SUITE_DIST_BACKEND=gloo: several ranks on one GPU (NCCL refuses two ranks on one device)
        backend = backend or os.environ.get("BENCH_SUITE_DIST_BACKEND") or (
            "nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":  # NCCL needs each rank on its own GPU before the first collective
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        tdist.init_process_group(backend=backend, timeout=collective_timeout())
        # A gloo group still alive at interpreter exit aborts the process ("terminate called without an
        # active exception"), so whoever joins through here also leaves cleanly, even on an early return.
        # No barrier there: after an error on one rank, the others may never reach it.
        atexit.register(shutdown, barrier=False)
        heartbeat.start()
    return current()


def shutdown(barrier: bool = True) -> None:
    """Wait for every rank (unless told not to), then destroy the process group (idempotent; no-op alone)."""
    if tdist.is_available() and tdist.is_initialized():
        try:
            if barrier:
                tdist.barrier()
        finally:
            tdist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_process(code: int = 0) -> int:
    """End a CLI process that joined a process group: barrier, destroy the group, flush, then ``os._exit``.

    Why not a normal return: even after ``destroy_process_group()``, a gloo worker thread can still be dropping
    the last reference to a tensor of the final collective (which needs the GIL) while the interpreter
    finalises; Python then cancels that thread inside C++ and the process dies with "terminate called without
    an active exception" (SIGABRT, ~1 run in 10 on a loaded 2-core machine, seen under torchrun and
    mp.spawn). Everything this process had to write is written and flushed before, so skipping interpreter
    finalisation loses nothing. With no process group this just returns ``code``.
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        return code
    shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
