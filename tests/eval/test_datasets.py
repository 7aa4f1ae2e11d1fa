"""Loaders on tiny files in the official layouts, written here; missing and corrupt inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmkit.errors import DatasetError, InputError
from vlmkit.eval.benchmarks import chair, mme, pope, video
from vlmkit.eval.benchmarks.chair import Chair
from vlmkit.eval.media import FrameFolder, VideoFile, mvbench_indices, uniform_indices


def _image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (value, 0, 0)).save(path)
    return path


def _video(path: Path, frames: int = 20, fps: int = 10) -> Path:
    imageio = pytest.importorskip("imageio", reason="imageio is in the [video] extra")
    path.parent.mkdir(parents=True, exist_ok=True)
    # 64x64: decord mis-decodes some narrow widths (e.g. 48).
    imageio.mimwrite(path, [np.full((64, 64, 3), 10 * i, np.uint8) for i in range(frames)], fps=fps, codec="libx264")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- POPE


@pytest.fixture
def pope_dir(tmp_path):
    images = tmp_path / "val2014"
    for i in (1, 2):
        _image(images / f"COCO_val2014_{i:012d}.jpg", 40 * i)
    questions = tmp_path / "coco"
    questions.mkdir()
    for split in ("random", "adversarial"):
        _jsonl(
            questions / f"coco_pope_{split}.json",
            [
                {
                    "question_id": 1,
                    "image": "COCO_val2014_000000000001.jpg",
                    "text": "Is there a dog in the image?",
                    "label": "yes",
                },
                {
                    "question_id": 2,
                    "image": "COCO_val2014_000000000002.jpg",
                    "text": "Is there a cat in the image?",
                    "label": "no",
                },
            ],
        )
    return questions, images


def test_pope_question_files(pope_dir):
    questions, images = pope_dir
    bench = pope.load_pope(questions, images)
    assert len(bench) == 4 and bench.info["splits"] == ["adversarial", "random"]
    first = next(iter(bench))
    assert first.sample_id == "adversarial/1"
    assert first.prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert first.target == "yes"
    assert first.load_media()[0].size == (8, 6)
    only = pope.load_pope(questions / "coco_pope_random.json", images, prompt=pope.PROMPTS["vcd"])
    assert [s.sample_id for s in only] == ["random/1", "random/2"]
    assert only.info["splits"] == ["random"]
    assert next(iter(only)).prompt.endswith("? Please answer this question with one word.")
    # The runner groups by split and scores; the pairing is positional.
    replies = {"random/1": "Yes", "random/2": "No"}
    split = [(replies[s.sample_id], s.target) for s in only]
    assert pope.score([r for r, _ in split], [t for _, t in split])["accuracy"] == 1.0


def test_pope_split_filter_and_missing_things(pope_dir, tmp_path):
    questions, images = pope_dir
    assert len(pope.load_pope(questions, images, splits=["random"])) == 2
    with pytest.raises(DatasetError, match=r"splits \['popular'\] are not in"):
        pope.load_pope(questions, images, splits=["popular"])
    (images / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(DatasetError, match="1 POPE images missing in .*: COCO_val2014_000000000002.jpg"):
        pope.load_pope(questions, images)
    with pytest.raises(DatasetError, match="pass image_dir="):
        pope.load_pope(questions)
    bad = _jsonl(tmp_path / "coco_pope_bad.json", [{"question_id": 1, "image": "x.jpg", "text": "?"}])
    with pytest.raises(DatasetError, match=r"coco_pope_bad.json:1 lacks label"):
        pope.load_pope(bad, images)
    with pytest.raises(DatasetError, match="does not exist"):
        pope.load_pope(tmp_path / "nope.json", images)


def test_pope_corrupt_image_names_the_file(pope_dir):
    questions, images = pope_dir
    (images / "COCO_val2014_000000000001.jpg").write_bytes(b"not a jpeg")
    sample = next(iter(pope.load_pope(questions, images)))
    with pytest.raises(InputError, match="COCO_val2014_000000000001.jpg"):
        sample.load_media()


def test_pope_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    buffer = tmp_path / "img.png"
    _image(buffer, 200)
    good = buffer.read_bytes()
    table = pa.table(
        {
            "id": ["0", "1", "2"],
            "question_id": ["1", "2", "3"],
            "question": [
                "Is there a dog in the image?",
                "Is there a cat in the image?",
                "Is there a car in the image?",
            ],
            "answer": ["yes", "no", "no"],
            "image_source": ["a", "b", "c"],
            "image": [
                {"bytes": good, "path": "a.png"},
                {"bytes": good, "path": "b.png"},
                {"bytes": b"garbage", "path": "c.png"},
            ],
            "category": ["random", "random", "popular"],
        }
    )
    folder = tmp_path / "POPE" / "data"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "test-00000-of-00001.parquet")
    bench = pope.load_pope(tmp_path / "POPE")
    assert len(bench) == 3 and bench.info["splits"] == ["popular", "random"]
    samples = list(bench)
    assert [s.sample_id for s in samples] == ["random/1", "random/2", "popular/3"]
    assert samples[0].load_media()[0].getpixel((0, 0)) == (200, 0, 0)
    with pytest.raises(InputError, match=r"test-00000-of-00001.parquet row 2 \(question_id 3\)"):
        samples[2].load_media()
    assert len(pope.load_pope(folder / "test-00000-of-00001.parquet", splits=["random"])) == 2
    pq.write_table(table.drop(["category"]), folder / "test-00000-of-00001.parquet")
    with pytest.raises(DatasetError, match=r"lacks columns \['category'\]"):
        pope.load_pope(folder)


# ---------------------------------------------------------------- CHAIR


@pytest.fixture
def coco_images(tmp_path):
    folder = tmp_path / "val2014"
    for i in (5, 7, 11, 13, 17, 19):
        _image(folder / f"COCO_val2014_{i:012d}.jpg", 10 * i)
    (folder / "README.txt").write_text("not an image")
    gt = tmp_path / "gt.json"
    Chair({i: ["person"] for i in (5, 7, 11, 13, 17)}).save_ground_truth(gt)  # 19 has no ground truth
    return folder, gt


def test_chair_seeded_subset(coco_images):
    folder, gt = coco_images
    bench = chair.load_chair(folder, gt, num_images=3, seed=1)
    ids = bench.info["image_ids"]
    assert len(ids) == 3 and set(ids) <= {5, 7, 11, 13, 17}
    assert ids == chair.load_chair(folder, gt, num_images=3, seed=1).info["image_ids"]
    assert [s.metadata["image_id"] for s in bench] == ids
    sample = next(iter(bench))
    assert sample.prompt == "Please describe this image in detail." and sample.target is None
    assert round(sample.load_media()[0].getpixel((0, 0))[0] / 10) == ids[0]
    assert chair.load_chair(folder, gt, num_images=None).info["image_ids"] == [5, 7, 11, 13, 17]
    assert chair.load_chair(folder, gt, image_ids=[13, 5]).info["image_ids"] == [13, 5]


def test_chair_errors(coco_images, tmp_path):
    folder, gt = coco_images
    with pytest.raises(DatasetError, match="num_images=9 but .* only 5 eligible"):
        chair.load_chair(folder, gt, num_images=9)
    with pytest.raises(DatasetError, match="1 CHAIR images with ground truth missing .*: 19"):
        chair.load_chair(folder, gt, image_ids=[5, 19])
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    with pytest.raises(
        DatasetError, match="4 COCO annotation files missing .*: instances_train2014.json, instances_val2014.json"
    ):
        chair.load_chair(folder, annotations)


# ---------------------------------------------------------------- MME


@pytest.fixture
def mme_root(tmp_path):
    base = tmp_path / "MME_Benchmark_release_version"
    art = base / "artwork"
    _image(art / "images" / "10.jpg")
    (art / "questions_answers_YN").mkdir(parents=True)
    (art / "questions_answers_YN" / "10.txt").write_text(
        "Is this artwork by Monet? Please answer yes or no.\tYes\n"
        "Is this artwork by Dali? Please answer yes or no.\tNo\n"
    )
    color = base / "color"
    _image(color / "000000055072.jpg")
    (color / "000000055072.txt").write_text(
        "Is there a brown giraffe in the image?  Please answer yes or no.\tYes\n"
        "Is there a green giraffe in the image? Please answer yes or no.\tNo\n"
    )
    code = base / "code_reasoning"
    _image(code / "0001.png")
    (code / "0001.txt").write_text(
        "Is the output 'Hello'? Please answer yes or no.\tYes\nIs the output 'World'? Please answer yes or no.\tNo"
    )
    return tmp_path


def test_mme_both_layouts(mme_root):
    bench = mme.load_mme(mme_root, subtasks=["artwork", "color", "code_reasoning"])
    samples = list(bench)
    assert [s.sample_id for s in samples] == [
        "artwork/10.jpg/0",
        "artwork/10.jpg/1",
        "color/000000055072.jpg/0",
        "color/000000055072.jpg/1",
        "code_reasoning/0001.png/0",
        "code_reasoning/0001.png/1",
    ]
    # LLaVA's prompt: "Please answer yes or no." and the spaces before it go, then the short-answer suffix.
    assert (
        samples[2].prompt
        == "Is there a brown giraffe in the image?\nAnswer the question using a single word or phrase."
    )
    assert samples[2].metadata["question"] == "Is there a brown giraffe in the image?  Please answer yes or no."
    assert samples[0].target == "Yes" and samples[1].target == "No"
    assert samples[4].load_media()[0].size == (8, 6)
    replies = ["Yes", "No", "Yes", "Yes", "No", "No"]
    results: dict[str, list] = {}
    for sample, reply in zip(samples, replies):
        results.setdefault(sample.metadata["subtask"], []).append({**sample.metadata, "response": reply})
    scores = mme.score(results)
    assert scores["subtasks"]["artwork"]["score"] == 200.0
    assert scores["subtasks"]["color"]["score"] == 50.0
    assert scores["cognition"] == 50.0


def test_mme_missing(mme_root):
    with pytest.raises(DatasetError, match="11 MME subtask folders missing .*: existence, count, position, posters"):
        mme.load_mme(mme_root)
    (mme_root / "MME_Benchmark_release_version" / "color" / "000000055072.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 MME question files or images missing .*000000055072\.\{jpg,png\}"):
        mme.load_mme(mme_root, subtasks=["color"])
    with pytest.raises(DatasetError, match="no subtask folder"):
        mme.load_mme(mme_root / "MME_Benchmark_release_version" / "artwork")


# ---------------------------------------------------------------- video


def test_frame_sampling_rules():
    # The official MVBench get_index gave these for the same arguments.
    assert mvbench_indices(4, 10.0, 19) == [2, 7, 12, 16]
    assert mvbench_indices(3, 10.0, 19, (0.5, 1.5)) == [6, 9, 13]
    assert mvbench_indices(4, 3, 10, (1.0, 2.0), first=1) == [3, 4, 5, 5]
    assert uniform_indices(20, 4) == [0, 6, 12, 19]


def test_mvbench(tmp_path):
    root = tmp_path / "MVBench"
    (root / "json").mkdir(parents=True)
    (root / "json" / "action_count.json").write_text(
        json.dumps(
            [
                {"video": "a.mp4", "question": "How many times?", "candidates": ["1", "2", "3"], "answer": "2"},
            ]
        )
    )
    (root / "json" / "action_sequence.json").write_text(
        json.dumps(
            [
                {
                    "video": "b.mp4",
                    "question": "What first?",
                    "candidates": ["sit", "stand"],
                    "answer": "stand",
                    "start": 0.5,
                    "end": 1.5,
                },
            ]
        )
    )
    (root / "json" / "episodic_reasoning.json").write_text(
        json.dumps(
            [
                {
                    "video": "clip1",
                    "question": "Why?",
                    "candidates": ["x", "y"],
                    "answer": "x",
                    "start": 1.0,
                    "end": 2.0,
                },
            ]
        )
    )
    _video(root / "video" / "perception" / "videos" / "a.mp4")
    _video(root / "video" / "star" / "Charades_v1_480" / "b.mp4")
    for k in range(1, 11):
        _image(root / "video" / "tvqa" / "frames_fps3_hq" / "clip1" / f"{k:05d}.jpg", 20 * k)
    bench = video.load_mvbench(root, tasks=["action_count", "action_sequence", "episodic_reasoning"], num_frames=4)
    count, sequence, episodic = list(bench)
    assert count.sample_id == "action_count/0" and count.target == "B"
    assert count.prompt == (
        video.MVBENCH_SYSTEM + "Question: How many times?\nOptions:\n(A) 1\n(B) 2\n(C) 3\nOnly give the best option."
    )
    assert count.answer_prefix == "Best option:("
    assert count.metadata["task_type"] == "Action Count"
    frames = count.load_media()
    assert len(frames) == 4 and frames[0].size == (64, 64)
    # Segment middles of frames 0-19: 2, 7, 12, 16 -> grey levels 20, 70, 120, 160 (lossy codec).
    assert [round(np.asarray(f)[..., 0].mean() / 10) for f in frames] == [2, 7, 12, 16]
    assert sequence.media[0] == VideoFile(
        root / "video" / "star" / "Charades_v1_480" / "b.mp4", 4, "mvbench", (0.5, 1.5)
    )
    assert [round(np.asarray(f)[..., 0].mean() / 10) for f in sequence.load_media()] == [6, 8, 11, 14]
    assert episodic.media[0] == FrameFolder(root / "video" / "tvqa" / "frames_fps3_hq" / "clip1", 4, (1.0, 2.0))
    # Frames 3, 4, 5, 5 of 00001-00010.jpg (values 20 * index, JPEG-rounded).
    assert [round(f.getpixel((0, 0))[0] / 20) for f in episodic.load_media()] == [3, 4, 5, 5]
    record = {**count.metadata, "response": "B) 2"}
    assert video.score([record], style="mvbench")["groups"]["task_type"]["Action Count"]["accuracy"] == 1.0


def test_mvbench_missing_and_corrupt(tmp_path):
    root = tmp_path / "MVBench"
    (root / "json").mkdir(parents=True)
    with pytest.raises(DatasetError, match="1 MVBench json/<task>.json files missing .*: action_count"):
        video.load_mvbench(root, tasks=["action_count"])
    (root / "json" / "action_count.json").write_text(
        json.dumps(
            [
                {"video": "a.mp4", "question": "?", "candidates": ["1", "2"], "answer": "2"},
                {"video": "gone.mp4", "question": "?", "candidates": ["1", "2"], "answer": "1"},
            ]
        )
    )
    (root / "video" / "perception" / "videos").mkdir(parents=True)
    (root / "video" / "perception" / "videos" / "a.mp4").write_bytes(b"not a video")
    with pytest.raises(DatasetError, match="1 MVBench videos missing .*gone.mp4"):
        video.load_mvbench(root, tasks=["action_count"])
    (root / "json" / "action_count.json").write_text(
        json.dumps([{"video": "a.mp4", "question": "?", "candidates": ["1"], "answer": "3"}])
    )
    with pytest.raises(DatasetError, match="answer '3' is not one of the candidates"):
        video.load_mvbench(root, tasks=["action_count"])
    (root / "json" / "action_count.json").write_text(
        json.dumps([{"video": "a.mp4", "question": "?", "candidates": ["1"], "answer": "1"}])
    )
    sample = next(iter(video.load_mvbench(root, tasks=["action_count"])))
    with pytest.raises(InputError, match="cannot decode video .*a.mp4"):
        sample.load_media()
    with pytest.raises(DatasetError, match="do not exist; valid"):
        video.load_mvbench(root, tasks=["action_counting"])


def test_videomme_grouped_and_flat(tmp_path):
    videos = tmp_path / "data"
    _video(videos / "fFjv93ACGo8.mp4", frames=12)
    question = {
        "question_id": "001-1",
        "task_type": "Counting Problem",
        "question": "How many apples?",
        "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."],
        "answer": "C",
    }
    video_fields = {
        "video_id": "001",
        "videoID": "fFjv93ACGo8",
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
    }
    grouped = tmp_path / "videomme.json"
    grouped.write_text(json.dumps([{**video_fields, "questions": [question]}]))
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps([{**question, **video_fields}]))
    for path in (grouped, flat):
        (sample,) = list(video.load_videomme(path, videos, num_frames=3))
        assert sample.sample_id == "001-1" and sample.target == "C"
        assert sample.metadata["options"] == ["One.", "Two.", "Three.", "Four."]
        assert sample.prompt.endswith("How many apples?\nA. One.\nB. Two.\nC. Three.\nD. Four.\nThe best answer is:")
        assert sample.prompt.startswith("Select the best answer")
    frames = sample.load_media()
    assert [round(np.asarray(f)[..., 0].mean() / 10) for f in frames] == [0, 5, 11]
    result = video.score(
        [{**sample.metadata, "response": "The best answer is C."}], "videomme", group_by=("duration", "domain")
    )
    assert result["groups"]["domain"]["Knowledge"]["accuracy"] == 1.0
    assert len(video.load_videomme(flat, videos, durations=["long"])) == 0
    with pytest.raises(DatasetError, match="1 Video-MME videos missing .*fFjv93ACGo8.mp4"):
        video.load_videomme(flat, tmp_path)
    flat.write_text(json.dumps([{**question, "videoID": "fFjv93ACGo8"}]))
    with pytest.raises(DatasetError, match="question 0 lacks duration, domain, sub_category"):
        video.load_videomme(flat, videos)


def test_egoschema(tmp_path):
    videos = tmp_path / "videos"
    _video(videos / "q1.mp4", frames=8)
    questions = tmp_path / "questions.json"
    questions.write_text(
        json.dumps(
            [
                {
                    "q_uid": uid,
                    "google_drive_id": "x",
                    "question": "What does c do?",
                    **{f"option {k}": f"thing {k}" for k in range(5)},
                }
                for uid in ("q1", "q2")
            ]
        )
    )
    answers = tmp_path / "subset_answers.json"
    answers.write_text(json.dumps({"q1": 3}))
    (sample,) = list(video.load_egoschema(questions, videos, answers, num_frames=2))
    assert sample.target == "D" and sample.sample_id == "q1"
    assert sample.prompt == (
        "What does c do?\nA. thing 0\nB. thing 1\nC. thing 2\nD. thing 3\nE. thing 4\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert len(sample.load_media()) == 2
    assert video.score([{**sample.metadata, "response": "D."}], "egoschema")["accuracy"] == 1.0
    with pytest.raises(DatasetError, match="1 EgoSchema videos missing .*q2.mp4"):
        video.load_egoschema(questions, videos)
    answers.write_text(json.dumps({"q9": 1}))
    with pytest.raises(DatasetError, match="1 EgoSchema questions named in the answer file missing .*: q9"):
        video.load_egoschema(questions, videos, answers)
