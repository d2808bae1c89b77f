"""One exception type per kind of bad input, so CLIs can print a clean one-line error."""


class BenchError(Exception):
    """Base class: the message is a single line naming the problem and the fix."""


class BadInputError(BenchError, ValueError):
    """Arguments or data that cannot be used as given (shapes, NaN, budget, ...)."""


class MissingDataError(BenchError, FileNotFoundError):
    """A dataset, shard, store or weight file is missing; the message says how to get it."""


class UnknownNameError(BenchError, KeyError):
    """An unknown method / dataset / encoder / recipe / profile name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CorruptDataError(BenchError, ValueError):
    """A file exists but its content is damaged (bad shard, checksum mismatch)."""


def unknown(kind: str, name: str, known) -> UnknownNameError:
    return UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
