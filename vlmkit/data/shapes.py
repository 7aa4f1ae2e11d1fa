"""A procedurally generated visual world: shapes on cluttered backgrounds, with exact ground truth.

Every scene is a pure function of one integer seed. A scene holds 1-6 objects drawn from
`CATEGORIES` (named icons such as "star", "key", "lock"), each with a colour, a size, a
position and a rotation, on a gradient background with clutter lines, dots, blobs and pixel
noise. The world has a COCO-like co-occurrence structure: the categories in `PAIRS` usually
appear together (like fork and knife), and a partner added for co-occurrence is often small or
faint ("weak"). Models trained on this world learn a prior that wins when the visual evidence is
weak, which is what POPE's adversarial split and CHAIR measure.

Ground truth is exact by construction: an object's box is the bounding box of the pixels its own
coverage mask touches (`object_mask`), and `render` composites exactly those masks, in order,
without overlaps between objects.

Seeds come from two disjoint ranges, `TRAIN_SEEDS` and `EVAL_SEEDS`; `check_seeds` raises when a
training stream or a benchmark would cross into the other range.

Example:
    >>> scene = sample_scene(EVAL_SEEDS.start)
    >>> image = render(scene)  # PIL.Image, RGB, 96 x 96
    >>> image.size
    (96, 96)
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlmkit.errors import ConfigError

# --------------------------------------------------------------------------------------------
# The world's vocabulary
# --------------------------------------------------------------------------------------------

CATEGORIES: tuple[str, ...] = (
    "star", "moon", "key", "lock", "cloud", "bolt", "house", "tree", "flower", "leaf",
    "arrow", "target", "umbrella", "drop", "heart", "cross", "triangle", "square", "diamond",
    "hexagon", "ring", "crown",
)
"""The object categories, each a distinct drawn icon, in decreasing order of frequency."""

PAIRS: tuple[tuple[str, str], ...] = (
    ("moon", "star"), ("key", "lock"), ("cloud", "bolt"), ("house", "tree"),
    ("flower", "leaf"), ("arrow", "target"), ("umbrella", "drop"),
)
"""Category pairs that co-occur most of the time (the world's fork and knife)."""

PARTNER: dict[str, str] = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}

