"""Training streams of the shapes world: procedural, on the fly, indexable and seeded.

Sample `i` of a stream is a pure function of `(stream seed, i)`, so a resumed run sees exactly
the batches the uninterrupted run would have seen. Scene seeds come from `TRAIN_SEEDS` only
(`check_seeds` enforces it), so the held-out benchmarks never share a scene with training.

Two kinds of samples:

* vision samples: an image plus dense per-patch targets (`patch_labels`);
* conversations: the same plus a LLaVA-1.5-style multi-turn chat, with labels on answer tokens
  (and optionally on the focus word's span, see `ConversationEncoder.encode`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from vlmkit.data.shapes import WorldConfig, check_seeds, patch_labels, render_array, sample_scene
from vlmkit.data.shapes_text import QA, QA_KINDS
from vlmkit.errors import ConfigError

IGNORE = -100


@dataclass(frozen=True)
class Mixture:
    """What a conversation stream asks.

    Attributes:
        caption: probability that a sample is one captioning turn instead of questions.
        min_turns: fewest question turns in a question sample.
        max_turns: most question turns in a question sample.
        existence: relative weight of yes/no existence questions.
        count: relative weight of counting questions.
        color: relative weight of colour questions.
        position: relative weight of position questions.
        focus: how the prompt positions after each question's focus word are supervised with
            the answer's gist: "none", "word" or "span" (`ConversationEncoder.encode`).
    """

    caption: float = 0.3
    min_turns: int = 3
    max_turns: int = 6
    existence: float = 0.5
    count: float = 0.15
    color: float = 0.15
    position: float = 0.2
    focus: str = "span"

    def __post_init__(self) -> None:
        if self.focus not in ("none", "word", "span"):
            raise ConfigError(f"focus={self.focus!r} is unknown; use 'none', 'word' or 'span'.")
        if not 1 <= self.min_turns <= self.max_turns:
            raise ConfigError(f"need 1 <= min_turns <= max_turns, got {self.min_turns}, {self.max_turns}.")

    def kinds(self) -> tuple[list[str], np.ndarray]:
        """Question kinds and their probabilities."""
        names = ["existence", "count", "color", "position"]
        weights = np.array([getattr(self, n) for n in names], dtype=np.float64)
        return names, weights / weights.sum()


def sample_qas(scene, rng: np.random.Generator, mixture: Mixture) -> list[QA]:
    """The turns of one training conversation about `scene`."""
    if not scene.objects or rng.random() < mixture.caption:
        return [QA_KINDS["caption"](scene, rng)]
    names, probs = mixture.kinds()
    turns = int(rng.integers(mixture.min_turns, mixture.max_turns + 1))
    qas: list[QA] = []
    for _ in range(4 * turns):
        qa = QA_KINDS[names[int(rng.choice(len(names), p=probs))]](scene, rng)
        if qa is not None and all(qa.question != q.question for q in qas):
            qas.append(qa)
        if len(qas) == turns:
            break
    return qas


class ConversationEncoder:
    """Token ids and answer-only labels of a LLaVA-1.5-style chat, piece by piece.

    The pieces reproduce the tokenizer's chat template exactly (tests check this); each distinct
    piece is tokenized once and cached.

    Args:
        tokenizer: the shapes tokenizer.
        image_tokens: placeholder ids standing for the visual input (the processor's expansion).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_tokens: list[int]):
        self.tokenizer = tokenizer
        self.image_tokens = list(image_tokens)
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def encode(self, qas: list[QA], focus: str = "none") -> tuple[list[int], list[int]]:
        """`(input_ids, labels)` of a conversation; the first turn carries the image.

        Args:
            qas: the turns.
            focus: "word" also supervises the prompt position of each question's focus word
                (e.g. "star") with the answer's gist (e.g. "Yes"); "span" supervises every
                prompt position from the focus word to the end of the question; "none" neither.
                Next-token predictions inside the prompt are never used when generating, so
                this only adds a direct training signal for looking the word up in the image.

        Returns:
            Token ids and labels (`IGNORE` where nothing is predicted).
        """
        ids = [self.tokenizer.bos_token_id] + self._ids("USER:") + self.image_tokens
        labels = [IGNORE] * len(ids)
        for k, qa in enumerate(qas):
            prompt = self._ids(("" if k == 0 else "USER: ") + qa.question + " ASSISTANT:")
            target = self._ids(qa.answer) + [self.tokenizer.eos_token_id]
            prompt_labels = [IGNORE] * len(prompt)
            if focus != "none" and qa.focus:
                word = self._ids(qa.focus)[0]
                where = max(i for i, t in enumerate(prompt) if t == word)
                stop = where + 2 if focus == "word" else len(prompt)
                prompt_labels[where + 1:stop] = [self._ids(qa.focus_answer)[0]] * (stop - where - 1)
            ids += prompt + target
            labels += prompt_labels + target
        return ids, labels


class ShapesStream(torch.utils.data.Dataset):
    """An indexable stream of training samples from training seeds.

    Args:
        start_seed: scene seed of sample 0 (in `TRAIN_SEEDS`).
        length: number of samples (seeds `start_seed .. start_seed + length - 1`).
        world: the world config.
        encoder: the conversation encoder; None yields vision-pretraining samples.
        mixture: the question mixture of conversation samples.
        patch_size: ViT patch size for the dense targets.
        curriculum: `(start difficulty, samples until full difficulty)`.
    """

    def __init__(self, start_seed: int, length: int, world: WorldConfig,
                 encoder: ConversationEncoder | None = None, mixture: Mixture | None = None,
                 patch_size: int = 8, curriculum: tuple[float, int] = (1.0, 0)):
        self.seeds = check_seeds("train", start_seed, length)
        self.world = world
        self.encoder = encoder
        self.mixture = mixture or Mixture()
        self.patch_size = patch_size
        self.curriculum = curriculum

    def __len__(self) -> int:
        return len(self.seeds)

    def difficulty(self, index: int) -> float:
        """The scene difficulty of sample `index` (linear ramp)."""
        start, ramp = self.curriculum
        return 1.0 if ramp <= 0 else min(1.0, start + (1.0 - start) * index / ramp)

    def __getitem__(self, index: int) -> dict:
        seed = self.seeds[index]
        scene = sample_scene(seed, self.world, self.difficulty(index))
        image = torch.from_numpy(render_array(scene))
        dense = {k: torch.from_numpy(v) for k, v in patch_labels(scene, self.patch_size).items()}
        if self.encoder is None:
            return {"image": image, **dense}
        rng = np.random.default_rng([seed, 7])
        qas = sample_qas(scene, rng, self.mixture)
        ids, labels = self.encoder.encode(qas, focus=self.mixture.focus)
        return {"image": image, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels), **dense}


def collate(samples: list[dict], pad_id: int,
            dense: tuple[str, ...] = ("category", "colour", "centre", "present", "horizontal", "vertical")) -> dict:
    """Stack images and the `dense` targets; right-pad token sequences (labels with `IGNORE`)."""
    out = {"images": torch.stack([s["image"] for s in samples])}
    if "input_ids" in samples[0]:
        length = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), length), pad_id)
        labels = torch.full((len(samples), length), IGNORE)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = s["input_ids"], s["labels"], 1
        out.update(input_ids=ids, labels=labels, attention_mask=mask)
    for key in dense:
        out[key] = torch.stack([s[key] for s in samples])
    return out
