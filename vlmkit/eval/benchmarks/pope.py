"""POPE: the question files and their images, the answer parsers in common use, and the POPE metrics.

**Loading** (:func:`load_pope`): RUCAIBox/POPE question files (JSON lines) with an image folder, or
lmms-eval's parquet files with embedded images. Each sample's ``metadata`` holds ``split``,
``question_id``, ``image`` (question files only) and ``label``; replies grouped by split score with
:func:`score_splits` (answers and labels pair by position). Under ``vlmkit eval --bench pope``,
``--data`` is a question file, a folder of ``*pope*.json`` files, or lmms-eval parquet; images are in
``--media`` or else ``<data>/images`` or ``<data>/val2014`` (for a file: beside it); ``--split``
picks splits. The prompts, by codebase, are in :data:`PROMPTS`.

**Scoring.**

The same raw outputs score differently under the parsers in common use, so every call names its
``style`` (default ``"llava"``, the de-facto standard). Each style behaves exactly as its reference:

* ``"llava"``: RUCAIBox/POPE ``evaluate.py`` @3df3ba1b110ecce25696989577fad583b67d4239, identical to
  haotian-liu/LLaVA ``llava/eval/eval_pope.py`` @c121f0432da27facab705978f83c4ada465e46fd. Keep the text
  before the first ``.``, drop commas, split on single spaces; the answer is "no" when one of the
  words is exactly ``No``, ``no`` or ``not``, and "yes" otherwise. Case-sensitive: ``"NO"`` and
  ``"No!"`` are yes, so is an empty answer.
* ``"opera"``: shikiw/OPERA ``pope_eval.py::recorder`` @61426efe4e2e53207f32d9112a86ba5f8364d1d9.
  Drop every ``.`` and ``,``, split on single spaces; "no" when a word is ``No``, ``no``, ``not`` or
  ``NO`` or ends with ``n't``, else "yes".
* ``"vcd"``: DAMO-NLP-SG/VCD ``experiments/eval/eval_pope.py`` @d6568ff81b8fd306a49e630df44f2db5c2300191.
  A substring test against the label on the lowercased, stripped answer: a yes-labelled question is
  a true positive when ``"yes"`` occurs anywhere (``"eyes"`` counts), otherwise a false negative; a
  no-labelled question is a true negative when ``"no"`` occurs anywhere (``"not"``, ``"know"``,
  ``"snow"``, ``"none"`` count), otherwise a false positive.
* ``"lmms_eval"``: EvolvingLMMs-Lab/lmms-eval ``lmms_eval/tasks/pope/utils.py``
  @75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3. No parsing: the lowercased, stripped answer must equal
  ``"yes"`` or ``"no"``; anything else (``"yes."``) is "other": never a positive or a negative
  prediction, but still in the accuracy denominator.

Metrics follow the references' formulas (precision, recall, F1, accuracy over all answers), with two
deliberate differences: ``yes_ratio`` is the share of *predicted* yes in every style (lmms-eval
reports the ground-truth share, always 0.5), and a zero denominator gives 0.0 plus a message in
``"warnings"`` instead of a ZeroDivisionError. Answers pair with labels by position, as in the
references.

Example:
    >>> from vlmkit.eval.benchmarks import pope
    >>> pope.parse("No, there is not.")
    'no'
    >>> pope.parse("NO")  # case-sensitive, like the reference
    'yes'
    >>> r = pope.score(["Yes", "No", "Yes", "Yes"], ["yes", "no", "no", "yes"])
    >>> r["TP"], r["FP"], r["TN"], r["FN"], r["yes_ratio"]
    (2, 1, 1, 0, 0.75)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmkit.errors import DatasetError, InputError, missing_extra
from vlmkit.eval._common import check_style, divide
from vlmkit.eval.benchmarks.base import (
    SHORT_ANSWER,
    Benchmark,
    DataOptions,
    Loaded,
    Prompt,
    Sample,
    SampleSet,
    check_files,
    check_unique,
    first_dir,
    require,
    template_of,
)
from vlmkit.eval.media import ImageBytes, ImageFile

STYLES = ("llava", "opera", "vcd", "lmms_eval")
"""Parsing styles, each named after the codebase whose script it reproduces."""

SPLITS = ("random", "popular", "adversarial")
"""The three POPE sampling strategies whose mean F1 is the LLaVA paper's single "POPE" number."""

PROMPTS = {
    "llava": Prompt(
        "{question}" + SHORT_ANSWER, source="haotian-liu/LLaVA playground/data/eval/pope/llava_pope_test.jsonl"
    ),
    "vcd": Prompt(
        "{question} Please answer this question with one word.",
        source="DAMO-NLP-SG/VCD experiments/eval/object_hallucination_vqa_llava.py",
    ),
    "opera": Prompt("{question}", source="shikiw/OPERA pope_eval.py (the question alone in the model template)"),
}
"""POPE prompts by codebase; ``"llava"`` (also lmms-eval's) is the default."""