SYNONYMS: dict[str, tuple[str, ...]] = {
    "star": ("star",), "moon": ("moon", "crescent"), "key": ("key",),
    "lock": ("lock", "padlock"), "cloud": ("cloud",), "bolt": ("bolt", "lightning"),
    "house": ("house", "hut", "cottage"), "tree": ("tree", "pine"),
    "flower": ("flower", "blossom"), "leaf": ("leaf",), "arrow": ("arrow",),
    "target": ("target", "bullseye"), "umbrella": ("umbrella", "parasol"),
    "drop": ("drop", "droplet", "raindrop"), "heart": ("heart",), "cross": ("cross",),
    "triangle": ("triangle",), "square": ("square",), "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",), "ring": ("ring", "hoop"), "crown": ("crown",),
}
"""Words a caption may use for each category; the first is the category name."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 225, 30),
    "green": (30, 170, 50), "blue": (30, 70, 225), "purple": (140, 40, 190),
    "white": (250, 250, 250), "black": (15, 15, 15),
}
"""Colour names and their nominal RGB values (objects get a small jitter around them)."""

SIZE_WORDS: tuple[str, ...] = ("small", "medium", "large")

TRAIN_SEEDS = range(0, 1_000_000_000)
"""Scene seeds reserved for training data."""
EVAL_SEEDS = range(1_000_000_000, 2_000_000_000)
"""Scene seeds reserved for held-out evaluation; never overlaps `TRAIN_SEEDS`."""


def check_seeds(split: str, start: int, count: int) -> range:
    """The seed range `[start, start + count)`, after checking that it stays inside `split`.

    Args:
        split: "train" or "eval".
        start: first scene seed.
        count: number of scenes.

    Returns:
        The range of scene seeds.

    Raises:
        ConfigError: when the split is unknown or the range leaves the split's seed range.
    """
    allowed = {"train": TRAIN_SEEDS, "eval": EVAL_SEEDS}
    if split not in allowed:
        raise ConfigError(f"seed split {split!r} is unknown; use one of {sorted(allowed)}.")
    seeds = range(start, start + count)
    bound = allowed[split]
    if count < 0 or start < bound.start or seeds.stop > bound.stop:
        raise ConfigError(
            f"{split} seeds [{start}, {start + count}) leave the {split} range "
            f"[{bound.start}, {bound.stop}); training and evaluation seeds must never overlap. "
            f"Pick a start seed in [{bound.start}, {bound.stop - max(count, 0)}]."
        )
    return seeds


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are sampled. Defaults define the world the shipped models were trained on.

    Attributes:
        image_size: side of the square image in pixels.
        min_objects: fewest objects per scene.
        max_objects: most objects per scene.
        pair_prob: probability that a sampled paired category brings its partner.
        partner_weak_prob: probability that such a partner is weak (small or faint).
        weak_prob: probability that any other object is weak.
        repeat_prob: probability that a scene repeats one category 2-4 times (for counting).
        frequency_decay: category `i` of `CATEGORIES` is sampled with weight `1/(i+4)**decay`.
        noise_max: largest standard deviation of the Gaussian pixel noise (grey levels).
        clutter: scale of the number of clutter lines, dots and blobs (0 disables clutter).
    """

    image_size: int = 96
    min_objects: int = 1
    max_objects: int = 6
    pair_prob: float = 0.8
    partner_weak_prob: float = 0.4
    weak_prob: float = 0.1
    repeat_prob: float = 0.2
    frequency_decay: float = 1.5
    noise_max: float = 10.0
    clutter: float = 1.0

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ConfigError(f"image_size={self.image_size} is too small; use >= 32 pixels.")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ConfigError(
                f"need 1 <= min_objects <= max_objects <= 8, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}."
            )
        for name in ("pair_prob", "partner_weak_prob", "weak_prob", "repeat_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value} is not a probability; use a value in [0, 1].")

    def category_weights(self) -> np.ndarray:
        """Sampling probabilities of `CATEGORIES` (a Zipf-like frequency ranking)."""
        weights = 1.0 / (np.arange(len(CATEGORIES)) + 4.0) ** self.frequency_decay
        return weights / weights.sum()


# --------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------


def third(position: float, image_size: int) -> int:
    """Which third of the image (0, 1, 2 from the left or top) holds pixel coordinate `position`."""
    return min(int(3 * position / image_size), 2)


@dataclass
class ShapeObject:
    """One drawn object and its exact ground truth.

    Attributes:
        category: a name from `CATEGORIES`.
        colour: a name from `COLOURS`.
        rgb: the exact RGB drawn (the named colour plus jitter).
        size: the icon's diameter in pixels.
        cx: horizontal centre in pixels.
        cy: vertical centre in pixels.
        rotation: rotation in degrees, counter-clockwise.
        alpha: opacity in (0, 1]; faint objects have low opacity.
        weak: whether the object is small or faint (weak visual evidence).
        box: `(x0, y0, x1, y1)` pixel box, end-exclusive, of every pixel the object touches.
        size_word: "small", "medium" or "large".
    """

    category: str
    colour: str
    rgb: tuple[int, int, int]
    size: float
    cx: float
    cy: float
    rotation: float
    alpha: float = 1.0
    weak: bool = False
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    size_word: str = "medium"

    def horizontal(self, image_size: int) -> str:
        """ "left", "center" or "right": which third of the image holds the centre."""
        return ("left", "center", "right")[third(self.cx, image_size)]

    def vertical(self, image_size: int) -> str:
        """ "top", "middle" or "bottom": which third of the image holds the centre."""
        return ("top", "middle", "bottom")[third(self.cy, image_size)]

    def to_json(self) -> dict:
        """A JSON-serialisable dict of the ground truth."""
        return {
            "category": self.category, "colour": self.colour, "rgb": list(self.rgb),
            "size": round(self.size, 3), "size_word": self.size_word,
            "cx": round(self.cx, 3), "cy": round(self.cy, 3),
            "rotation": round(self.rotation, 3), "alpha": round(self.alpha, 3),
            "weak": self.weak, "box": list(self.box),
        }


