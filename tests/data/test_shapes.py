"""The shapes world: determinism, exact ground truth, co-occurrence prior, seed ranges, clips."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from vlmkit.data.shapes import (
    CATEGORIES, EVAL_SEEDS, PAIRS, PARTNER, TRAIN_SEEDS, ShapeObject, WorldConfig, add_noise,
    check_seeds, object_mask, patch_labels, render, render_array, render_background, sample_scene,
)
from vlmkit.data.shapes_text import QA_KINDS, caption, pope_question
from vlmkit.data.shapes_video import (
    clip_question, frame_objects, mc_answer, mc_prompt, render_clip, sample_clip, write_mp4,
)
from vlmkit.errors import ConfigError

SEEDS = range(EVAL_SEEDS.start, EVAL_SEEDS.start + 40)


def test_world_has_enough_distinct_categories():
    assert len(CATEGORIES) >= 16 and len(set(CATEGORIES)) == len(CATEGORIES)
    masks = {}
    for category in CATEGORIES:
        _, _, mask = object_mask(ShapeObject(category, "red", (255, 0, 0), 40.0, 50.0, 50.0, 0.0), 100)
        assert mask.sum() > 100, category
        masks[category] = (mask > 0.5).astype(np.int8)
    for a in CATEGORIES:  # every icon differs from every other by a clear margin of pixels
        for b in CATEGORIES:
            if a < b:
                assert np.abs(masks[a] - masks[b]).sum() > 100, (a, b)


def test_scenes_are_deterministic():
    for seed in SEEDS[:10]:
        a, b = sample_scene(seed), sample_scene(seed)
        assert a.to_json() == b.to_json()
        assert np.array_equal(render_array(a), render_array(b))
    assert sample_scene(SEEDS[0]).to_json() != sample_scene(SEEDS[1]).to_json()


def test_boxes_are_exact_and_objects_do_not_overlap():
    for seed in SEEDS:
        scene = sample_scene(seed)
        assert 1 <= len(scene.objects) <= 6
        for obj in scene.objects:
            x0, y0, mask = object_mask(obj, scene.image_size)
            ys, xs = np.nonzero(mask > 0)
            bx0, by0, bx1, by1 = obj.box
            # the box holds every pixel the object touches, and is tight on every side
            assert (bx0, by0) == (x0 + xs.min(), y0 + ys.min())
            assert (bx1, by1) == (x0 + xs.max() + 1, y0 + ys.max() + 1)
        boxes = [o.box for o in scene.objects]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_rendered_objects_change_pixels_only_inside_their_boxes():
    for seed in SEEDS[:15]:
        scene = sample_scene(seed)
        with_objects = render_array(scene).astype(int)
        without = add_noise(render_background(scene), scene.noise_std, scene.seed).astype(int)
        inside = np.zeros(with_objects.shape[:2], bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            inside[y0:y1, x0:x1] = True
            if not obj.weak:  # a clearly visible object changes its own pixels
                assert np.abs(with_objects - without)[y0:y1, x0:x1].max() > 40
        assert np.array_equal(with_objects[~inside], without[~inside])


def test_co_occurrence_prior_and_weak_objects():
    scenes = [sample_scene(s) for s in range(TRAIN_SEEDS.start, TRAIN_SEEDS.start + 800)]

    def star_given(category: str) -> float:
        having = [s for s in scenes if category in s.categories()]
        return sum("star" in s.categories() for s in having) / len(having)

    assert star_given("moon") > 0.7  # the world's fork and knife
    assert star_given("moon") > star_given("heart") + 0.3
    objects = [o for s in scenes for o in s.objects]
    weak = [o for o in objects if o.weak]
    assert 0.05 < len(weak) / len(objects) < 0.35
    partners_weak = [o for s in scenes for o in s.objects[1:] if o.weak and o.category in PARTNER]
    assert len(partners_weak) > len(weak) / 2  # the prior's partner is the object seen badly
    assert {a for a, _ in PAIRS} <= set(CATEGORIES)


def test_patch_labels_follow_objects():
    scene = sample_scene(SEEDS[3])
    labels = patch_labels(scene, 8)
    assert labels["category"].shape == (12, 12)
    assert set(np.unique(labels["category"])) - {-1} == {CATEGORIES.index(c) for c in scene.categories()} or all(
        o.weak for o in scene.objects)
    assert labels["centre"].sum() == len({(int(o.cy // 8), int(o.cx // 8)) for o in scene.objects})
    with pytest.raises(ConfigError, match="does not divide"):
        patch_labels(scene, 7)


def test_patch_side_labels_name_the_third_of_the_object_centre():
    scene = sample_scene(SEEDS[3])
    obj = dataclasses.replace(scene.objects[0], cx=20.0, cy=80.0, weak=False)  # left, bottom third
    labels = patch_labels(dataclasses.replace(scene, objects=[obj]), 8)
    on_object = labels["category"] >= 0
    assert on_object.any()
    assert (labels["horizontal"][on_object] == 0).all() and (labels["vertical"][on_object] == 1).all()
    background = ~on_object
    assert (labels["horizontal"][:, 11][background[:, 11]] == 1).all()  # right-most column: right
    assert (labels["horizontal"][:, 5][background[:, 5]] == 2).all()  # centre columns: middle
    assert (labels["vertical"][0][background[0]] == 0).all()  # top row: top
    assert (labels["horizontal"][0, :4] == 0).all() and (labels["horizontal"][0, 4:8] == 2).all()


def test_seed_ranges_never_overlap():
    assert TRAIN_SEEDS.stop <= EVAL_SEEDS.start
    assert check_seeds("train", 0, 10) == range(0, 10)
    with pytest.raises(ConfigError, match="must never overlap"):
        check_seeds("train", TRAIN_SEEDS.stop - 5, 10)
    with pytest.raises(ConfigError, match="must never overlap"):
        check_seeds("eval", 3, 10)
    with pytest.raises(ConfigError, match="unknown"):
        check_seeds("test", 3, 10)


def test_world_config_validation():
    with pytest.raises(ConfigError, match="max_objects"):
        WorldConfig(min_objects=4, max_objects=2)
    with pytest.raises(ConfigError, match="probability"):
        WorldConfig(pair_prob=1.5)
    with pytest.raises(ConfigError, match="difficulty"):
        sample_scene(0, difficulty=2.0)
    assert render(sample_scene(0, WorldConfig(image_size=64))).size == (64, 64)


def test_text_answers_are_exact():
    rng = np.random.default_rng(0)
    for seed in SEEDS[:20]:
        scene = sample_scene(seed)
        text = caption(scene)
        for category in scene.categories():
            assert category in text or any(w in text for w in ("crescent", "padlock"))
        for kind, make in QA_KINDS.items():
            qa = make(scene, rng)
            if qa is None or kind != "existence":
                continue
            asked = next(c for c in CATEGORIES if re.search(rf"\b{c}\b", qa.question))
            assert qa.label == ("yes" if asked in scene.categories() else "no")
    assert pope_question("umbrella") == "Is there an umbrella in the image?"


def test_clips_have_exact_per_frame_ground_truth(tmp_path):
    seen = set()
    for seed in SEEDS[:24]:
        clip = sample_clip(seed)
        seen.add(clip.event)
        frames = [frame_objects(clip, t) for t in range(clip.num_frames)]
        subject = [[o for o in f if o.category == clip.subject.category] for f in frames]
        if clip.event == "appear":
            assert all(not s for s in subject[:clip.event_frame]) and all(subject[clip.event_frame:])
        elif clip.event == "disappear":
            assert all(subject[:clip.event_frame]) and not any(subject[clip.event_frame:])
        elif clip.event == "move":
            xs = [s[0].box[0] for s in subject]
            ys = [s[0].box[1] for s in subject]
            delta = {"left": xs[0] - xs[-1], "right": xs[-1] - xs[0], "up": ys[0] - ys[-1],
                     "down": ys[-1] - ys[0]}[clip.direction]
            assert delta > 0.25 * clip.scene.image_size
        else:
            colours = [s[0].colour for s in subject]
            assert colours[0] != colours[-1] == clip.new_colour
        item = clip_question(clip, np.random.default_rng(seed))
        assert len(item["candidates"]) == 4 == len(set(item["candidates"]))
        assert item["answer"] in item["candidates"]
        assert mc_answer(item["candidates"], item["answer"]) in {f"Best option:( {x}) {item['answer']}" for x in "ABCD"}
        assert "Only give the best option." in mc_prompt(item["question"], item["candidates"])
    assert seen == {"appear", "disappear", "move", "color"}
    clip = sample_clip(SEEDS[0])
    frames = render_clip(clip)
    assert np.array_equal(frames, render_clip(sample_clip(SEEDS[0])))
    decord = pytest.importorskip("decord")
    write_mp4(frames, tmp_path / "clip.mp4")
    reader = decord.VideoReader(str(tmp_path / "clip.mp4"))
    decoded = reader.get_batch(list(range(len(reader)))).asnumpy()
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 12


def test_the_focus_word_of_a_question_comes_after_every_word_its_answer_depends_on():
    from vlmkit.data.shapes import COLOURS
    from vlmkit.data.shapes_text import NUMBER_WORDS, colour_qa, count_qa, existence_qa, position_qa

    keys = set(CATEGORIES) | set(COLOURS) | set(NUMBER_WORDS) | {"left", "right", "top", "bottom"}
    keys |= {w + "s" for w in CATEGORIES}
    checked = set()
    for seed in SEEDS:
        scene = sample_scene(seed)
        rng = np.random.default_rng(seed)
        for qa in (existence_qa(scene, rng, True), existence_qa(scene, rng, False), count_qa(scene, rng),
                   colour_qa(scene, rng), position_qa(scene, rng)):
            if qa is None or not qa.focus:
                continue
            words = re.findall(r"[a-z]+", qa.question.split("?")[0].lower())  # without the suffix
            after = words[max(i for i, w in enumerate(words) if w == qa.focus.lower()) + 1:]
            assert not keys & set(after), (qa.question, qa.focus)  # the gist is known at the focus word
            checked.add((qa.kind, qa.label in ("yes", "no")))
    assert ("position", True) in checked and ("color", True) in checked
