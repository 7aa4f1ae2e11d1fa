"""MME parsing and scoring against the official eval tool's behaviour."""

from __future__ import annotations

import random

import pytest

from vlmkit.errors import ConfigError, InputError
from vlmkit.eval.benchmarks import mme

from .fixtures import mme_results


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, there is.", "yes"),
        ("n", "other"),  # "n\n" holds neither word
        ("y", "other"),
        ("Not sure", "no"),
        ("none", "no"),
        ("The answer is yes", "other"),  # only the first four characters count
        ("yesterday", "yes"),
        (" yes", "yes"),
        ("  yes", "other"),  # "  ye"
        ("NO", "no"),
        ("", "other"),
    ],
)
def test_official_parse(response, expected):
    assert mme.parse(response) == expected


@pytest.mark.parametrize(
    ("response", "expected"), [("n", "no"), ("y", "yes"), ("  yes", "yes"), ("No.", "no"), ("x", "other")]
)
def test_lmms_eval_parse(response, expected):
    assert mme.parse(response, style="lmms_eval") == expected


def _pair(image, first, second, gts=("Yes", "No")):
    return [
        {"image": image, "question": "q1", "gt": gts[0], "response": first},
        {"image": image, "question": "q2", "gt": gts[1], "response": second},
    ]


def test_acc_plus_needs_both_questions_of_an_image():
    rows = _pair("a.jpg", "Yes", "No") + _pair("b.jpg", "Yes", "Yes") + _pair("c.jpg", "n", "No")
    result = mme.score({"existence": rows})["subtasks"]["existence"]
    assert result["acc"] == 4 / 6
    assert result["acc_plus"] == 1 / 3
    assert result["score"] == 4 / 6 * 100 + 1 / 3 * 100
    assert (result["questions"], result["images"], result["other"]) == (6, 3, 1)


def test_reproduces_official_calculation_py_digits():
    # eval_tool/calculation.py (MME tool zip sha256 b8125e2a...) on these results, written as its
    # <task>.txt files, printed exactly these numbers (float artefacts included).
    result = mme.score(mme_results())
    expected = {
        "existence": 50.0,
        "count": 62.5,
        "position": 80.0,
        "color": 58.333333333333336,
        "posters": 33.33333333333333,
        "celebrity": 37.5,
        "scene": 40.0,
        "landmark": 25.0,
        "artwork": 33.33333333333333,
        "OCR": 12.5,
        "commonsense_reasoning": 40.0,
        "numerical_calculation": 49.99999999999999,
        "text_translation": 99.99999999999999,
        "code_reasoning": 62.5,
    }
    assert {name: r["score"] for name, r in result["subtasks"].items()} == expected
    assert result["perception"] == 432.5
    assert result["cognition"] == 252.5
    assert result["total"] == 685.0
    assert result["warnings"] == []


def test_grouping_by_image_ignores_row_order():
    results = mme_results()
    shuffled = {task: random.Random(0).sample(rows, len(rows)) for task, rows in results.items()}
    assert mme.score(shuffled)["perception"] == mme.score(results)["perception"]


def test_partial_results_warn():
    result = mme.score({"color": _pair("a.jpg", "Yes", "No")})
    assert result["perception"] == 200.0 and result["cognition"] == 0.0
    assert any("perception total covers 1 of 10" in w for w in result["warnings"])
    assert any("cognition total covers 0 of 4" in w for w in result["warnings"])


def test_errors():
    with pytest.raises(InputError, match="Did you mean 'OCR'"):
        mme.score({"ocr": _pair("a.jpg", "Yes", "No")})
    with pytest.raises(InputError, match="image 'a.jpg' has 1 question"):
        mme.score({"color": _pair("a.jpg", "Yes", "No")[:1]})
    with pytest.raises(InputError, match="gt 'Maybe'"):
        mme.score({"color": _pair("a.jpg", "Yes", "No", gts=("Maybe", "No"))})
    with pytest.raises(InputError, match="lacks response"):
        mme.score({"color": [{"image": "a", "question": "q", "gt": "Yes"}]})
    with pytest.raises(InputError, match="no records"):
        mme.score({"color": []})
    with pytest.raises(ConfigError, match="valid styles"):
        mme.parse("yes", style="otter")