@dataclass
class Scene:
    """A scene: background, clutter, noise and objects, all fixed by `seed`.

    Attributes:
        seed: the scene seed.
        image_size: side of the image in pixels.
        background: `(rgb_a, rgb_b, angle)` of the linear gradient.
        clutter: drawing primitives `(kind, params)` painted before the objects.
        noise_std: standard deviation of the pixel noise.
        objects: the objects in drawing order (the annotation order of the ground truth).
    """

    seed: int
    image_size: int
    background: tuple
    clutter: list
    noise_std: float
    objects: list[ShapeObject]

    def categories(self) -> list[str]:
        """Distinct categories in annotation order (POPE's ground-truth object list)."""
        return list(dict.fromkeys(o.category for o in self.objects))

    def count(self, category: str) -> int:
        """How many objects of `category` the scene holds."""
        return sum(o.category == category for o in self.objects)

    def to_json(self) -> dict:
        """A JSON-serialisable dict of the ground truth."""
        return {
            "seed": self.seed, "image_size": self.image_size,
            "objects": [o.to_json() for o in self.objects],
        }


# --------------------------------------------------------------------------------------------
# Icons: each category is a list of filled (255) or erased (0) primitives in unit coordinates
# ([-1, 1] square, y down), rotated and scaled at draw time.
# --------------------------------------------------------------------------------------------


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star_points(points: int, inner: float, phase: float = -math.pi / 2) -> list:
    out = []
    for i in range(2 * points):
        radius = 1.0 if i % 2 == 0 else inner
        angle = phase + i * math.pi / points
        out.append((radius * math.cos(angle), radius * math.sin(angle)))
    return out


def _heart_points() -> list:
    out = []
    for t in np.linspace(0, 2 * math.pi, 40, endpoint=False):
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((x / 17.0, -y / 17.0 - 0.1))
    return out


def _leaf_points() -> list:
    top = [(x, -0.5 * math.sin(math.pi * (x + 1) / 2)) for x in np.linspace(-1, 1, 16)]
    bottom = [(x, 0.5 * math.sin(math.pi * (x + 1) / 2)) for x in np.linspace(1, -1, 16)]
    return top + bottom


