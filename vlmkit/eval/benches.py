"""What the runner needs to know per benchmark: where its files are, how to hash them, how to score rows.

``--bench`` is one of :data:`BENCHES`. Each reads the official layout through
:mod:`vlmkit.eval.datasets`; the folders below are found inside ``--data`` unless given explicitly:

* ``pope``: ``--data`` is a question file, a folder of ``*pope*.json`` files, or lmms-eval parquet;
  images in ``--media`` or else ``<data>/images`` or ``<data>/val2014`` (for a file: beside it).
  ``--split`` picks splits. Scored per split with :func:`vlmkit.eval.pope.score_splits`.
* ``chair``: images in ``--media`` or ``<data>/val2014`` or ``<data>/images``; ground truth in
  ``--annotations`` or ``<data>/annotations`` (the four COCO files, or a
  :meth:`~vlmkit.eval.chair.Chair.save_ground_truth` file); a synonym table in ``--synonyms`` or
  ``<data>/synonyms.txt`` when present (else COCO's). ``--num-images`` (500) images are drawn with
  ``--data-seed`` (42). Scored with :class:`vlmkit.eval.chair.Chair`.
* ``mme``: ``--data`` is the release folder; ``--split`` picks subtasks (default: those present).
  Scored with :func:`vlmkit.eval.mme.score`.
* ``video``: ``--video-format`` (default: from the layout) is ``mvbench`` (``<data>/json/*.json`` +
  ``<data>/video/``, and ``<data>/data_list.json`` for a task set other than MVBench's 20, as the
  shapes world writes; ``--split`` picks tasks), ``videomme`` (``--data`` is the annotation file, or a
  folder holding one ``*.json``/``*.parquet``; videos in ``--media`` or ``<data>/videos``; ``--split``
  picks durations) or ``egoschema`` (``<data>/questions.json``, optional
  ``<data>/subset_answers.json``, videos in ``--media`` or ``<data>/videos``). Scored with
  :func:`vlmkit.eval.video.score` in the matching style.

The data hash (:func:`data_hash`) covers every sample's id, prompt, target and metadata, and the bytes
of every image; videos count by file name and size (hashing hours of video at every start would
cost more than it protects).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError, DatasetError, did_you_mean
from vlmkit.eval import datasets
from vlmkit.eval.media import FrameFolder, ImageBytes, ImageFile, VideoFile

BENCHES = ("pope", "chair", "mme", "video")
VIDEO_FORMATS = ("mvbench", "videomme", "egoschema")
STYLES = {"pope": ("llava", "opera", "vcd", "lmms_eval"), "mme": ("official", "lmms_eval"), "chair": (), "video": ()}
DEFAULT_STYLE = {"pope": "llava", "mme": "official"}
DEFAULT_MAX_NEW_TOKENS = {"pope": 16, "chair": 512, "mme": 16, "video": 16}
"""Per benchmark when no ``--max-new-tokens`` is given: short answers get 16 tokens (lmms-eval's MME
setting; enough for "Yes"/"No"/a letter and an end token), CHAIR captions 512 (OPERA's setting)."""

PRIMARY = {"pope": ("f1", True), "chair": ("CHAIRs", False), "mme": ("perception", True), "video": ("accuracy", True)}
"""The headline metric per benchmark (plotted by ``vlmkit report``) and whether higher is better."""


@dataclass(frozen=True)
class DataOptions:
    """Where a benchmark's files are and which part of it to run.

    Attributes:
        path: ``--data``.
        media: Image or video folder, when not in the default place.
        annotations: CHAIR ground truth (COCO annotation folder or ground-truth file).
        synonyms: CHAIR synonym table file.
        splits: POPE splits, MME subtasks, MVBench tasks or Video-MME durations; None for all.
        num_images: CHAIR: images to draw.
        data_seed: CHAIR: seed of the draw.
        num_frames: Video: frames per video (default: the loader's, 16 for MVBench, 32 otherwise).
        video_format: Video: one of :data:`VIDEO_FORMATS`, or None to tell from the layout.
    """

    path: str
    media: str | None = None
    annotations: str | None = None
    synonyms: str | None = None
    splits: tuple[str, ...] | None = None
    num_images: int = 500
    data_seed: int = 42
    num_frames: int | None = None
    video_format: str | None = None


def check_bench(bench: str) -> str:
    """Return ``bench`` if known, else raise ConfigError listing the benchmarks."""
    if bench not in BENCHES:
        raise ConfigError(
            f"--bench {bench!r} is not supported; choose one of {', '.join(BENCHES)}.{did_you_mean(bench, BENCHES)}"
        )
    return bench


def load(bench: str, options: DataOptions) -> tuple[datasets.Benchmark, dict[str, Any], dict[str, Any]]:
    """Load a benchmark from its official layout.

    Args:
        bench: One of :data:`BENCHES`.
        options: Where the files are (see the module docstring for the defaults).

    Returns:
        ``(benchmark, paths, choices)``: the resolved absolute paths (where the files are), and the
        choices that select samples (splits, CHAIR draw, frames, video format). The run config
        records both; scoring reads them back.

    Raises:
        ConfigError: Unknown benchmark or video format.
        DatasetError: Files missing or malformed (from the loaders).
    """
    check_bench(bench)
    root = Path(options.path).expanduser().resolve()
    if not root.exists():
        raise DatasetError(f"--data {options.path} does not exist; point it at the {bench} benchmark files.")
    media = Path(options.media).expanduser().resolve() if options.media else None
    splits = list(options.splits) if options.splits else None
    paths: dict[str, Any] = {"data": str(root)}
    choices: dict[str, Any] = {"splits": splits}
    if bench == "pope":
        parquet = root.suffix == ".parquet" or (root.is_dir() and any(root.rglob("*.parquet")))
        images = None if parquet else media or _first_dir(root if root.is_dir() else root.parent, ("images", "val2014"))
        benchmark = datasets.load_pope(root, images, splits=splits)
        paths["media"] = str(images) if images else None
    elif bench == "chair":
        images = media or _first_dir(root, ("val2014", "images")) or root
        truth = Path(options.annotations).expanduser().resolve() if options.annotations else root / "annotations"
        synonyms = options.synonyms or (root / "synonyms.txt" if (root / "synonyms.txt").is_file() else None)
        benchmark = datasets.load_chair(images, truth, num_images=options.num_images, seed=options.data_seed)
        paths.update(
            media=str(images), annotations=str(truth), synonyms=str(Path(synonyms).resolve()) if synonyms else None
        )
        choices.update(num_images=options.num_images, data_seed=options.data_seed)
    elif bench == "mme":
        benchmark = datasets.load_mme(root, subtasks=splits or _mme_subtasks(root))
    else:
        benchmark = _load_video(root, media, splits, options, paths, choices)
    return benchmark, paths, choices


def _load_video(
    root: Path, media: Path | None, splits: list[str] | None, options: DataOptions, paths: dict, choices: dict
) -> datasets.Benchmark:
    kind = options.video_format or _video_format(root)
    if kind not in VIDEO_FORMATS:
        raise ConfigError(
            f"--video-format {kind!r} is not supported; choose one of {', '.join(VIDEO_FORMATS)}."
            + did_you_mean(kind, VIDEO_FORMATS)
        )
    frames = {} if options.num_frames is None else {"num_frames": options.num_frames}
    choices.update(format=kind, num_frames=options.num_frames)
    if kind == "mvbench":
        tasks = splits or sorted(p.stem for p in (root / "json").glob("*.json"))
        listed = root / "data_list.json"
        if listed.is_file():
            paths["data_list"] = str(listed)
            data_list = json.loads(listed.read_text(encoding="utf-8"))
            return datasets.load_mvbench(root, tasks=tasks, data_list=data_list, **frames)
        return datasets.load_mvbench(root, tasks=tasks, **frames)
    videos = media or _first_dir(root if root.is_dir() else root.parent, ("videos", "video", "data"))
    if videos is None:
        raise DatasetError(f"{kind}: no video folder found beside {root} (videos/, video/ or data/); pass --media.")
    paths["media"] = str(videos)
    if kind == "videomme":
        annotations = root if root.is_file() else _single(root, ("*.json", "*.parquet"), "Video-MME annotation")
        paths["annotations"] = str(annotations)
        return datasets.load_videomme(annotations, videos, durations=splits, **frames)
    folder = root if root.is_dir() else root.parent
    answers = folder / "subset_answers.json"
    paths["answers"] = str(answers) if answers.is_file() else None
    return datasets.load_egoschema(
        folder / "questions.json", videos, answers=answers if answers.is_file() else None, **frames
    )


def _mme_subtasks(root: Path) -> list[str] | None:
    """The subtasks present in an MME folder (in the official order); None lets the loader explain."""
    from vlmkit.eval.mme import SUBTASKS

    for folder in (
        root,
        root / "MME_Benchmark_release_version",
        root / "MME_Benchmark",
        root / "MME_Benchmark_release_version" / "MME_Benchmark",
    ):
        present = [name for name in SUBTASKS if (folder / name).is_dir()]
        if present:
            return present
    return None


def _video_format(root: Path) -> str:
    if (root / "json").is_dir():
        return "mvbench"
    if (root / "questions.json").is_file():
        return "egoschema"
    if root.is_file() or any(root.glob("*.json")) or any(root.glob("*.parquet")):
        return "videomme"
    raise DatasetError(
        f"cannot tell the video benchmark in {root}: expected json/ (MVBench), questions.json (EgoSchema) or a "
        "Video-MME annotation file; pass --video-format."
    )


def _first_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / name for name in names if (root / name).is_dir()), None)


