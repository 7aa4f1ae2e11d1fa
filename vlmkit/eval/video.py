"""Multiple-choice scoring for video benchmarks: extract the chosen option, then accuracy per group.

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
    >>> from vlmkit.eval import video
    >>> video.parse_choice("B) a red ball", ["a cube", "a red ball"], style="mvbench")
    'B'
    >>> video.parse_choice("The best answer is C.", ["w", "x", "y", "z"], style="videomme")
    'C'
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from vlmkit.errors import InputError
from vlmkit.eval._common import check_style, divide

STYLES = ("mvbench", "videomme", "egoschema")

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