# ("poly", points, fill) | ("circle", (x, y, r), fill)
_ICONS: dict[str, list] = {
    "star": [("poly", _star_points(5, 0.45), 255)],
    "moon": [("circle", (0.0, 0.0, 1.0), 255), ("circle", (0.45, -0.2, 0.82), 0)],
    "key": [
        ("circle", (-0.55, 0.0, 0.42), 255), ("circle", (-0.55, 0.0, 0.2), 0),
        ("poly", _rect(-0.2, -0.1, 0.95, 0.1), 255), ("poly", _rect(0.55, 0.1, 0.7, 0.4), 255),
        ("poly", _rect(0.8, 0.1, 0.95, 0.32), 255),
    ],
    "lock": [
        ("circle", (0.0, -0.3, 0.55), 255), ("circle", (0.0, -0.3, 0.33), 0),
        ("poly", _rect(-0.72, -0.05, 0.72, 0.95), 255), ("circle", (0.0, 0.35, 0.14), 0),
        ("poly", _rect(-0.05, 0.35, 0.05, 0.7), 0),
    ],
    "cloud": [
        ("circle", (-0.5, 0.15, 0.42), 255), ("circle", (0.0, -0.15, 0.55), 255),
        ("circle", (0.5, 0.15, 0.42), 255), ("poly", _rect(-0.5, 0.15, 0.5, 0.57), 255),
    ],
    "bolt": [("poly", [(0.25, -1.0), (-0.55, 0.12), (-0.05, 0.12), (-0.3, 1.0), (0.55, -0.18),
                       (0.05, -0.18)], 255)],
    "house": [
        ("poly", _rect(-0.7, -0.05, 0.7, 0.95), 255),
        ("poly", [(-1.0, 0.0), (0.0, -0.95), (1.0, 0.0)], 255),
        ("poly", _rect(-0.17, 0.45, 0.17, 0.95), 0),
    ],
    "tree": [
        ("poly", [(0.0, -1.0), (-0.55, -0.2), (0.55, -0.2)], 255),
        ("poly", [(0.0, -0.6), (-0.8, 0.45), (0.8, 0.45)], 255),
        ("poly", _rect(-0.15, 0.4, 0.15, 1.0), 255),
    ],
    "flower": [("circle", (0.55 * math.cos(a), 0.55 * math.sin(a), 0.4), 255)
               for a in np.linspace(0, 2 * math.pi, 5, endpoint=False)]
    + [("circle", (0.0, 0.0, 0.22), 0)],
    "leaf": [("poly", _leaf_points(), 255), ("poly", _rect(-0.85, -0.05, 0.75, 0.05), 0),
             ("poly", _rect(-1.0, -0.05, -0.8, 0.05), 255)],
    "arrow": [("poly", _rect(-1.0, -0.13, 0.2, 0.13), 255),
              ("poly", [(0.15, -0.55), (1.0, 0.0), (0.15, 0.55)], 255)],
    "target": [("circle", (0.0, 0.0, 1.0), 255), ("circle", (0.0, 0.0, 0.74), 0),
               ("circle", (0.0, 0.0, 0.5), 255), ("circle", (0.0, 0.0, 0.26), 0),
               ("circle", (0.0, 0.0, 0.13), 255)],
    "umbrella": [
        ("pie", (0.0, 0.05, 1.0), 255), ("poly", _rect(-0.07, 0.0, 0.07, 0.85), 255),
        ("poly", _rect(-0.35, 0.75, 0.07, 0.88), 255), ("poly", _rect(-0.35, 0.55, -0.22, 0.88), 255),
    ],
    "drop": [("circle", (0.0, 0.35, 0.62), 255),
             ("poly", [(0.0, -1.0), (-0.57, 0.15), (0.57, 0.15)], 255)],
    "heart": [("poly", _heart_points(), 255)],
    "cross": [("poly", _rect(-0.3, -1.0, 0.3, 1.0), 255), ("poly", _rect(-1.0, -0.3, 1.0, 0.3), 255)],
    "triangle": [("poly", [(0.0, -1.0), (-0.95, 0.75), (0.95, 0.75)], 255)],
    "square": [("poly", _rect(-0.8, -0.8, 0.8, 0.8), 255)],
    "diamond": [("poly", [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)], 255)],
    "hexagon": [("poly", _star_points(3, 1.0, phase=0.0), 255)],
    "ring": [("circle", (0.0, 0.0, 1.0), 255), ("circle", (0.0, 0.0, 0.58), 0)],
    "crown": [("poly", [(-0.9, 0.6), (-0.9, -0.55), (-0.45, 0.0), (0.0, -0.75), (0.45, 0.0),
                        (0.9, -0.55), (0.9, 0.6)], 255)],
}

_SUPERSAMPLE = 4


def object_mask(obj: ShapeObject, image_size: int) -> tuple[int, int, np.ndarray]:
    """The object's coverage mask, in [0, 1], over the image pixels it may touch.

    Drawn at 4x resolution and box-filtered, so edge pixels get fractional coverage.

    Args:
        obj: the object.
        image_size: side of the image in pixels.

    Returns:
        `(x0, y0, mask)`: the mask's top-left pixel in the image and a float32 array
        `mask[y, x]`, already clipped to the image.
    """
    radius = obj.size / 2.0
    x0 = int(math.floor(obj.cx - radius)) - 1
    y0 = int(math.floor(obj.cy - radius)) - 1
    width = int(math.ceil(2 * radius)) + 3
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (width * ss, width * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cos, sin = math.cos(math.radians(obj.rotation)), math.sin(math.radians(obj.rotation))

    def to_canvas(u: float, v: float) -> tuple[float, float]:
        x = obj.cx + radius * (u * cos + v * sin)
        y = obj.cy + radius * (-u * sin + v * cos)
        return ((x - x0) * ss, (y - y0) * ss)

    for kind, params, fill in _ICONS[obj.category]:
        if kind == "poly":
            draw.polygon([to_canvas(u, v) for u, v in params], fill=fill)
        else:
            u, v, r = params
            x, y = to_canvas(u, v)
            rr = r * radius * ss
            if kind == "circle":
                draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fill)
            else:  # "pie": the upper half disc, turned with the object
                start = 180 - obj.rotation
                draw.pieslice([x - rr, y - rr, x + rr, y + rr], start, start + 180, fill=fill)
    mask = np.asarray(canvas, dtype=np.float32).reshape(width, ss, width, ss).mean(axis=(1, 3))
    mask /= 255.0
    # clip to the image
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + width, image_size), min(y0 + width, image_size)
    return cx0, cy0, mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]


