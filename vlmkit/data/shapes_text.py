"""Words about the shapes world: captions, question templates and their exact answers.

Every function here is a pure function of a scene (or clip) and a `numpy.random.Generator`, so
training data and benchmarks built from the same seeds are identical run to run. The templates
follow the official benchmarks: POPE's "Is there a {} in the image?", MME's yes/no questions
with " Please answer yes or no.", and OPERA's CHAIR prompt "Please describe this image in
detail.".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmkit.data.shapes import CATEGORIES, COLOURS, SYNONYMS, Scene, ShapeObject

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

_PLURALS = {"leaf": "leaves", "cross": "crosses"}


def plural(word: str) -> str:
    """The plural of a category or synonym word."""
    return _PLURALS.get(word, word + "es" if word.endswith(("s", "x", "sh", "ch")) else word + "s")


def article(word: str) -> str:
    """ "a" or "an" for `word`."""
    return "an" if word[0] in "aeiou" else "a"


POPE_TEMPLATE = "Is there a {} in the image?"
"""POPE's question template (the released files use "an" before a vowel)."""

CHAIR_PROMPT = "Please describe this image in detail."
"""The prompt of the CHAIR protocol (OPERA `chair_eval.py`)."""

MME_SUFFIX = " Please answer yes or no."
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."

YES_NO_SUFFIXES = ("", "", MME_SUFFIX, SHORT_ANSWER_SUFFIX, " Please answer this question with one word.")
OPEN_SUFFIXES = ("", SHORT_ANSWER_SUFFIX)
BRIEF_PROMPTS = ("Describe the image briefly.", "What objects are in the image?",
                 "Describe the image.", "What do you see in the picture?")
DETAIL_PROMPTS = (CHAIR_PROMPT, "Describe this image in detail.")


def pope_question(category: str) -> str:
    """POPE's question about `category`, with the article fixed as in the released files."""
    return f"Is there {article(category)} {category} in the image?"


@dataclass(frozen=True)
class QA:
    """One question with its exact answer.

    Attributes:
        question: the question text, suffix included.
        answer: the answer text the models are trained to give.
        kind: the question family ("existence", "count", "color", "position", "caption").
        label: "yes"/"no" for yes/no questions, else the short answer.
        focus: the word of the question the answer is about (e.g. "star"), or "".
        focus_answer: the one-word gist of the answer ("Yes", "Two", "Red", "left"), or "".
    """

    question: str
    answer: str
    kind: str
    label: str
    focus: str = ""
    focus_answer: str = ""


def _yes_no(question: str, truth: bool, kind: str, rng: np.random.Generator, focus: str) -> QA:
    suffix = YES_NO_SUFFIXES[int(rng.integers(len(YES_NO_SUFFIXES)))]
    word = "Yes" if truth else "No"
    return QA(question + suffix, word + ".", kind, word.lower(), focus, word)


def _open(question: str, answer: str, kind: str, rng: np.random.Generator, focus: str,
          gist: str) -> QA:
    suffix = OPEN_SUFFIXES[int(rng.integers(len(OPEN_SUFFIXES)))]
    return QA(question + suffix, answer[0].upper() + answer[1:] + ".", kind, answer, focus, gist)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

def _region(obj: ShapeObject, size: int) -> str:
    h, v = obj.horizontal(size), obj.vertical(size)
    if h == "center" and v == "middle":
        return "in the center"
    if h == "center":
        return f"at the {v}"
    if v == "middle":
        return f"on the {h}"
    return f"at the {v} {h}"


