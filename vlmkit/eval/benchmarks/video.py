"""Video multiple choice (MVBench, Video-MME, EgoSchema): official layouts, option extraction, accuracy.

**Loading**: :func:`load_mvbench` (``json/<task>.json`` and ``video/``), :func:`load_videomme` and
:func:`load_egoschema`. Each sample's ``metadata`` holds ``options``, ``answer``, ``question``,
``video`` and the grouping keys (``task_type``; Video-MME also ``duration``, ``domain``,
``sub_category``); score ``{**metadata, "response": reply}`` with :func:`score`. Under ``vlmkit
eval --bench video``, ``--video-format`` (default: from the layout) is ``mvbench`` (``<data>/json/*.json``
+ ``<data>/video/``, and ``<data>/data_list.json`` for a task set other than MVBench's 20, as the
shapes world writes; ``--split`` picks tasks), ``videomme`` (``--data`` is the annotation file, or
a folder holding one ``*.json``/``*.parquet``; videos in ``--media`` or ``<data>/videos``;
``--split`` picks durations) or ``egoschema`` (``<data>/questions.json``, optional
``<data>/subset_answers.json``, videos in ``--media`` or ``<data>/videos``), scored in the matching
style. Only a model whose processor reads videos (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) can run
it: frames given to an image-only model as separate images are not what these benchmarks measure.

**Scoring.**

Options are always the option *texts* in order; their letters are ``A``, ``B``, ``C``, ... Each style
reproduces one reference's extraction:

* ``"mvbench"``: OpenGVLab/Ask-Anything ``video_chat2/mvbench.ipynb::check_ans``
  @4dd8210b030374bb0c510a57dfbe916f70d3ef71. The official protocol pre-fills the answer with
  ``"Best option:("`` and puts ``"("`` back in front of the reply, so the reply is read as
  ``"(" + first line of the stripped response``; its first space-separated token, lowercased and
  without dots, is compared with ``"(a)"``, ``"(b)"``, ...: an option matches when the token is a
  substring of its ``"(x)"`` or contains it. ``"A"``, ``"(A)"``, ``"A."`` and ``"A) text"`` all pick
  A. Accuracy is over all questions (the notebook's ``acc_dict`` and ``Avg``).
* ``"videomme"``: ``eval_your_results.py`` in thanku-all/parse_answer
  @afd52cfe3dde5b3685e0d4f760c10c756860c758, the script the Video-MME README
  (BradyFU/Video-MME @8889f313a4b9e9480611d65daa505aab2ef63808) points to. Strip, delete answer
  prefixes (with the list's quirks: two missing commas fuse ``"The best option is"`` with ``"The
  correct option is"`` and ``"Best answer:"`` with ``"Best option:"``, so those only go as pairs),
  then take the first capital ``A``-``D`` anywhere (``"The Answer is D"`` gives A). Accuracy is
  correct / *answered*: replies with no letter leave the denominator, as in the reference.
* ``"egoschema"``: EvolvingLMMs-Lab/lmms-eval ``lmms_eval/tasks/egoschema/utils.py``
  (``parse_multi_choice_response``, from MMMU) @75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3, which
  scores the 500-question subset whose answers are public (the EgoSchema repository has no scorer;
  the full set is graded by its server). Candidates ``(A)``, ``A `` (so an article "A " counts),
  ``A.``; if none and the reply has more than 5 words, options quoted as ``"A. text"``; several
  candidates resolve to the one whose last occurrence comes first. Accuracy is over all questions.

Deviations, all where the reference is degenerate; each is counted in ``"warnings"``:
an empty MVBench reply matches every option in the notebook (so it is always right) and is wrong
here; an MVBench reply naming several options (``"(A)/(B)"``) is right for any of them in the
notebook and counts as the first one here; lmms-eval picks a random option when nothing parses,
which is no answer (wrong) here.

Example:
    >>> from vlmkit.eval.benchmarks import video
    >>> video.parse_choice("B) a red ball", ["a cube", "a red ball"], style="mvbench")
    'B'
    >>> video.parse_choice("The best answer is C.", ["w", "x", "y", "z"], style="videomme")
    'C'
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import ConfigError, DatasetError, InputError, did_you_mean, missing_extra
from vlmkit.eval._common import check_style, divide, read_json
from vlmkit.eval.benchmarks.base import (
    Benchmark,
    DataOptions,
    Loaded,
    Prompt,
    Sample,
    SampleSet,
    check_files,
    check_unique,
    first_dir,
    raise_missing,
    require,
    template_of,
)
from vlmkit.eval.media import FrameFolder, VideoFile

STYLES = ("mvbench", "videomme", "egoschema")
FORMATS = STYLES
"""The video benchmarks' layouts (``--video-format``); each is scored in the style of the same name."""

MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, select the "
    "best option that accurately addresses the question.\n"
)
PROMPTS = {
    "mvbench": Prompt(
        MVBENCH_SYSTEM + "Question: {question}\nOptions:\n{options}\nOnly give the best option.",
        answer_prefix="Best option:(",
        source="OpenGVLab/Ask-Anything video_chat2/mvbench.ipynb (system_llm=True: the system text leads the question)",
    ),
    "videomme": Prompt(
        "Select the best answer to the following multiple-choice question based on the video. Respond with only "
        "the letter (A, B, C, or D) of the correct option.\n{question}\n{options}\nThe best answer is:",
        source="BradyFU/Video-MME README.md (without subtitles)",
    ),
    "egoschema": Prompt(
        "{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
        source="EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/egoschema/utils.py",
    ),
}
"""Prompts by format. MVBench letters options ``(A) text``; Video-MME and EgoSchema ``A. text``."""

_VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")
_GROUPS = {"mvbench": ("task_type",), "videomme": ("duration", "domain", "sub_category", "task_type"), "egoschema": ()}

_VIDEOMME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
    "Answer:",
    "Option:",
    "The correct answer",
    "The correct option",
)
_VIDEOMME_LETTER = re.compile(r"[ABCD]")
_EGOSCHEMA_STRIP = (",", ".", "!", "?", ";", ":", "'")


def parse_choice(response: str, options: Sequence[str], style: str) -> str | None:
    """Extract the chosen option letter from a reply, as the style's reference does.

    Args:
        response: The model's raw reply.
        options: The option texts, in order (letters A, B, ... follow that order).
        style: One of :data:`STYLES`.

    Returns:
        The letter, or None when the reference finds no (single, meaningful) choice.

    Raises:
        ConfigError: Unknown style.
    """
    check_style(style, STYLES, "video")
    return _choose(response, options, style)[0]


def score(
    records: Sequence[Mapping[str, Any]],
    style: str,
    group_by: Sequence[str] = ("task_type",),
) -> dict[str, Any]:
    """Accuracy overall and per group.

    Args:
        records: ``[{"response", "options", "answer", <group keys>...}]``; ``answer`` is the correct
            letter (``"C"``) or its 0-based index.
        style: One of :data:`STYLES`; it also fixes the denominator (see the module docstring).
        group_by: Record keys to break accuracy down by (Video-MME: ``"duration"``, ``"domain"``,
            ``"sub_category"``, ``"task_type"``). Records without a key are left out of that breakdown.

    Returns:
        ``{"accuracy", "correct", "answered", "total", "groups": {key: {value: {"accuracy",
        "correct", "answered", "total"}}}, "style", "warnings"}``; accuracies are fractions.

    Raises:
        ConfigError: Unknown style.
        InputError: A record lacks a key or its answer is not one of its options.
    """
    check_style(style, STYLES, "video")
    overall = _Tally()
    groups: dict[str, dict[Any, _Tally]] = {key: {} for key in group_by}
    quirks = {"empty": 0, "several": 0, "unparsed": 0}
    for index, record in enumerate(records):
        missing = [key for key in ("response", "options", "answer") if key not in record]
        if missing:
            raise InputError(
                f"video record {index} lacks {', '.join(missing)}; each needs response, options and answer."
            )
        truth = _answer_letter(record["answer"], record["options"], index)
        predicted, quirk = _choose(record["response"], record["options"], style)
        if quirk:
            quirks[quirk] += 1
        answered = predicted is not None or style != "videomme"
        overall.add(predicted == truth, answered)
        for key in group_by:
            if key in record:
                groups[key].setdefault(record[key], _Tally()).add(predicted == truth, answered)
    warnings: list[str] = []
    result = overall.result("overall", warnings)
    if quirks["empty"]:
        warnings.append(
            f"{quirks['empty']} mvbench replies without an option letter (e.g. empty) count as wrong; "
            "the official notebook counts them right"
        )
    if quirks["several"]:
        warnings.append(
            f"{quirks['several']} mvbench replies name several options; the first counts (the notebook accepts any)"
        )
    if quirks["unparsed"]:
        warnings.append(
            f"{quirks['unparsed']} egoschema replies name no option and count as wrong (lmms-eval guesses at random)"
        )
    if style == "videomme" and result["answered"] < result["total"]:
        warnings.append(
            f"{result['total'] - result['answered']} of {result['total']} videomme replies name no option and are "
            "left out of the denominator, as in the reference"
        )
    return {
        **result,
        "groups": {
            key: {value: tally.result(f"{key}={value}", warnings) for value, tally in values.items()}
            for key, values in groups.items()
        },
        "style": style,
        "warnings": warnings,
    }