def _box_of(obj: ShapeObject, image_size: int) -> tuple[int, int, int, int]:
    x0, y0, mask = object_mask(obj, image_size)
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        return (x0, y0, x0, y0)
    return (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

_SIZE_RANGES = {"small": (0.12, 0.16), "medium": (0.17, 0.23), "large": (0.24, 0.32)}
_WEAK_SMALL = (0.085, 0.10)
_FAINT_ALPHA = (0.28, 0.42)


def _hls_rgb(h: float, lightness: float, s: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hls_to_rgb(h % 1.0, lightness, s)
    return (int(r * 255), int(g * 255), int(b * 255))


def _sample_background(rng: np.random.Generator) -> tuple:
    hue = rng.random()
    a = _hls_rgb(hue, rng.uniform(0.32, 0.62), rng.uniform(0.05, 0.45))
    b = _hls_rgb(hue + rng.uniform(-0.25, 0.25), rng.uniform(0.32, 0.62), rng.uniform(0.05, 0.45))
    return (a, b, float(rng.uniform(0, 2 * math.pi)))


def _background_at(background: tuple, x: float, y: float, size: int) -> np.ndarray:
    a, b, angle = background
    t = 0.5 + ((x / size - 0.5) * math.cos(angle) + (y / size - 0.5) * math.sin(angle)) / 1.42
    return (1 - t) * np.asarray(a, np.float32) + t * np.asarray(b, np.float32)


def _sample_clutter(rng: np.random.Generator, config: WorldConfig) -> list:
    size = config.image_size
    out: list = []
    if config.clutter <= 0:
        return out
    for _ in range(rng.poisson(3.0 * config.clutter)):
        pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        colour = tuple(int(c) for c in rng.integers(40, 220, 3))
        out.append(("line", (pts, colour, float(rng.uniform(0.25, 0.55)))))
    for _ in range(rng.poisson(6.0 * config.clutter)):
        x, y = rng.uniform(0, size, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        out.append(("dot", ((float(x), float(y), float(rng.uniform(0.5, 1.3))), colour,
                            float(rng.uniform(0.3, 0.7)))))
    for _ in range(rng.poisson(1.0 * config.clutter)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.03, 0.08) * size
        angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(5, 9))))
        pts = [(float(x + r * rng.uniform(0.5, 1) * math.cos(a)),
                float(y + r * rng.uniform(0.5, 1) * math.sin(a))) for a in angles]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        out.append(("blob", (pts, colour, float(rng.uniform(0.12, 0.3)))))
    return out


def _pick_colour(rng: np.random.Generator, background: tuple, x: float, y: float, size: int,
                 faint: bool) -> tuple[str, tuple[int, int, int]]:
    names = list(COLOURS)
    local = _background_at(background, x, y, size)
    for _ in range(20):
        name = names[int(rng.integers(len(names)))]
        rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[name])
        # faint objects get opacity instead; every object keeps a distinguishable colour
        if np.abs(np.asarray(rgb, np.float32) - local).sum() >= (120 if not faint else 160):
            return name, rgb
    return name, rgb


def _overlaps(box: tuple, boxes: list, gap: int = 1) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap
               for b in boxes)


