"""Benchmark loaders: the official file layouts, read from a local path, as :class:`Sample` streams.

Every loader checks the layout before returning and raises :class:`~vlmkit.errors.DatasetError`
listing exactly what is missing. Media are read only when :meth:`Sample.load_media` is called, so a
corrupt file raises :class:`~vlmkit.errors.InputError` naming it for that one sample, and a runner
can record an error row and go on.

Each sample's ``metadata`` holds what the benchmark's scorer needs besides the model's reply:

* POPE: ``split``, ``question_id``, ``image``, ``label``; group replies by split for
  ``pope.score_splits`` (answers and labels pair by position).
* CHAIR: ``image_id``; score ``{"image_id": ..., "caption": reply}`` with ``Chair.score``.
* MME: ``subtask``, ``image``, ``question``, ``gt``; score ``{**metadata, "response": reply}`` grouped
  by subtask with ``mme.score``.
* MVBench, Video-MME, EgoSchema: ``options``, ``answer``, ``question``, ``video`` and the grouping keys
  (``task_type``; Video-MME also ``duration``, ``domain``, ``sub_category``); score
  ``{**metadata, "response": reply}`` with ``video.score``.

Default prompts come from :mod:`vlmkit.eval.prompts`; pass ``prompt=`` (a :class:`~vlmkit.eval.prompts.Prompt`
or a template string) to change them.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.errors import DatasetError, missing_extra
from vlmkit.eval import mme as _mme
from vlmkit.eval import pope as _pope
from vlmkit.eval import prompts
from vlmkit.eval._common import read_json
from vlmkit.eval.chair import COCO_ANNOTATION_FILES, Chair
from vlmkit.eval.media import FrameFolder, ImageBytes, ImageFile, VideoFile

Media = ImageFile | ImageBytes | VideoFile | FrameFolder
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
_VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")
_SHOWN = 10


@dataclass(frozen=True)
class Sample:
    """One benchmark item, ready to batch.

    Attributes:
        sample_id: Unique within the benchmark (``"random/17"``, ``"color/0001.jpg/1"``, ...).
        prompt: The user text, default benchmark prompt applied (no chat template).
        target: Ground truth: ``"yes"``/``"no"`` (POPE), ``"Yes"``/``"No"`` (MME), an option
            letter (video), or None (CHAIR, scored against its ground-truth objects).
        media: Lazy references to the image(s) or video; see :meth:`load_media`.
        metadata: What the scorer needs besides the reply (see the module docstring).
        answer_prefix: Text the reference protocol pre-fills in the assistant turn, or ``""``.
    """

    sample_id: str
    prompt: str
    target: Any
    media: tuple[Media, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    answer_prefix: str = ""

    def load_media(self) -> list[Image.Image]:
        """Read the sample's images, or its video's sampled frames, as RGB images.

        Raises:
            InputError: A file is missing or corrupt; the message names it.
        """
        return [image for ref in self.media for image in ref.load()]


class Benchmark:
    """The samples of one benchmark plus what a run should record about them.

    Iterating yields :class:`Sample` objects in the official order (parquet files are streamed, so
    iterating twice reads them twice). ``info`` records the files read and choices made (e.g.
    CHAIR's sampled ``image_ids``) so a runner can save them.

    Args:
        name: Benchmark name (``"pope"``, ``"chair"``, ``"mme"``, ``"mvbench"``, ``"videomme"``, ``"egoschema"``).
        samples: The samples, or a function returning a fresh iterator over them.
        size: Number of samples; required when ``samples`` is a function.
        info: Provenance and choices.
    """

    def __init__(
        self,
        name: str,
        samples: Sequence[Sample] | Callable[[], Iterator[Sample]],
        size: int | None = None,
        info: Mapping[str, Any] | None = None,
    ):
        self.name = name
        self.info = dict(info or {})
        if callable(samples):
            if size is None:
                raise TypeError("Benchmark needs size= when samples is a function.")
            self._stream, self._size = samples, size
        else:
            items = list(samples)
            self._stream, self._size = (lambda: iter(items)), len(items)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._stream())

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"Benchmark({self.name!r}, {self._size} samples)"


def load_pope(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    splits: Iterable[str] | None = None,
    prompt: prompts.Prompt | str = prompts.POPE["llava"],
) -> Benchmark:
    """Load POPE from question files and an image folder, or from lmms-eval's parquet files.

    Args:
        path: One of: a question file in JSON lines (``{"question_id", "image", "text", "label"}``
            per line, e.g. RUCAIBox/POPE ``output/coco/coco_pope_random.json``); a folder of such
            files; a ``.parquet`` file or a folder of them (lmms-eval's ``lmms-lab/POPE`` layout:
            ``question_id``, ``question``, ``answer``, ``image`` with embedded bytes, ``category``).
        image_dir: Folder with the images the question files name (e.g. COCO ``val2014``); not
            used for parquet.
        splits: Keep only these splits (``random``, ``popular``, ``adversarial``); default all.
            A row's split is its ``category`` field, else the last ``_`` part of its file name.
        prompt: Prompt or template with ``{question}``; default LLaVA's.

    Returns:
        The benchmark; samples keep file order, so each split's answers and labels pair by position.

    Raises:
        DatasetError: Missing files, images, fields or splits; the message lists them.
    """
    source = Path(path)
    template = _template(prompt)
    wanted = None if splits is None else list(splits)
    parquet = (
        sorted(source.rglob("*.parquet")) if source.is_dir() else ([source] if source.suffix == ".parquet" else [])
    )
    if parquet:
        return _load_pope_parquet(source, parquet, wanted, template)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if "pope" in p.name and p.suffix in (".json", ".jsonl"))
        if not files:
            raise DatasetError(
                f"POPE: {source} holds no *pope*.json(l) question files or .parquet files; point path at them."
            )
    elif source.is_file():
        files = [source]
    else:
        raise DatasetError(f"POPE question file or folder {source} does not exist; check the path.")
    if image_dir is None:
        raise DatasetError(f"POPE question files ({source}) name image files; pass image_dir= (e.g. COCO val2014).")
    images = Path(image_dir)
    if not images.is_dir():
        raise DatasetError(
            f"POPE image folder {images} does not exist; pass the folder holding the images (e.g. COCO val2014)."
        )
    samples, found = [], set()
    for file in files:
        for line_number, row in _json_lines(file):
            _require(row, ("question_id", "image", "text", "label"), f"{file}:{line_number}", "POPE")
            split = str(row.get("category") or file.stem.rsplit("_", 1)[-1])
            found.add(split)
            if wanted is not None and split not in wanted:
                continue
            samples.append(
                Sample(
                    sample_id=f"{split}/{row['question_id']}",
                    prompt=template.format(question=row["text"]),
                    target=str(row["label"]).lower().strip(),
                    media=(ImageFile(images / row["image"]),),
                    metadata={
                        "split": split,
                        "question_id": row["question_id"],
                        "image": row["image"],
                        "label": row["label"],
                    },
                )
            )
    _check_splits(wanted, found, source)
    _check_unique(samples, "POPE", "load one question file (or split) at a time")
    _check_files(
        {s.metadata["image"] for s in samples},
        lambda name: (images / name).is_file(),
        "POPE images",
        images,
        "copy the images the question files name into image_dir",
    )
    return Benchmark(
        "pope", samples, info={"files": [str(f) for f in files], "image_dir": str(images), "splits": sorted(found)}
    )


def load_chair(
    image_dir: str | os.PathLike,
    ground_truth: str | os.PathLike,
    num_images: int | None = 500,
    seed: int = 42,
    image_ids: Iterable[int] | None = None,
    prompt: prompts.Prompt | str = prompts.CHAIR,
) -> Benchmark:
    """Load a seeded subset of COCO images for CHAIR captioning.

    Args:
        image_dir: Folder of COCO images (``COCO_val2014_000000123456.jpg`` or ``000000123456.jpg``).
        ground_truth: The COCO annotation folder (the four files :meth:`Chair.from_coco` reads) or a
            ground-truth file from :meth:`Chair.save_ground_truth`; with a file, only images it
            covers are eligible.
        num_images: How many images to draw (papers use 500); None for all.
        seed: Seed of the draw: ``random.Random(seed).sample`` over the eligible ids sorted.
        image_ids: Use exactly these images instead of drawing (e.g. a released 500-image list).
        prompt: Prompt or template; default OPERA's "Please describe this image in detail."

    Returns:
        The benchmark; ``info["image_ids"]`` is the chosen id list, in sample order, for the runner to save.

    Raises:
        DatasetError: Missing folder, annotation files, images, or too few images.
    """
    images = Path(image_dir)
    if not images.is_dir():
        raise DatasetError(f"CHAIR image folder {images} does not exist; pass the COCO val2014 image folder.")
    truth = Path(ground_truth)
    if truth.is_dir():
        _check_files(
            COCO_ANNOTATION_FILES,
            lambda name: (truth / name).is_file(),
            "COCO annotation files",
            truth,
            "unzip annotations_trainval2014.zip there, or pass a ground-truth file from Chair.save_ground_truth",
        )
        covered = None
    else:
        covered = set(Chair.from_ground_truth(truth).image_ids)
    available: dict[int, Path] = {}
    for file in sorted(images.iterdir()):
        match = re.search(r"(\d+)\.(?:jpg|jpeg|png)$", file.name, re.IGNORECASE)
        if match and (covered is None or int(match.group(1)) in covered):
            available.setdefault(int(match.group(1)), file)
    if image_ids is not None:
        chosen = [int(i) for i in image_ids]
        _check_files(
            chosen,
            lambda i: i in available,
            "CHAIR images" + ("" if covered is None else " with ground truth"),
            images,
            "use ids of images present in image_dir (and in the ground-truth file)",
        )
    elif num_images is None:
        chosen = sorted(available)
    else:
        if num_images > len(available):
            raise DatasetError(
                f"CHAIR: num_images={num_images} but {images} has only {len(available)} eligible images; "
                f"pass num_images<={len(available)} or num_images=None for all."
            )
        chosen = random.Random(seed).sample(sorted(available), num_images)
    template = _template(prompt)
    samples = [
        Sample(
            sample_id=str(i),
            prompt=template.format(),
            target=None,
            media=(ImageFile(available[i]),),
            metadata={"image_id": i},
        )
        for i in chosen
    ]
    info = {
        "image_ids": chosen,
        "image_dir": str(images),
        "ground_truth": str(truth),
        "seed": seed,
        "num_images": num_images,
    }
    return Benchmark("chair", samples, info=info)


def load_mme(
    root: str | os.PathLike,
    subtasks: Iterable[str] | None = None,
    prompt: prompts.Prompt | str = prompts.MME,
) -> Benchmark:
    """Load MME from the ``MME_Benchmark_release_version`` folder.

    Both subtask layouts are read: ``<task>/images/`` + ``<task>/questions_answers_YN/`` (artwork,
    celebrity, landmark, posters, scene) and flat ``<task>/<name>.{jpg,png}`` + ``<task>/<name>.txt``.
    Each ``.txt`` holds two ``question<TAB>Yes|No`` lines. ``root`` may be the release folder, its
    parent, or a copy nested one level deeper (``.../MME_Benchmark/``).

    Args:
        root: The folder.
        subtasks: Keep only these subtasks (names as in :data:`vlmkit.eval.mme.SUBTASKS`); default all 14.
        prompt: Prompt or template; ``{question}`` is the question without "Please answer yes or no.".

    Returns:
        The benchmark; sample ids are ``<subtask>/<image>/<0|1>``.

    Raises:
        DatasetError: Missing subtask folders, question files, images, or malformed lines.
    """
    base = Path(root)
    candidates = [
        base,
        base / "MME_Benchmark_release_version",
        base / "MME_Benchmark",
        base / "MME_Benchmark_release_version" / "MME_Benchmark",
    ]
    folder = next((c for c in candidates if any((c / t).is_dir() for t in _mme.SUBTASKS)), None)
    if folder is None:
        raise DatasetError(
            f"MME: no subtask folder ({', '.join(_mme.SUBTASKS)}) found in {base} or its "
            "MME_Benchmark_release_version/ or MME_Benchmark/ subfolders; point root at the unzipped release."
        )
    names = list(_mme.SUBTASKS) if subtasks is None else list(subtasks)
    unknown = [t for t in names if t not in _mme.SUBTASKS]
    if unknown:
        raise DatasetError(f"MME subtasks {unknown} do not exist; valid: {', '.join(_mme.SUBTASKS)}.")
    _check_files(
        names, lambda t: (folder / t).is_dir(), "MME subtask folders", folder, "unzip the complete MME release"
    )
    template = _template(prompt)
    samples, missing = [], []
    for task in names:
        task_dir = folder / task
        if (task_dir / "questions_answers_YN").is_dir():
            qa_dir, image_dir = task_dir / "questions_answers_YN", task_dir / "images"
        else:
            qa_dir = image_dir = task_dir
        question_files = sorted(qa_dir.glob("*.txt"))
        if not question_files:
            missing.append(f"{qa_dir}/*.txt")
        for qa_file in question_files:
            image = next(
                (image_dir / (qa_file.stem + s) for s in _IMAGE_SUFFIXES if (image_dir / (qa_file.stem + s)).is_file()),
                None,
            )
            if image is None:
                missing.append(str(image_dir / (qa_file.stem + ".{jpg,png}")))
                continue
            lines = [line for line in qa_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            if len(lines) != 2:
                raise DatasetError(
                    f"MME: {qa_file} has {len(lines)} question lines; MME has 2 per image. "
                    "Restore the file from the release."
                )
            for k, line in enumerate(lines):
                parts = line.split("\t")
                if len(parts) != 2 or parts[1].strip() not in ("Yes", "No"):
                    raise DatasetError(f"MME: {qa_file} line {k + 1} is not 'question<TAB>Yes|No': {line!r}.")
                question, answer = parts[0], parts[1].strip()
                samples.append(
                    Sample(
                        sample_id=f"{task}/{image.name}/{k}",
                        prompt=template.format(question=question.replace(prompts.MME_YES_NO, "").strip()),
                        target=answer,
                        media=(ImageFile(image),),
                        metadata={"subtask": task, "image": image.name, "question": question, "gt": answer},
                    )
                )
    if missing:
        _raise_missing("MME question files or images", missing, folder, "unzip the complete MME release")
    return Benchmark("mme", samples, info={"root": str(folder), "subtasks": names})


MVBENCH_TASKS = {
    "action_sequence": ("Action Sequence", "star/Charades_v1_480", "video", True),
    "action_prediction": ("Action Prediction", "star/Charades_v1_480", "video", True),
    "action_antonym": ("Action Antonym", "ssv2_video", "video", False),
    "fine_grained_action": ("Fine-grained Action", "Moments_in_Time_Raw/videos", "video", False),
    "unexpected_action": ("Unexpected Action", "FunQA_test/test", "video", False),
    "object_existence": ("Object Existence", "clevrer/video_validation", "video", False),
    "object_interaction": ("Object Interaction", "star/Charades_v1_480", "video", True),
    "object_shuffle": ("Object Shuffle", "perception/videos", "video", False),
    "moving_direction": ("Moving Direction", "clevrer/video_validation", "video", False),
    "action_localization": ("Action Localization", "sta/sta_video", "video", True),
    "scene_transition": ("Scene Transition", "scene_qa/video", "video", False),
    "action_count": ("Action Count", "perception/videos", "video", False),
    "moving_count": ("Moving Count", "clevrer/video_validation", "video", False),
    "moving_attribute": ("Moving Attribute", "clevrer/video_validation", "video", False),
    "state_change": ("State Change", "perception/videos", "video", False),
    "fine_grained_pose": ("Fine-grained Pose", "nturgbd", "video", False),
    "character_order": ("Character Order", "perception/videos", "video", False),
    "egocentric_navigation": ("Egocentric Navigation", "vlnqa", "video", False),
    "episodic_reasoning": ("Episodic Reasoning", "tvqa/frames_fps3_hq", "frame", True),
    "counterfactual_inference": ("Counterfactual Inference", "clevrer/video_validation", "video", False),
}
"""MVBench's 20 tasks: ``json/<key>.json`` -> (task type, video folder under ``video/``, media kind,
whether items carry a ``start``/``end`` bound), from the official notebook's ``data_list``."""


