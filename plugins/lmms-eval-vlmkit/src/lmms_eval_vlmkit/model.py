"""The lmms-eval model class: a checkpoint loaded by `vlmkit.zoo.load`, patched by `vlmkit.apply`.

``--model_args`` (lmms-eval's ``key=value,key=value``):

* ``pretrained``: a shipped checkpoint name (``vlmkit.zoo.available()``) or a local
  ``save_pretrained`` folder; safetensors only, no code from the folder runs.
* ``methods``: vlmkit method specs separated by ``;``, applied together, e.g.
  ``methods="visionzip:tokens=64;vcd:alpha=1"``. Quote the value when a spec holds commas:
  ``--model_args 'pretrained=shapes-llava,methods="fastv:layer=2,keep=0.5"'``. Empty: the plain model.
* ``batch_size``: requests per ``generate()`` call (left-padded); lmms-eval's ``--batch_size`` sets it.
* ``device``: torch device; default the process's accelerator device (CUDA if present, else CPU).
* ``dtype``: ``auto`` (bfloat16 on CUDA, float16 where bfloat16 is unsupported, float32 on the CPU,
  as ``vlmkit eval``), ``float32``, ``bfloat16`` or ``float16``.

Prompts are built the way ``vlmkit eval`` builds them: the images first, then the task's text, in one
user turn through the processor's chat template, with the generation prompt. A task that gives
POPE's LLaVA prompt (``question + "\\nAnswer the question using a single word or phrase."``) and
greedy decoding with ``max_new_tokens: 16`` gets the answers of ``vlmkit eval --bench pope``.

Requests are batched in the order lmms-eval gives them (consecutive requests with the same
generation settings share a batch), so batches are those of ``vlmkit eval`` with the same batch size.

The patch is removed in `Vlmkit.clean`, which lmms-eval's evaluator calls once all requests have
run; `Vlmkit.close` does the same for callers that drive the class themselves.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

import vlmkit
from vlmkit import zoo
from vlmkit.errors import ConfigError, did_you_mean

MODEL_ARGS = ("pretrained", "methods", "batch_size", "device", "dtype")
"""The ``--model_args`` keys this model takes (``max_batch_size`` from lmms-eval's CLI is ignored)."""

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_NEW_TOKENS = 1024
"""Used when a task's ``generation_kwargs`` give no ``max_new_tokens`` (lmms-eval's usual default)."""

_GENERATE_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "until")


def parse_methods(methods: str | Sequence[str] | None) -> list[str]:
    """Split ``"a:x=1;b:y=2"`` (quotes around it allowed) into method specs.

    Example:
        >>> parse_methods('"visionzip:tokens=64;fastv:layer=2,keep=0.5"')
        ['visionzip:tokens=64', 'fastv:layer=2,keep=0.5']
    """
    if methods is None:
        return []
    if not isinstance(methods, str):
        return [str(spec).strip() for spec in methods if str(spec).strip()]
    text = methods.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return [spec.strip() for spec in text.split(";") if spec.strip()]


