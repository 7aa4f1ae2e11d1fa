"""POPE scoring: turn free-text answers into yes/no and compute the POPE metrics.

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
    >>> from vlmkit.eval import pope
    >>> pope.parse("No, there is not.")
    'no'
    >>> pope.parse("NO")  # case-sensitive, like the reference
    'yes'
    >>> r = pope.score(["Yes", "No", "Yes", "Yes"], ["yes", "no", "no", "yes"])
    >>> r["TP"], r["FP"], r["TN"], r["FN"], r["yes_ratio"]
    (2, 1, 1, 0, 0.75)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlmkit.errors import InputError
from vlmkit.eval._common import check_style, divide

STYLES = ("llava", "opera", "vcd", "lmms_eval")
"""Parsing styles, each named after the codebase whose script it reproduces."""

SPLITS = ("random", "popular", "adversarial")
"""The three POPE sampling strategies whose mean F1 is the LLaVA paper's single "POPE" number."""

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