def load_mvbench(
    root: str | os.PathLike,
    tasks: Iterable[str] | None = None,
    num_frames: int = 16,
    video_dirs: Mapping[str, str | os.PathLike] | None = None,
    prompt: prompts.Prompt | str = prompts.MVBENCH,
    data_list: Mapping[str, Sequence] | None = None,
) -> Benchmark:
    """Load MVBench: ``<root>/json/<task>.json`` and the videos under ``<root>/video/``.

    Each JSON item has ``video``, ``question``, ``candidates`` and ``answer`` (the text of the right
    candidate), plus ``start``/``end`` seconds for bounded tasks. Frames follow the official
    segment-middle sampling; Episodic Reasoning reads its 3-fps frame folders.

    Args:
        root: The MVBench folder.
        tasks: Keys of :data:`MVBENCH_TASKS` (or of ``data_list``) to load; default all.
        num_frames: Frames per video (the official evaluation uses 16).
        video_dirs: Per-task video folder overrides (absolute, or relative to ``<root>/video``), for
            copies laid out differently (e.g. lmms-eval's ``star/Charades_segment``).
        prompt: Prompt or template with ``{question}`` and ``{options}`` (lettered ``(A) text``).
        data_list: Another task set in the official notebook's ``data_list`` form (as a
            ``data_list.json`` holds it): ``{task_type: [json_file, video_folder, "video"|"frame",
            bounded]}``; it replaces :data:`MVBENCH_TASKS`, and task keys are the JSON file stems.

    Returns:
        The benchmark; sample ids are ``<task>/<index>``.

    Raises:
        DatasetError: Missing JSON files or videos, or an answer that is not a candidate.
    """
    base = Path(root)
    known = MVBENCH_TASKS
    if data_list is not None:
        known = {Path(str(v[0])).stem: (str(k), str(v[1]), str(v[2]), bool(v[3])) for k, v in data_list.items()}
    names = list(known) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        raise DatasetError(f"MVBench tasks {unknown} do not exist; valid: {', '.join(known)}.")
    _check_files(
        names,
        lambda t: (base / "json" / f"{t}.json").is_file(),
        "MVBench json/<task>.json files",
        base,
        "download OpenGVLab/MVBench and point root at the folder holding json/ and video/",
    )
    template = _template(prompt)
    samples = []
    for task in names:
        task_type, folder, kind, bounded = known[task]
        video_root = base / "video" / Path((video_dirs or {}).get(task, folder))
        items = read_json(base / "json" / f"{task}.json", "MVBench")
        for index, item in enumerate(items):
            where = f"{base / 'json' / f'{task}.json'} item {index}"
            _require(
                item,
                ("video", "question", "candidates", "answer") + (("start", "end") if bounded else ()),
                where,
                "MVBench",
            )
            letter = _letter_of(item["answer"], item["candidates"], where)
            bound = (float(item["start"]), float(item["end"])) if bounded else None
            path = video_root / item["video"]
            media = (
                FrameFolder(path, num_frames, bound)
                if kind == "frame"
                else VideoFile(path, num_frames, "mvbench", bound)
            )
            options = "\n".join(f"({string.ascii_uppercase[k]}) {c}" for k, c in enumerate(item["candidates"]))
            samples.append(
                Sample(
                    sample_id=f"{task}/{index}",
                    prompt=template.format(question=item["question"], options=options),
                    target=letter,
                    media=(media,),
                    metadata={
                        "task_type": task_type,
                        "options": list(item["candidates"]),
                        "answer": letter,
                        "question": item["question"],
                        "video": item["video"],
                    },
                    answer_prefix=prompt.answer_prefix if isinstance(prompt, prompts.Prompt) else "",
                )
            )
    _check_files(
        [s.media[0].path for s in samples],
        os.path.exists,
        "MVBench videos",
        base / "video",
        "unzip the video archives under video/ or pass video_dirs=",
    )
    return Benchmark("mvbench", samples, info={"root": str(base), "tasks": names, "num_frames": num_frames})


