"""MME: the release folder's yes/no questions, their parsing, per-subtask acc / acc+ / score, and the totals.

**Loading** (:func:`load_mme`): the ``MME_Benchmark_release_version`` folder, both subtask
layouts. Each sample's ``metadata`` holds ``subtask``, ``image``, ``question`` and ``gt``; score
``{**metadata, "response": reply}`` grouped by subtask with :func:`score`. Under ``vlmkit eval
--bench mme``, ``--data`` is the release folder and ``--split`` picks subtasks (default: those
present).

**Scoring.**

Follows the official tool, BradyFU/Awesome-Multimodal-Large-Language-Models branch ``Evaluation``
@dd2950902889cd614d4edf606827240166d29381, ``tools/eval_tool.zip`` -> ``eval_tool/calculation.py``
(zip sha256 b8125e2a7c3418e5761c12b3cfe4f1624b3c53ba44009e75b7d3f797d3d8acee):

* **Parsing.** The tool lowercases the response as read from its results file, so it still ends in
  the line's ``"\\n"``. An exact ``"yes"``/``"no"`` therefore never matches; the label comes from the
  first four characters: "yes" if they contain ``yes``, else "no" if they contain ``no``, else
  "other". So ``"n"`` and ``"y"`` are other, ``"not sure"`` and ``"none"`` are no, ``"The answer
  is yes"`` is other and ``"yesterday"`` is yes. ``style="lmms_eval"`` reproduces lmms-eval's variant
  (``lmms_eval/tasks/mme/utils.py::parse_pred_ans`` @75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3: strip
  and drop ``.`` first, and accept a lone ``y``/``n``).
* **Metrics.** Per subtask, ``acc`` is the share of correct answers ("other" is always wrong),
  ``acc_plus`` the share of images whose two questions are both right, and
  ``score = acc*100 + acc_plus*100`` (max 200). Perception sums the 10 perception subtasks (max
  2000), Cognition the 4 cognition ones (max 800), in the tool's order, so the floats match it
  digit for digit.

One difference: the tool pairs *consecutive lines* into images; here questions are grouped by their
``image`` field, which gives the same result on files in the official order and the right one when
a runner wrote results in another order.

Example:
    >>> from vlmkit.eval.benchmarks import mme
    >>> mme.parse("Yes, there is.")
    'yes'
    >>> mme.parse("n")
    'other'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import DatasetError, InputError, did_you_mean
from vlmkit.eval._common import check_style
from vlmkit.eval.benchmarks.base import (
    SHORT_ANSWER,
    Benchmark,
    DataOptions,
    Loaded,
    Prompt,
    Sample,
    SampleSet,
    check_files,
    raise_missing,
    template_of,
)
from vlmkit.eval.media import ImageFile

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
"""The 10 perception subtasks, in the official tool's order."""

COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
"""The 4 cognition subtasks, in the official tool's order."""

SUBTASKS = PERCEPTION + COGNITION
STYLES = ("official", "lmms_eval")

PROMPTS = {
    "llava": Prompt(
        "{question}" + SHORT_ANSWER, source="haotian-liu/LLaVA playground/data/eval/MME/llava_mme.jsonl"
    )
}
"""MME's prompt: the question without "Please answer yes or no." (and the spaces before it), then LLaVA's suffix."""

MME_YES_NO = "Please answer yes or no."
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
_RELEASE_FOLDERS = ("", "MME_Benchmark_release_version", "MME_Benchmark", "MME_Benchmark_release_version/MME_Benchmark")
_RECORD_KEYS = ("image", "question", "gt", "response")


def parse(response: str, style: str = "official") -> str:
    """Map a model response to ``"yes"``, ``"no"`` or ``"other"``.

    Args:
        response: The raw response (one line, as written to the official results file).
        style: ``"official"`` (``calculation.py``) or ``"lmms_eval"``.

    Returns:
        ``"yes"``, ``"no"`` or ``"other"``.

    Raises:
        ConfigError: Unknown style.
    """
    check_style(style, STYLES, "MME")
    if style == "official":
        text = response.lower() + "\n"  # the tool reads the line with its newline
    else:
        text = response.lower().strip().replace(".", "")
        if len(text) == 1:
            return {"y": "yes", "n": "no"}.get(text, "other")
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    return "no" if "no" in prefix else "other"


def score(results: Mapping[str, Sequence[Mapping[str, str]]], style: str = "official") -> dict[str, Any]:
    """Score MME results.

    Args:
        results: ``{subtask: [{"image", "question", "gt", "response"}, ...]}`` with subtask names as
            in :data:`SUBTASKS` and ``gt`` ``"Yes"``/``"No"``. Every image needs exactly two questions.
        style: Parsing style, see :func:`parse`.

    Returns:
        ``{"subtasks": {name: {"acc", "acc_plus", "score", "questions", "images", "other"}},
        "perception", "cognition", "total", "warnings"}``. Totals sum the subtasks present, in the
        official order; ``warnings`` lists the subtasks missing from a total.

    Raises:
        ConfigError: Unknown style.
        InputError: Unknown subtask, missing record keys, a ground truth other than yes/no, or an
            image without exactly two questions.

    Example:
        >>> rows = [{"image": "1.jpg", "question": "q1", "gt": "Yes", "response": "Yes"},
        ...         {"image": "1.jpg", "question": "q2", "gt": "No", "response": "Yes"}]
        >>> score({"color": rows})["subtasks"]["color"]["score"]
        50.0
    """
    check_style(style, STYLES, "MME")
    unknown = [name for name in results if name not in SUBTASKS]
    if unknown:
        by_lower = {name.lower(): name for name in SUBTASKS}
        hint = by_lower.get(str(unknown[0]).lower())
        raise InputError(
            f"MME subtask {unknown[0]!r} is not an MME subtask; valid: {', '.join(SUBTASKS)}."
            f"{f' Did you mean {hint!r}?' if hint else did_you_mean(str(unknown[0]), SUBTASKS)}"
            " Name results by the benchmark's folder names."
        )
    subtasks = {name: _score_subtask(name, results[name], style) for name in SUBTASKS if name in results}
    warnings = []
    totals = {}
    for total_name, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        total = 0.0
        for name in members:
            if name in subtasks:
                total += subtasks[name]["score"]
        missing = [name for name in members if name not in subtasks]
        if missing:
            warnings.append(
                f"{total_name} total covers {len(members) - len(missing)} of {len(members)} subtasks; "
                f"missing: {', '.join(missing)}"
            )
        totals[total_name] = total
    return {
        "subtasks": subtasks,
        "perception": totals["perception"],
        "cognition": totals["cognition"],
        "total": totals["perception"] + totals["cognition"],
        "style": style,
        "warnings": warnings,
    }


