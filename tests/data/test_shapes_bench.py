"""The shapes benchmarks are valid in the official formats, and the CLI writes them."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from vlmkit.cli import main
from vlmkit.data.shapes import CATEGORIES, EVAL_SEEDS, sample_scene
from vlmkit.data.shapes_bench import (
    POPE_SPLITS, pope_questions, synonyms_text, write_chair, write_mme, write_pope, write_train,
    write_video,
)
from vlmkit.errors import ConfigError


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pope_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pope")
    write_pope(out, n=12)
    return out


def test_pope_files_follow_the_official_format(pope_dir):
    truth = {r["image"]: r["objects"] for r in _jsonl(pope_dir / "shapes_ground_truth_objects.json")}
    images_per_split = []
    for split in POPE_SPLITS:
        rows = _jsonl(pope_dir / f"shapes_pope_{split}.json")
        assert all(set(r) == {"question_id", "image", "text", "label"} for r in rows)
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        assert Counter(r["label"] for r in rows) == {"yes": 36, "no": 36}  # 12 images x 3 pairs
        assert [r["label"] for r in rows] == ["yes", "no"] * 36
        images_per_split.append([r["image"] for r in rows])
        for i in range(0, len(rows), 6):
            image = rows[i]["image"]
            objects = truth[image]
            asked = [r["text"] for r in rows[i:i + 6]]
            positives = [f"Is there {'an' if o[0] in 'aeiou' else 'a'} {o} in the image?" for o in objects[:3]]
            assert asked[0::2] == positives  # positives: the first three ground-truth objects
            negatives = [next(c for c in CATEGORIES if f" {c} in" in q) for q in asked[1::2]]
            assert not set(negatives) & set(objects)  # a negative is never in the image
            assert len(set(negatives)) == 3
            assert (pope_dir / "images" / image).is_file()
    assert images_per_split[0] == images_per_split[1] == images_per_split[2]
    for row in _jsonl(pope_dir / "ground_truth.jsonl")[:3]:
        scene = sample_scene(row["seed"])
        assert row["objects"] == scene.to_json()["objects"]


def test_pope_negatives_follow_each_strategy():
    objects = [["star", "moon", "key"], ["moon", "star", "lock"], ["key", "lock", "heart"],
               ["cross", "ring", "star"]]
    images = ["a", "b", "c", "d"]
    adversarial = pope_questions(objects, images, "adversarial", seed=0)
    # co-occurrence with "key" (image c's first positive): lock 2 (excluded), star 1, moon 1, heart 1
    assert adversarial[13]["text"] == "Is there a star in the image?"
    popular = pope_questions(objects, images, "popular", seed=0)
    assert popular[1]["text"] == "Is there a lock in the image?"  # star (3) and moon/key are in a
    for rows in (adversarial, popular, pope_questions(objects, images, "random", seed=0)):
        for row in rows:
            if row["label"] == "no":
                image_objects = objects[images.index(row["image"])]
                assert not any(f" {o} " in row["text"] for o in image_objects)
    with pytest.raises(ConfigError, match="strategy"):
        pope_questions(objects, images, "hard", seed=0)
    with pytest.raises(ConfigError, match="no negative exists"):
        pope_questions(objects[:1], images[:1], "random", seed=0)


def test_pope_adversarial_negatives_are_top_co_occurring(pope_dir):
    truth = {r["image"]: r["objects"] for r in _jsonl(pope_dir / "shapes_ground_truth_objects.json")}
    co = Counter()
    for objs in truth.values():
        co.update((a, b) for a in objs for b in objs if a != b)
    rows = _jsonl(pope_dir / "shapes_pope_adversarial.json")
    asked: set[str] = set()
    for i in range(0, len(rows), 2):
        if i % 6 == 0:
            asked = set()
        objects = truth[rows[i]["image"]]
        positive = next(c for c in CATEGORIES if f" {c} in" in rows[i]["text"])
        negative = next(c for c in CATEGORIES if f" {c} in" in rows[i + 1]["text"])
        best = max((co[(positive, c)] for c in CATEGORIES if c not in objects and c not in asked),
                   default=0)
        assert co[(positive, negative)] == best or best == 0
        asked.add(negative)


def test_chair_set_has_coco_layout_and_consistent_ground_truth(tmp_path):
    annotations = write_chair(tmp_path, n=6)
    names = {"instances_val2014.json", "captions_val2014.json", "instances_train2014.json",
             "captions_train2014.json"}
    assert {p.name for p in annotations.iterdir()} == names
    instances = json.loads((annotations / "instances_val2014.json").read_text())
    captions = json.loads((annotations / "captions_val2014.json").read_text())
    assert {"images", "annotations", "categories"} <= set(instances)
    categories = {c["id"]: c["name"] for c in instances["categories"]}
    assert sorted(categories.values()) == sorted(CATEGORIES)
    for annotation in instances["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert w > 0 and h > 0 and annotation["area"] == w * h
    for image in instances["images"]:
        assert (tmp_path / "val2014" / image["file_name"]).is_file()
    assert len(captions["annotations"]) == 3 * 6
    lines = synonyms_text().strip().splitlines()
    assert [line.split(", ")[0] for line in lines] == list(CATEGORIES)
    assert (tmp_path / "synonyms.txt").read_text() == synonyms_text()
    chair = pytest.importorskip("vlmkit.eval.benchmarks.chair")
    scorer = chair.Chair.from_coco(annotations, synonyms=tmp_path / "synonyms.txt")
    for image in instances["images"]:
        expected = {categories[a["category_id"]] for a in instances["annotations"]
                    if a["image_id"] == image["id"]}
        assert scorer.ground_truth(image["id"]) == expected


def test_mme_layout(tmp_path):
    root = write_mme(tmp_path, n=3)
    assert root.name == "MME_Benchmark_release_version"
    for subtask in ("existence", "count", "position", "color"):
        texts = sorted((root / subtask).glob("*.txt"))
        assert len(texts) == 3
        for text in texts:
            assert text.with_suffix(".png").is_file()
            lines = text.read_text().splitlines()
            assert len(lines) == 2
            (q1, a1), (q2, a2) = (line.split("\t") for line in lines)
            assert (a1, a2) == ("Yes", "No") and q1 != q2
            assert q1.endswith(" Please answer yes or no.") and q2.endswith(" Please answer yes or no.")


def test_video_set_is_mvbench_style(tmp_path):
    folder = write_video(tmp_path, n=8)
    items = [item for path in folder.glob("*.json") for item in json.loads(path.read_text())]
    assert len(items) == 8
    for item in items:
        assert set(item) == {"video", "question", "candidates", "answer"}
        assert item["answer"] in item["candidates"] and len(item["candidates"]) == 4
        assert (tmp_path / "video" / "shapes" / item["video"]).is_file()
    data_list = json.loads((tmp_path / "data_list.json").read_text())
    assert set(data_list) == {p.stem for p in folder.glob("*.json")}
    truth = _jsonl(tmp_path / "ground_truth.jsonl")
    assert all(len(t["frames"]) == 8 for t in truth)


def test_train_set_uses_training_seeds_only(tmp_path):
    path = write_train(tmp_path, n=3, turns=2)
    records = json.loads(path.read_text())
    assert len(records) == 3
    for record in records:
        assert record["conversations"][0]["value"].startswith("<image>\n")
        assert [t["from"] for t in record["conversations"]] == ["human", "gpt"] * 2
    with pytest.raises(ConfigError, match="must never overlap"):
        write_train(tmp_path, n=3, seed=EVAL_SEEDS.start)
    with pytest.raises(ConfigError, match="must never overlap"):
        write_pope(tmp_path, n=3, seed=0)


def test_cli_writes_benches(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path), "--n", "2", "--bench", "pope,mme"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert set(written) == {"pope", "mme"}
    assert (tmp_path / "pope" / "shapes_pope_random.json").is_file()
    assert (tmp_path / "mme" / "MME_Benchmark_release_version" / "count").is_dir()
    assert main(["data", "shapes", "--out", str(tmp_path), "--bench", "popee"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["data", "shapes", "--out", str(tmp_path), "--n", "2", "--bench", "pope", "--seed", "5"]) == 2
    assert "must never overlap" in capsys.readouterr().err
