"""Tiny benchmark folders in the official layouts, for the runner tests (written into tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tests.eval.fixtures import COCO_IMAGES, write_coco_annotations

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


def image(seed: int, size: int = 64) -> Image.Image:
    """A small picture: a coloured background with a shape, different per seed."""
    picture = Image.new("RGB", (size, size), COLOURS[seed % len(COLOURS)])
    draw = ImageDraw.Draw(picture)
    box = (8 + seed % 5, 10, 40 + seed % 7, 50)
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=COLOURS[(seed + 3) % len(COLOURS)])
    return picture


def write_pope(root: Path, images: int = 4, corrupt: bool = False) -> Path:
    """RUCAIBox/POPE layout: ``coco_pope_{random,adversarial}.json`` (JSON lines) and ``images/``.

    Each split asks one question per image (labels alternate yes, no). With ``corrupt``, one more
    image file holds garbage and gets a question in the ``random`` split.
    """
    (root / "images").mkdir(parents=True)
    names = [f"COCO_val2014_{k:012d}.jpg" for k in range(images)]
    for k, name in enumerate(names):
        image(k).save(root / "images" / name)
    for split, objects in (("random", ("cat", "dog")), ("adversarial", ("car", "cup"))):
        rows = [
            {
                "question_id": k + 1,
                "image": name,
                "text": f"Is there a {objects[k % 2]} in the image?",
                "label": ("yes", "no")[k % 2],
            }
            for k, name in enumerate(names)
        ]
        if corrupt and split == "random":
            (root / "images" / "broken.jpg").write_bytes(b"not a jpeg at all")
            rows.insert(
                1, {"question_id": 99, "image": "broken.jpg", "text": "Is there a cat in the image?", "label": "yes"}
            )
        (root / f"coco_pope_{split}.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def write_chair(root: Path) -> Path:
    """COCO layout: ``val2014/`` images and ``annotations/`` (the four COCO 2014 files)."""
    write_coco_annotations(root / "annotations")
    (root / "val2014").mkdir(parents=True)
    for k, (image_id, (split, _, _)) in enumerate(COCO_IMAGES.items()):
        if split == "val":
            image(k).save(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    return root


def write_mme(root: Path) -> Path:
    """MME release layout: flat ``<subtask>/<name>.png`` + ``<name>.txt`` for two subtasks x two images."""
    folder = root / "MME_Benchmark_release_version"
    for t, subtask in enumerate(("color", "existence")):
        (folder / subtask).mkdir(parents=True)
        for k in range(2):
            image(4 * t + k).save(folder / subtask / f"{k:04d}.png")
            (folder / subtask / f"{k:04d}.txt").write_text(
                "Is there a red object in the image? Please answer yes or no.\tYes\n"
                "Is there a blue object in the image? Please answer yes or no.\tNo\n"
            )
    return root


def write_mvbench(root: Path, videos: int = 3, task: str | None = None) -> Path:
    """MVBench layout: ``json/object_existence.json`` and ``video/clevrer/video_validation/*.mp4``.

    With ``task``, the questions go to ``json/<task>.json`` and ``video/custom/``, listed in a
    ``data_list.json`` (the official notebook's form; the shapes world writes one).
    """
    import imageio

    folder = root / "video" / ("custom" if task else "clevrer/video_validation")
    folder.mkdir(parents=True)
    items = []
    for k in range(videos):
        frames = [np.asarray(image(k + f, size=64)) for f in range(6)]
        imageio.mimwrite(folder / f"v{k}.mp4", frames, fps=3, codec="libx264")
        items.append(
            {
                "video": f"v{k}.mp4",
                "question": "Are there any moving objects when the video begins?",
                "candidates": ["yes", "no", "not sure"],
                "answer": ("yes", "no", "not sure")[k % 3],
            }
        )
    (root / "json").mkdir()
    (root / "json" / f"{task or 'object_existence'}.json").write_text(json.dumps(items))
    if task:
        (root / "data_list.json").write_text(json.dumps({task: [f"{task}.json", "custom/", "video", False]}))
    return root


def save_tiny_llava(folder: Path) -> Path:
    """tiny:llava saved as a local model folder (``save_pretrained`` of the model and its processor)."""
    from vlmkit import zoo

    model, processor = zoo.tiny("llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