class Vlmkit(lmms):
    """A vlmkit-patched vision-language model for lmms-eval (see the module docstring for the args).

    Raises:
        ConfigError: An unknown ``--model_args`` key (the message lists the valid ones), a bad
            ``batch_size`` or ``dtype``, or vlmkit's own errors for a bad checkpoint or method spec
            (``UnknownMethodError`` with the valid names, ``ConfigError`` for values).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        methods: str | Sequence[str] | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(
                f"--model_args key {name!r} is not known to the vlmkit model; valid keys: {', '.join(MODEL_ARGS)}."
                + did_you_mean(name, MODEL_ARGS)
            )
        if not pretrained:
            raise ConfigError(
                "--model_args needs pretrained=<checkpoint>: a shipped name "
                f"({', '.join(zoo.available())}) or a local save_pretrained folder."
            )
        self._batch_size = _batch_size(batch_size)
        if dtype not in DTYPES:
            raise ConfigError(f"--model_args dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
        specs = parse_methods(methods)
        self.methods = [vlmkit.parse_spec(spec) for spec in specs]  # validate before loading anything

        from accelerate import Accelerator

        self.accelerator = Accelerator()
        self._device = torch.device(device) if device else self.accelerator.device
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self.pretrained = str(pretrained)
        model, processor = zoo.load(self.pretrained, dtype=_torch_dtype(dtype, self._device))
        if getattr(processor, "chat_template", None) is None:
            raise ConfigError(
                f"the processor of {self.pretrained} has no chat template; the vlmkit model prompts through it. "
                "Save the model with a processor that has one (processor.chat_template = ...; "
                "processor.save_pretrained(path))."
            )
        processor.tokenizer.padding_side = "left"
        self._model = model.to(self._device).eval()
        self.processor = processor
        self.patch = vlmkit.apply(self._model, *self.methods) if self.methods else None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ properties lmms-eval reads
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self._batch_size

    # ------------------------------------------------------------------ the three request types
    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Generate for ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` requests, batched.

        ``gen_kwargs`` keys: ``max_new_tokens``, ``temperature`` (> 0 samples unless ``do_sample`` says
        otherwise), ``top_p``, ``top_k``, ``num_beams``, ``do_sample``, and ``until`` (the reply is cut
        at the first stop string); other keys are ignored with a warning.
        """
        args = [request.args for request in requests]
        replies: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=self.rank != 0, desc="vlmkit generate_until")
        for indices in self._batches([a[1] for a in args]):
            contexts = [args[i][0] for i in indices]
            visuals = [self._visuals(args[i][2], args[i][3], args[i][4], args[i][5]) for i in indices]
            outputs = self._generate(contexts, visuals, args[indices[0]][1])
            for i, context, output in zip(indices, contexts, outputs):
                replies[i] = output
                self.cache_hook.add_partial("generate_until", (context, args[i][1]), output)
            bar.update(len(indices))
        bar.close()
        return replies  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[list[str]]:
        """Multi-round generation, lmms-eval's protocol, batched per round.

        Requests are ``(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)``. Round 0
        answers ``context`` with ``doc_to_visual(doc)``; each later round calls ``doc_to_text(doc,
        previous_output=..., round_idx=r, previous_round_info=...)``, which returns ``(visuals, context,
        terminal, round_outputs, round_info)``: ``terminal`` ends that request, and its result is the
        list ``round_outputs`` (every round's reply by default), the one-entry-per-round list lmms-eval
        expects. Each round is one user turn.
        """
        args = [request.args for request in requests]
        results: list[list[str] | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=self.rank != 0, desc="vlmkit generate_until_multi_round")
        for indices in self._batches([a[1] for a in args]):
            gen_kwargs = args[indices[0]][1]
            docs = {i: self._doc(args[i][4], args[i][5], args[i][6]) for i in indices}
            rounds: dict[int, list[str]] = {i: [] for i in indices}
            info: dict[int, Any] = {i: None for i in indices}
            prompts = {i: (args[i][0], _as_list(args[i][2](docs[i]))) for i in indices}
            round_idx = 0
            while prompts:
                active = list(prompts)
                outputs = self._generate([prompts[i][0] for i in active], [prompts[i][1] for i in active], gen_kwargs)
                for i, output in zip(active, outputs):
                    rounds[i].append(output.strip())
                round_idx += 1
                prompts = {}
                for i in active:
                    step = args[i][3](
                        docs[i], previous_output=list(rounds[i]), round_idx=round_idx, previous_round_info=info[i]
                    )
                    visuals, context, terminal, round_outputs, info[i] = step
                    if round_outputs is not None:
                        rounds[i] = list(round_outputs)
                    if not terminal:
                        prompts[i] = (context, _as_list(visuals))
            for i in indices:
                results[i] = list(rounds[i])
                self.cache_hook.add_partial("generate_until_multi_round", (args[i][0], gen_kwargs), results[i])
            bar.update(len(indices))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its prompt, and whether greedy decoding gives it.

        Requests are ``(context, continuation, doc_to_visual, doc_id, task, split)``; ``continuation``
        may be a ``doc_to_target`` function. The continuation follows the assistant prompt of the chat
        template directly. Scored with one forward pass per batch, so prefill methods (pruning) act;
        logits-stage methods (contrastive decoding) act only inside ``generate()`` and are not applied.
        """
        decode_only = [m.name for m in self.methods if _site(m.name) == "logits"]
        if decode_only:
            self._warn_once(
                "loglikelihood",
                f"{', '.join(decode_only)} act(s) only in generate(); loglikelihood scores without them.",
            )
        args = [request.args for request in requests]
        results: list[tuple[float, bool] | None] = [None] * len(args)
        tokenizer = self.processor.tokenizer
        bar = tqdm(total=len(args), disable=self.rank != 0, desc="vlmkit loglikelihood")
        for start in range(0, len(args), self.batch_size):
            indices = list(range(start, min(start + self.batch_size, len(args))))
            prompts, continuations, images = [], [], []
            for i in indices:
                context, target, doc_to_visual, doc_id, task, split = args[i]
                doc = self._doc(doc_id, task, split)
                continuation = target if isinstance(target, str) else target(doc)
                frames = _as_list(doc_to_visual(doc))
                prompts.append(self._chat(context, frames))
                continuations.append(continuation)
                images.extend(frames)
            texts = [p + c for p, c in zip(prompts, continuations)]
            lengths = [_num_tokens(tokenizer, t) - _num_tokens(tokenizer, p) for t, p in zip(texts, prompts)]
            inputs = self._inputs(texts, images)
            with torch.inference_mode():
                logits = self._model(**inputs).logits.float()
            ids = inputs["input_ids"]
            for row, (i, n) in enumerate(zip(indices, lengths)):
                if n < 1:
                    raise ConfigError(
                        f"loglikelihood request {i}: continuation {continuations[row]!r} adds no token to its prompt."
                    )
                target_ids = ids[row, -n:]
                scores = torch.log_softmax(logits[row, -n - 1 : -1], dim=-1)
                logprob = scores.gather(-1, target_ids[:, None]).sum().item()
                greedy = bool((scores.argmax(-1) == target_ids).all())
                results[i] = (logprob, greedy)
                self.cache_hook.add_partial("loglikelihood", (args[i][0], continuations[row]), results[i])
            bar.update(len(indices))
        bar.close()
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ end of run
    def close(self) -> None:
        """Remove the vlmkit patch (idempotent): the model is exactly as loaded again."""
        patch, self.patch = getattr(self, "patch", None), None
        if patch is not None:
            patch.remove()

    def clean(self) -> None:
        """Called by lmms-eval's evaluator after the last request: remove the patch, then free the model."""
        self.close()
        super().clean()

    # ------------------------------------------------------------------ helpers
    def _batches(self, gen_kwargs: Sequence[dict]) -> list[list[int]]:
        """Consecutive runs of requests with equal generation settings, cut into ``batch_size`` pieces."""
        batches: list[list[int]] = []
        key = None
        for index, kwargs in enumerate(gen_kwargs):
            current = json.dumps(kwargs, sort_keys=True, default=str)
            if batches and current == key and len(batches[-1]) < self.batch_size:
                batches[-1].append(index)
            else:
                batches.append([index])
            key = current
        return batches

    def _doc(self, doc_id: int, task: str, split: str) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Callable | None, doc_id: int, task: str, split: str) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        return _as_list(doc_to_visual(self._doc(doc_id, task, split)))

    def _chat(self, text: str, images: Sequence[Image.Image]) -> str:
        content: list[dict[str, str]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": text})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _inputs(self, texts: Sequence[str], images: Sequence[Image.Image]):
        return self.processor(text=list(texts), images=list(images) or None, padding=True, return_tensors="pt").to(
            self._device, dtype=self._model.dtype
        )

    def _generate(
        self, contexts: Sequence[str], visuals: Sequence[Sequence[Image.Image]], gen_kwargs: dict
    ) -> list[str]:
        settings = dict(gen_kwargs or {})
        ignored = sorted(set(settings) - set(_GENERATE_KEYS))
        if ignored:
            self._warn_once(
                "gen:" + ",".join(ignored),
                f"generation_kwargs {ignored} are ignored by the vlmkit model; it reads {', '.join(_GENERATE_KEYS)}.",
            )
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(settings.get("temperature") or 0.0)
        sample = bool(settings.get("do_sample", temperature > 0))
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(settings.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            "num_beams": int(settings.get("num_beams") or 1),
            "do_sample": sample,
        }
        if sample:
            kwargs["temperature"] = temperature or 1.0
            kwargs["top_p"] = float(settings["top_p"]) if settings.get("top_p") is not None else 1.0
            kwargs["top_k"] = int(settings["top_k"]) if settings.get("top_k") is not None else 0
        texts = [self._chat(context, frames) for context, frames in zip(contexts, visuals)]
        inputs = self._inputs(texts, [image for frames in visuals for image in frames])
        generation = self._model.generation_config
        pad = generation.pad_token_id if generation.pad_token_id is not None else self.processor.tokenizer.pad_token_id
        with torch.inference_mode():
            output = self._model.generate(**inputs, **kwargs, pad_token_id=pad)
        replies = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :].cpu(), skip_special_tokens=True)
        return [_cut(reply, until) for reply in replies]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


def _batch_size(value: int | str) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(
            f"batch_size {value!r} is not supported by the vlmkit model; give an integer >= 1 "
            "(--batch_size 8); 'auto' is not supported."
        )
    return int(text)


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _as_list(visuals: Any) -> list[Image.Image]:
    if visuals is None:
        return []
    items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    for item in items:
        if not isinstance(item, Image.Image):
            raise ConfigError(
                f"the vlmkit lmms-eval model takes images (PIL.Image) from doc_to_visual, got {type(item).__name__}; "
                "video and audio tasks are not supported (run videos with vlmkit eval --bench video)."
            )
    return [item.convert("RGB") for item in items]


def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _cut(reply: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            reply = reply.split(stop)[0]
    return reply


def _site(name: str) -> str | None:
    return next((info.site for info in vlmkit.list_methods() if info.name == name), None)
