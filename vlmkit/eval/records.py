"""The files of one eval run directory, written so that a killed run loses nothing and repeats nothing.

Layout of ``RUN_DIR``:

* ``config.json``: the fully resolved run config (model and weight hash, methods with all
  parameters, decoding, seed, versions, data hash and sample ids, a short hash per media file).
  Written once, atomically; a resumed run must match it (see :func:`config_differences`), except
  that ``--rerun-errors`` accepts changed media files whose samples only have error rows (a fixed
  corrupt image) and records the new hashes.
* ``shards/shard-<rank>-of-<n>.jsonl``: one JSON line per finished sample, appended by process
  ``rank`` of ``n`` and flushed + fsynced after every batch. A line torn by a kill is cut off before
  the next append.
* ``samples.jsonl``: every sample row, in benchmark order, merged from the shards by process 0
  (temporary file + rename).
* ``scores.json``: config, scores and summaries (temporary file + rename).
* ``.lock``: held (``flock``) by the process that writes the run, so a second ``vlmkit eval`` or
  ``vlmkit score`` on the same folder stops at once with the holder's pid (see :func:`lock`). The
  operating system releases it when that process ends, however it ends.

A sample with several rows (an error row, then the row of ``--rerun-errors``) counts by its first
row without an error, else its first row.

Write failures (a read-only folder, a full disk) raise ``OSError`` naming the file; rows already
written stay, so the same command resumes once the disk is fixed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError, ConflictError, DatasetError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not locked there
    fcntl = None

CONFIG = "config.json"
SAMPLES = "samples.jsonl"
SCORES = "scores.json"
SHARDS = "shards"
LOCK = ".lock"

LOCATION_FIELDS = ("data.paths", "data.info", "model.path", "data.files")
"""Config fields a resumed run may differ in: where things are, not what they are (data or weights
moved, as long as their hashes agree), and the per-file hashes, which ``data.hash`` covers and
which only serve to name the files behind a changed ``data.hash``."""


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON through a temporary file and a rename.

    Args:
        path: Destination; replaced only once the new content is complete on disk.
        payload: JSON-serialisable data.
    """
    write_text_atomic(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsync, then rename."""
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def read_json(path: Path, what: str) -> Any:
    """Read a run file, raising DatasetError (naming the file and the fix) when absent or malformed."""
    if not path.is_file():
        raise DatasetError(
            f"{what} {path} does not exist; is this a vlmkit eval run directory (run `vlmkit eval` first)?"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DatasetError(f"{what} {path} is not valid JSON ({error}); delete it and rerun `vlmkit eval`.") from None


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Describe every field where two run configs disagree, ignoring :data:`LOCATION_FIELDS`.

    Args:
        recorded: The config in ``RUN_DIR/config.json``.
        current: The config of the command being run.

    Returns:
        One ``"<dotted.field>: <recorded> (recorded) vs <current> (now)"`` string per difference,
        sorted by field; empty when the configs match.
    """
    old, new = _flatten(recorded), _flatten(current)
    differences = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == field or key.startswith(field + ".") for field in LOCATION_FIELDS):
            continue
        if old.get(key, _MISSING) != new.get(key, _MISSING):
            differences.append(
                f"{key}: {_short(old.get(key, _MISSING))} (recorded) vs {_short(new.get(key, _MISSING))} (now)"
            )
    return differences


def check_or_write_config(
    run_dir: Path,
    config: Mapping[str, Any],
    media: Mapping[str, Sequence[str]] | None = None,
    rerun_errors: bool = False,
) -> bool:
    """Record ``config`` in a new run directory, or check it against the recorded one.

    Args:
        run_dir: The run directory (created when missing).
        config: The resolved config of this command.
        media: Sample id -> the media files it reads (names as in ``config["data"]["files"]``), to
            tell which samples a changed file touches.
        rerun_errors: Accept changed media files when every sample that reads them has no row or
            only error rows (they rerun); the new hashes are recorded.

    Returns:
        True when the directory already held a run (this command resumes it).

    Raises:
        ConfigError: The recorded config differs; the message lists each differing field and, when
            the data changed, the files whose content changed.
    """
    path = run_dir / CONFIG
    if not path.exists():
        write_json_atomic(path, config)
        return False
    recorded = read_json(path, "run config")
    differences = config_differences(recorded, config)
    if not differences:
        return True
    changed = changed_files(recorded, config)
    if [line.split(":", 1)[0] for line in differences] == ["data.hash"] and changed and rerun_errors:
        readers = [sample for sample, names in (media or {}).items() if changed.intersection(names)]
        rows = latest_rows(run_dir)
        kept = [sample for sample in readers if sample in rows and rows[sample].get("error") is None]
        if not kept:
            write_json_atomic(path, config)
            return True
        raise ConfigError(
            f"cannot resume into {run_dir}: {_listed(sorted(changed))} changed since the run started, and "
            f"{len(kept)} sample(s) read them without an error ({_listed(kept)}); their results came from the old "
            "files. Pass a new --out directory to run everything on the new files."
        )
    hint = ""
    if changed:
        hint = (
            f" Files whose content changed since the run started: {_listed(sorted(changed))}. If you fixed files that "
            "had failed to load, rerun with --rerun-errors to redo their samples."
        )
    elif any(line.startswith("data.hash:") for line in differences) and "files" not in recorded.get("data", {}):
        hint = " (This run predates per-file hashes, so the changed files cannot be named.)"
    raise ConfigError(
        f"cannot resume into {run_dir}: it was started with a different config. Differing fields: "
        + "; ".join(differences)
        + "."
        + hint
        + " Rerun with the recorded settings to resume, or pass a new --out directory for the new settings."
    )