def object_phrases(scene: Scene, detail: bool, rng: np.random.Generator | None = None) -> list[str]:
    """Noun phrases naming every object, largest first; same-category objects are grouped.

    Args:
        scene: the scene.
        detail: add each single object's size and position.
        rng: when given, a singular object is sometimes named by a synonym.

    Returns:
        Phrases such as "a large red star at the top left" or "two green hearts".
    """
    groups: dict[str, list[ShapeObject]] = {}
    for obj in sorted(scene.objects, key=lambda o: (-o.size * o.alpha, scene.objects.index(o))):
        groups.setdefault(obj.category, []).append(obj)
    phrases = []
    for category, objs in groups.items():
        if len(objs) > 1:
            colours = {o.colour for o in objs}
            colour = f"{objs[0].colour} " if len(colours) == 1 else ""
            phrases.append(f"{NUMBER_WORDS[len(objs)]} {colour}{plural(category)}")
            continue
        obj = objs[0]
        name = category
        if rng is not None and len(SYNONYMS[category]) > 1 and rng.random() < 0.1:
            name = SYNONYMS[category][1 + int(rng.integers(len(SYNONYMS[category]) - 1))]
        size = f"{obj.size_word} " if obj.size_word != "medium" else ""
        words = f"{size}{obj.colour} {name}"
        phrase = f"{article(words)} {words}"
        if detail:
            phrase += f" {_region(obj, scene.image_size)}"
        phrases.append(phrase)
    return phrases


def join_phrases(phrases: list[str]) -> str:
    """ "a, b and c"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, detail: bool = True, rng: np.random.Generator | None = None) -> str:
    """The reference caption: every object, named by category (or synonym), largest first.

    Args:
        scene: the scene.
        detail: include sizes and positions (the answer to `CHAIR_PROMPT`).
        rng: enables occasional synonyms.

    Returns:
        E.g. "The image shows a large red star at the top left and two green hearts."
    """
    body = join_phrases(object_phrases(scene, detail, rng))
    return f"The image shows {body}." if scene.objects else "The image shows nothing."


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------

def existence_qa(scene: Scene, rng: np.random.Generator, positive: bool) -> QA:
    """A yes/no existence question: a present category, or an absent one drawn uniformly."""
    present = scene.categories()
    if positive and present:
        category = present[int(rng.integers(len(present)))]
    else:
        absent = [c for c in CATEGORIES if c not in present]
        category = absent[int(rng.integers(len(absent)))]
    templates = (POPE_TEMPLATE, POPE_TEMPLATE, POPE_TEMPLATE, "Is there a {} in the picture?",
                 "Does the image contain a {}?", "Do you see a {} in the image?")
    template = templates[int(rng.integers(len(templates)))]
    question = template.replace("a {}", f"{article(category)} {category}")
    return _yes_no(question, category in present, "existence", rng, category)


def count_qa(scene: Scene, rng: np.random.Generator) -> QA:
    """How many objects of a present category: open ("Two.") or yes/no with a true or wrong count."""
    category = scene.categories()[int(rng.integers(len(scene.categories())))]
    n = scene.count(category)
    if rng.random() < 0.5:
        return _open(f"How many {plural(category)} are there in the image?", NUMBER_WORDS[n],
                     "count", rng, plural(category), NUMBER_WORDS[n].capitalize())
    truth = rng.random() < 0.5
    asked = n if truth else int(rng.choice([k for k in range(1, 5) if k != n]))
    focus = category if asked == 1 else plural(category)
    return _yes_no(count_question(category, asked), truth, "count", rng, focus)


def count_question(category: str, n: int) -> str:
    """ "Is there only one star in the image?" / "Are there three stars in the image?"."""
    if n == 1:
        return f"Is there only one {category} in the image?"
    return f"Are there {NUMBER_WORDS[n]} {plural(category)} in the image?"


def unique_objects(scene: Scene) -> list[ShapeObject]:
    """Objects that are the only one of their category (so "the star" is unambiguous)."""
    return [o for o in scene.objects if scene.count(o.category) == 1]


def colour_qa(scene: Scene, rng: np.random.Generator) -> QA | None:
    """The colour of an object: open ("What color is the star?") or yes/no (MME style)."""
    objs = scene.objects
    obj = objs[int(rng.integers(len(objs)))]
    if rng.random() < 0.4 and scene.count(obj.category) == 1:
        return _open(f"What color is the {obj.category}?", obj.colour, "color", rng, obj.category,
                     obj.colour.capitalize())
    truth = rng.random() < 0.5
    if truth:
        colour = obj.colour
    else:
        used = {o.colour for o in objs if o.category == obj.category}
        colour = [c for c in COLOURS if c not in used][int(rng.integers(len(COLOURS) - len(used)))]
    return _yes_no(colour_question(colour, obj.category), truth, "color", rng, obj.category)


def colour_question(colour: str, category: str) -> str:
    """ "Is there a red star in the image?"."""
    return f"Is there {article(colour)} {colour} {category} in the image?"


_SIDES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def side_question(category: str, side: str) -> str:
    """ "Is the star on the left side of the image?" / "Is the star at the top of the image?"."""
    if side in ("left", "right"):
        return f"Is the {category} on the {side} side of the image?"
    return f"Is the {category} at the {side} of the image?"


def clear_sides(obj: ShapeObject, size: int) -> list[str]:
    """The sides ("left", "right", "top", "bottom") whose outer third holds the object's centre."""
    sides = [obj.horizontal(size), obj.vertical(size)]
    return [s for s in sides if s in _SIDES]


