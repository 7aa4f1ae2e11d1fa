"""CHAIR against shikiw/OPERA chair.py: word rules, ground truth and pinned reference outputs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vlmkit.errors import ConfigError, DatasetError, InputError
from vlmkit.eval.benchmarks import chair as chair_module
from vlmkit.eval.benchmarks.chair import COCO_ANNOTATION_FILES, Chair

from .fixtures import CHAIR_CAPTIONS, write_coco_annotations

@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return write_coco_annotations(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def scorer(coco) -> Chair:
    return Chair.from_coco(coco)


RECORDS = [{"image_id": i, "caption": c} for i, c in CHAIR_CAPTIONS]


def test_reproduces_opera_chair_py(scorer):
    assert_reference_scores(scorer.score(RECORDS))


def assert_reference_scores(result):
    """shikiw/OPERA chair.py @61426ef (NLTK 3.10.4, the full NLTK data) on
    fixtures.write_coco_annotations + CHAIR_CAPTIONS printed/saved exactly these values."""
    assert result["overall"] == {
        "CHAIRs": 0.8181818181818182,
        "CHAIRi": 0.34146341463414637,
        "Recall": 0.6285714285714286,
        "Len": 0.14545454545454548,
    }
    expected = [  # generated words, hallucinated [word, class], hallucination_idxs, CHAIRi, Recall
        (["person", "person", "motorcycle", "bus"], [["bus", "bus"]], [17], 0.25, 2 / 3),
        (["toilet", "chair"], [["chair", "chair"]], [8], 0.5, 0.5),
        (["toilet", "sink", "bench"], [["bench", "bench"]], [10], 1 / 3, 1.0),
        (["elephant", "giraffe", "bird"], [["bird", "bird"]], [11], 1 / 3, 2 / 3),
        (["cat", "couch", "remote", "laptop"], [["laptop computer", "laptop"]], [15], 0.25, 1.0),
        (
            ["train", "traffic light", "fire hydrant"],
            [["traffic light", "traffic light"], ["fire hydrant", "fire hydrant"]],
            [10, 14],
            2 / 3,
            1.0,
        ),
        (["person", "skis", "snowboard", "person", "person", "bench"], [["bench", "bench"]], [14], 1 / 6, 0.75),
        (["dog", "dog", "frisbee", "sports ball", "person"], [], [], 0.0, 1.0),
        (
            ["wine glass", "wine glass", "dining table", "tie", "teddy bear", "hot dog"],
            [["teddy bear", "teddy bear"], ["hot dog", "hot dog"]],
            [16, 19],
            1 / 3,
            0.6,
        ),
        ([], [], [], 0.0, 0.0),
        (
            ["tv", "tv", "tv", "dining table", "cat"],
            [["television", "tv"], ["tv", "tv"], ["monitor", "tv"], ["desk", "dining table"]],
            [1, 4, 5, 9],
            0.8,
            1 / 3,
        ),
    ]
    for sentence, (generated, hallucinated, idxs, chair_i, recall) in zip(result["sentences"], expected):
        assert sentence["mscoco_generated_words"] == generated
        assert sentence["mscoco_hallucinated_words"] == hallucinated
        assert sentence["hallucination_idxs"] == idxs
        assert sentence["metrics"] == {
            "CHAIRs": int(bool(hallucinated)),
            "CHAIRi": chair_i,
            "Recall": recall,
            "Len": 0.0,
        }
    assert result["counts"]["captions"] == 11 and result["warnings"] == []


def test_trim_incomplete_matches_reference_rule(scorer):
    # The reference run on captions cut after their last "." (its commented-out rule) gave these.
    result = scorer.score(RECORDS, trim_incomplete=True)
    assert result["overall"] == {"CHAIRs": 0.8181818181818182, "CHAIRi": 0.35, "Recall": 0.6, "Len": 0.1409090909090909}
    assert result["sentences"][-1]["caption"] == "A television and a tv monitor are on the desk."
    assert (
        scorer.score([{"image_id": 104, "caption": "A cat on a"}], trim_incomplete=True)["sentences"][0]["caption"]
        == ""
    )


def test_ground_truth_unites_instances_and_caption_objects(scorer):
    assert scorer.ground_truth(101) == {"car", "motorcycle", "person"}
    assert scorer.ground_truth(201) == {"dog", "frisbee", "person", "sports ball"}  # frisbee from a caption
    assert scorer.ground_truth("105") == {"train"}  # "train tracks" merges and hides nothing new
    assert scorer.image_ids == [101, 102, 103, 104, 105, 106, 201, 202]


def test_double_words(scorer):
    found = scorer.caption_to_words("A man on a motor bike and a baby elephant near a passenger jet.")
    assert "motor bike" in found.double_words  # merged ...
    assert found.node_words == ["person", "elephant", "airplane"]  # ... but never counted
    assert scorer.caption_to_words("A train track.").node_words == []
    assert scorer.caption_to_words("A man in a bow tie.").node_words == ["person", "tie"]
    assert scorer.caption_to_words("A stove top oven.").node_words == ["oven", "oven"]  # three words never merge
    assert scorer.caption_to_words("A slice of cheesecake.").node_words == []  # leading-space synonym


def test_toilet_seat(scorer):
    assert scorer.caption_to_words("A toilet seat.").node_words == ["toilet"]
    found = scorer.caption_to_words("The seat is next to the toilet and a chair.")
    assert found.node_words == ["toilet", "chair"]
    assert found.idxs == [5, 8]  # shifted by the dropped "seat", as in the reference
    assert scorer.caption_to_words("A seat by the window.").node_words == ["chair"]


def test_subset_ground_truth_and_file_round_trip(coco, scorer, tmp_path):
    subset = Chair.from_coco(coco, image_ids=[102, 104])
    assert subset.image_ids == [102, 104]
    assert subset.ground_truth(104) == scorer.ground_truth(104)
    path = tmp_path / "gt.json"
    scorer.save_ground_truth(path)
    loaded = Chair.from_ground_truth(path)
    assert loaded.score(RECORDS) == scorer.score(RECORDS)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"104": ["cat", "sofa"]}))
    assert Chair.from_ground_truth(plain).ground_truth(104) == {"cat", "couch"}
    with pytest.raises(DatasetError, match=r"have no COCO 2014 annotations.*\[999\]"):
        Chair.from_coco(coco, image_ids=[102, 999])


def test_other_worlds_with_own_synonyms():
    synonyms = "fox, vixen, cub\nhen, chicken, rooster\n"
    world = Chair({"farm-1": ["hen"]}, synonyms=synonyms)
    result = world.score([{"image_id": "farm-1", "caption": "A vixen chases two chickens."}])
    assert result["sentences"][0]["mscoco_generated_words"] == ["fox", "hen"]
    assert result["overall"]["CHAIRi"] == 0.5
    with pytest.raises(ConfigError, match="'dog' .* not in the synonym table"):
        Chair({1: ["dog"]}, synonyms=synonyms)


def test_division_by_zero_is_flagged(scorer):
    result = scorer.score([{"image_id": 202, "caption": "It is a sunny day."}])
    assert result["overall"]["CHAIRi"] == 0.0
    assert any(w.startswith("CHAIRi") for w in result["warnings"])
    empty = scorer.score([])
    assert empty["overall"] == {"CHAIRs": 0.0, "CHAIRi": 0.0, "Recall": 0.0, "Len": 0.0}


def test_errors(coco, scorer, tmp_path):
    with pytest.raises(InputError, match="no ground truth for image 7"):
        scorer.score([{"image_id": 7, "caption": "A dog."}])
    with pytest.raises(InputError, match="needs 'image_id' and 'caption'"):
        scorer.score([{"image": 101, "caption": "A dog."}])
    (tmp_path / "instances_val2014.json").write_text((coco / "instances_val2014.json").read_text())
    with pytest.raises(DatasetError) as error:
        Chair.from_coco(tmp_path)
    missing = [name for name in COCO_ANNOTATION_FILES if name != "instances_val2014.json"]
    assert f"missing: {', '.join(missing)}" in str(error.value)
    with pytest.raises(DatasetError, match="does not exist"):
        Chair.from_ground_truth(tmp_path / "nope.json")


def test_missing_nltk_data_names_the_downloads(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(chair_module, "_nltk_checked", False)
    monkeypatch.setattr(chair_module, "PACKAGED_NLTK_DATA", tmp_path / "not-installed")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(DatasetError) as error:
        chair_module.require_nltk_data()
    assert "nltk.download('punkt_tab'); nltk.download('averaged_perceptron_tagger_eng')" in str(error.value)
    assert "NLTK_DATA" in str(error.value)


SUBSET_RUN = """
import json, sys
import nltk
from vlmkit.eval.benchmarks import chair
nltk.data.path[:] = [str(chair.PACKAGED_NLTK_DATA)]  # the shipped subset and nothing else
scorer = chair.Chair.from_coco(sys.argv[1])
records = json.loads(sys.argv[2])
print(json.dumps({"words": [scorer.caption_to_words(r["caption"]) for r in records], "scores": scorer.score(records)}))
"""


def test_shipped_nltk_subset_alone_gives_the_reference_words_and_scores(coco, scorer, tmp_path):
    """With NLTK_DATA unset, no home folder data and only vlmkit's shipped subset on NLTK's path,
    CHAIR finds the same words, node words, positions and scores as the full NLTK data gave the
    reference implementation (and as this process, whatever NLTK data it finds first)."""
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"} | {"HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", SUBSET_RUN, str(coco), json.dumps(RECORDS)],
                         env=env, capture_output=True, text=True, check=True)
    result = json.loads(run.stdout)
    assert_reference_scores(result["scores"])
    assert result["words"] == [[list(part) for part in scorer.caption_to_words(r["caption"])] for r in RECORDS]


def test_shipped_nltk_files_are_the_upstream_files():
    """Every shipped file is listed with the SHA-256 of the upstream file it copies, and nothing else
    is shipped."""
    folder = chair_module.PACKAGED_NLTK_DATA
    manifest = dict(line.split("  ")[::-1] for line in (folder / "MANIFEST.sha256").read_text().splitlines())
    found = {}
    for archive in folder.rglob("*.zip"):
        with zipfile.ZipFile(archive) as zipped:
            for name in zipped.namelist():
                if not name.endswith("/"):
                    found[f"{archive.relative_to(folder).as_posix()}/{name}"] = hashlib.sha256(zipped.read(name)).hexdigest()
    assert found == manifest
    assert {p.name for p in folder.iterdir() if p.is_file()} == {"README.md", "MANIFEST.sha256", "LICENSE-Apache-2.0.txt"}