def changed_files(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> set[str]:
    """Media files (as ``data.files`` names them) whose hash differs between two run configs, or that only one has."""
    old = recorded.get("data", {}).get("files")
    new = current.get("data", {}).get("files")
    if old is None or new is None:
        return set()
    return {name for name in old.keys() | new.keys() if old.get(name) != new.get(name)}


def _listed(names: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the block; another process holding it is an error.

    The lock is an ``flock`` on ``RUN_DIR/.lock`` (created with the folder), released when the
    block ends or the process dies. Under ``torchrun`` only process 0 takes it.

    Raises:
        ConflictError: Another process holds the lock; the message names its pid.
        OSError: The folder or the lock file cannot be created (naming the path).
    """
    if fcntl is None:
        yield
        return
    path = run_dir / LOCK
    with _naming(path):
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ConflictError(
                f"{run_dir} is in use by another vlmkit process (pid {holder}); wait for it to finish (rerunning "
                "then resumes or rescores), or pass another --out."
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(handle)


def shard_path(run_dir: Path, rank: int, world_size: int) -> Path:
    """Where process ``rank`` of ``world_size`` appends its rows."""
    return run_dir / SHARDS / f"shard-{rank:05d}-of-{world_size:05d}.jsonl"


class ShardWriter:
    """Appends sample rows to one shard file; every :meth:`write` is flushed and fsynced.

    A line left incomplete by a killed process (no trailing newline) is cut off on opening, so the
    next append starts a clean line.

    Args:
        path: The shard file (created with its folder when missing).
    """

    def __init__(self, path: Path):
        self.path = path
        with _naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            created = not path.exists()
            _cut_torn_line(path)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            if created:
                _fsync_dir(path.parent)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append ``rows`` (one batch) in one write, then flush and fsync.

        Raises:
            OSError: The write failed (e.g. the disk is full), naming the shard file; a partial line
                is cut off when the run resumes.
        """
        with _naming(self.path):
            self._file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file."""
        with _naming(self.path):
            self._file.close()


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a shard or ``samples.jsonl``; a torn last line (killed mid-write) is skipped.

    Raises:
        DatasetError: A line other than the last one is not JSON (the file was damaged otherwise).
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:
            if number == len(lines):  # no newline after it: a write cut short
                continue
            raise DatasetError(
                f"{path}:{number} is not a JSON line; the file was damaged. Delete that line (the sample reruns) "
                "and rerun the same `vlmkit eval` command."
            ) from None


def shard_rows(run_dir: Path) -> Iterator[dict[str, Any]]:
    """Rows of every shard file in ``run_dir`` (any process count), file by file."""
    for path in sorted((run_dir / SHARDS).glob("shard-*.jsonl")):
        yield from read_rows(path)


def latest_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each sample's row from all shard files: its first row without an error, else its first row."""
    by_id: dict[str, dict[str, Any]] = {}
    for row in shard_rows(run_dir):
        kept = by_id.get(row["sample_id"])
        if kept is None or (kept.get("error") is not None and row.get("error") is None):
            by_id[row["sample_id"]] = row
    return by_id


def merge_shards(run_dir: Path, sample_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Write ``samples.jsonl``: one row per sample id, in the order given, from all shard files.

    Args:
        run_dir: The run directory.
        sample_ids: The run's sample ids in benchmark order.

    Returns:
        The merged rows (see :func:`latest_rows` for samples with several rows).

    Raises:
        DatasetError: Some samples have no row yet (the run is unfinished).
    """
    by_id = latest_rows(run_dir)
    missing = [sample_id for sample_id in sample_ids if sample_id not in by_id]
    if missing:
        raise DatasetError(
            f"{run_dir} has no result yet for {len(missing)} of {len(sample_ids)} samples (e.g. {missing[:3]}); "
            "rerun the same `vlmkit eval` command to finish the run."
        )
    rows = [by_id[sample_id] for sample_id in sample_ids]
    write_text_atomic(run_dir / SAMPLES, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return rows


def finished_ids(run_dir: Path, rerun_errors: bool = False) -> set[str]:
    """Ids of the samples that already have a row in some shard file (with ``rerun_errors``: a row without an error)."""
    return {
        sample_id
        for sample_id, row in latest_rows(run_dir).items()
        if not (rerun_errors and row.get("error") is not None)
    }


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Give an OSError raised in the block the file name it lacks (writes and fsyncs on open files)."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or isinstance(error, DatasetError):
            raise
        raise type(error)(error.errno, error.strerror or str(error), str(path)) from error


_MISSING = object()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    return {prefix: value}


def _short(value: Any, limit: int = 80) -> str:
    if value is _MISSING:
        return "(absent)"
    text = json.dumps(value) if isinstance(value, (list, tuple)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cut_torn_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as file:
        data = file.read()
        if data.endswith(b"\n"):
            return
        file.truncate(data.rfind(b"\n") + 1)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
