"""Short video clips of the shapes world, with exact per-frame ground truth and MVBench-style questions.

A clip is a static scene (1-3 objects on a cluttered background) plus one subject object and one
event: the subject appears, disappears, moves left/right/up/down, or changes colour. Every frame's
objects, colours and boxes are exact (`frame_objects`); frames differ also in pixel noise. Clips
are written as H.264 mp4 files (imageio-ffmpeg's bundled ffmpeg) that decord reads.

Example:
    >>> from vlmkit.data.shapes import EVAL_SEEDS
    >>> clip = sample_clip(EVAL_SEEDS.start)
    >>> frames = render_clip(clip)  # uint8 [T, H, W, 3]
    >>> frames.shape[0] == clip.num_frames
    True
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmkit.data.shapes import (
    CATEGORIES, COLOURS, ShapeObject, WorldConfig, _box_of, _overlaps, _pick_colour,
    add_noise, composite, render_background, sample_scene,
)
from vlmkit.errors import ConfigError
from vlmkit.eval.benchmarks.video import PROMPTS

EVENTS = ("appear", "disappear", "move", "color")
DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

VIDEO_TASKS = {
    "appear": "object_appear", "disappear": "object_disappear",
    "move": "moving_direction", "color": "color_change",
}
"""Event kind -> MVBench-style task name."""

MC_SUFFIX = "Only give the best option."


@dataclass
class Clip:
    """A clip: a static scene, a subject and one event.

    Attributes:
        scene: the static scene (its `objects` are the static objects).
        num_frames: number of frames.
        subject: the subject object as it is in frame 0 (or when it first appears).
        event: one of `EVENTS`.
        event_frame: first frame after the change (appear, disappear, color).
        direction: for "move", one of `DIRECTIONS`.
        shift: for "move", the total displacement in pixels.
        new_colour: for "color", the colour name after the change.
        new_rgb: for "color", its exact RGB.
    """

    scene: object
    num_frames: int
    subject: ShapeObject
    event: str
    event_frame: int = 0
    direction: str = ""
    shift: float = 0.0
    new_colour: str = ""
    new_rgb: tuple = (0, 0, 0)

    @property
    def seed(self) -> int:
        """The clip seed."""
        return self.scene.seed

    def to_json(self) -> dict:
        """Per-frame ground truth as a JSON-serialisable dict."""
        return {
            "seed": self.seed, "num_frames": self.num_frames, "event": self.event,
            "subject": self.subject.category, "event_frame": self.event_frame,
            "direction": self.direction, "new_colour": self.new_colour,
            "frames": [[o.to_json() for o in frame_objects(self, t)] for t in range(self.num_frames)],
        }


def _subject_at(clip: Clip, t: int) -> ShapeObject | None:
    subject = clip.subject
    if clip.event == "appear" and t < clip.event_frame:
        return None
    if clip.event == "disappear" and t >= clip.event_frame:
        return None
    moved = copy.copy(subject)
    if clip.event == "move":
        dx, dy = _STEP[clip.direction]
        progress = t / max(clip.num_frames - 1, 1)
        moved.cx = subject.cx + dx * clip.shift * progress
        moved.cy = subject.cy + dy * clip.shift * progress
        moved.box = _box_of(moved, clip.scene.image_size)
    elif clip.event == "color" and t >= clip.event_frame:
        moved.colour, moved.rgb = clip.new_colour, clip.new_rgb
    return moved


def frame_objects(clip: Clip, t: int) -> list[ShapeObject]:
    """The objects visible in frame `t`, with exact boxes (static objects first)."""
    subject = _subject_at(clip, t)
    return list(clip.scene.objects) + ([subject] if subject is not None else [])


def sample_clip(seed: int, config: WorldConfig | None = None, num_frames: int = 8,
                difficulty: float = 1.0) -> Clip:
    """The clip of one seed.

    Args:
        seed: clip seed; the same seed and arguments always give the same clip.
        config: the world (`WorldConfig(max_objects=3)` by default: clips are sparser).
        num_frames: frames per clip (>= 4).
        difficulty: curriculum knob as in `sample_scene`.

    Returns:
        The clip.

    Raises:
        ConfigError: if `num_frames < 4`.
    """
    if num_frames < 4:
        raise ConfigError(f"num_frames={num_frames} is too short for an event; use >= 4.")
    config = config or WorldConfig(max_objects=3)
    rng = np.random.default_rng([seed, 1])
    scene = sample_scene(seed, config, difficulty)
    size = scene.image_size
    event = EVENTS[int(rng.integers(len(EVENTS)))]
    present = set(scene.categories())
    choices = [c for c in CATEGORIES if c not in present]
    category = choices[int(rng.integers(len(choices)))]
    boxes = [o.box for o in scene.objects]
    for _ in range(200):
        diameter = float(rng.uniform(0.16, 0.28) * size)
        subject = ShapeObject(category, "", (0, 0, 0), diameter, 0.0, 0.0,
                              float(rng.uniform(-20, 20)), size_word="medium")
        margin = diameter / 2 + 1
        direction, shift = "", 0.0
        if event == "move":
            direction = DIRECTIONS[int(rng.integers(4))]
            shift = float(rng.uniform(0.3, 0.45) * size)
        dx, dy = _STEP.get(direction, (0, 0))
        lo_x, hi_x = margin - min(dx, 0) * shift, size - margin - max(dx, 0) * shift
        lo_y, hi_y = margin - min(dy, 0) * shift, size - margin - max(dy, 0) * shift
        if lo_x >= hi_x or lo_y >= hi_y:
            continue
        subject.cx, subject.cy = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
        clip = Clip(scene, num_frames, subject, event, direction=direction, shift=shift)
        path = [_subject_at(clip, t) for t in range(num_frames)] if event == "move" else [subject]
        subject.box = _box_of(subject, size)
        if not any(_overlaps(_box_of(s, size) if s is not subject else subject.box, boxes)
                   for s in path):
            break
    else:  # a crowded scene: drop the static objects
        scene.objects = []
    subject.colour, subject.rgb = _pick_colour(rng, scene.background, subject.cx, subject.cy,
                                               size, faint=False)
    subject.size_word = "large" if subject.size > 0.22 * size else "medium"
    clip.event_frame = int(rng.integers(2, num_frames - 1))
    if event == "color":
        others = [c for c in COLOURS if c != subject.colour]
        clip.new_colour = others[int(rng.integers(len(others)))]
        clip.new_rgb = COLOURS[clip.new_colour]
    return clip


def render_frame(clip: Clip, t: int, background: np.ndarray | None = None) -> np.ndarray:
    """Frame `t` as uint8 `[H, W, 3]` (pass `render_background(clip.scene)` to reuse it)."""
    if background is None:
        background = render_background(clip.scene)
    image = composite(background.copy(), frame_objects(clip, t), clip.scene.image_size)
    return add_noise(image, clip.scene.noise_std, clip.seed * 64 + t)


def render_clip(clip: Clip) -> np.ndarray:
    """All frames as uint8 `[T, H, W, 3]`."""
    background = render_background(clip.scene)
    return np.stack([render_frame(clip, t, background) for t in range(clip.num_frames)])


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 4) -> None:
    """Write uint8 `[T, H, W, 3]` frames as an H.264 mp4 (crf 10, yuv420p) that decord reads.

    Raises:
        ImportError: when imageio-ffmpeg is not installed (extra `video`).
    """
    try:
        import imageio_ffmpeg
    except ImportError as error:
        from vlmkit.errors import missing_extra

        raise missing_extra("imageio-ffmpeg", "video") from error
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
        macro_block_size=1, output_params=["-crf", "10", "-threads", "1"],
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------


def mc_prompt(question: str, candidates: list[str]) -> str:
    """MVBench's prompt as the eval suite writes it (`vlmkit.eval.benchmarks.video.PROMPTS["mvbench"]`): the
    system text, the question, the options lettered "(A) text", "Only give the best option."."""
    options = "\n".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(candidates))
    return PROMPTS["mvbench"].template.format(question=question, options=options)


MC_ANSWER_PREFIX = PROMPTS["mvbench"].answer_prefix
"""What MVBench pre-fills in the assistant's turn: "Best option:("."""