def _score_subtask(name: str, records: Sequence[Mapping[str, str]], style: str) -> dict[str, Any]:
    by_image: dict[str, list[bool]] = {}
    other = 0
    for index, record in enumerate(records):
        missing = [key for key in _RECORD_KEYS if key not in record]
        if missing:
            raise InputError(
                f"MME {name} record {index} lacks {', '.join(missing)}; each record needs {', '.join(_RECORD_KEYS)}."
            )
        truth = str(record["gt"]).lower()
        if truth not in ("yes", "no"):
            raise InputError(f"MME {name} record {index} has gt {record['gt']!r}; MME ground truth is 'Yes' or 'No'.")
        predicted = parse(record["response"], style)
        other += predicted == "other"
        by_image.setdefault(record["image"], []).append(predicted == truth)
    if not by_image:
        raise InputError(f"MME {name} has no records; leave the subtask out instead of passing an empty list.")
    odd = {image: len(answers) for image, answers in by_image.items() if len(answers) != 2}
    if odd:
        image, count = next(iter(odd.items()))
        raise InputError(
            f"MME {name} image {image!r} has {count} question(s); every MME image has exactly 2 "
            f"({len(odd)} image(s) affected). Score complete results only."
        )
    correct = sum(sum(answers) for answers in by_image.values())
    questions = 2 * len(by_image)
    acc = correct / questions
    acc_plus = sum(all(answers) for answers in by_image.values()) / len(by_image)
    return {
        "acc": acc,
        "acc_plus": acc_plus,
        "score": acc * 100 + acc_plus * 100,
        "questions": questions,
        "images": len(by_image),
        "other": other,
    }


def load_mme(
    root: str | os.PathLike,
    subtasks: Iterable[str] | None = None,
    prompt: Prompt | str = PROMPTS["llava"],
) -> SampleSet:
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
        The samples; sample ids are ``<subtask>/<image>/<0|1>``.

    Raises:
        DatasetError: Missing subtask folders, question files, images, or malformed lines.
    """
    base = Path(root)
    folder = next((c for c in _release_folders(base) if any((c / t).is_dir() for t in SUBTASKS)), None)
    if folder is None:
        raise DatasetError(
            f"MME: no subtask folder ({', '.join(SUBTASKS)}) found in {base} or its "
            "MME_Benchmark_release_version/ or MME_Benchmark/ subfolders; point root at the unzipped release."
        )
    names = list(SUBTASKS) if subtasks is None else list(subtasks)
    unknown = [t for t in names if t not in SUBTASKS]
    if unknown:
        raise DatasetError(f"MME subtasks {unknown} do not exist; valid: {', '.join(SUBTASKS)}.")
    check_files(
        names, lambda t: (folder / t).is_dir(), "MME subtask folders", folder, "unzip the complete MME release"
    )
    template = template_of(prompt)
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
                        prompt=template.format(question=question.replace(MME_YES_NO, "").strip()),
                        target=answer,
                        media=(ImageFile(image),),
                        metadata={"subtask": task, "image": image.name, "question": question, "gt": answer},
                    )
                )
    if missing:
        raise_missing("MME question files or images", missing, folder, "unzip the complete MME release")
    return SampleSet("mme", samples, info={"root": str(folder), "subtasks": names}, split_key="subtask")


def _release_folders(root: Path) -> list[Path]:
    return [root / name if name else root for name in _RELEASE_FOLDERS]


def _load(root: Path, media: Path | None, splits: list[str] | None, options: DataOptions) -> Loaded:
    return Loaded(load_mme(root, subtasks=splits or _present_subtasks(root)), {}, {})


def _present_subtasks(root: Path) -> list[str] | None:
    """The subtasks present in an MME folder (in the official order); None lets the loader explain."""
    for folder in _release_folders(root):
        present = [name for name in SUBTASKS if (folder / name).is_dir()]
        if present:
            return present
    return None


def _score_rows(rows, data, style, warnings):
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
    details = score(results, style)
    return {"perception": details["perception"], "cognition": details["cognition"], "total": details["total"]}, details


BENCHMARK = Benchmark(
    name="mme",
    summary="MME yes/no perception and cognition subtasks; acc + acc+ scores, perception / cognition totals",
    load=_load,
    score=_score_rows,
    prompts=PROMPTS,
    max_new_tokens=16,
    primary="perception",
    metric_title="MME {} score",
    styles=STYLES,
    default_style="official",
)
