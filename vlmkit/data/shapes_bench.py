"""Benchmarks of the shapes world, written in the official file formats of the real ones.

Each writer renders held-out scenes (seeds from `EVAL_SEEDS`) and writes them next to question
files laid out exactly like the real benchmark, so the loaders in
`vlmkit.eval` read both:

* `write_pope`: POPE JSON lines `{question_id, image, text, label}` for the `random`, `popular`
  and `adversarial` splits, built like RUCAIBox/POPE `utils.py` (positives are each image's first
  three ground-truth objects; negatives drawn at random, by frequency, or by co-occurrence with
  the positive), plus the `{image, objects}` ground-truth lines they were built from.
* `write_chair`: `annotations/{instances,captions}_{train,val}2014.json` in COCO's format (the
  train files are valid but empty), the images, and `synonyms.txt` in OPERA's `synonyms_txt`
  format.
* `write_mme`: `MME_Benchmark_release_version/{existence,count,position,color}/` with
  `<name>.png` + `<name>.txt` (two `question\\tYes|No` lines, Yes first).
* `write_video`: MVBench-style `json/<task>.json` lists of `{video, question, candidates,
  answer}` and `video/shapes/*.mp4`.
* `write_multi`: many images in one prompt (1 to 16) and one POPE existence question whose object
  is in exactly one of them or in none, `shapes_multi.jsonl` rows `{question_id, images, text,
  label, num_images, needle, category}` (a long-context needle test; no official counterpart).
* `write_train`: a LLaVA-style instruction file (`{id, image, conversations}`) from training seeds.

Every writer also leaves a `ground_truth.jsonl` with the exact scene of each image.
"""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlmkit.data.shapes import (
    CATEGORIES, COLOURS, EVAL_SEEDS, SYNONYMS, TRAIN_SEEDS, Scene, WorldConfig, check_seeds,
    render, sample_scene,
)
from vlmkit.data.shapes_text import (
    MME_SUFFIX, QA_KINDS, caption, clear_sides, colour_question, count_question, pope_question,
    side_question, unique_objects,
)
from vlmkit.data.shapes_video import clip_question, render_clip, sample_clip, write_mp4
from vlmkit.errors import ConfigError

POPE_SPLITS = ("random", "popular", "adversarial")
MME_SUBTASKS = ("existence", "count", "position", "color")
BENCHES = ("pope", "chair", "mme", "video", "multi", "train")
MULTI_COUNTS = (1, 2, 4, 8, 16)
_SCAN_LIMIT = 200
"""Scenes scanned per kept image at most, before a writer gives up."""


def _qualifying(seed: int, n: int, keep: Callable[[Scene], bool], config: WorldConfig,
                split: str = "eval") -> Iterator[Scene]:
    """The first `n` scenes, from seed `seed` upward, that `keep` accepts."""
    found = 0
    limit = n * _SCAN_LIMIT
    for s in check_seeds(split, seed, limit):
        scene = sample_scene(s, config)
        if keep(scene):
            found += 1
            yield scene
            if found == n:
                return
    raise ConfigError(f"only {found} of {n} scenes from seed {seed} qualify; lower n.")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _save_image(scene: Scene, path: Path) -> None:
    render(scene).save(path, format="PNG")


# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------


def pope_questions(objects: list[list[str]], images: list[str], strategy: str, seed: int,
                   sample_num: int = 3) -> list[dict]:
    """POPE questions for images with known object lists, as RUCAIBox/POPE `utils.py::pope` does.

    Args:
        objects: per image, the distinct ground-truth objects in annotation order.
        images: per image, its file name.
        strategy: "random", "popular" or "adversarial".
        seed: seeds the random choices (the reference sets none).
        sample_num: questions pairs per image (positives are `objects[i][:sample_num]`).

    Returns:
        Rows `{question_id, image, text, label}`, alternating yes and no per image.

    Raises:
        ConfigError: for an unknown strategy or an image with fewer than `sample_num` objects.
    """
    if strategy not in POPE_SPLITS:
        raise ConfigError(f"POPE strategy {strategy!r} is unknown; use one of {POPE_SPLITS}.")
    rng = random.Random(seed)
    vocabulary = list(dict.fromkeys(o for objs in objects for o in objs))
    frequency = Counter(o for objs in objects for o in objs)
    by_frequency = sorted(vocabulary, key=lambda o: frequency[o], reverse=True)
    co_occurrence: dict[str, Counter] = defaultdict(Counter)
    for objs in objects:
        for a in objs:
            for b in objs:
                if a != b:
                    co_occurrence[a][b] += 1
    rows: list[dict] = []
    for image, objs in zip(images, objects):
        if len(objs) < sample_num:
            raise ConfigError(f"image {image} has {len(objs)} objects; POPE needs >= {sample_num}.")
        asked: set[str] = set()
        for i in range(sample_num):
            positive = objs[i]
            excluded = set(objs) | asked
            if excluded >= set(vocabulary):
                raise ConfigError(f"image {image}: every object name is in the image or already "
                                  "asked, so no negative exists; use more images.")
            if strategy == "random":
                negative = rng.choice(vocabulary)
                while negative in excluded:
                    negative = rng.choice(vocabulary)
            else:
                ranked = (by_frequency if strategy == "popular" else
                          sorted(co_occurrence[positive], key=co_occurrence[positive].get,
                                 reverse=True))
                negative = next((o for o in ranked if o not in excluded), None)
                while negative is None or negative in excluded:
                    negative = rng.choice(vocabulary)
            asked.add(negative)
            for name, label in ((positive, "yes"), (negative, "no")):
                rows.append({"question_id": len(rows) + 1, "image": image,
                             "text": pope_question(name), "label": label})
    return rows


