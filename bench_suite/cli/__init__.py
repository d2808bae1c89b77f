"""The command lines (orchestration): ``select``, ``features``, ``prepare_encoders``; and their shared
plumbing here: logging through rich, and bad input reported as one line (exit code 2)."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from pathlib import Path

from rich.logging import RichHandler

from bench_suite import heartbeat
from bench_suite.errors import BadInputError, BenchError


PROJECT_LOGGERS = ("bench_suite", "baselines", "launchers")


class _CurrentStderr(logging.StreamHandler):
    """A plain handler that writes to whatever ``sys.stderr`` is when it emits, not the one it was made with: a
    command line run in-process (tests capturing stderr) leaves no handler on a closed stream behind."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool = False) -> None:
    """The project's messages at INFO (DEBUG with ``verbose``); other libraries' only from WARNING up (faiss
    announces its AVX2 loader at INFO). In a terminal through rich; otherwise (a log file, a SLURM job) one
    plain line per message with its time, never wrapped, so paths stay whole."""
    if sys.stderr.isatty():
        from rich.console import Console

        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("PIL").setLevel(logging.INFO)  # its DEBUG is a line per PNG chunk and EXIF tag read


def main_guard(fn):
    """Run a CLI main; a BenchError becomes ``error: <message>`` on stderr and exit status 2. A collective that
    failed because another rank died becomes one line naming that rank, and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # one line, not a traceback; what finished is kept (extraction resumes)
            print("interrupted", file=sys.stderr, flush=True)
            # then die of SIGINT, as Python does: a shell loop around the command stops too (exit 130 would not)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            sys.exit(130)  # (where SIGINT cannot end the process)
        except RuntimeError as exc:  # gloo / NCCL report a dead peer as a RuntimeError naming an address
            diagnosis = heartbeat.describe_loss(exc)
            if diagnosis is None:
                raise
            print(f"error: {diagnosis}", file=sys.stderr, flush=True)
            os._exit(1)  # not sys.exit: tearing down a process group with a dead peer can hang

    return wrapper


def parse_sources(specs: list[str]) -> dict[str, Path]:
    """``--source DATASET=PATH`` flags -> {dataset: path} (``~`` expanded); a flag without ``=`` is one line."""
    sources = {}
    for spec in specs:
        if "=" not in spec:
            raise BadInputError(f"--source expects DATASET=PATH, got {spec!r}")
        name, path = spec.split("=", 1)
        sources[name] = Path(path).expanduser()
    return sources