def _choose_categories(rng: np.random.Generator, config: WorldConfig, n: int) -> list[tuple]:
    """`n`-ish (category, is_partner) tuples with co-occurrence and repeats."""
    weights = config.category_weights()
    chosen: list[tuple[str, bool]] = []
    while len(chosen) < n:
        category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=weights))]
        if any(c == category for c, _ in chosen):
            continue
        chosen.append((category, False))
        partner = PARTNER.get(category)
        if partner and len(chosen) < n and rng.random() < config.pair_prob:
            if not any(c == partner for c, _ in chosen):
                chosen.append((partner, True))
    if rng.random() < config.repeat_prob:
        category = chosen[int(rng.integers(len(chosen)))][0]
        for _ in range(int(rng.integers(1, 4))):
            chosen.append((category, False))
    return chosen


def sample_scene(seed: int, config: WorldConfig | None = None, difficulty: float = 1.0) -> Scene:
    """The scene of one seed.

    Args:
        seed: scene seed; the same seed and config always give the same scene.
        config: the world's parameters (`WorldConfig()` when omitted).
        difficulty: in [0, 1]; lower values give fewer, larger, never-weak objects and less
            clutter and noise (a curriculum for training). Benchmarks use 1.

    Returns:
        The scene, with exact boxes.

    Raises:
        ConfigError: if `difficulty` is outside [0, 1].
    """
    if not 0.0 <= difficulty <= 1.0:
        raise ConfigError(f"difficulty={difficulty} is outside [0, 1].")
    config = config or WorldConfig()
    rng = np.random.default_rng(seed)
    size = config.image_size
    background = _sample_background(rng)
    clutter = _sample_clutter(rng, config) if rng.random() < 0.3 + 0.7 * difficulty else []
    noise_std = float(rng.uniform(1.0, config.noise_max) * (0.3 + 0.7 * difficulty))
    most = config.min_objects + round((config.max_objects - config.min_objects) * max(difficulty, 0.3))
    n = int(rng.integers(config.min_objects, most + 1))
    objects: list[ShapeObject] = []
    boxes: list[tuple] = []
    for category, is_partner in _choose_categories(rng, config, n):
        if len(objects) >= config.max_objects:
            break
        weak_p = (config.partner_weak_prob if is_partner else config.weak_prob) * difficulty
        weak = bool(rng.random() < weak_p)
        faint = weak and bool(rng.random() < 0.5)
        if weak and not faint:
            frac, size_word = rng.uniform(*_WEAK_SMALL), "small"
        else:
            size_word = SIZE_WORDS[int(rng.choice(3, p=[0.3, 0.4, 0.3]))]
            frac = rng.uniform(*_SIZE_RANGES[size_word])
        diameter = float(frac * size)
        rotation = float(rng.uniform(0, 360) if category == "arrow" else rng.uniform(-15, 15))
        alpha = float(rng.uniform(*_FAINT_ALPHA)) if faint else 1.0
        for _ in range(30):
            margin = diameter / 2 + 1
            cx, cy = (float(v) for v in rng.uniform(margin, size - margin, 2))
            obj = ShapeObject(category, "", (0, 0, 0), diameter, cx, cy, rotation, alpha, weak)
            box = _box_of(obj, size)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        obj.colour, obj.rgb = _pick_colour(rng, background, cx, cy, size, faint)
        obj.box = box
        obj.size_word = size_word
        objects.append(obj)
        boxes.append(box)
    return Scene(seed, size, background, clutter, noise_std, objects)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def render_background(scene: Scene) -> np.ndarray:
    """The scene without objects and without noise: gradient plus clutter, float32 `[H, W, 3]`."""
    size = scene.image_size
    a, b, angle = scene.background
    ys, xs = (np.mgrid[0:2 * size, 0:2 * size].astype(np.float32) + 0.5) / 2
    t = 0.5 + ((xs / size - 0.5) * math.cos(angle) + (ys / size - 0.5) * math.sin(angle)) / 1.42
    image = (1 - t)[..., None] * np.asarray(a, np.float32) + t[..., None] * np.asarray(b, np.float32)
    canvas = Image.fromarray(np.rint(image).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas, "RGBA")  # fills blend with their alpha
    for kind, (shape, colour, alpha) in scene.clutter:
        fill = (*colour, int(round(255 * alpha)))
        if kind == "line":
            draw.line([(2 * x, 2 * y) for x, y in shape], fill=fill, width=2)
        elif kind == "dot":
            x, y, r = shape
            draw.ellipse([2 * (x - r), 2 * (y - r), 2 * (x + r), 2 * (y + r)], fill=fill)
        else:
            draw.polygon([(2 * x, 2 * y) for x, y in shape], fill=fill)
    return np.asarray(canvas.reduce(2), np.float32)