def position_qa(scene: Scene, rng: np.random.Generator) -> QA | None:
    """Where a unique object is: open ("On the left.") or yes/no; None when no object qualifies."""
    size = scene.image_size
    candidates = [o for o in unique_objects(scene) if clear_sides(o, size)]
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    sides = clear_sides(obj, size)
    side = sides[int(rng.integers(len(sides)))]
    if rng.random() < 0.35:
        answer = f"on the {side}" if side in ("left", "right") else f"at the {side}"
        return _open(f"Where is the {obj.category}?", answer, "position", rng, obj.category, side)
    truth = rng.random() < 0.5
    asked = side if truth else _SIDES[side]
    # The focus is the side word, the question's last key word: only from there on is the answer
    # known (at "star" in "Is the star on the left side ...?" it is not yet).
    return _yes_no(side_question(obj.category, asked), truth, "position", rng, asked)


def caption_qa(scene: Scene, rng: np.random.Generator) -> QA:
    """A captioning turn: detailed (CHAIR prompt, with positions) or brief."""
    detail = rng.random() < 0.5
    prompts = DETAIL_PROMPTS if detail else BRIEF_PROMPTS
    prompt = prompts[int(rng.integers(len(prompts)))]
    text = caption(scene, detail, rng)
    return QA(prompt, text, "caption", text)


QA_KINDS = {
    "existence": lambda s, r: existence_qa(s, r, positive=bool(r.random() < 0.5)),
    "count": count_qa,
    "color": colour_qa,
    "position": position_qa,
    "caption": caption_qa,
}
"""Question families and their generators `(scene, rng) -> QA | None`."""


def all_template_texts() -> list[str]:
    """Every fixed word sequence the templates can produce (the tokenizer's vocabulary source)."""
    texts = [POPE_TEMPLATE, CHAIR_PROMPT, MME_SUFFIX, SHORT_ANSWER_SUFFIX, *YES_NO_SUFFIXES,
             *BRIEF_PROMPTS, *DETAIL_PROMPTS, "Yes. No. The image shows nothing.",
             "Is there a in the picture? Does the image contain a? Do you see a in the image?",
             "How many are there in the image? What color is the? Where is the?",
             "Is there only one in the image? Are there in the image?",
             "on the left side of the image at the top of the image at the bottom",
             "on the right in the center at the middle",
             "a an and , .", " ".join(NUMBER_WORDS), " ".join(COLOURS),
             " ".join(w.capitalize() for w in (*NUMBER_WORDS, *COLOURS)),
             "small medium large On At", "On the left. At the top."]
    for words in SYNONYMS.values():
        texts += [" ".join(words), " ".join(plural(w) for w in words)]
    return texts