def write_pope(out: str | Path, n: int = 500, seed: int = EVAL_SEEDS.start,
               config: WorldConfig | None = None, sample_num: int = 3) -> dict[str, Path]:
    """Write POPE's three splits over `n` held-out images with >= `sample_num` categories.

    Args:
        out: folder to create; gets `images/`, `shapes_pope_{split}.json`,
            `shapes_ground_truth_objects.json` and `ground_truth.jsonl`.
        n: number of images (the official files use 500).
        seed: first scene seed (must lie in `EVAL_SEEDS`).
        config: the world.
        sample_num: questions pairs per image (3 in the official files).

    Returns:
        `{split: path}` of the question files.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    config = config or WorldConfig()
    scenes = list(_qualifying(seed, n, lambda s: len(s.categories()) >= sample_num, config))
    names = [f"shapes_{s.seed:010d}.png" for s in scenes]
    for scene, name in zip(tqdm(scenes, desc="pope images", leave=False), names):
        _save_image(scene, out / "images" / name)
    objects = [s.categories() for s in scenes]
    _write_jsonl(out / "shapes_ground_truth_objects.json",
                 [{"image": name, "objects": objs} for name, objs in zip(names, objects)])
    _write_jsonl(out / "ground_truth.jsonl",
                 [{"image": name, **s.to_json()} for name, s in zip(names, scenes)])
    paths = {}
    for split in POPE_SPLITS:
        paths[split] = out / f"shapes_pope_{split}.json"
        _write_jsonl(paths[split], pope_questions(objects, names, split, seed, sample_num))
    return paths


# --------------------------------------------------------------------------------------------
# CHAIR
# --------------------------------------------------------------------------------------------


def synonyms_text() -> str:
    """The synonym table in OPERA's `synonyms_txt` format: one line per class, class first."""
    return "\n".join(", ".join(words) for words in SYNONYMS.values()) + "\n"


def write_chair(out: str | Path, n: int = 500, seed: int = EVAL_SEEDS.start,
                config: WorldConfig | None = None, captions_per_image: int = 3) -> Path:
    """Write a captioning set in the layout of COCO-2014's annotations, for the CHAIR scorer.

    Args:
        out: folder to create; gets `val2014/` images, `annotations/` (four COCO files) and
            `synonyms.txt`.
        n: number of images (the CHAIR protocol uses 500).
        seed: first scene seed (must lie in `EVAL_SEEDS`).
        config: the world.
        captions_per_image: reference captions per image (COCO has 5).

    Returns:
        The annotations folder.
    """
    out = Path(out)
    (out / "val2014").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    config = config or WorldConfig()
    scenes = list(_qualifying(seed, n, lambda s: bool(s.objects), config))
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CATEGORIES)]
    images, instances, captions = [], [], []
    for index, scene in enumerate(tqdm(scenes, desc="chair images", leave=False), start=1):
        name = f"shapes_val2014_{index:012d}.png"
        _save_image(scene, out / "val2014" / name)
        images.append({"id": index, "file_name": name, "width": scene.image_size,
                       "height": scene.image_size, "seed": scene.seed})
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            instances.append({
                "id": len(instances) + 1, "image_id": index,
                "category_id": CATEGORIES.index(obj.category) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0, "segmentation": [],
            })
        rng = np.random.default_rng([scene.seed, 2])
        for k in range(captions_per_image):
            text = caption(scene, detail=k % 2 == 0, rng=rng if k else None)
            captions.append({"id": len(captions) + 1, "image_id": index, "caption": text})
    info = {"description": "vlmkit shapes world (synthetic), COCO-2014 layout", "version": "1.0"}
    files = {
        "instances_val2014.json": {"info": info, "images": images, "annotations": instances,
                                   "categories": categories},
        "captions_val2014.json": {"info": info, "images": images, "annotations": captions},
        "instances_train2014.json": {"info": info, "images": [], "annotations": [],
                                     "categories": categories},
        "captions_train2014.json": {"info": info, "images": [], "annotations": []},
    }
    for name, content in files.items():
        (out / "annotations" / name).write_text(json.dumps(content))
    (out / "synonyms.txt").write_text(synonyms_text())
    _write_jsonl(out / "ground_truth.jsonl",
                 [{"image_id": i + 1, **s.to_json()} for i, s in enumerate(scenes)])
    return out / "annotations"


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------