def load_videomme(
    annotations: str | os.PathLike,
    video_dir: str | os.PathLike,
    num_frames: int = 32,
    durations: Iterable[str] | None = None,
    prompt: prompts.Prompt | str = prompts.VIDEOMME,
) -> Benchmark:
    """Load Video-MME (without subtitles).

    Args:
        annotations: A JSON file, either the official grouped form (a list of videos with
            ``video_id``, ``duration``, ``domain``, ``sub_category`` and ``questions``, as in
            BradyFU/Video-MME ``evaluation/output_test_template.json``) or a list of question rows
            as in the Hugging Face release (``videoID``, ``question_id``, ``duration``, ``domain``,
            ``sub_category``, ``task_type``, ``question``, ``options``, ``answer``); or that
            release's ``.parquet`` file.
        video_dir: Folder of ``<videoID>.mp4`` (or ``.MP4``/``.mkv``; ``<video_id>`` also tried).
        num_frames: Frames per video, sampled uniformly.
        durations: Keep only these durations (``short``, ``medium``, ``long``).
        prompt: Prompt or template with ``{question}`` and ``{options}`` (lettered ``A. text``).

    Returns:
        The benchmark; sample ids are the question ids.

    Raises:
        DatasetError: Missing files or fields, bad answers, or missing videos.
    """
    source, videos = Path(annotations), Path(video_dir)
    if source.suffix == ".parquet":
        rows = [dict(row) for row in _read_parquet_rows(source)]
    else:
        rows = []
        for video in read_json(source, "Video-MME"):
            if "questions" in video:
                shared = {k: v for k, v in video.items() if k != "questions"}
                rows.extend({**shared, **question} for question in video["questions"])
            else:
                rows.append(video)
    if not videos.is_dir():
        raise DatasetError(
            f"Video-MME video folder {videos} does not exist; pass the folder holding <videoID>.mp4 files."
        )
    wanted = None if durations is None else set(durations)
    template = _template(prompt)
    samples, missing = [], []
    for index, row in enumerate(rows):
        where = f"{source} question {index}"
        _require(
            row,
            ("question_id", "duration", "domain", "sub_category", "task_type", "question", "options", "answer"),
            where,
            "Video-MME",
        )
        if wanted is not None and row["duration"] not in wanted:
            continue
        options = [
            re.sub(rf"^{string.ascii_uppercase[k]}\.\s*", "", str(text)) for k, text in enumerate(row["options"])
        ]
        letter = _letter_of(row["answer"], options, where, by_letter=True)
        names = [str(row[k]) for k in ("videoID", "video_id") if row.get(k)]
        path = next((videos / (n + s) for n in names for s in _VIDEO_SUFFIXES if (videos / (n + s)).is_file()), None)
        if path is None:
            missing.append(str(videos / f"{names[0] if names else '?'}.mp4"))
            continue
        lettered = "\n".join(f"{string.ascii_uppercase[k]}. {text}" for k, text in enumerate(options))
        samples.append(
            Sample(
                sample_id=str(row["question_id"]),
                prompt=template.format(question=row["question"], options=lettered),
                target=letter,
                media=(VideoFile(path, num_frames, "uniform"),),
                metadata={
                    "question_id": row["question_id"],
                    "video": path.name,
                    "duration": row["duration"],
                    "domain": row["domain"],
                    "sub_category": row["sub_category"],
                    "task_type": row["task_type"],
                    "options": options,
                    "answer": letter,
                    "question": row["question"],
                },
            )
        )
    if missing:
        _raise_missing("Video-MME videos", sorted(set(missing)), videos, "download the videos into video_dir")
    _check_unique(samples, "Video-MME", "remove duplicated questions from the annotation file")
    return Benchmark(
        "videomme", samples, info={"annotations": str(source), "video_dir": str(videos), "num_frames": num_frames}
    )


