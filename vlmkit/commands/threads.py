"""``--threads``: how many CPU threads torch uses, for every command that computes.

Without a cap torch starts one thread per core in every process, so two vlmkit processes on one
machine oversubscribe it and both slow down many times over. Each computing command (``eval``,
``demo``, ``train shapes``, ``train evaluate``) takes ``--threads N``. The default is this
process's share of the cores it may run on: an equal part under ``torchrun`` / ``accelerate
launch`` (``LOCAL_WORLD_SIZE`` processes on the machine), else ``OMP_NUM_THREADS`` when it is set,
else all of them. :func:`apply` sets it before
the command's first torch operation (``vlmkit.cli.main`` calls it), through ``torch.set_num_threads``
and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for libraries and subprocesses that read them.
"""

from __future__ import annotations

import argparse
import os

from vlmkit.errors import ConfigError


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default() -> int:
    """This process's share of :func:`cores`: ``cores // LOCAL_WORLD_SIZE`` (at least 1) under a
    launcher, else ``OMP_NUM_THREADS`` when set to a positive integer, else all of them."""
    processes = _positive(os.environ.get("LOCAL_WORLD_SIZE"))
    if processes is not None:
        return max(1, cores() // processes)
    return _positive(os.environ.get("OMP_NUM_THREADS")) or cores()


def _positive(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value >= 1 else None


def add_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads`` to a computing command's parser."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=f"CPU threads torch uses (default here: {default()}; under torchrun / accelerate launch the cores "
        "divided by the processes per machine, else $OMP_NUM_THREADS when set, else all cores)",
    )


def apply(threads: int | None) -> int:
    """Use ``threads`` CPU threads (:func:`default` when None) from now on; returns the number.

    Raises:
        ConfigError: ``threads`` is below 1.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads {threads!r} must be >= 1 (an integer; leave it out for {default()}).")
    count = default() if threads is None else threads
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(count)
    import torch

    torch.set_num_threads(count)
    return count