def mc_answer(candidates: list[str], answer: str) -> str:
    """The trained reply, the pre-filled prefix included: "Best option:( B) heart".

    The space keeps the shapes tokenizer from reading "(B)" as one option token: after the
    pre-filled "(" the model must write the letter and ")" as their own tokens.
    """
    return f"{MC_ANSWER_PREFIX} {'ABCD'[candidates.index(answer)]}) {answer}"


def clip_question(clip: Clip, rng: np.random.Generator) -> dict:
    """The clip's multiple-choice question about its event.

    Returns:
        `{"task", "question", "candidates", "answer"}` with four candidates, the answer among
        them, in random order.
    """
    subject = clip.subject.category
    static = [o.category for o in clip.scene.objects]
    absent = [c for c in CATEGORIES if c != subject and c not in static]
    if clip.event in ("appear", "disappear"):
        verb = "appears" if clip.event == "appear" else "disappears"
        question = f"Which object {verb} during the video?"
        pool = list(dict.fromkeys(static))[:2]
        pool += [absent[i] for i in rng.permutation(len(absent))[: 3 - len(pool)]]
        answer, distractors = subject, pool
    elif clip.event == "move":
        question = f"In which direction does the {subject} move?"
        answer = clip.direction
        distractors = [d for d in DIRECTIONS if d != answer]
    else:
        question = f"What color does the {subject} change to?"
        answer = clip.new_colour
        others = [c for c in COLOURS if c not in (answer, clip.subject.colour)]
        distractors = [clip.subject.colour] + [others[i] for i in rng.permutation(len(others))[:2]]
    candidates = [answer, *distractors]
    candidates = [candidates[i] for i in rng.permutation(4)]
    return {"task": VIDEO_TASKS[clip.event], "question": question,
            "candidates": candidates, "answer": answer}


def video_template_texts() -> list[str]:
    """Every fixed word sequence of the video prompts (for the tokenizer's vocabulary)."""
    return [
        "Which object appears during the video? Which object disappears during the video?",
        "In which direction does the move? What color does the change to?",
        " ".join(DIRECTIONS), "Question: Option: " + MC_SUFFIX, "Best option: (",
        "Describe the video. What happens in the video? The video shows",
    ]