class _Tally:
    def __init__(self) -> None:
        self.correct = self.answered = self.total = 0

    def add(self, correct: bool, answered: bool) -> None:
        self.total += 1
        self.answered += answered
        self.correct += correct

    def result(self, name: str, warnings: list[str]) -> dict[str, Any]:
        return {
            "accuracy": divide(self.correct, self.answered, f"accuracy ({name})", warnings),
            "correct": self.correct,
            "answered": self.answered,
            "total": self.total,
        }


def _choose(response: str, options: Sequence[str], style: str) -> tuple[str | None, str | None]:
    """The chosen letter, and which deviation from the reference applied (``None`` if none did)."""
    letters = string.ascii_uppercase[: len(options)]
    if style == "mvbench":
        return _mvbench_choice(response, letters)
    if style == "videomme":
        text = response.strip()
        for prefix in _VIDEOMME_PREFIXES:
            text = text.replace(prefix, "")
        match = _VIDEOMME_LETTER.search(text)
        return (match.group(0) if match else None), None
    choice = _egoschema_choice(response, options, letters)
    return choice, (None if choice else "unparsed")


def _mvbench_choice(response: str, letters: str) -> tuple[str | None, str | None]:
    token = ("(" + response.strip().split("\n")[0]).lower().split(" ")[0]
    bare = token.replace(".", "")
    matches = [c for c in letters if bare in f"({c.lower()})" or f"({c.lower()})" in token]
    if len(matches) == len(letters) > 1:  # a token with no letter, e.g. "(" from an empty reply
        return None, "empty"
    if len(matches) > 1:
        return min(matches, key=lambda c: token.find(f"({c.lower()})")), "several"
    return (matches[0] if matches else None), None


def _egoschema_choice(response: str, options: Sequence[str], letters: str) -> str | None:
    for char in _EGOSCHEMA_STRIP:
        response = response.strip(char)
    response = f" {response} "
    candidates = [f"({c})" for c in letters if f"({c})" in response]
    candidates += [f"{c} " for c in letters if f"{c} " in response]
    candidates += [f"{c}." for c in letters if f"{c}." in response]
    by_content = False
    if not candidates and len(response.split()) > 5:
        quoted = {c: f"{c}. {text}".strip().lower() for c, text in zip(letters, options)}
        candidates = [c for c in letters if quoted[c] in response.lower()]
        by_content = True
    if not candidates:
        return None
    if by_content:
        starts = [response.lower().rfind(quoted[c]) for c in candidates]
    else:
        starts = [response.rfind(c) for c in candidates]
    chosen = candidates[starts.index(min(starts))]
    return chosen.replace("(", "").replace(")", "").replace(".", "").strip()


def _answer_letter(answer: Any, options: Sequence[str], index: int) -> str:
    letters = string.ascii_uppercase[: len(options)]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return letters[answer]
    if isinstance(answer, str) and len(answer) == 1 and answer in letters:
        return answer
    raise InputError(
        f"video record {index} has answer {answer!r}; with {len(options)} options it must be a letter in "
        f"{letters!r} or an index 0-{len(options) - 1}. Loaders give letters."
    )


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
    prompt: Prompt | str = PROMPTS["mvbench"],
    data_list: Mapping[str, Sequence] | None = None,
) -> SampleSet:
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
        The samples; sample ids are ``<task>/<index>``.

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
    check_files(
        names,
        lambda t: (base / "json" / f"{t}.json").is_file(),
        "MVBench json/<task>.json files",
        base,
        "download OpenGVLab/MVBench and point root at the folder holding json/ and video/",
    )
    template = template_of(prompt)
    samples = []
    for task in names:
        task_type, folder, kind, bounded = known[task]
        video_root = base / "video" / Path((video_dirs or {}).get(task, folder))
        items = read_json(base / "json" / f"{task}.json", "MVBench")
        for index, item in enumerate(items):
            where = f"{base / 'json' / f'{task}.json'} item {index}"
            require(
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
                    answer_prefix=prompt.answer_prefix if isinstance(prompt, Prompt) else "",
                )
            )
    check_files(
        [s.media[0].path for s in samples],
        os.path.exists,
        "MVBench videos",
        base / "video",
        "unzip the video archives under video/ or pass video_dirs=",
    )
    info = {"root": str(base), "tasks": names, "num_frames": num_frames}
    return SampleSet("mvbench", samples, info=info, split_key="task_type")