def _single(root: Path, patterns: Sequence[str], what: str) -> Path:
    found = sorted(path for pattern in patterns for path in root.glob(pattern))
    if len(found) != 1:
        raise DatasetError(
            f"expected exactly one {what} file ({', '.join(patterns)}) in {root}, found {len(found)}; "
            "pass the file itself as --data."
        )
    return found[0]


def data_hash(samples: Sequence[datasets.Sample]) -> str:
    """SHA-256 over the samples' ids, prompts, targets, metadata and media (see the module docstring)."""
    digest = hashlib.sha256()
    for sample in samples:
        fields = {
            "id": sample.sample_id,
            "prompt": sample.prompt,
            "target": sample.target,
            "prefix": sample.answer_prefix,
            "metadata": dict(sample.metadata),
        }
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
        for ref in sample.media:
            digest.update(_media_fingerprint(ref))
    return digest.hexdigest()


def _media_fingerprint(ref: Any) -> bytes:
    if isinstance(ref, ImageFile):
        try:
            return hashlib.sha256(Path(ref.path).read_bytes()).digest()
        except OSError:
            return f"missing:{Path(ref.path).name}".encode()
    if isinstance(ref, ImageBytes):
        return hashlib.sha256(ref.data).digest()
    if isinstance(ref, VideoFile):
        size = os.path.getsize(ref.path) if os.path.exists(ref.path) else -1
        return json.dumps([Path(ref.path).name, size, ref.num_frames, ref.sampling, ref.bound]).encode()
    if isinstance(ref, FrameFolder):
        names = sorted(os.listdir(ref.path)) if os.path.isdir(ref.path) else []
        return json.dumps([Path(ref.path).name, names, ref.num_frames, ref.bound, ref.fps]).encode()
    raise TypeError(f"unknown media reference {type(ref).__name__}")