_LLAVA_NEGATIVES = frozenset({"No", "not", "no"})
_OPERA_NEGATIVES = frozenset({"No", "not", "no", "NO"})


def parse(answer: str, style: str = "llava", label: str | None = None) -> str:
    """Map one free-text answer to ``"yes"``, ``"no"`` or ``"other"`` as the style's reference does.

    Args:
        answer: The model's raw answer.
        style: One of :data:`STYLES`.
        label: Only used by ``"vcd"``, whose test depends on the label: with a label, the result is
            the prediction VCD's counting implies ("yes" for a yes-label answer containing "yes",
            otherwise "no"; "no" for a no-label answer containing "no", otherwise "yes"). Without
            a label, ``"vcd"`` returns "yes" or "no" when exactly one of the two substrings occurs,
            and "other" when both or neither do.

    Returns:
        ``"yes"`` or ``"no"``; ``"other"`` only for ``"lmms_eval"`` and unlabelled ``"vcd"``.

    Raises:
        ConfigError: Unknown style.
        InputError: ``label`` is not yes/no.
    """
    check_style(style, STYLES, "POPE")
    if style == "llava":
        words = answer.split(".")[0].replace(",", "").split(" ")
        return "no" if _LLAVA_NEGATIVES.intersection(words) else "yes"
    if style == "opera":
        words = answer.replace(".", "").replace(",", "").split(" ")
        negative = any(w in _OPERA_NEGATIVES or w.endswith("n't") for w in words)
        return "no" if negative else "yes"
    text = answer.lower().strip()
    if style == "lmms_eval":
        return text if text in ("yes", "no") else "other"
    has_yes, has_no = "yes" in text, "no" in text
    if label is None:
        if has_yes == has_no:
            return "other"
        return "yes" if has_yes else "no"
    if _normalise_label(label, 0) == "yes":
        return "yes" if has_yes else "no"
    return "no" if has_no else "yes"


def score(answers: Sequence[str], labels: Sequence[str], style: str = "llava") -> dict[str, Any]:
    """Score one POPE split.

    Args:
        answers: Raw model answers, in question-file order.
        labels: Ground-truth ``"yes"``/``"no"`` labels, same order (case and surrounding spaces ignored).
        style: One of :data:`STYLES`.

    Returns:
        ``{"TP", "FP", "TN", "FN", "other", "n", "accuracy", "precision", "recall", "f1",
        "yes_ratio", "style", "warnings"}``. Metrics are fractions; ``yes_ratio`` is the share of
        answers parsed as yes; ``other`` counts answers that are neither (lmms_eval style only).

    Raises:
        ConfigError: Unknown style.
        InputError: Lengths differ or a label is not yes/no.

    Example:
        >>> score(["yes.", "no"], ["yes", "no"], style="lmms_eval")["accuracy"]
        0.5
    """
    check_style(style, STYLES, "POPE")
    if len(answers) != len(labels):
        raise InputError(
            f"POPE score got {len(answers)} answers but {len(labels)} labels; they pair by position, "
            "so both must come from the same question file in the same order."
        )
    counts = {"TP": 0, "FP": 0, "TN": 0, "FN": 0, "other": 0}
    for index, (answer, label) in enumerate(zip(answers, labels)):
        truth = _normalise_label(label, index)
        predicted = parse(answer, style, label=truth) if style == "vcd" else parse(answer, style)
        if predicted == "other":
            counts["other"] += 1
        elif predicted == "yes":
            counts["TP" if truth == "yes" else "FP"] += 1
        else:
            counts["TN" if truth == "no" else "FN"] += 1
    tp, fp, tn, fn = counts["TP"], counts["FP"], counts["TN"], counts["FN"]
    warnings: list[str] = []
    n = len(answers)
    precision = divide(tp, tp + fp, "precision", warnings)
    recall = divide(tp, tp + fn, "recall", warnings)
    f1 = divide(2 * precision * recall, precision + recall, "f1", warnings)
    accuracy = divide(tp + tn, n, "accuracy", warnings)
    yes_ratio = divide(tp + fp, n, "yes_ratio", warnings)
    if counts["other"]:
        warnings.append(
            f"{counts['other']} of {n} answers are neither 'yes' nor 'no' under style {style!r}; they count as wrong"
        )
    return {
        **counts,
        "n": n,
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": yes_ratio,
        "style": style,
        "warnings": warnings,
    }