def load_egoschema(
    questions: str | os.PathLike,
    video_dir: str | os.PathLike,
    answers: str | os.PathLike | None = None,
    num_frames: int = 32,
    prompt: prompts.Prompt | str = prompts.EGOSCHEMA,
) -> Benchmark:
    """Load EgoSchema from the official ``questions.json`` and ``<q_uid>.mp4`` videos.

    Args:
        questions: ``questions.json`` (items with ``q_uid``, ``question``, ``option 0``...``option 4``).
        video_dir: Folder of ``<q_uid>.mp4``.
        answers: ``subset_answers.json`` (``{q_uid: 0-4}``): only the 500 answered questions are
            loaded, with letter targets. Without it, all questions load with target None (for a
            submission file).
        num_frames: Frames per video, sampled uniformly.
        prompt: Prompt or template with ``{question}`` and ``{options}`` (lettered ``A. text``).

    Returns:
        The benchmark; sample ids are the ``q_uid``.

    Raises:
        DatasetError: Missing files, fields or videos, or answers for unknown questions.
    """
    videos = Path(video_dir)
    items = {str(item.get("q_uid")): item for item in read_json(Path(questions), "EgoSchema")}
    keys = list(items)
    truth: dict[str, int] = {}
    if answers is not None:
        truth = read_json(Path(answers), "EgoSchema")
        _check_files(
            list(truth),
            items.__contains__,
            "EgoSchema questions named in the answer file",
            Path(questions),
            "use the questions.json and subset_answers.json of one release",
        )
        keys = list(truth)
    template = _template(prompt)
    samples = []
    for key in keys:
        item = items[key]
        option_keys = [f"option {k}" for k in range(5)]
        _require(item, ("q_uid", "question", *option_keys), f"{questions} question {key}", "EgoSchema")
        options = [str(item[k]) for k in option_keys]
        letter = None
        if answers is not None:
            letter = _letter_of(truth[key], options, f"{answers} entry {key}", by_letter=True)
        lettered = "\n".join(f"{string.ascii_uppercase[k]}. {text}" for k, text in enumerate(options))
        samples.append(
            Sample(
                sample_id=key,
                prompt=template.format(question=item["question"], options=lettered),
                target=letter,
                media=(VideoFile(videos / f"{key}.mp4", num_frames, "uniform"),),
                metadata={"options": options, "answer": letter, "question": item["question"], "video": f"{key}.mp4"},
            )
        )
    _check_files(
        [s.media[0].path for s in samples],
        os.path.exists,
        "EgoSchema videos",
        videos,
        "download the videos into video_dir",
    )
    return Benchmark(
        "egoschema", samples, info={"questions": str(questions), "answers": str(answers), "num_frames": num_frames}
    )


