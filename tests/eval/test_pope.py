"""POPE parsing styles, metrics and their quirks."""

from __future__ import annotations

import pytest

from vlmkit.errors import ConfigError, InputError
from vlmkit.eval.benchmarks import pope

from .fixtures import pope_rows


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("No", "no"),
        ("no", "no"),
        ("No, there is not.", "no"),
        ("I do not see one", "no"),
        ("Yes, no doubt", "no"),  # any word "no" wins
        ("NO", "yes"),  # case-sensitive
        ("No!", "yes"),  # punctuation other than . and , sticks to the word
        ("There isn't a dog", "yes"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("", "yes"),
        ("\nNo", "yes"),  # split on spaces only
    ],
)
def test_llava_style(answer, expected):
    assert pope.parse(answer) == expected
    assert pope.parse(answer, style="llava") == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("NO", "no"),
        ("There isn't a dog", "no"),
        ("Yes. No.", "no"),  # periods are removed everywhere, not cut
        ("No!", "yes"),
        ("Yes", "yes"),
        ("I don't know", "no"),
    ],
)
def test_opera_style(answer, expected):
    assert pope.parse(answer, style="opera") == expected


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        ("Yes", "yes", "yes"),
        ("I see eyes", "yes", "yes"),  # substring "yes"
        ("No", "yes", "no"),
        ("Maybe", "yes", "no"),  # no "yes": a false negative
        ("I don't know", "no", "no"),  # "know" contains "no"
        ("Snow", "no", "no"),
        ("Nothing there", "no", "no"),
        ("Yes", "no", "yes"),
        ("Maybe", "no", "yes"),  # no "no": a false positive
        ("yes and no", "yes", "yes"),
        ("yes and no", "no", "no"),
    ],
)
def test_vcd_style_depends_on_label(answer, label, expected):
    assert pope.parse(answer, style="vcd", label=label) == expected


def test_vcd_style_without_label():
    assert pope.parse("Yes", style="vcd") == "yes"
    assert pope.parse("none", style="vcd") == "no"
    assert pope.parse("yes and no", style="vcd") == "other"
    assert pope.parse("maybe", style="vcd") == "other"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("yes", "yes"), ("  YES \n", "yes"), ("No", "no"), ("Yes.", "other"), ("yes, there is", "other"), ("", "other")],
)
def test_lmms_eval_style_is_exact_match(answer, expected):
    assert pope.parse(answer, style="lmms_eval") == expected


def test_four_rows_by_hand():
    result = pope.score(["Yes", "No", "Yes", "Yes"], ["yes", "no", "no", "yes"])
    assert (result["TP"], result["FP"], result["TN"], result["FN"]) == (2, 1, 1, 0)
    assert result["accuracy"] == 0.75
    assert result["precision"] == 2 / 3
    assert result["recall"] == 1.0
    assert result["f1"] == 0.8
    assert result["yes_ratio"] == 0.75
    assert result["warnings"] == []


def test_lmms_eval_other_is_wrong_but_counted():
    result = pope.score(["Yes.", "yes", "no", "No"], ["yes", "yes", "no", "yes"], style="lmms_eval")
    assert (result["TP"], result["FP"], result["TN"], result["FN"], result["other"]) == (1, 0, 1, 1, 1)
    assert result["accuracy"] == 0.5  # "Yes." is in the denominator
    assert result["recall"] == 0.5  # ... but neither a TP nor an FN
    assert result["yes_ratio"] == 0.25  # predicted yes, not ground-truth yes (lmms-eval reports 0.75 here)
    assert any("neither 'yes' nor 'no'" in w for w in result["warnings"])


def test_vcd_counting():
    answers = ["Yes", "eyes", "I don't know", "Sure", "No"]
    labels = ["yes", "yes", "no", "no", "yes"]
    result = pope.score(answers, labels, style="vcd")
    assert (result["TP"], result["FP"], result["TN"], result["FN"]) == (2, 1, 1, 1)
    assert result["yes_ratio"] == 3 / 5


def test_division_by_zero_is_flagged_not_raised():
    result = pope.score(["No", "No"], ["yes", "no"])
    assert result["precision"] == 0.0 and result["f1"] == 0.0
    assert any(w.startswith("precision") for w in result["warnings"])
    assert any(w.startswith("f1") for w in result["warnings"])
    empty = pope.score([], [])
    assert empty["accuracy"] == 0.0 and empty["yes_ratio"] == 0.0
    assert any(w.startswith("accuracy") for w in empty["warnings"])


