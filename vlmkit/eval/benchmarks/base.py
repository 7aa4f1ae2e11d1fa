"""What every benchmark module builds on: the :class:`Benchmark` object, the samples its loader returns, the data hash.

A benchmark is one module under ``vlmkit/eval/benchmarks/`` holding its reference-exact scorer,
its loader, its default prompts and one :class:`Benchmark` object, ``BENCHMARK``, that ties them
together for ``vlmkit eval`` (see :mod:`vlmkit.eval.benchmarks`). This module holds the parts they
share:

* :class:`Prompt`: a prompt template and the codebase it comes from;
* :class:`Sample` and :class:`SampleSet`: what a loader returns, media read lazily;
* :class:`DataOptions`: where a benchmark's files are (``--data``, ``--media``, ...);
* :class:`Benchmark`: the registered object;
* :func:`fingerprint`: the data hash a run records, and one hash per media file;
* the checks loaders share (missing files listed, duplicate ids, required fields).

Every loader checks the layout before returning and raises :class:`~vlmkit.errors.DatasetError`
listing exactly what is missing. Media are read only when :meth:`Sample.load_media` is called, so a
corrupt file raises :class:`~vlmkit.errors.InputError` naming it for that one sample, and a runner
can record an error row and go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from vlmkit.errors import ConfigError, DatasetError, did_you_mean
from vlmkit.eval.media import FrameFolder, ImageBytes, ImageFile, VideoFile

Media = ImageFile | ImageBytes | VideoFile | FrameFolder
MEDIA_KINDS = ("image", "video")
VIDEO_MODELS = (
    "LLaVA-OneVision (shapes-video, tiny:llava_onevision), Qwen2-VL (tiny:qwen2_vl) and Qwen2.5-VL (tiny:qwen2_5_vl)"
)
"""The model families whose processors read videos, for messages."""
_SHOWN = 10


@dataclass(frozen=True)
class Prompt:
    """A prompt template and where it comes from.

    Templates are plain ``str.format`` strings: ``{question}`` is the benchmark's question,
    ``{options}`` the options one per line, already lettered as the benchmark letters them. The
    model's chat template is the runner's business, not these strings'.

    Attributes:
        template: ``str.format`` template with ``{question}`` and, for multiple choice, ``{options}``.
        answer_prefix: Text the reference protocol pre-fills at the start of the assistant's turn
            (MVBench's ``"Best option:("``); empty when none. Runners that cannot pre-fill may skip
            it: the matching parser accepts replies either way.
        source: The file the prompt follows.
    """

    template: str
    answer_prefix: str = ""
    source: str = ""


SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
"""LLaVA's suffix for short answers (its POPE and MME prompts)."""


@dataclass(frozen=True)
class Sample:
    """One benchmark item, ready to batch.

    Attributes:
        sample_id: Unique within the benchmark (``"random/17"``, ``"color/0001.jpg/1"``, ...).
        prompt: The user text, default benchmark prompt applied (no chat template).
        target: Ground truth: ``"yes"``/``"no"`` (POPE), ``"Yes"``/``"No"`` (MME), an option
            letter (video), or None (CHAIR, scored against its ground-truth objects).
        media: Lazy references to the image(s) or video; see :meth:`load_media`.
        metadata: What the scorer needs besides the reply (each benchmark module says what).
        answer_prefix: Text the reference protocol pre-fills in the assistant turn, or ``""``.
    """

    sample_id: str
    prompt: str
    target: Any
    media: tuple[Media, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    answer_prefix: str = ""

    def load_media(self) -> list:
        """Read the sample's images, or its video's sampled frames, as RGB ``PIL.Image`` objects.

        Raises:
            InputError: A file is missing or corrupt; the message names it.
        """
        return [image for ref in self.media for image in ref.load()]


class SampleSet:
    """The samples of one benchmark plus what a run should record about them.

    Iterating yields :class:`Sample` objects in the official order (parquet files are streamed, so
    iterating twice reads them twice). ``info`` records the files read and choices made (e.g.
    CHAIR's sampled ``image_ids``) so a runner can save them.

    Args:
        name: Benchmark name (``"pope"``, ``"chair"``, ``"mme"``, ``"mvbench"``, ``"videomme"``, ``"egoschema"``).
        samples: The samples, or a function returning a fresh iterator over them.
        size: Number of samples; required when ``samples`` is a function.
        info: Provenance and choices.
        split_key: The metadata field that names a sample's split (what ``--split`` selects: POPE
            split, MME subtask, MVBench task type, Video-MME duration); None when there is none.
            ``--limit N`` takes the first N samples of each split.
    """

    def __init__(
        self,
        name: str,
        samples: Sequence[Sample] | Callable[[], Iterator[Sample]],
        size: int | None = None,
        info: Mapping[str, Any] | None = None,
        split_key: str | None = None,
    ):
        self.name = name
        self.info = dict(info or {})
        self.split_key = split_key
        if callable(samples):
            if size is None:
                raise TypeError("SampleSet needs size= when samples is a function.")
            self._stream, self._size = samples, size
        else:
            items = list(samples)
            self._stream, self._size = (lambda: iter(items)), len(items)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._stream())

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"SampleSet({self.name!r}, {self._size} samples)"

    def first(self, limit: int | None) -> list[Sample]:
        """The samples, or the first ``limit`` of each split (of all of them when there are no splits)."""
        if limit is None:
            return list(self)
        taken: dict[Any, int] = {}
        chosen = []
        for sample in self:
            split = sample.metadata.get(self.split_key) if self.split_key else None
            if taken.get(split, 0) < limit:
                taken[split] = taken.get(split, 0) + 1
                chosen.append(sample)
        return chosen


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
        video_format: Video: ``mvbench``, ``videomme`` or ``egoschema``, or None to tell from the layout.
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


class Loaded(NamedTuple):
    """What a benchmark's loader returns.

    Attributes:
        samples: The samples.
        paths: Resolved absolute paths of the files read, besides ``--data`` (recorded as
            ``data.paths``; a resumed run may find them elsewhere).
        choices: What selects the samples besides ``--split`` (recorded as ``data.options``; a
            resumed run must make the same choices).
    """

    samples: SampleSet
    paths: dict[str, Any]
    choices: dict[str, Any]


Loader = Callable[[Path, "Path | None", "list[str] | None", DataOptions], Loaded]
"""``(root, media, splits, options) -> Loaded``: ``root`` is ``--data`` resolved (it exists),
``media`` is ``--media`` resolved or None, ``splits`` is ``--split`` as a list or None."""

Scorer = Callable[[list, Mapping[str, Any], "str | None", list], "tuple[dict[str, float], dict[str, Any]]"]
"""``(rows, data, style, warnings) -> (metrics, details)``: ``rows`` are a run's sample rows without
errors (``response``, ``metadata``), ``data`` the run's recorded paths and choices, ``warnings`` a
list to append to; ``metrics`` are the headline numbers, ``details`` the reference scorer's result."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark as ``vlmkit eval --bench NAME`` runs it; each benchmark module defines one as ``BENCHMARK``.

    Attributes:
        name: The ``--bench`` name: the module's file name (lowercase snake case).
        summary: One line for ``vlmkit eval --help`` and the docs.
        load: The loader (see :data:`Loader`): the official layout under ``--data``.
        score: The scorer over rows (see :data:`Scorer`), reference-exact.
        prompts: The default prompts by codebase or format; loaders use them unless given another.
        max_new_tokens: Tokens generated when no ``--max-new-tokens`` is given.
        primary: The headline metric (plotted by ``vlmkit report``).
        higher_is_better: Whether a larger ``primary`` is better.
        metric_title: Axis label for ``primary`` in report plots; ``{}`` is the metric name.
        styles: Scoring styles (answer parsers) ``--style`` accepts; empty when the parser is fixed.
        default_style: The style used when none is given.
        media: ``"image"``, or ``"video"``: only models whose processor reads videos can run it.
        check: Scorer prerequisites, ``(data) -> None`` on the recorded paths and choices; raises
            before the first forward pass (e.g. CHAIR's NLTK data and synonym table).

    Example:
        >>> from vlmkit.eval import benchmarks
        >>> pope = benchmarks.get("pope")
        >>> pope.primary, pope.max_new_tokens, pope.styles
        ('f1', 16, ('llava', 'opera', 'vcd', 'lmms_eval'))
    """

    name: str
    summary: str
    load: Loader
    score: Scorer
    prompts: Mapping[str, Prompt]
    max_new_tokens: int
    primary: str
    higher_is_better: bool = True
    metric_title: str = "{}"
    styles: tuple[str, ...] = ()
    default_style: str | None = None
    media: str = "image"
    check: Callable[[Mapping[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ConfigError(f"benchmark name {self.name!r} must be lowercase snake case (its module's file name).")
        if self.media not in MEDIA_KINDS:
            raise ConfigError(f"benchmark {self.name!r}: media={self.media!r} must be one of {', '.join(MEDIA_KINDS)}.")
        if (self.default_style is None) != (not self.styles) or (self.styles and self.default_style not in self.styles):
            raise ConfigError(
                f"benchmark {self.name!r}: default_style={self.default_style!r} must be one of styles={self.styles} "
                "(both empty when the parser is fixed)."
            )
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"benchmark {self.name!r}: max_new_tokens={self.max_new_tokens!r} must be an int >= 1.")

    def open(self, options: DataOptions) -> Loaded:
        """Load the benchmark from its official layout under ``options.path``.

        Returns:
            The samples, with ``paths`` (``data`` first) and ``choices`` (``splits`` first) as the
            run config records them.

        Raises:
            DatasetError: ``--data`` does not exist, or files are missing or malformed (from the loader).
            ConfigError: A choice the benchmark does not have (e.g. an unknown video format).
        """
        root = Path(options.path).expanduser().resolve()
        if not root.exists():
            raise DatasetError(f"--data {options.path} does not exist; point it at the {self.name} benchmark files.")
        media = Path(options.media).expanduser().resolve() if options.media else None
        splits = list(options.splits) if options.splits else None
        loaded = self.load(root, media, splits, options)
        return Loaded(loaded.samples, {"data": str(root), **loaded.paths}, {"splits": splits, **loaded.choices})

    def check_style(self, style: str | None) -> str | None:
        """The scoring style: ``style`` if valid, the default when None.

        Raises:
            ConfigError: The benchmark has no such style (or no styles at all).
        """
        if style is None:
            return self.default_style
        if style not in self.styles:
            allowed = (
                f"one of {', '.join(self.styles)}"
                if self.styles
                else f"none (its parser is fixed{'; video follows its format' if self.media == 'video' else ''})"
            )
            raise ConfigError(
                f"--style {style!r} is not a {self.name} scoring style; allowed: {allowed}."
                + did_you_mean(style, self.styles)
            )
        return style

    def check_ready(self, data: Mapping[str, Any]) -> None:
        """Raise now what scoring would raise after generation (missing scorer data or tables)."""
        if self.check is not None:
            self.check(data)

    def check_model(self, processor: Any, model: Mapping[str, Any]) -> None:
        """Raise unless the model can read this benchmark's media.

        Args:
            processor: The model's processor.
            model: The run config's model record (``spec``, ``class``).

        Raises:
            ConfigError: A video benchmark and a processor without a video processor: its frames
                would go in as separate images, which is not what the benchmark measures.
        """
        if self.media == "video" and getattr(processor, "video_processor", None) is None:
            raise ConfigError(
                f"--bench {self.name} needs a model that reads videos, and {model['spec']} ({model['class']}) reads "
                f"images only (its processor has no video processor). Use a video model: {VIDEO_MODELS}."
            )

    def score_rows(
        self, rows: Sequence[Mapping[str, Any]], data: Mapping[str, Any], style: str | None = None
    ) -> dict[str, Any]:
        """Score a run's sample rows with the benchmark's scorer.

        Rows with an ``error`` (media that failed to load) are left out; a warning says how many.

        Args:
            rows: Sample rows in benchmark order (``response``, ``metadata``, ``error``).
            data: The run config's recorded paths and choices (``data.paths`` and ``data.options``).
            style: Scoring style; None for the default.

        Returns:
            ``{"metrics": {name: value}, "details": <the scorer's full result>, "style", "warnings"}``;
            ``metrics`` holds the headline numbers the report shows.
        """
        style = self.check_style(style)
        good = [row for row in rows if row.get("error") is None]
        warnings: list[str] = []
        if len(good) < len(rows):
            warnings.append(
                f"{len(rows) - len(good)} of {len(rows)} samples failed (error rows) and are left out of the scores"
            )
        if not good:
            return {"metrics": {}, "details": {}, "style": style, "warnings": warnings + ["no sample to score"]}
        metrics, details = self.score(good, data, style, warnings)
        warnings += details.get("warnings", [])
        return {"metrics": metrics, "details": details, "style": style, "warnings": warnings}


def fingerprint(samples: Sequence[Sample], root: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """The data hash of a run and a short hash per media file.

    The data hash is SHA-256 over every sample's id, prompt, target, answer prefix and metadata, and
    its media: the bytes of every image; videos count by file name and size (hashing hours of video
    at every start would cost more than it protects).

    Args:
        samples: The run's samples.
        root: ``--data``; file names under it are recorded relative to it, so a moved copy matches.

    Returns:
        ``(data_hash, files)``: ``files`` maps each media file (or embedded image) to the first 16
        hex digits of its own hash, so a changed hash can name the files that changed.
    """
    digest = hashlib.sha256()
    files: dict[str, str] = {}
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
            media = _media_fingerprint(ref)
            digest.update(media)
            files[media_name(ref, root)] = hashlib.sha256(media).hexdigest()[:16]
    return digest.hexdigest(), files


def media_name(ref: Media, root: str | os.PathLike) -> str:
    """How :func:`fingerprint` names a media reference: its path (or source), relative to ``root`` when under it."""
    name = ref.name if isinstance(ref, ImageBytes) else str(ref.path)
    prefix = str(root).rstrip(os.sep) + os.sep
    return name[len(prefix) :] if name.startswith(prefix) else name


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


def template_of(prompt: Prompt | str) -> str:
    """The ``str.format`` template of a prompt given as a :class:`Prompt` or a plain string."""
    return prompt.template if isinstance(prompt, Prompt) else prompt


def require(row: Mapping, keys: Iterable[str], where: str, benchmark: str) -> None:
    """Raise a DatasetError naming ``where`` when ``row`` lacks one of ``keys``."""
    missing = [key for key in keys if key not in row]
    if missing:
        raise DatasetError(
            f"{benchmark}: {where} lacks {', '.join(missing)}; the official format has {', '.join(keys)}."
        )


def check_unique(samples: Sequence[Sample], benchmark: str, fix: str) -> None:
    """Raise a DatasetError when two samples share an id."""
    seen: set[str] = set()
    for sample in samples:
        if sample.sample_id in seen:
            raise DatasetError(f"{benchmark}: sample id {sample.sample_id!r} occurs twice; {fix}.")
        seen.add(sample.sample_id)


def check_files(names: Iterable, exists: Callable[[Any], bool], what: str, where: Path, fix: str) -> None:
    """Raise a DatasetError listing the ``names`` for which ``exists`` is false."""
    missing = [str(name) for name in dict.fromkeys(names) if not exists(name)]
    if missing:
        raise_missing(what, missing, where, fix)


def raise_missing(what: str, missing: Sequence[str], where: Path, fix: str) -> None:
    """Raise a DatasetError listing the first missing files and how many more there are."""
    shown = ", ".join(missing[:_SHOWN]) + (f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else "")
    raise DatasetError(f"{len(missing)} {what} missing in {where}: {shown}. Fix: {fix}.")


def first_dir(root: Path, names: Sequence[str]) -> Path | None:
    """The first of ``root/<name>`` that is a folder, or None."""
    return next((root / name for name in names if (root / name).is_dir()), None)