def score_splits(splits: Mapping[str, tuple[Sequence[str], Sequence[str]]], style: str = "llava") -> dict[str, Any]:
    """Score several POPE splits and average their F1 (the LLaVA paper's single "POPE" number).

    Args:
        splits: ``{split_name: (answers, labels)}``, normally ``random``, ``popular`` and ``adversarial``.
        style: One of :data:`STYLES`.

    Returns:
        ``{"splits": {name: score(...)}, "mean_f1", "mean_accuracy", "style", "warnings"}``; the means
        are unweighted over the splits given. ``warnings`` carries each split's warnings (prefixed
        with its name) and says when the splits are not exactly the three standard ones.

    Raises:
        InputError: ``splits`` is empty, or as :func:`score`.

    Example:
        >>> r = score_splits({"random": (["yes"], ["yes"]), "popular": (["no"], ["yes"])})
        >>> r["mean_f1"]
        0.5
    """
    if not splits:
        raise InputError(f"POPE score_splits got no splits; pass {{split: (answers, labels)}} for {', '.join(SPLITS)}.")
    results = {name: score(answers, labels, style) for name, (answers, labels) in splits.items()}
    warnings = [f"{name}: {message}" for name, result in results.items() for message in result["warnings"]]
    if set(results) != set(SPLITS):
        warnings.append(
            f"mean over splits {sorted(results)}; the published POPE number averages exactly {list(SPLITS)}"
        )
    return {
        "splits": results,
        "mean_f1": sum(r["f1"] for r in results.values()) / len(results),
        "mean_accuracy": sum(r["accuracy"] for r in results.values()) / len(results),
        "style": style,
        "warnings": warnings,
    }


def _normalise_label(label: str, index: int) -> str:
    truth = str(label).lower().strip()
    if truth not in ("yes", "no"):
        raise InputError(
            f"POPE label {label!r} at position {index} is not 'yes' or 'no'; POPE question files "
            "label every question yes or no; check that the labels come from the question file."
        )
    return truth


def load_pope(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    splits: Iterable[str] | None = None,
    prompt: Prompt | str = PROMPTS["llava"],
) -> SampleSet:
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
        The samples; they keep file order, so each split's answers and labels pair by position.

    Raises:
        DatasetError: Missing files, images, fields or splits; the message lists them.
    """
    source = Path(path)
    template = template_of(prompt)
    wanted = None if splits is None else list(splits)
    parquet = (
        sorted(source.rglob("*.parquet")) if source.is_dir() else ([source] if source.suffix == ".parquet" else [])
    )
    if parquet:
        return _load_parquet(source, parquet, wanted, template)
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
            require(row, ("question_id", "image", "text", "label"), f"{file}:{line_number}", "POPE")
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
    check_unique(samples, "POPE", "load one question file (or split) at a time")
    check_files(
        {s.metadata["image"] for s in samples},
        lambda name: (images / name).is_file(),
        "POPE images",
        images,
        "copy the images the question files name into image_dir",
    )
    return SampleSet(
        "pope",
        samples,
        info={"files": [str(f) for f in files], "image_dir": str(images), "splits": sorted(found)},
        split_key="split",
    )


def _load_parquet(source: Path, files: list[Path], wanted: list[str] | None, template: str) -> SampleSet:
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
    info = {"files": [str(f) for f in files], "splits": sorted(found)}
    return SampleSet("pope", stream, size=size, info=info, split_key="split")


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


def _check_splits(wanted: list[str] | None, found: set[str], source: Path) -> None:
    if wanted is not None and set(wanted) - found:
        raise DatasetError(
            f"POPE splits {sorted(set(wanted) - found)} are not in {source}; it has {sorted(found)} "
            f"(standard: {', '.join(SPLITS)})."
        )


def _load(root: Path, media: Path | None, splits: list[str] | None, options: DataOptions) -> Loaded:
    parquet = root.suffix == ".parquet" or (root.is_dir() and any(root.rglob("*.parquet")))
    images = None if parquet else media or first_dir(root if root.is_dir() else root.parent, ("images", "val2014"))
    return Loaded(load_pope(root, images, splits=splits), {"media": str(images) if images else None}, {})


def _score_rows(rows, data, style, warnings):
    splits: dict[str, tuple[list[str], list[str]]] = {}
    for row in rows:
        answers, labels = splits.setdefault(row["metadata"]["split"], ([], []))
        answers.append(row["response"])
        labels.append(row["metadata"]["label"])
    details = score_splits(splits, style)
    per_split = details["splits"].values()
    metrics = {
        "f1": details["mean_f1"],
        "accuracy": details["mean_accuracy"],
        "precision": sum(s["precision"] for s in per_split) / len(per_split),
        "recall": sum(s["recall"] for s in per_split) / len(per_split),
        "yes_ratio": sum(s["yes_ratio"] for s in per_split) / len(per_split),
    }
    return metrics, details


BENCHMARK = Benchmark(
    name="pope",
    summary="POPE object-existence questions (yes/no), scored per split; mean F1 over splits",
    load=_load,
    score=_score_rows,
    prompts=PROMPTS,
    max_new_tokens=16,
    primary="f1",
    metric_title="POPE {} (mean over splits)",
    styles=STYLES,
    default_style="llava",
)