def load_videomme(
    annotations: str | os.PathLike,
    video_dir: str | os.PathLike,
    num_frames: int = 32,
    durations: Iterable[str] | None = None,
    prompt: Prompt | str = PROMPTS["videomme"],
) -> SampleSet:
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
        The samples; sample ids are the question ids.

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
    template = template_of(prompt)
    samples, missing = [], []
    for index, row in enumerate(rows):
        where = f"{source} question {index}"
        require(
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
        raise_missing("Video-MME videos", sorted(set(missing)), videos, "download the videos into video_dir")
    check_unique(samples, "Video-MME", "remove duplicated questions from the annotation file")
    info = {"annotations": str(source), "video_dir": str(videos), "num_frames": num_frames}
    return SampleSet("videomme", samples, info=info, split_key="duration")


def load_egoschema(
    questions: str | os.PathLike,
    video_dir: str | os.PathLike,
    answers: str | os.PathLike | None = None,
    num_frames: int = 32,
    prompt: Prompt | str = PROMPTS["egoschema"],
) -> SampleSet:
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
        The samples; sample ids are the ``q_uid``.

    Raises:
        DatasetError: Missing files, fields or videos, or answers for unknown questions.
    """
    videos = Path(video_dir)
    items = {str(item.get("q_uid")): item for item in read_json(Path(questions), "EgoSchema")}
    keys = list(items)
    truth: dict[str, int] = {}
    if answers is not None:
        truth = read_json(Path(answers), "EgoSchema")
        check_files(
            list(truth),
            items.__contains__,
            "EgoSchema questions named in the answer file",
            Path(questions),
            "use the questions.json and subset_answers.json of one release",
        )
        keys = list(truth)
    template = template_of(prompt)
    samples = []
    for key in keys:
        item = items[key]
        option_keys = [f"option {k}" for k in range(5)]
        require(item, ("q_uid", "question", *option_keys), f"{questions} question {key}", "EgoSchema")
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
    check_files(
        [s.media[0].path for s in samples],
        os.path.exists,
        "EgoSchema videos",
        videos,
        "download the videos into video_dir",
    )
    return SampleSet(
        "egoschema", samples, info={"questions": str(questions), "answers": str(answers), "num_frames": num_frames}
    )


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


def _load(root: Path, media: Path | None, splits: list[str] | None, options: DataOptions) -> Loaded:
    kind = options.video_format or _video_format(root)
    if kind not in FORMATS:
        raise ConfigError(
            f"--video-format {kind!r} is not supported; choose one of {', '.join(FORMATS)}."
            + did_you_mean(kind, FORMATS)
        )
    frames = {} if options.num_frames is None else {"num_frames": options.num_frames}
    choices = {"format": kind, "num_frames": options.num_frames}
    if kind == "mvbench":
        tasks = splits or sorted(p.stem for p in (root / "json").glob("*.json"))
        listed = root / "data_list.json"
        if listed.is_file():
            data_list = json.loads(listed.read_text(encoding="utf-8"))
            samples = load_mvbench(root, tasks=tasks, data_list=data_list, **frames)
            return Loaded(samples, {"data_list": str(listed)}, choices)
        return Loaded(load_mvbench(root, tasks=tasks, **frames), {}, choices)
    videos = media or first_dir(root if root.is_dir() else root.parent, ("videos", "video", "data"))
    if videos is None:
        raise DatasetError(f"{kind}: no video folder found beside {root} (videos/, video/ or data/); pass --media.")
    if kind == "videomme":
        annotations = root if root.is_file() else _single(root, ("*.json", "*.parquet"), "Video-MME annotation")
        samples = load_videomme(annotations, videos, durations=splits, **frames)
        return Loaded(samples, {"media": str(videos), "annotations": str(annotations)}, choices)
    folder = root if root.is_dir() else root.parent
    answers = folder / "subset_answers.json"
    samples = load_egoschema(
        folder / "questions.json", videos, answers=answers if answers.is_file() else None, **frames
    )
    return Loaded(samples, {"media": str(videos), "answers": str(answers) if answers.is_file() else None}, choices)


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


def _single(root: Path, patterns: Sequence[str], what: str) -> Path:
    found = sorted(path for pattern in patterns for path in root.glob(pattern))
    if len(found) != 1:
        raise DatasetError(
            f"expected exactly one {what} file ({', '.join(patterns)}) in {root}, found {len(found)}; "
            "pass the file itself as --data."
        )
    return found[0]


def _score_rows(rows, data, style, warnings):
    kind = data["format"]
    answered = [row for row in rows if row["metadata"].get("answer") is not None]
    if len(answered) < len(rows):
        warnings.append(
            f"{len(rows) - len(answered)} video questions have no answer key (EgoSchema full set) and are not scored"
        )
    if not answered:
        return {}, {}
    records = [{**row["metadata"], "response": row["response"]} for row in answered]
    details = score(records, kind, group_by=_GROUPS[kind])
    return {"accuracy": details["accuracy"]}, details


BENCHMARK = Benchmark(
    name="video",
    summary="video multiple choice: MVBench, Video-MME or EgoSchema (--video-format); letter accuracy",
    load=_load,
    score=_score_rows,
    prompts=PROMPTS,
    max_new_tokens=16,
    primary="accuracy",
    metric_title="video {}",
    media="video",
)