def _load_pope_parquet(source: Path, files: list[Path], wanted: list[str] | None, template: str) -> Benchmark:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_extra("pyarrow", "eval") from None
    columns = ["question_id", "question", "answer", "image", "category"]
    found: dict[str, int] = {}
    for file in files:
        try:
            present = set(pq.read_schema(file).names)
            if set(columns) - present:
                raise DatasetError(
                    f"POPE parquet {file} lacks columns {sorted(set(columns) - present)}; lmms-eval's layout has "
                    f"{', '.join(columns)}."
                )
            for split in pq.read_table(file, columns=["category"]).column("category").to_pylist():
                found[str(split)] = found.get(str(split), 0) + 1
        except OSError as error:
            raise DatasetError(f"POPE parquet {file} is unreadable ({error}); re-download it.") from None
    _check_splits(wanted, set(found), source)

    def stream() -> Iterator[Sample]:
        for file in files:
            row_number = 0
            for batch in pq.ParquetFile(file).iter_batches(batch_size=64, columns=columns):
                for row in batch.to_pylist():
                    split = str(row["category"])
                    row_number += 1
                    if wanted is not None and split not in wanted:
                        continue
                    image = row["image"]
                    data = image.get("bytes") if isinstance(image, dict) else image
                    yield Sample(
                        sample_id=f"{split}/{row['question_id']}",
                        prompt=template.format(question=str(row["question"]).strip()),
                        target=str(row["answer"]).lower().strip(),
                        media=(
                            ImageBytes(data or b"", f"{file} row {row_number - 1} (question_id {row['question_id']})"),
                        ),
                        metadata={"split": split, "question_id": row["question_id"], "label": row["answer"]},
                    )

    size = sum(n for split, n in found.items() if wanted is None or split in wanted)
    return Benchmark("pope", stream, size=size, info={"files": [str(f) for f in files], "splits": sorted(found)})