def _mme_pair(scene: Scene, subtask: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(yes question, no question) for one image, or None when the scene does not qualify."""
    present = scene.categories()
    if subtask == "existence":
        absent = [c for c in CATEGORIES if c not in present]
        yes = present[int(rng.integers(len(present)))]
        no = absent[int(rng.integers(len(absent)))]
        return pope_question(yes), pope_question(no)
    if subtask == "count":
        category = max(present, key=scene.count)
        n = scene.count(category)
        if n < 2 and rng.random() < 0.5:
            return None
        wrong = [k for k in range(1, 5) if k != n]
        return count_question(category, n), count_question(category, wrong[int(rng.integers(3))])
    if subtask == "position":
        objs = [o for o in unique_objects(scene) if clear_sides(o, scene.image_size)]
        if not objs:
            return None
        obj = objs[int(rng.integers(len(objs)))]
        sides = clear_sides(obj, scene.image_size)
        side = sides[int(rng.integers(len(sides)))]
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[side]
        return side_question(obj.category, side), side_question(obj.category, opposite)
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    used = {o.colour for o in scene.objects if o.category == obj.category}
    others = [c for c in COLOURS if c not in used]
    return (colour_question(obj.colour, obj.category),
            colour_question(others[int(rng.integers(len(others)))], obj.category))


def write_mme(out: str | Path, n: int = 30, seed: int = EVAL_SEEDS.start,
              config: WorldConfig | None = None) -> Path:
    """Write MME's perception subtasks existence, count, position and color for the shapes world.

    Args:
        out: folder to create; gets `MME_Benchmark_release_version/<subtask>/`.
        n: images per subtask (MME has 30), two questions each.
        seed: first scene seed (must lie in `EVAL_SEEDS`); subtasks use disjoint seeds.
        config: the world.

    Returns:
        The `MME_Benchmark_release_version` folder.
    """
    root = Path(out) / "MME_Benchmark_release_version"
    config = config or WorldConfig()
    for k, subtask in enumerate(MME_SUBTASKS):
        folder = root / subtask
        folder.mkdir(parents=True, exist_ok=True)
        start = seed + k * n * _SCAN_LIMIT
        rows = []
        pairs: dict[int, tuple[str, str]] = {}

        def keep(scene: Scene, subtask: str = subtask) -> bool:
            pair = _mme_pair(scene, subtask, np.random.default_rng([scene.seed, 3]))
            if pair is not None:
                pairs[scene.seed] = pair
            return pair is not None

        for scene in _qualifying(start, n, lambda s: bool(s.objects) and keep(s), config):
            name = f"{scene.seed:010d}"
            _save_image(scene, folder / f"{name}.png")
            yes, no = pairs[scene.seed]
            (folder / f"{name}.txt").write_text(f"{yes}{MME_SUFFIX}\tYes\n{no}{MME_SUFFIX}\tNo\n")
            rows.append({"image": f"{name}.png", **scene.to_json()})
        _write_jsonl(folder / "ground_truth.jsonl", rows)
    return root


# --------------------------------------------------------------------------------------------
# Video multiple choice
# --------------------------------------------------------------------------------------------


def write_video(out: str | Path, n: int = 200, seed: int = EVAL_SEEDS.start,
                config: WorldConfig | None = None, num_frames: int = 8, fps: int = 4) -> Path:
    """Write an MVBench-style multiple-choice set over `n` held-out clips.

    Args:
        out: folder to create; gets `json/<task>.json` (one list per task), `video/shapes/*.mp4`
            and `ground_truth.jsonl` (per-frame objects and boxes).
        n: number of clips (spread over the four event tasks).
        seed: first clip seed (must lie in `EVAL_SEEDS`).
        config: the world (`WorldConfig(max_objects=3, image_size=...)`).
        num_frames: frames per clip.
        fps: frames per second of the mp4 files.

    Returns:
        The `json` folder.
    """
    out = Path(out)
    (out / "json").mkdir(parents=True, exist_ok=True)
    (out / "video" / "shapes").mkdir(parents=True, exist_ok=True)
    tasks: dict[str, list[dict]] = defaultdict(list)
    truth = []
    for s in tqdm(check_seeds("eval", seed, n), desc="video clips", leave=False):
        clip = sample_clip(s, config, num_frames)
        name = f"clip_{s:010d}.mp4"
        write_mp4(render_clip(clip), out / "video" / "shapes" / name, fps=fps)
        item = clip_question(clip, np.random.default_rng([s, 4]))
        tasks[item.pop("task")].append({"video": name, **item})
        truth.append({"video": name, **clip.to_json()})
    for task, items in sorted(tasks.items()):
        (out / "json" / f"{task}.json").write_text(json.dumps(items, indent=1))
    (out / "data_list.json").write_text(json.dumps(
        {task: [f"{task}.json", "shapes/", "video", False] for task in sorted(tasks)}, indent=1))
    _write_jsonl(out / "ground_truth.jsonl", truth)
    return out / "json"


# --------------------------------------------------------------------------------------------
# Training set (static)
# --------------------------------------------------------------------------------------------


def write_multi(out: str | Path, n: int = 50, seed: int = EVAL_SEEDS.start, config: WorldConfig | None = None,
                counts: tuple[int, ...] = MULTI_COUNTS, pool: int = 200) -> Path:
    """Write the multi-image needle test: for each image count k in `counts`, `n` prompts of k
    held-out images and POPE's existence question ("Is there a star in the image?"), alternately
    about a category present in exactly one of the k images (label yes; `needle` is its index) and
    about one present in none (label no), drawn uniformly among the categories that qualify.

    Args:
        out: folder to create; gets `images/`, `shapes_multi.jsonl` and `ground_truth.jsonl`.
        n: prompts per image count.
        seed: first scene seed (in `EVAL_SEEDS`); the images come from a pool of `pool` scenes.
        config: the world.
        counts: image counts per prompt.
        pool: scenes the prompts draw their images from.

    Returns:
        The question file.
    """
    if not counts or min(counts) < 1 or max(counts) > pool:
        raise ConfigError(f"multi: image counts {counts} must lie in 1..{pool} (the image pool)")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    config = config or WorldConfig()
    scenes = list(_qualifying(seed, pool, lambda s: True, config))
    names = [f"shapes_{s.seed:010d}.png" for s in scenes]
    for scene, name in zip(tqdm(scenes, desc="multi images", leave=False), names):
        _save_image(scene, out / "images" / name)
    _write_jsonl(out / "ground_truth.jsonl", [{"image": name, **s.to_json()} for name, s in zip(names, scenes)])
    present = [set(s.categories()) for s in scenes]
    rng = np.random.default_rng(seed)
    rows = []
    for k in counts:
        for index in range(n):
            label = "yes" if index % 2 == 0 else "no"
            for _ in range(_SCAN_LIMIT):
                chosen = [int(i) for i in rng.choice(pool, size=k, replace=False)]
                needle = int(rng.integers(k)) if label == "yes" else -1
                others = set().union(*(present[i] for j, i in enumerate(chosen) if j != needle))
                candidates = sorted((present[chosen[needle]] if label == "yes" else set(CATEGORIES)) - others)
                if candidates:
                    break
            else:
                raise ConfigError(f"multi: found no {label} question for {k} images in {_SCAN_LIMIT} draws; use a larger pool")
            category = candidates[int(rng.integers(len(candidates)))]
            rows.append({"question_id": len(rows), "images": [names[i] for i in chosen], "text": pope_question(category),
                         "label": label, "num_images": k, "needle": needle, "category": category})
    path = out / "shapes_multi.jsonl"
    _write_jsonl(path, rows)
    return path


def write_train(out: str | Path, n: int = 1000, seed: int = TRAIN_SEEDS.start,
                config: WorldConfig | None = None, turns: int = 4) -> Path:
    """Write a LLaVA-style instruction file over training seeds (the models train on the fly).

    Args:
        out: folder to create; gets `images/` and `shapes_train.json`.
        n: number of images.
        seed: first scene seed (must lie in `TRAIN_SEEDS`).
        config: the world.
        turns: question/answer turns per image (a caption or a question each).

    Returns:
        The instruction file.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    config = config or WorldConfig()
    records = []
    for s in tqdm(check_seeds("train", seed, n), desc="train images", leave=False):
        scene = sample_scene(s, config)
        if not scene.objects:
            continue
        name = f"shapes_{s:010d}.png"
        _save_image(scene, out / "images" / name)
        rng = np.random.default_rng([s, 5])
        conversations = []
        kinds = list(QA_KINDS)
        while len(conversations) < 2 * turns:
            qa = QA_KINDS[kinds[int(rng.integers(len(kinds)))]](scene, rng)
            if qa is None:
                continue
            prefix = "<image>\n" if not conversations else ""
            conversations += [{"from": "human", "value": prefix + qa.question},
                              {"from": "gpt", "value": qa.answer}]
        records.append({"id": f"{s:010d}", "image": name, "conversations": conversations})
    path = out / "shapes_train.json"
    path.write_text(json.dumps(records, indent=1))
    return path
