"""Multi-image needle test: accuracy against the number of images in one prompt.

Each prompt holds k images and one POPE existence question ("Is there a star in the image?") whose
object is in exactly one of the k images (label yes) or in none (label no). The images go into the
prompt in order, each with its own placeholder; the question follows. Accuracy per image count
shows how well a model keeps finding evidence as the multimodal context grows (V2PE's claim). The
question file is JSON lines `{question_id, images, text, label, num_images, needle, category}`
beside an `images/` folder, as `vlmkit data shapes --bench multi` writes it; answers are parsed and
scored as POPE's (LLaVA's parser: a reply with "No", "not" or "no" is a no).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmkit.errors import DatasetError
from vlmkit.eval.benchmarks.base import (
    Benchmark, DataOptions, Loaded, SampleSet, Sample, check_files, check_unique, first_dir, require, template_of,
)
from vlmkit.eval.benchmarks.pope import PROMPTS, _json_lines, score
from vlmkit.eval.media import ImageFile


def load_multi(path: str | Path, image_dir: str | Path, counts: list[str] | None = None) -> SampleSet:
    """Load the question file(s) `*multi*.jsonl` under `path` (or that file) and their images.

    Args:
        path: the question file or its folder.
        image_dir: the folder holding the images the rows name.
        counts: keep only these image counts (as strings, e.g. ["1", "16"]); default all.

    Raises:
        DatasetError: missing files, images, fields or counts; the message names them.
    """
    source = Path(path)
    files = sorted(source.glob("*multi*.jsonl")) if source.is_dir() else [source] if source.is_file() else []
    if not files:
        raise DatasetError(f"multi: {source} holds no *multi*.jsonl question file; write one with "
                           "`vlmkit data shapes --bench multi --out DIR`")
    images = Path(image_dir)
    template = template_of(PROMPTS["llava"])
    samples, found = [], set()
    for file in files:
        for line, row in _json_lines(file):
            require(row, ("question_id", "images", "text", "label", "num_images"), f"{file}:{line}", "multi")
            split = str(row["num_images"])
            found.add(split)
            if counts is not None and split not in counts:
                continue
            if len(row["images"]) != int(row["num_images"]):
                raise DatasetError(f"{file}:{line}: num_images={row['num_images']} but {len(row['images'])} images listed")
            samples.append(Sample(
                sample_id=f"{split}/{row['question_id']}", prompt=template.format(question=row["text"]),
                target=str(row["label"]).lower(), media=tuple(ImageFile(images / name) for name in row["images"]),
                metadata={"split": split, "question_id": row["question_id"], "label": row["label"],
                          "needle": row.get("needle"), "category": row.get("category"), "images": row["images"]},
            ))
    if counts is not None and set(counts) - found:
        raise DatasetError(f"multi: image counts {sorted(set(counts) - found)} are not in {source}; it has {sorted(found, key=int)}")
    check_unique(samples, "multi", "load one question file at a time")
    check_files({name for s in samples for name in s.metadata["images"]}, lambda name: (images / name).is_file(),
                "multi images", images, "copy the images the question file names into its images/ folder")
    return SampleSet("multi", samples, info={"files": [str(f) for f in files], "image_dir": str(images),
                                             "counts": sorted(found, key=int)}, split_key="split")


def _load(root: Path, media: Path | None, splits: list[str] | None, options: DataOptions) -> Loaded:
    images = media or first_dir(root if root.is_dir() else root.parent, ("images",))
    if images is None:
        raise DatasetError(f"multi: no images/ folder beside {root}; pass --media DIR")
    return Loaded(load_multi(root, images, splits), {"media": str(images)}, {})


def _score_rows(rows, data, style, warnings) -> tuple[dict[str, Any], dict[str, Any]]:
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for row in rows:
        answers, labels = groups.setdefault(row["metadata"]["split"], ([], []))
        answers.append(row["response"])
        labels.append(row["metadata"]["label"])
    by_count = {k: score(*groups[k]) for k in sorted(groups, key=int)}
    metrics = {"accuracy": sum(s["accuracy"] for s in by_count.values()) / len(by_count)}
    metrics |= {f"accuracy@{k}": s["accuracy"] for k, s in by_count.items()}
    return metrics, {"counts": by_count}


BENCHMARK = Benchmark(
    name="multi",
    summary="multi-image needle test: an existence question over 1-16 images in one prompt, accuracy per image count",
    load=_load,
    score=_score_rows,
    prompts={"llava": PROMPTS["llava"]},
    max_new_tokens=16,
    primary="accuracy",
    metric_title="multi-image {} (mean over image counts)",
)