def _template(prompt: prompts.Prompt | str) -> str:
    return prompt.template if isinstance(prompt, prompts.Prompt) else prompt


def _json_lines(file: Path) -> Iterator[tuple[int, dict]]:
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except ValueError as error:
                    raise DatasetError(
                        f"{file}:{number} is not a JSON object ({error}); POPE files hold one object per line."
                    ) from None


def _read_parquet_rows(file: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_extra("pyarrow", "eval") from None
    if not file.is_file():
        raise DatasetError(f"{file} does not exist; check the path.")
    try:
        return pq.read_table(file).to_pylist()
    except OSError as error:
        raise DatasetError(f"{file} is unreadable parquet ({error}); re-download it.") from None


def _require(row: Mapping, keys: Iterable[str], where: str, benchmark: str) -> None:
    missing = [key for key in keys if key not in row]
    if missing:
        raise DatasetError(
            f"{benchmark}: {where} lacks {', '.join(missing)}; the official format has {', '.join(keys)}."
        )


def _letter_of(answer: Any, options: Sequence[str], where: str, by_letter: bool = False) -> str:
    letters = string.ascii_uppercase[: len(options)]
    if by_letter and isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return letters[answer]
    if by_letter and isinstance(answer, str) and answer.strip() in tuple(letters):
        return answer.strip()
    if not by_letter and answer in options:
        return letters[list(options).index(answer)]
    allowed = f"a letter in {letters!r} or an index" if by_letter else "one of the candidates"
    raise DatasetError(f"{where}: answer {answer!r} is not {allowed} ({list(options)}); fix the annotation.")


def _check_splits(wanted: list[str] | None, found: set[str], source: Path) -> None:
    if wanted is not None and set(wanted) - found:
        raise DatasetError(
            f"POPE splits {sorted(set(wanted) - found)} are not in {source}; it has {sorted(found)} "
            f"(standard: {', '.join(_pope.SPLITS)})."
        )


def _check_unique(samples: Sequence[Sample], benchmark: str, fix: str) -> None:
    seen: set[str] = set()
    for sample in samples:
        if sample.sample_id in seen:
            raise DatasetError(f"{benchmark}: sample id {sample.sample_id!r} occurs twice; {fix}.")
        seen.add(sample.sample_id)


def _check_files(names: Iterable, exists: Callable[[Any], bool], what: str, where: Path, fix: str) -> None:
    missing = [str(name) for name in dict.fromkeys(names) if not exists(name)]
    if missing:
        _raise_missing(what, missing, where, fix)


def _raise_missing(what: str, missing: Sequence[str], where: Path, fix: str) -> None:
    shown = ", ".join(missing[:_SHOWN]) + (f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else "")
    raise DatasetError(f"{len(missing)} {what} missing in {where}: {shown}. Fix: {fix}.")
