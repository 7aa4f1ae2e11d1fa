"""Video multiple-choice extraction per reference, and accuracy per group."""

from __future__ import annotations

import pytest

from vlmkit.errors import ConfigError, InputError
from vlmkit.eval.benchmarks import video

OPTIONS4 = ["a red ball", "a blue cube", "two dogs", "nothing"]
OPTIONS5 = ["the man cooks food", "he repairs a bike", "she paints a wall", "they play cards", "c cleans the kitchen"]

# (reply, letters MVBench's check_ans accepts, Video-MME extract_characters_regex, lmms-eval egoschema parse)
# Each column is what the reference function returned on the reply (run beside ours; "" = nothing,
# for egoschema: no candidate, where lmms-eval would guess at random).
REFERENCE = [
    ("A", "A", "A", "A"),
    ("B.", "B", "B", "B"),
    ("(C)", "C", "C", "C"),
    ("C) two dogs", "C", "C", ""),
    ("(D) nothing", "D", "D", "D"),
    ("d", "D", "", ""),
    (" b ", "B", "", ""),
    ("", "ABCD", "", ""),
    ("   ", "ABCD", "", ""),
    ("...", "ABCD", "", ""),
    ("Answer: D", "", "D", "D"),
    ("The Answer is D", "", "A", "D"),
    ("The best answer is C.", "", "C", "C"),
    ("The correct option is B", "", "B", "B"),
    ("Best option: (A) a red ball", "", "B", "A"),
    ("(A)/(B)", "AB", "A", "A"),
    ("(B) or (C)", "B", "B", "B"),
    ("E", "", "", "E"),
    ("I think it is B because", "", "B", "B"),
    ("A man is cooking", "A", "A", "A"),
    ("The answer is (B).", "", "B", "B"),
    ("Option B", "", "B", "B"),
    ("none of these apply to this video really at all honestly okay", "", "", ""),
    ("C cleans the kitchen", "C", "C", "C"),
    ("B\n(C)", "B", "B", "C"),
    ("b) he repairs a bike", "B", "", ""),
    ("(a", "", "", ""),
    ("a.", "A", "", ""),
    ("Best answer:Best option: B", "", "B", "B"),
    ("The best option isThe correct option is C", "", "C", "C"),
    ("B, C", "", "B", "C"),
    ("'D'", "", "D", "D"),
    ("(E)", "", "", "E"),
]


@pytest.mark.parametrize(("reply", "mvbench", "videomme", "egoschema"), REFERENCE)
def test_matches_reference_extraction(reply, mvbench, videomme, egoschema):
    # MVBench: the notebook accepts a set; with one letter we agree, with all (no letter) we answer
    # nothing, with several we take the first.
    expected_mvbench = None if len(mvbench) in (0, 4) else mvbench[0]
    assert video.parse_choice(reply, OPTIONS4, style="mvbench") == expected_mvbench
    assert video.parse_choice(reply, OPTIONS4, style="videomme") == (videomme or None)
    assert video.parse_choice(reply, OPTIONS5, style="egoschema") == (egoschema or None)


def test_egoschema_content_match_uses_lettered_options():
    # More than 5 words and no letter: lmms-eval looks for the option quoted as "X. text".
    reply = "I would say d. they play cards in this one"
    assert video.parse_choice(reply, OPTIONS5, style="egoschema") == "D"


def test_mvbench_accuracy_counts_every_question():
    records = [
        {"response": "A", "options": OPTIONS4, "answer": "A", "task_type": "Action Count"},
        {"response": "", "options": OPTIONS4, "answer": "B", "task_type": "Action Count"},
        {"response": "(A)/(B)", "options": OPTIONS4, "answer": 1, "task_type": "Scene Transition"},
        {"response": "(C) two dogs", "options": OPTIONS4, "answer": "C", "task_type": "Scene Transition"},
    ]
    result = video.score(records, style="mvbench")
    assert (result["correct"], result["answered"], result["total"]) == (2, 4, 4)
    assert result["accuracy"] == 0.5
    assert result["groups"]["task_type"]["Action Count"]["accuracy"] == 0.5
    assert result["groups"]["task_type"]["Scene Transition"]["accuracy"] == 0.5
    assert any("without an option letter" in w for w in result["warnings"])
    assert any("several options" in w for w in result["warnings"])


def test_videomme_leaves_unanswered_out_of_the_denominator():
    records = [
        {"response": "A", "options": OPTIONS4, "answer": "A", "duration": "short", "task_type": "OCR Problems"},
        {"response": "b", "options": OPTIONS4, "answer": "B", "duration": "short", "task_type": "OCR Problems"},
        {"response": "C.", "options": OPTIONS4, "answer": "D", "duration": "long", "task_type": "Counting Problem"},
    ]
    result = video.score(records, style="videomme", group_by=("duration", "task_type"))
    assert (result["correct"], result["answered"], result["total"]) == (1, 2, 3)
    assert result["accuracy"] == 0.5
    assert result["groups"]["duration"]["short"] == {"accuracy": 1.0, "correct": 1, "answered": 1, "total": 2}
    assert result["groups"]["task_type"]["Counting Problem"]["accuracy"] == 0.0
    assert any("left out of the denominator" in w for w in result["warnings"])


def test_egoschema_unparsed_is_wrong_not_random():
    records = [
        {"response": "B", "options": OPTIONS5, "answer": 1},
        {"response": "hmm", "options": OPTIONS5, "answer": 0},
    ]
    result = video.score(records, style="egoschema", group_by=())
    assert result["accuracy"] == 0.5 and result["groups"] == {}
    assert any("lmms-eval guesses at random" in w for w in result["warnings"])


def test_empty_and_errors():
    empty = video.score([], style="videomme")
    assert empty["accuracy"] == 0.0 and any(w.startswith("accuracy (overall)") for w in empty["warnings"])
    with pytest.raises(ConfigError, match="valid styles: mvbench, videomme, egoschema"):
        video.parse_choice("A", OPTIONS4, style="mmmu")
    with pytest.raises(InputError, match="answer 'E';.*letter in 'ABCD'"):
        video.score([{"response": "A", "options": OPTIONS4, "answer": "E"}], style="mvbench")
    with pytest.raises(InputError, match="lacks options"):
        video.score([{"response": "A", "answer": "A"}], style="mvbench")
