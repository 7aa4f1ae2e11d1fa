"""Debias: "Debiasing Multimodal Large Language Models" (Zhang et al., 2024, arXiv:2403.05262; first
titled "Debiasing Large Visual Language Models").

Site: `logits`. One extra branch reads the prompt with the image absent (no image tokens, or a
pure-noise image), which exposes the language prior. Two strategies:

- `mode="calibrate"` ("Post-Hoc Debias", classification and multiple choice): an affine calibration
  of the answer distribution, q(a) proportional to W p(a | v, x) with W = diag(p(a | absent, x))^-1,
  so that every answer scores the same when the image is absent. It applies to the first `steps`
  generated tokens over the answer classes (each answer's first token in lower case and capitalised,
  with and without a leading space: "yes", " yes", "Yes", " Yes"); the classes keep their total probability and every other token
  is unchanged.
- `mode="sample"` ("Debias sampling" / visual debias decoding, open generation): the contrast
  softmax[(1 + alpha) logit(y | v, x) - alpha logit(y | absent, x)] on the plausible set
  {y : p(y | v, x) >= beta max_w p(w | v, x)}.

Defaults: calibrate, answers ("yes", "no"), steps = 1; sample: alpha = 1, beta = 0.1 (the VCD-style
values; the paper tunes alpha per task).

Deviations: one image-absent input per call (the paper also averages over several meaningless
images); answer tokens are found with the tokenizer passed as `generate(..., tokenizer=...)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.errors import ConfigError
from vlmkit.methods.decode.base import BranchConfig, DecodeMethod, check_range, contrast, plausible_tokens
from vlmkit.methods.decode.images import noised_branch
from vlmkit.registry import register_method

MODES = ("calibrate", "sample")
ABSENT = ("none", "noise")


@dataclass(frozen=True)
class DebiasConfig(BranchConfig):
    mode: str = field(default="calibrate", metadata={"help": "'calibrate' (post-hoc, answers) or 'sample' (open generation)"})
    answers: tuple[str, ...] = field(default=("yes", "no"), metadata={"help": "answer words calibrated in mode 'calibrate'"})
    steps: int = field(default=1, metadata={"help": "generated tokens calibrated, from the first (0: plain decoding)"})
    alpha: float = field(default=1.0, metadata={"help": "contrast strength in mode 'sample', >= 0 (0: plain decoding)"})
    beta: float = field(default=0.1, metadata={"help": "adaptive plausibility threshold in mode 'sample', in (0, 1]"})
    absent: str = field(default="none", metadata={"help": "how the image is removed: 'none' (no image tokens) or 'noise'"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"debias: mode={self.mode!r} is not one of {', '.join(map(repr, MODES))}")
        if self.absent not in ABSENT:
            raise ConfigError(f"debias: absent={self.absent!r} is not one of {', '.join(map(repr, ABSENT))}")
        answers = (self.answers,) if isinstance(self.answers, str) else tuple(self.answers)
        object.__setattr__(self, "answers", answers)
        if len(answers) < 2 or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ConfigError(f"debias: answers={self.answers!r} must be two or more non-empty words")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"debias: steps={self.steps!r} must be an integer >= 0")
        check_range("debias", "alpha", self.alpha, 0.0)
        check_range("debias", "beta", self.beta, 0.0, 1.0, low_open=True)


@register_method("debias", family="decode", sites="logits")
class Debias(DecodeMethod):
    """Calibrate answers (or contrast tokens) against the image-absent prediction."""

    Config = DebiasConfig
    example = "mode='sample'"
    neutral = "mode='sample',alpha=0"
    paper = "https://arxiv.org/abs/2403.05262"

    def branches(self, call):
        if self.config.absent == "noise":
            return [noised_branch(call, 999, 0, self.name)]
        return [call.without_visual()]

    def context(self, call):
        """The answer classes' token ids (mode 'calibrate')."""
        if self.config.mode != "calibrate":
            return None
        return answer_classes(call.require_tokenizer(self.name, "its answers"), self.config.answers)

    def branch_vocabulary(self, scores: torch.Tensor) -> torch.Tensor | None:
        if self.config.mode == "sample":
            return plausible_tokens(scores, self.config.beta, active=self.config.alpha > 0)
        return None  # calibration normalises the image-absent distribution over the whole vocabulary

    def combine(self, scores: torch.Tensor, step) -> torch.Tensor:
        config = self.config
        if config.mode == "sample":
            return contrast(scores, step.branch_logits[0], config.alpha, config.beta)
        if step.index >= config.steps:
            return scores.clone()
        return calibrate(scores, step.branch_logits[0], step.context)


def answer_classes(tokenizer, answers: tuple[str, ...]) -> list[list[int]]:
    """Per answer, the first (non-whitespace) token ids of its case and leading-space variants."""
    classes = []
    for answer in answers:
        word = answer.strip()
        variants = {prefix + form for form in (word, word.lower(), word.capitalize()) for prefix in ("", " ")}
        ids = set()
        for variant in variants:
            tokens = tokenizer(variant, add_special_tokens=False)["input_ids"]
            ids.add(next(t for t in tokens if tokenizer.decode([t]).strip()))
        classes.append(sorted(ids))
    seen: dict[int, str] = {}
    for answer, ids in zip(answers, classes):
        for token in ids:
            if token in seen:
                raise ConfigError(f"debias: answers {seen[token]!r} and {answer!r} start with the same token; choose distinct words")
            seen[token] = answer
    return classes


def calibrate(scores: torch.Tensor, absent: torch.Tensor, classes: list[list[int]]) -> torch.Tensor:
    """Post-hoc debias over answer classes: class log-mass P_c - Q_c (image present minus absent),
    renormalised to the classes' total present mass; tokens keep their share within their class."""
    present = torch.log_softmax(scores, dim=-1)
    without = torch.log_softmax(absent, dim=-1)
    mass = torch.stack([present[:, ids].logsumexp(-1) for ids in classes], dim=-1)  # (rows, classes)
    prior = torch.stack([without[:, ids].logsumexp(-1) for ids in classes], dim=-1)
    calibrated = mass - prior
    calibrated = calibrated - calibrated.logsumexp(-1, keepdim=True) + mass.logsumexp(-1, keepdim=True)
    out = present.clone()
    for index, ids in enumerate(classes):
        out[:, ids] = present[:, ids] - mass[:, index : index + 1] + calibrated[:, index : index + 1]
    return out
