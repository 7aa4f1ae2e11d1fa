"""POPE as an lmms-eval task folder that reads local files only, scored by vlmkit's POPE scorer.

`write_task` turns POPE question files in the official format (JSON lines ``{"question_id", "image",
"text", "label"}``, e.g. RUCAIBox/POPE's ``coco_pope_random.json`` or the files ``vlmkit data shapes
--bench pope`` writes) and their image folder into a folder for lmms-eval's ``--include_path``:

* ``<name>_<split>.jsonl``: the questions in file order, with absolute image paths;
* ``<name>_<split>.yaml``: one task per split (``dataset_path: json`` on the file beside it);
* ``<name>.yaml``: the group of the splits, whose accuracy and F1 are unweighted means over them
  (as ``vlmkit eval`` reports ``mean_accuracy`` and ``mean_f1``).

Prompts are lmms-eval's POPE prompt, which is also ``vlmkit eval``'s default: the question, then
``"\\nAnswer the question using a single word or phrase."``; decoding is greedy with 16 new tokens and
no stop string, as ``vlmkit eval --bench pope``. Answers are parsed with the ``style`` of
vlmkit's POPE scorer (default ``"llava"``, RUCAIBox/POPE's parser; lmms-eval's own POPE task counts
only an exact ``yes``/``no``, which is ``style="lmms_eval"``).

Command line::

    python -m lmms_eval_vlmkit.pope DATA_DIR --out TASKS_DIR [--images DIR] [--name vlmkit_pope]
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.errors import DatasetError

try:  # one module per benchmark
    from vlmkit.eval.benchmarks import pope as _pope
except ImportError:  # vlmkit before that layout
    from vlmkit.eval import pope as _pope

SPLITS = _pope.SPLITS
STYLES = _pope.STYLES
METRICS = ("accuracy", "f1", "precision", "recall", "yes_ratio")
"""Reported per split as ``pope_<metric>``; the group averages ``pope_accuracy`` and ``pope_f1``."""

POST_PROMPT = "\nAnswer the question using a single word or phrase."
MAX_NEW_TOKENS = 16


# ---------------------------------------------------------------- functions the task YAML names
def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The question's image, read from the absolute path `write_task` stored."""
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    """``pre_prompt + question + post_prompt`` (the task YAML sets both)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', POST_PROMPT)}"


def _process_results(style: str):
    def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, dict[str, Any]]:
        row = {"question_id": doc["question_id"], "answer": results[0], "label": doc["answer"], "style": style}
        return {f"pope_{metric}": row for metric in METRICS}

    process_results.__name__ = process_results.__qualname__ = f"process_results_{style}"
    process_results.__doc__ = f"Keep the raw reply and the label; the aggregations score them with style {style!r}."
    return process_results


process_results_llava = _process_results("llava")
process_results_opera = _process_results("opera")
process_results_vcd = _process_results("vcd")
process_results_lmms_eval = _process_results("lmms_eval")


def _aggregate(metric: str):
    def aggregate(rows: Sequence[dict[str, Any]]) -> float:
        styles = {row["style"] for row in rows}
        if len(styles) != 1:
            raise ValueError(f"POPE rows mix parsing styles {sorted(styles)}; one task scores with one style.")
        return _pope.score([r["answer"] for r in rows], [r["label"] for r in rows], styles.pop())[metric]

    aggregate.__name__ = aggregate.__qualname__ = f"aggregate_{metric}"
    aggregate.__doc__ = f"POPE {metric} of one split, as vlmkit's POPE scorer computes it."
    return aggregate


aggregate_accuracy = _aggregate("accuracy")
aggregate_f1 = _aggregate("f1")
aggregate_precision = _aggregate("precision")
aggregate_recall = _aggregate("recall")
aggregate_yes_ratio = _aggregate("yes_ratio")


# ---------------------------------------------------------------- writing the task folder
def write_task(
    data: str | Path,
    out: str | Path,
    *,
    images: str | Path | None = None,
    name: str = "vlmkit_pope",
    splits: Iterable[str] | None = None,
    style: str = "llava",
) -> dict[str, Path]:
    """Write POPE question files as an lmms-eval task folder (see the module docstring).

    Args:
        data: A question file or a folder of ``*pope*.json(l)`` files. A row's split is its
            ``category`` field, else the last ``_`` part of its file name (``..._random.json``).
        out: The task folder to write (created); pass it to ``--include_path``.
        images: The folder the rows' ``image`` names are in; default ``images/`` or ``val2014/``
            beside the question files.
        name: Group name; the tasks are ``<name>_<split>``.
        splits: Keep only these splits; default all found.
        style: Answer parser, one of `STYLES` (vlmkit's POPE parsers).

    Returns:
        ``{task_or_group_name: yaml_path}``, the group under ``name``.

    Raises:
        DatasetError: Missing files, fields, images or splits; the message names them.
        ValueError: Unknown style.

    Example:
        >>> write_task("data/pope", "tasks")  # doctest: +SKIP
        {'vlmkit_pope_adversarial': ..., 'vlmkit_pope_popular': ..., 'vlmkit_pope_random': ..., 'vlmkit_pope': ...}
    """
    if style not in STYLES:
        raise ValueError(f"POPE style {style!r} is not known; choose one of {', '.join(STYLES)}.")
    source = Path(data).expanduser().resolve()
    files = _question_files(source)
    folder = Path(images).expanduser().resolve() if images else _image_folder(source)
    rows: dict[str, list[dict[str, Any]]] = {}
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"POPE: {file}:{number} is not JSON ({error}).") from None
            missing = [key for key in ("question_id", "image", "text", "label") if key not in row]
            if missing:
                raise DatasetError(
                    f"POPE: {file}:{number} lacks {missing}; the official rows have question_id, image, text, label."
                )
            split = str(row.get("category") or file.stem.rsplit("_", 1)[-1])
            image = folder / row["image"]
            if not image.is_file():
                raise DatasetError(
                    f"POPE: image {image} ({file}:{number}) does not exist; pass images= the folder holding it."
                )
            rows.setdefault(split, []).append(
                {
                    "question_id": row["question_id"],
                    "question": row["text"],
                    "answer": str(row["label"]).lower().strip(),
                    "category": split,
                    "image": str(image),
                }
            )
    wanted = sorted(rows) if splits is None else list(splits)
    unknown = [split for split in wanted if split not in rows]
    if unknown:
        raise DatasetError(f"POPE: splits {unknown} are not in {source}; found {sorted(rows)}.")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split in wanted:
        task = f"{name}_{split}"
        with open(out / f"{task}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows[split])
        written[task] = out / f"{task}.yaml"
        written[task].write_text(_task_yaml(task, style))
    written[name] = out / f"{name}.yaml"
    written[name].write_text(_group_yaml(name, [f"{name}_{split}" for split in wanted]))
    return written


def _question_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if "pope" in p.name and p.suffix in (".json", ".jsonl"))
        if files:
            return files
        raise DatasetError(f"POPE: {source} holds no *pope*.json(l) question files; point data at them.")
    raise DatasetError(f"POPE: question file or folder {source} does not exist.")


def _image_folder(source: Path) -> Path:
    root = source if source.is_dir() else source.parent
    for candidate in ("images", "val2014"):
        if (root / candidate).is_dir():
            return root / candidate
    raise DatasetError(f"POPE: no images/ or val2014/ folder beside {source}; pass images= the image folder.")


def _task_yaml(task: str, style: str) -> str:
    module = "lmms_eval_vlmkit.pope"  # also when run as python -m lmms_eval_vlmkit.pope
    metrics = "".join(
        f"  - metric: pope_{metric}\n"
        f"    aggregation: !function {module}.aggregate_{metric}\n"
        "    higher_is_better: true\n"
        for metric in METRICS
    )
    return (
        f"task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {task}.jsonl\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {module}.doc_to_visual\n"
        f"doc_to_text: !function {module}.doc_to_text\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n"
        f"  max_new_tokens: {MAX_NEW_TOKENS}\n"
        "  temperature: 0\n"
        "  num_beams: 1\n"
        "  do_sample: false\n"
        "  until: []\n"
        f"process_results: !function {module}.process_results_{style}\n"
        "metric_list:\n"
        f"{metrics}"
        "lmms_eval_specific_kwargs:\n"
        "  default:\n"
        '    pre_prompt: ""\n'
        f"    post_prompt: {json.dumps(POST_PROMPT)}\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def _group_yaml(name: str, tasks: Sequence[str]) -> str:
    listed = "".join(f"  - {task}\n" for task in tasks)
    means = "".join(
        f"  - metric: pope_{metric}\n    aggregation: mean\n    weight_by_size: false\n"
        for metric in ("accuracy", "f1")
    )
    return f"group: {name}\ntask:\n{listed}aggregate_metric_list:\n{means}metadata:\n  version: 1.0\n"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lmms_eval_vlmkit.pope DATA --out TASKS``: write the task folder."""
    parser = argparse.ArgumentParser(prog="python -m lmms_eval_vlmkit.pope", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a POPE question file or a folder of *pope*.json(l) files")
    parser.add_argument("--out", required=True, help="task folder to write (give it to lmms-eval's --include_path)")
    parser.add_argument("--images", help="image folder (default images/ or val2014/ beside the question files)")
    parser.add_argument("--name", default="vlmkit_pope", help="group name; tasks are NAME_<split> (%(default)s)")
    parser.add_argument("--split", nargs="+", help=f"splits to keep (default all; standard: {', '.join(SPLITS)})")
    parser.add_argument("--style", default="llava", choices=STYLES, help="answer parser (default llava)")
    args = parser.parse_args(argv)
    written = write_task(args.data, args.out, images=args.images, name=args.name, splits=args.split, style=args.style)
    for task, path in written.items():
        print(f"{task}: {path}")


if __name__ == "__main__":
    main()