def _rows(tp, fp, tn, fn):
    return ["Yes"] * tp + ["Yes"] * fp + ["No"] * tn + ["No"] * fn, ["yes"] * tp + ["no"] * fp + ["no"] * tn + [
        "yes"
    ] * fn


def test_reproduces_llava_eval_pope_digits():
    # haotian-liu/LLaVA llava/eval/eval_pope.py on LLaVA-1.5-13B's released answers
    # (playground/data/eval/pope/answers/llava-v1.5-13b.jsonl @32cebc3, labels RUCAIBox/POPE @e3e3926)
    # printed these; the metrics depend only on the four counts, which the synthetic rows reproduce.
    expected = {
        "adversarial": ((1182, 117, 1383, 318), 0.855, 0.9099307159353349, 0.788, 0.8445873526259379, 0.433),
        "random": (
            (1182, 31, 1379, 318),
            0.8800687285223368,
            0.9744435284418796,
            0.788,
            0.8713601179506082,
            0.4168384879725086,
        ),
        "popular": (
            (1182, 59, 1441, 318),
            0.8743333333333333,
            0.9524576954069299,
            0.788,
            0.8624589565851879,
            0.4136666666666667,
        ),
    }
    result = pope.score_splits({split: _rows(*counts) for split, (counts, *_) in expected.items()})
    for split, (counts, acc, precision, recall, f1, yes_ratio) in expected.items():
        got = result["splits"][split]
        assert (got["TP"], got["FP"], got["TN"], got["FN"]) == counts
        assert (got["accuracy"], got["precision"], got["recall"], got["f1"], got["yes_ratio"]) == (
            acc,
            precision,
            recall,
            f1,
            yes_ratio,
        )
    assert result["mean_f1"] == (0.8445873526259379 + 0.8713601179506082 + 0.8624589565851879) / 3
    assert round(result["mean_f1"] * 100, 1) == 85.9
    assert result["warnings"] == []


# What each reference printed on fixtures.pope_rows(): LLaVA eval_pope.py, OPERA pope_eval.py
# (recorder + print_acc), VCD experiments/eval/eval_pope.py, lmms-eval pope_aggregate_* (whose yes
# ratio, 0.5, is the ground truth's; ours is the predictions').
POPE_REFERENCE = {  # (TP, FP, TN, FN), accuracy, precision, recall, f1, yes_ratio
    "llava": ((23, 20, 11, 8), 0.5483870967741935, 0.5348837209302325,
              0.7419354838709677, 0.6216216216216216, 0.6935483870967742),
    "opera": ((19, 16, 15, 12), 0.5483870967741935, 0.5428571428571428,
              0.6129032258064516, 0.5757575757575757, 0.5645161290322581),
    "vcd": ((15, 11, 20, 16), 0.5645161290322581, 0.5769230769230769,
            0.4838709677419355, 0.5263157894736842, 0.41935483870967744),
    "lmms_eval": ((9, 6, 6, 3), 0.24193548387096775, 0.6, 0.75, 0.6666666666666665, 15 / 62),
}  # fmt: skip


@pytest.mark.parametrize("style", pope.STYLES)
def test_reproduces_each_reference_on_quirky_answers(style):
    rows = pope_rows()
    result = pope.score([a for a, _ in rows], [label for _, label in rows], style=style)
    counts, accuracy, precision, recall, f1, yes_ratio = POPE_REFERENCE[style]
    assert (result["TP"], result["FP"], result["TN"], result["FN"]) == counts
    assert (result["accuracy"], result["precision"], result["recall"], result["f1"]) == (
        accuracy,
        precision,
        recall,
        f1,
    )
    assert result["yes_ratio"] == yes_ratio
    assert result["other"] == (38 if style == "lmms_eval" else 0)


def test_score_splits_flags_nonstandard_splits_and_carries_warnings():
    result = pope.score_splits({"random": (["No"], ["yes"])})
    assert result["mean_f1"] == 0.0
    assert any(w.startswith("random: precision") for w in result["warnings"])
    assert any("published POPE number" in w for w in result["warnings"])
    with pytest.raises(InputError, match="no splits"):
        pope.score_splits({})


def test_errors():
    with pytest.raises(ConfigError, match="Did you mean 'llava'"):
        pope.parse("yes", style="lava")
    with pytest.raises(InputError, match="2 answers but 1 labels"):
        pope.score(["yes", "no"], ["yes"])
    with pytest.raises(InputError, match="'maybe' at position 1"):
        pope.score(["yes", "no"], ["yes", "maybe"])
    assert pope.score(["yes"], [" YES "])["TP"] == 1