def check_style(bench: str, style: str | None) -> str | None:
    """The scoring style for ``bench``: ``style`` if valid, the default when None.

    Raises:
        ConfigError: The benchmark has no such style (or no styles at all).
    """
    if style is None:
        return DEFAULT_STYLE.get(bench)
    allowed = STYLES[bench]
    if style not in allowed:
        what = f"one of {', '.join(allowed)}" if allowed else "none (its parser is fixed; video follows its format)"
        raise ConfigError(
            f"--style {style!r} is not a {bench} scoring style; allowed: {what}.{did_you_mean(style, allowed)}"
        )
    return style


def score(
    bench: str, rows: Sequence[Mapping[str, Any]], data: Mapping[str, Any], style: str | None = None
) -> dict[str, Any]:
    """Score a run's sample rows with the benchmark's reference-exact scorer.

    Rows with an ``error`` (media that failed to load) are left out; a warning says how many.

    Args:
        bench: One of :data:`BENCHES`.
        rows: Sample rows in benchmark order (``response``, ``metadata``, ``error``).
        data: The ``data`` section of the run config (resolved paths, video format).
        style: Scoring style (POPE parser or MME parser); None for the default.

    Returns:
        ``{"metrics": {name: value}, "details": <the scorer's full result>, "style", "warnings"}``;
        ``metrics`` holds the headline numbers the report shows.
    """
    style = check_style(bench, style)
    good = [row for row in rows if row.get("error") is None]
    warnings = []
    if len(good) < len(rows):
        warnings.append(
            f"{len(rows) - len(good)} of {len(rows)} samples failed (error rows) and are left out of the scores"
        )
    if not good:
        return {"metrics": {}, "details": {}, "style": style, "warnings": warnings + ["no sample to score"]}
    scorer = {"pope": _score_pope, "chair": _score_chair, "mme": _score_mme, "video": _score_video}[bench]
    metrics, details = scorer(good, data, style, warnings)
    return {"metrics": metrics, "details": details, "style": style, "warnings": warnings + details.get("warnings", [])}


