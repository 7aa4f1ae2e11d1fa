"""The files of one eval run directory, written so that a killed run loses nothing and repeats nothing.

Layout of ``RUN_DIR``:

* ``config.json``: the fully resolved run config (model and weight hash, methods with all
  parameters, decoding, seed, versions, data hash and sample ids). Written once, atomically; a
  resumed run must match it (see :func:`config_differences`).
* ``shards/shard-<rank>-of-<n>.jsonl``: one JSON line per finished sample, appended by process
  ``rank`` of ``n`` and flushed + fsynced after every batch. A line torn by a kill is cut off before
  the next append.
* ``samples.jsonl``: every sample row, in benchmark order, merged from the shards by process 0
  (temporary file + rename).
* ``scores.json``: config, scores and summaries (temporary file + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError, DatasetError

CONFIG = "config.json"
SAMPLES = "samples.jsonl"
SCORES = "scores.json"
SHARDS = "shards"

LOCATION_FIELDS = ("data.paths", "data.info", "model.path")
"""Config fields that say *where* things are, not *what* they are: a resumed run may differ there
(data or weights moved) as long as their hashes agree."""


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON through a temporary file and a rename.

    Args:
        path: Destination; replaced only once the new content is complete on disk.
        payload: JSON-serialisable data.
    """
    write_text_atomic(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsync, then rename."""
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


def check_or_write_config(run_dir: Path, config: Mapping[str, Any]) -> bool:
    """Record ``config`` in a new run directory, or check it against the recorded one.

    Args:
        run_dir: The run directory (created when missing).
        config: The resolved config of this command.

    Returns:
        True when the directory already held a run (this command resumes it).

    Raises:
        ConfigError: The recorded config differs; the message lists each differing field.
    """
    path = run_dir / CONFIG
    if not path.exists():
        write_json_atomic(path, config)
        return False
    differences = config_differences(read_json(path, "run config"), config)
    if differences:
        raise ConfigError(
            f"cannot resume into {run_dir}: it was started with a different config. Differing fields: "
            + "; ".join(differences)
            + ". Rerun with the recorded settings to resume, or pass a new --out directory for the new settings."
        )
    return True


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
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        _cut_torn_line(path)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        if created:
            _fsync_dir(path.parent)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append ``rows`` (one batch) in one write, then flush and fsync."""
        self._file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file."""
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


def merge_shards(run_dir: Path, sample_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Write ``samples.jsonl``: one row per sample id, in the order given, from all shard files.

    Args:
        run_dir: The run directory.
        sample_ids: The run's sample ids in benchmark order.

    Returns:
        The merged rows.

    Raises:
        DatasetError: Some samples have no row yet (the run is unfinished).
    """
    by_id: dict[str, dict[str, Any]] = {}
    for row in shard_rows(run_dir):
        by_id.setdefault(row["sample_id"], row)
    missing = [sample_id for sample_id in sample_ids if sample_id not in by_id]
    if missing:
        raise DatasetError(
            f"{run_dir} has no result yet for {len(missing)} of {len(sample_ids)} samples (e.g. {missing[:3]}); "
            "rerun the same `vlmkit eval` command to finish the run."
        )
    rows = [by_id[sample_id] for sample_id in sample_ids]
    write_text_atomic(run_dir / SAMPLES, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return rows


def finished_ids(run_dir: Path) -> set[str]:
    """Ids of the samples that already have a row in some shard file."""
    return {row["sample_id"] for row in shard_rows(run_dir)}


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
