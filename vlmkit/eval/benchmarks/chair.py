"""CHAIR (Caption Hallucination Assessment with Image Relevance): COCO images to caption, scored as papers do.

**Loading** (:func:`load_chair`): a seeded draw of COCO images and their ground truth. Each sample's
``metadata`` holds ``image_id``; score ``{"image_id": ..., "caption": reply}`` with
:meth:`Chair.score`. Under ``vlmkit eval --bench chair``, images are in ``--media`` or
``<data>/val2014`` or ``<data>/images``; ground truth in ``--annotations`` or ``<data>/annotations``
(the four COCO files, or a :meth:`Chair.save_ground_truth` file); a synonym table in ``--synonyms``
or ``<data>/synonyms.txt`` when present (else COCO's). ``--num-images`` (500) images are drawn with
``--data-seed`` (42). Captions get 512 new tokens unless ``--max-new-tokens`` says otherwise
(OPERA's setting). The NLTK data and the synonym table are checked before the first caption.

**Scoring.**

Follows Maxlinn's Python 3 port of LisaAnne/Hallucination ``utils/chair.py``, as shipped in
shikiw/OPERA ``chair.py`` @61426efe4e2e53207f32d9112a86ba5f8364d1d9, the version behind the CHAIR
numbers of OPERA, VCD and later decoding papers. Behaviours kept on purpose:

* **Words.** ``nltk.word_tokenize`` on the lowercased caption, ``nltk.pos_tag``, then the WordNet
  lemmatizer with the tag's WordNet part of speech (noun when none).
* **Double words.** Left to right, two adjacent lemmas that form a known double word are merged:
  29 COCO double words (``"traffic light"``, ``"hot dog"``, ...; also ``"home plate"`` and
  ``"train track"``, which are no objects, so "train track" hides "train"), ``"baby <animal>"`` and
  ``"adult <animal>"`` -> the animal, ``"passenger jet/train"`` -> jet/train, ``"bow tie"`` -> tie,
  ``"toilet seat"`` -> toilet. ``"motor bike"`` merges but never counts: its synonym entry has a
  leading space (``",  motor bike"`` in the table). ``"stove top oven"`` (three words) never merges.
* **Toilet seat.** If a caption mentions both ``toilet`` and ``seat``, every ``seat`` (a synonym of
  chair) is dropped. The reference computes ``hallucination_idxs`` after that drop with the old
  positions, so they can be shifted; that is kept.
* **Ground truth** per COCO image: the categories of all its instance annotations plus the objects
  mined from all its reference captions, train2014 and val2014 merged, as a set.
* **Metrics.** CHAIRs = hallucinated captions / captions; CHAIRi = hallucinated mentions /
  mentions (repeats count); Recall = mentioned ground-truth objects / ground-truth objects, summed
  over captions; Len = 0.01 * tokens (after merging) / captions. All are fractions; the reference
  prints them x100.

Differences, all for inputs the reference mishandles: an image id without ground truth raises
:class:`~vlmkit.errors.InputError` (the reference silently treats every mention as hallucinated), a
zero denominator gives 0.0 plus a message in ``"warnings"``, and ``mscoco_gt_words`` is sorted.
``trim_incomplete=True`` applies the rule left commented out in the reference's ``compute_chair``
(keep the caption up to its last ``"."``), which OPERA uses for its 64-token setting.

NLTK data needed: punkt_tab, averaged_perceptron_tagger_eng and wordnet. vlmkit ships the files
they read (``vlmkit/eval/assets/nltk_data``, unmodified, with their licences) and searches them after
your own NLTK data (see :func:`require_nltk_data`).

Example:
    >>> from vlmkit.eval.benchmarks.chair import Chair
    >>> chair = Chair({1: ["dog", "person"]})
    >>> chair.score([{"image_id": 1, "caption": "A man walks a puppy next to a car."}])["overall"]["CHAIRs"]
    1.0
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from vlmkit.errors import ConfigError, DatasetError, InputError, did_you_mean, missing_extra
from vlmkit.eval._common import divide, read_json
from vlmkit.eval.benchmarks.base import (
    Benchmark,
    DataOptions,
    Loaded,
    Prompt,
    Sample,
    SampleSet,
    check_files,
    first_dir,
    template_of,
)
from vlmkit.eval.media import ImageFile

COCO_ANNOTATION_FILES = (
    "instances_train2014.json",
    "instances_val2014.json",
    "captions_train2014.json",
    "captions_val2014.json",
)
"""The four COCO 2014 annotation files :meth:`Chair.from_coco` reads (``annotations_trainval2014.zip``)."""

GROUND_TRUTH_FORMAT = "vlmkit-chair-ground-truth"

PROMPTS = {"opera": Prompt("Please describe this image in detail.", source="shikiw/OPERA chair_eval.py")}
"""The captioning prompt (OPERA's, the papers' CHAIR setting)."""

_COCO_DOUBLE_WORDS = (
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "bow tie",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
)
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_VEHICLE_WORDS = ("jet", "train")

_NLTK_RESOURCES = (
    ("punkt_tab", "tokenizers/punkt_tab/english/"),
    ("averaged_perceptron_tagger_eng", "taggers/averaged_perceptron_tagger_eng/"),
    ("wordnet", None),
)
_nltk_checked = False
PACKAGED_NLTK_DATA = Path(__file__).parents[1] / "assets" / "nltk_data"
"""The NLTK data subset shipped with vlmkit; searched after every folder of ``nltk.data.path``."""


class CaptionWords(NamedTuple):
    """What :meth:`Chair.caption_to_words` finds in one caption (the reference's four return values)."""

    words: list[str]
    """Object words as they appear after lemmatizing and merging (``"puppy"``)."""
    node_words: list[str]
    """The category of each object word (``"dog"``)."""
    idxs: list[int]
    """Token position of each object word (shifted where a toilet-seat drop happened, as in the reference)."""
    double_words: list[str]
    """All tokens after merging double words; their count is the caption's length for ``Len``."""


def require_nltk_data() -> None:
    """Check that NLTK and the data CHAIR needs are available.

    The subset shipped with vlmkit is appended to ``nltk.data.path``, so that a user's own data
    (``NLTK_DATA``, ``~/nltk_data``, ...) is found first and nothing is ever downloaded.

    Raises:
        ImportError: NLTK is not installed (``pip install 'vlmkit[eval]'``).
        DatasetError: Data is missing; the message lists the exact ``nltk.download(...)`` calls.
    """
    global _nltk_checked
    if _nltk_checked:
        return
    try:
        import nltk
        from nltk.corpus import wordnet
    except ImportError:
        raise missing_extra("nltk", "eval") from None
    if str(PACKAGED_NLTK_DATA) not in nltk.data.path:
        nltk.data.path.append(str(PACKAGED_NLTK_DATA))
    missing = []
    for name, resource in _NLTK_RESOURCES:
        try:
            if resource is None:
                wordnet.ensure_loaded()
            else:
                nltk.data.find(resource)
        except LookupError:
            missing.append(name)
    if missing:
        calls = "; ".join(f"nltk.download({name!r})" for name in missing)
        raise DatasetError(
            f"CHAIR needs NLTK data that was not found: {', '.join(missing)} (searched {list(nltk.data.path)}). "
            f'Fix: python -c "import nltk; {calls}", or point the NLTK_DATA environment variable at a '
            "folder that holds them."
        )
    _nltk_checked = True


class Chair:
    """A CHAIR scorer: a synonym table plus the ground-truth objects of each image.

    Args:
        gt_objects: ``{image_id: [object, ...]}``. Each object is a class name or one of its
            synonyms; synonyms are mapped to their class. Integer-like string ids become ints.
        synonyms: The synonym table as text, one line per class: the class first, then its
            synonyms, separated by ``", "`` (OPERA's ``synonyms_txt`` format; lines starting with
            ``#`` are comments), or a :class:`~pathlib.Path` to such a file. Default: the COCO table.

    Raises:
        ConfigError: An object is not in the synonym table.

    Example:
        >>> chair = Chair({7: ["cat", "sofa"]})
        >>> chair.caption_to_words("A kitten sleeps on the couch.").node_words
        ['cat', 'couch']
    """

    def __init__(self, gt_objects: Mapping[Any, Iterable[str]], synonyms: str | os.PathLike | None = None):
        self._synonym_lines = _read_synonyms(synonyms)
        self._objects = frozenset(word for line in self._synonym_lines for word in line)
        self._inverse: dict[str, str] = {}
        for line in self._synonym_lines:
            for word in line:
                self._inverse[word] = line[0]
        self._double_words = {word: word for word in _COCO_DOUBLE_WORDS}
        for animal in _ANIMAL_WORDS:
            self._double_words[f"baby {animal}"] = animal
            self._double_words[f"adult {animal}"] = animal
        for vehicle in _VEHICLE_WORDS:
            self._double_words[f"passenger {vehicle}"] = vehicle
        self._double_words.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
        self._gt: dict[Any, frozenset[str]] = {}
        for image_id, objects in gt_objects.items():
            nodes = set()
            for word in objects:
                if word not in self._inverse:
                    classes = [line[0] for line in self._synonym_lines]
                    raise ConfigError(
                        f"CHAIR ground-truth object {word!r} (image {image_id!r}) is not in the synonym "
                        f"table.{did_you_mean(word, self._inverse)} Use a class name ({', '.join(classes[:5])}, ...) "
                        "or add the word to the synonyms."
                    )
                nodes.add(self._inverse[word])
            self._gt[_image_key(image_id)] = frozenset(nodes)

    @classmethod
    def from_coco(
        cls,
        annotation_dir: str | os.PathLike,
        image_ids: Iterable[int] | None = None,
        synonyms: str | os.PathLike | None = None,
    ) -> Chair:
        """Build the ground truth from COCO 2014 annotations, as the reference does.

        Args:
            annotation_dir: Folder holding the four :data:`COCO_ANNOTATION_FILES`.
            image_ids: Only build ground truth for these images (much faster: mining all 616k
                reference captions takes long). Each image's objects are the same either way.
            synonyms: See :class:`Chair`.

        Returns:
            The scorer.

        Raises:
            DatasetError: A file is missing or unreadable, or an image id has no annotations.
        """
        folder = Path(annotation_dir)
        missing = [name for name in COCO_ANNOTATION_FILES if not (folder / name).is_file()]
        if missing:
            raise DatasetError(
                f"CHAIR ground truth needs {', '.join(COCO_ANNOTATION_FILES)} in {folder}; missing: "
                f"{', '.join(missing)}. Fix: unzip annotations_trainval2014.zip from cocodataset.org there, "
                "or score with Chair.from_ground_truth(<precomputed file>)."
            )
        wanted = None if image_ids is None else {int(i) for i in image_ids}
        chair = cls({}, synonyms)
        objects: dict[int, list[str]] = {}
        for split in ("val", "train"):
            instances = read_json(folder / f"instances_{split}2014.json", "CHAIR")
            names = {category["id"]: category["name"] for category in instances["categories"]}
            for annotation in instances["annotations"]:
                image_id = annotation["image_id"]
                if wanted is None or image_id in wanted:
                    objects.setdefault(image_id, []).append(chair._inverse[names[annotation["category_id"]]])
        for split in ("val", "train"):
            for annotation in read_json(folder / f"captions_{split}2014.json", "CHAIR")["annotations"]:
                image_id = annotation["image_id"]
                if wanted is None or image_id in wanted:
                    objects.setdefault(image_id, []).extend(chair.caption_to_words(annotation["caption"]).node_words)
        if wanted is not None and wanted - objects.keys():
            absent = sorted(wanted - objects.keys())
            raise DatasetError(
                f"CHAIR: {len(absent)} requested image id(s) have no COCO 2014 annotations in {folder}, "
                f"e.g. {absent[:5]}; CHAIR scores COCO train2014/val2014 images only."
            )
        chair._gt = {image_id: frozenset(words) for image_id, words in objects.items()}
        return chair

    @classmethod
    def from_ground_truth(cls, path: str | os.PathLike, synonyms: str | os.PathLike | None = None) -> Chair:
        """Load ground truth written by :meth:`save_ground_truth` (or a plain ``{image_id: [objects]}`` JSON).

        Args:
            path: The JSON file.
            synonyms: See :class:`Chair`; must be the table the file was built with.

        Returns:
            The scorer.

        Raises:
            DatasetError: The file is missing or not in either format.
        """
        data = read_json(Path(path), "CHAIR", fix="rebuild it with Chair.from_coco(...).save_ground_truth(path)")
        objects = data.get("objects") if data.get("format") == GROUND_TRUTH_FORMAT else data
        if not isinstance(objects, dict) or not all(isinstance(v, list) for v in objects.values()):
            raise DatasetError(
                f"CHAIR ground-truth file {path} is not {{image_id: [object, ...]}} nor a file written by "
                "Chair.save_ground_truth; rebuild it with Chair.from_coco(...).save_ground_truth(path)."
            )
        return cls(objects, synonyms)

    def save_ground_truth(self, path: str | os.PathLike) -> None:
        """Write the ground truth as JSON so images can be scored without the COCO annotations.

        Args:
            path: Output file; it holds ``{"format", "version", "objects": {image_id: [objects]}}``.
        """
        objects = {str(image_id): sorted(self._gt[image_id]) for image_id in self.image_ids}
        payload = {"format": GROUND_TRUTH_FORMAT, "version": 1, "objects": objects}
        Path(path).write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")

    @property
    def image_ids(self) -> list:
        """The ids of all images with ground truth."""
        return sorted(self._gt, key=lambda key: (isinstance(key, str), key))

    def ground_truth(self, image_id: Any) -> frozenset[str]:
        """The ground-truth classes of one image.

        Raises:
            InputError: No ground truth for this image.
        """
        key = _image_key(image_id)
        if key not in self._gt:
            raise InputError(
                f"CHAIR has no ground truth for image {image_id!r} ({len(self._gt)} images known). Build the "
                "scorer from annotations or a ground-truth file that covers the images you captioned."
            )
        return self._gt[key]

    def caption_to_words(self, caption: str) -> CaptionWords:
        """Find the object mentions of one caption.

        Args:
            caption: Free text.

        Returns:
            The mentions, their classes, positions and the merged token list.

        Raises:
            DatasetError: NLTK data is missing (see :func:`require_nltk_data`).
        """
        require_nltk_data()
        import nltk
        from nltk.corpus import wordnet
        from nltk.stem import WordNetLemmatizer

        tags = {"J": wordnet.ADJ, "V": wordnet.VERB, "N": wordnet.NOUN, "R": wordnet.ADV}
        lemmatizer = WordNetLemmatizer()
        tokens = nltk.word_tokenize(caption.lower())
        lemmas = [lemmatizer.lemmatize(word, pos=tags.get(tag[:1], wordnet.NOUN)) for word, tag in nltk.pos_tag(tokens)]
        merged, starts = [], []
        i = 0
        while i < len(lemmas):
            starts.append(i)
            pair = " ".join(lemmas[i : i + 2])
            if pair in self._double_words:
                merged.append(self._double_words[pair])
                i += 2
            else:
                merged.append(lemmas[i])
                i += 1
        words = merged
        if "toilet" in words and "seat" in words:
            words = [word for word in words if word != "seat"]
        # Positions are taken from ``starts`` by the index in the possibly shortened list, as the reference does.
        idxs = [starts[k] for k, word in enumerate(words) if word in self._objects]
        words = [word for word in words if word in self._objects]
        return CaptionWords(words, [self._inverse[word] for word in words], idxs, merged)

    def score(self, records: Sequence[Mapping[str, Any]], trim_incomplete: bool = False) -> dict[str, Any]:
        """Compute CHAIR over generated captions.

        Args:
            records: ``[{"image_id", "caption"}, ...]``; other keys are ignored.
            trim_incomplete: Cut each caption after its last ``"."`` first (a caption without one
                becomes empty), for runs cut short by ``max_new_tokens`` (OPERA's 64-token setting).

        Returns:
            ``{"overall": {"CHAIRs", "CHAIRi", "Recall", "Len"}, "counts": {...}, "sentences": [...],
            "warnings": [...]}``. Each sentence dict has ``image_id``, ``caption`` (as scored),
            ``mscoco_hallucinated_words`` (``[word, class]`` pairs), ``mscoco_gt_words``,
            ``mscoco_generated_words``, ``hallucination_idxs``, ``words`` and ``metrics``
            (``CHAIRs``, ``CHAIRi``, ``Recall``, and ``Len`` which is always 0 as in the reference).

        Raises:
            InputError: A record lacks a key or names an image without ground truth.
        """
        totals = dict.fromkeys(
            (
                "captions",
                "hallucinated_captions",
                "mentions",
                "hallucinated_mentions",
                "gt_objects",
                "recalled_gt_objects",
                "tokens",
            ),
            0,
        )
        sentences = []
        for index, record in enumerate(records):
            if "image_id" not in record or "caption" not in record:
                raise InputError(
                    f"CHAIR record {index} has keys {sorted(record)}; each record needs 'image_id' and 'caption'."
                )
            caption = record["caption"]
            if trim_incomplete:
                caption = caption[: caption.rfind(".") + 1]
            gt = self.ground_truth(record["image_id"])
            found = self.caption_to_words(caption)
            hallucinated = [[w, node] for w, node in zip(found.words, found.node_words) if node not in gt]
            recalled = {node for node in found.node_words if node in gt}
            totals["captions"] += 1
            totals["hallucinated_captions"] += bool(hallucinated)
            totals["mentions"] += len(found.node_words)
            totals["hallucinated_mentions"] += len(hallucinated)
            totals["gt_objects"] += len(gt)
            totals["recalled_gt_objects"] += len(recalled)
            totals["tokens"] += len(found.double_words)
            sentences.append(
                {
                    "image_id": record["image_id"],
                    "caption": caption,
                    "mscoco_hallucinated_words": hallucinated,
                    "mscoco_gt_words": sorted(gt),
                    "mscoco_generated_words": list(found.node_words),
                    "hallucination_idxs": [idx for idx, node in zip(found.idxs, found.node_words) if node not in gt],
                    "words": found.double_words,
                    "metrics": {
                        "CHAIRs": int(bool(hallucinated)),
                        "CHAIRi": len(hallucinated) / len(found.words) if found.words else 0.0,
                        "Recall": len(recalled) / len(gt) if gt else 0.0,
                        "Len": 0.0,
                    },
                }
            )
        warnings: list[str] = []
        overall = {
            "CHAIRs": divide(totals["hallucinated_captions"], totals["captions"], "CHAIRs", warnings),
            "CHAIRi": divide(totals["hallucinated_mentions"], totals["mentions"], "CHAIRi", warnings),
            "Recall": divide(totals["recalled_gt_objects"], totals["gt_objects"], "Recall", warnings),
            "Len": divide(0.01 * totals["tokens"], totals["captions"], "Len", warnings),
        }
        return {"overall": overall, "counts": totals, "sentences": sentences, "warnings": warnings}


def _read_synonyms(synonyms: str | os.PathLike | None) -> list[list[str]]:
    if synonyms is None:
        text = resources.files("vlmkit.eval").joinpath("assets/chair_coco_synonyms.txt").read_text(encoding="utf-8")
    elif isinstance(synonyms, os.PathLike):
        try:
            text = Path(synonyms).read_text(encoding="utf-8")
        except OSError as error:
            raise DatasetError(
                f"CHAIR synonyms file {synonyms} cannot be read ({error}); pass an existing file or the table as text."
            ) from None
    elif isinstance(synonyms, str):
        text = synonyms
    else:
        raise TypeError(f"CHAIR synonyms must be text, a pathlib.Path or None, got {type(synonyms).__name__}.")
    lines = [line.strip().split(", ") for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise ConfigError("CHAIR synonyms table is empty; give one line per class: 'class, synonym, synonym'.")
    return lines


def _image_key(image_id: Any) -> Any:
    if isinstance(image_id, str) and image_id.strip().isdigit():
        return int(image_id)
    return image_id


def load_chair(
    image_dir: str | os.PathLike,
    ground_truth: str | os.PathLike,
    num_images: int | None = 500,
    seed: int = 42,
    image_ids: Iterable[int] | None = None,
    prompt: Prompt | str = PROMPTS["opera"],
) -> SampleSet:
    """Load a seeded subset of COCO images for CHAIR captioning.

    Args:
        image_dir: Folder of COCO images (``COCO_val2014_000000123456.jpg`` or ``000000123456.jpg``).
        ground_truth: The COCO annotation folder (the four files :meth:`Chair.from_coco` reads) or a
            ground-truth file from :meth:`Chair.save_ground_truth`; with a file, only images it
            covers are eligible.
        num_images: How many images to draw (papers use 500); None for all.
        seed: Seed of the draw: ``random.Random(seed).sample`` over the eligible ids sorted.
        image_ids: Use exactly these images instead of drawing (e.g. a released 500-image list).
        prompt: Prompt or template; default OPERA's "Please describe this image in detail."

    Returns:
        The samples; ``info["image_ids"]`` is the chosen id list, in sample order, for the runner to save.

    Raises:
        DatasetError: Missing folder, annotation files, images, or too few images.
    """
    images = Path(image_dir)
    if not images.is_dir():
        raise DatasetError(f"CHAIR image folder {images} does not exist; pass the COCO val2014 image folder.")
    truth = Path(ground_truth)
    if truth.is_dir():
        check_files(
            COCO_ANNOTATION_FILES,
            lambda name: (truth / name).is_file(),
            "COCO annotation files",
            truth,
            "unzip annotations_trainval2014.zip there, or pass a ground-truth file from Chair.save_ground_truth",
        )
        covered = None
    else:
        covered = set(Chair.from_ground_truth(truth).image_ids)
    available: dict[int, Path] = {}
    for file in sorted(images.iterdir()):
        match = re.search(r"(\d+)\.(?:jpg|jpeg|png)$", file.name, re.IGNORECASE)
        if match and (covered is None or int(match.group(1)) in covered):
            available.setdefault(int(match.group(1)), file)
    if image_ids is not None:
        chosen = [int(i) for i in image_ids]
        check_files(
            chosen,
            lambda i: i in available,
            "CHAIR images" + ("" if covered is None else " with ground truth"),
            images,
            "use ids of images present in image_dir (and in the ground-truth file)",
        )
    elif num_images is None:
        chosen = sorted(available)
    else:
        if num_images > len(available):
            raise DatasetError(
                f"CHAIR: num_images={num_images} but {images} has only {len(available)} eligible images; "
                f"pass num_images<={len(available)} or num_images=None for all."
            )
        chosen = random.Random(seed).sample(sorted(available), num_images)
    template = template_of(prompt)
    samples = [
        Sample(
            sample_id=str(i),
            prompt=template.format(),
            target=None,
            media=(ImageFile(available[i]),),
            metadata={"image_id": i},
        )
        for i in chosen
    ]
    info = {
        "image_ids": chosen,
        "image_dir": str(images),
        "ground_truth": str(truth),
        "seed": seed,
        "num_images": num_images,
    }
    return SampleSet("chair", samples, info=info)


def _load(root: Path, media: Path | None, splits: list[str] | None, options: DataOptions) -> Loaded:
    images = media or first_dir(root, ("val2014", "images")) or root
    truth = Path(options.annotations).expanduser().resolve() if options.annotations else root / "annotations"
    synonyms = options.synonyms or (root / "synonyms.txt" if (root / "synonyms.txt").is_file() else None)
    samples = load_chair(images, truth, num_images=options.num_images, seed=options.data_seed)
    paths = {
        "media": str(images),
        "annotations": str(truth),
        "synonyms": str(Path(synonyms).resolve()) if synonyms else None,
    }
    return Loaded(samples, paths, {"num_images": options.num_images, "data_seed": options.data_seed})


def _synonyms(data: Mapping[str, Any]) -> Path | None:
    return Path(data["synonyms"]) if data.get("synonyms") else None


def _check(data: Mapping[str, Any]) -> None:
    require_nltk_data()
    _read_synonyms(_synonyms(data))


def _score_rows(rows, data, style, warnings):
    truth = Path(data["annotations"])
    image_ids = [row["metadata"]["image_id"] for row in rows]
    if truth.is_dir():
        chair = Chair.from_coco(truth, image_ids=image_ids, synonyms=_synonyms(data))
    else:
        chair = Chair.from_ground_truth(truth, synonyms=_synonyms(data))
    details = chair.score([{"image_id": row["metadata"]["image_id"], "caption": row["response"]} for row in rows])
    details.pop("sentences", None)  # per-caption details are in samples.jsonl already
    return dict(details["overall"]), details


BENCHMARK = Benchmark(
    name="chair",
    summary="CHAIR object hallucination in image captions (COCO); CHAIR_s, CHAIR_i, recall",
    load=_load,
    score=_score_rows,
    prompts=PROMPTS,
    max_new_tokens=512,
    primary="CHAIRs",
    higher_is_better=False,
    metric_title="CHAIR {}",
    check=_check,
)