def composite(image: np.ndarray, objects: list[ShapeObject], image_size: int) -> np.ndarray:
    """Paint `objects` over a float `[H, W, 3]` image in place and return it."""
    for obj in objects:
        x0, y0, mask = object_mask(obj, image_size)
        h, w = mask.shape
        weight = (obj.alpha * mask)[..., None]
        region = image[y0:y0 + h, x0:x0 + w]
        region *= 1 - weight
        region += weight * np.asarray(obj.rgb, np.float32)
    return image


def add_noise(image: np.ndarray, std: float, seed: int) -> np.ndarray:
    """Add seeded Gaussian noise and quantise to uint8."""
    noise = np.random.default_rng(seed).normal(0.0, std, image.shape).astype(np.float32)
    return np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)


def render_array(scene: Scene) -> np.ndarray:
    """The scene as a uint8 `[H, W, 3]` array."""
    image = composite(render_background(scene), scene.objects, scene.image_size)
    return add_noise(image, scene.noise_std, scene.seed)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image."""
    return Image.fromarray(render_array(scene), "RGB")


_SIDE_OF_THIRD = np.array([0, 2, 1])
"""Third of the image (0, 1, 2 from left or top) -> side class (0 left / top, 1 right / bottom, 2 middle)."""


def patch_labels(scene: Scene, patch_size: int) -> dict[str, np.ndarray]:
    """Dense per-patch targets for pretraining a vision tower.

    Args:
        scene: the scene.
        patch_size: the ViT patch size in pixels (must divide the image size).

    Returns:
        `category`: int64 `[G, G]`, index into `CATEGORIES` of the object covering most of the
        patch, or -1 for background (an object counts when it covers >= 1/16 of the patch);
        `colour`: int64 `[G, G]`, index into `COLOURS` of that object, -1 for background;
        `centre`: float32 `[G, G]`, 1 where an object's centre falls;
        `present`: float32 `[len(CATEGORIES)]`, 1 for every category in the scene;
        `horizontal`, `vertical`: int64 `[G, G]`, the third of the image (0 left / top, 1 right /
        bottom, 2 middle) that holds the centre of the patch's object, or of the patch itself on
        background, so that all of an object's tokens agree on the side a question asks about.
    """
    size = scene.image_size
    if size % patch_size:
        raise ConfigError(f"patch_size={patch_size} does not divide image_size={size}.")
    grid = size // patch_size
    best = np.full((grid, grid), 1.0 / 16, np.float32)
    category = np.full((grid, grid), -1, np.int64)
    colour = np.full((grid, grid), -1, np.int64)
    centre = np.zeros((grid, grid), np.float32)
    present = np.zeros(len(CATEGORIES), np.float32)
    own_third = _SIDE_OF_THIRD[[third((i + 0.5) * patch_size, size) for i in range(grid)]]
    horizontal = np.tile(own_third, (grid, 1))
    vertical = horizontal.T.copy()
    colour_names = list(COLOURS)
    for obj in scene.objects:
        x0, y0, mask = object_mask(obj, size)
        cover = np.zeros((size, size), np.float32)
        cover[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] = mask
        per_patch = cover.reshape(grid, patch_size, grid, patch_size).mean(axis=(1, 3))
        wins = per_patch >= best
        best = np.where(wins, per_patch, best)
        category[wins] = CATEGORIES.index(obj.category)
        colour[wins] = colour_names.index(obj.colour)
        horizontal[wins] = _SIDE_OF_THIRD[third(obj.cx, size)]
        vertical[wins] = _SIDE_OF_THIRD[third(obj.cy, size)]
        centre[min(int(obj.cy // patch_size), grid - 1), min(int(obj.cx // patch_size), grid - 1)] = 1
        present[CATEGORIES.index(obj.category)] = 1
    return {"category": category, "colour": colour, "centre": centre, "present": present,
            "horizontal": horizontal, "vertical": vertical}