def _score_pope(rows, data, style, warnings):
    from vlmkit.eval import pope

    splits: dict[str, tuple[list[str], list[str]]] = {}
    for row in rows:
        answers, labels = splits.setdefault(row["metadata"]["split"], ([], []))
        answers.append(row["response"])
        labels.append(row["metadata"]["label"])
    details = pope.score_splits(splits, style)
    per_split = details["splits"].values()
    metrics = {
        "f1": details["mean_f1"],
        "accuracy": details["mean_accuracy"],
        "precision": sum(s["precision"] for s in per_split) / len(per_split),
        "recall": sum(s["recall"] for s in per_split) / len(per_split),
        "yes_ratio": sum(s["yes_ratio"] for s in per_split) / len(per_split),
    }
    return metrics, details


def _score_chair(rows, data, style, warnings):
    from vlmkit.eval.chair import Chair

    truth = Path(data["annotations"])
    image_ids = [row["metadata"]["image_id"] for row in rows]
    if truth.is_dir():
        chair = Chair.from_coco(truth, image_ids=image_ids, synonyms=_synonyms(data))
    else:
        chair = Chair.from_ground_truth(truth, synonyms=_synonyms(data))
    details = chair.score([{"image_id": row["metadata"]["image_id"], "caption": row["response"]} for row in rows])
    details.pop("sentences", None)  # per-caption details are in samples.jsonl already
    return dict(details["overall"]), details


def _synonyms(data: Mapping[str, Any]) -> Path | None:
    return Path(data["synonyms"]) if data.get("synonyms") else None


def _score_mme(rows, data, style, warnings):
    from vlmkit.eval import mme

    by_image: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        meta = row["metadata"]
        by_image.setdefault((meta["subtask"], meta["image"]), []).append(
            {"image": meta["image"], "question": meta["question"], "gt": meta["gt"], "response": row["response"]}
        )
    results: dict[str, list[dict[str, str]]] = {}
    incomplete = 0
    for (subtask, _), records in by_image.items():
        if len(records) == 2:
            results.setdefault(subtask, []).extend(records)
        else:
            incomplete += 1
    if incomplete:
        warnings.append(f"{incomplete} MME images have only one scored question (--limit or an error) and are left out")
    if not results:
        return {}, {"warnings": ["no MME image with both questions answered"]}
    details = mme.score(results, style)
    return {"perception": details["perception"], "cognition": details["cognition"], "total": details["total"]}, details


_VIDEO_GROUPS = {
    "mvbench": ("task_type",),
    "videomme": ("duration", "domain", "sub_category", "task_type"),
    "egoschema": (),
}


def _score_video(rows, data, style, warnings):
    from vlmkit.eval import video

    kind = data["format"]
    answered = [row for row in rows if row["metadata"].get("answer") is not None]
    if len(answered) < len(rows):
        warnings.append(
            f"{len(rows) - len(answered)} video questions have no answer key (EgoSchema full set) and are not scored"
        )
    if not answered:
        return {}, {}
    records = [{**row["metadata"], "response": row["response"]} for row in answered]
    details = video.score(records, kind, group_by=_VIDEO_GROUPS[kind])
    return {"accuracy": details["accuracy"]}, details
