"""Extra forward branches for contrastive decoding, run through stock `generate()`.

A decoding method (site ``logits``, `vlmkit.methods.decode`) names the inputs it contrasts with:
the same prompt with a noised or transformed image, with no image, or with a disturbance
instruction. This module runs those branches beside the main rows of any `generate()` call
(greedy, sampling, beam search, `num_return_sequences`, left-padded batches, stopping criteria,
streamers) without changing the decoding loop:

* `install()` overrides three attributes of the model *instance* and adds three hooks, all recorded
  in the patch's undo log: `generate` (to see the call's own inputs and start a `DecodeSession`),
  `_get_logits_processor` (to put a fresh `BranchLogitsProcessor` *first* in the list, so that
  repetition penalties, temperature and top-k/top-p act on the contrasted logits, as in the
  reference implementations), `_reorder_cache` (beam search), a forward pre/post hook pair on the
  model and a pre-hook on its LM head. Outside `generate()` they do nothing.
* Prefill: generate's own prefill runs the main rows. The post-hook then prefills each branch with
  its own cache, its inputs prepared exactly as generate prepares the main ones (encoder outputs,
  positions, expansion for beams / `num_return_sequences`). Prefill is compute-bound, so running it
  apart costs what a batched one would. Under token pruning a branch replays the selections the
  main rows recorded (`EngineState.branch_scope`), or keeps every token (`branch_pruning="none"`).
* The branch caches then become extra rows of the main cache (left-padded to a common length), and
  every decoding step runs main and branch rows in one batched forward: the pre-hook appends the
  branch rows (the token the main row just chose, the branch's own positions and mask); the LM
  head runs on the main rows only, and the processor computes the branch rows' logits on the
  tokens the method reads (for contrast methods the plausible set, a few tokens). Decoding is
  memory-bound, so the extra rows cost less than a second forward (how much less depends on the
  matmul kernels: `benchmarks/decoding.py`).
* Beam search reorders the cache with `beam_idx`; the `_reorder_cache` override applies the same
  permutation to every branch's rows (beams only move within their sample, whose branch rows
  share one prompt, so masks and positions need no reordering).
* Without a cache (`use_cache=False`) every step recomputes each branch in full, as the main rows.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationMixin, LogitsProcessor
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from vlmkit.engine.cache import CompactLayer, CompactSlidingLayer, SlotLayout
from vlmkit.errors import ConfigError, InputError

if TYPE_CHECKING:
    from vlmkit.api import Patch
    from vlmkit.methods.decode.base import DecodeMethod

#: per-token inputs that follow `input_ids` (padding, insertion, removal, new tokens)
TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")
#: forward arguments that are not part of a call's inputs
_CONTROL_KEYS = frozenset(
    {
        "past_key_values", "use_cache", "cache_position", "logits_to_keep", "labels", "return_dict",
        "output_attentions", "output_hidden_states", "inputs_embeds", "kwargs",
    }
)


@dataclass
class CallInputs:
    """The model inputs of one `generate()` call as the caller passed them, one row per prompt.

    Branch inputs are derived from these (`without_visual`, `with_prefix`, `replace`), never
    from state outside the call.

    Attributes:
        kwargs: `input_ids`, `attention_mask` and every other model input of the call (pixel values,
            image sizes or grids, token types), before generate() encodes or expands anything.
        placeholder_ids: the placeholder token id per modality ("image", "video").
        pad_token_id: the id used for left padding.
        bos_token_id: the id a prompt may start with (kept first by `with_prefix`), or None.
        tokenizer: the tokenizer passed as `generate(tokenizer=...)`, or None.
        vision_config: the model's vision config (patch geometry of stacked-patch pixel layouts).
        name_or_path: where the model was loaded from ("" for models built in memory).
    """

    kwargs: dict[str, Any]
    placeholder_ids: dict[str, int]
    pad_token_id: int
    bos_token_id: int | None = None
    tokenizer: Any = None
    vision_config: Any = None
    name_or_path: str = ""

    @property
    def input_ids(self) -> torch.Tensor:
        return self.kwargs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        mask = self.kwargs.get("attention_mask")
        return torch.ones_like(self.input_ids) if mask is None else mask

    def replace(self, **changes: Any) -> "CallInputs":
        """The same call with some inputs replaced (e.g. `pixel_values=noised`)."""
        return dataclasses.replace(self, kwargs={**self.kwargs, **changes})

    def rows(self) -> list[dict[str, torch.Tensor]]:
        """Each prompt without its padding: its ids and per-token inputs."""
        keys = ["input_ids", *(k for k in TOKEN_KEYS if self.kwargs.get(k) is not None)]
        mask = self.attention_mask.bool()
        return [{key: self.kwargs[key][row][mask[row]] for key in keys} for row in range(mask.shape[0])]

    def with_rows(self, rows: list[dict[str, torch.Tensor]], keep_visual: bool = True) -> "CallInputs":
        """New inputs from per-prompt rows, left-padded again; visual inputs dropped unless `keep_visual`."""
        length = max(int(row["input_ids"].numel()) for row in rows)
        device = self.input_ids.device
        kwargs = dict(self.kwargs) if keep_visual else {}
        for key in rows[0]:
            fill = self.pad_token_id if key == "input_ids" else 0
            padded = torch.full((len(rows), length), fill, dtype=self.kwargs[key].dtype, device=device)
            for index, row in enumerate(rows):
                if row[key].numel():
                    padded[index, length - row[key].numel() :] = row[key]
            kwargs[key] = padded
        mask = torch.zeros(len(rows), length, dtype=self.attention_mask.dtype, device=device)
        for index, row in enumerate(rows):
            mask[index, length - row["input_ids"].numel() :] = 1
        kwargs["attention_mask"] = mask
        return dataclasses.replace(self, kwargs=kwargs)

    def without_visual(self) -> "CallInputs":
        """The prompts with every image/video placeholder token and every visual input removed."""
        placeholders = torch.tensor(list(self.placeholder_ids.values()), device=self.input_ids.device)
        rows = []
        for row in self.rows():
            text = ~torch.isin(row["input_ids"], placeholders)
            rows.append({key: value[text] for key, value in row.items()})
        return self.with_rows(rows, keep_visual=False)

    def with_prefix(self, token_ids: list[int]) -> "CallInputs":
        """The prompts with `token_ids` inserted at the start (after a leading BOS token)."""
        rows = []
        for row in self.rows():
            ids = row["input_ids"]
            at = 1 if self.bos_token_id is not None and ids.numel() and int(ids[0]) == self.bos_token_id else 0
            prefix = torch.tensor(token_ids, dtype=ids.dtype, device=ids.device)
            new = {"input_ids": torch.cat([ids[:at], prefix, ids[at:]])}
            for key, value in row.items():
                if key != "input_ids":
                    new[key] = torch.cat([value[:at], value.new_zeros(len(token_ids)), value[at:]])
            rows.append(new)
        return self.with_rows(rows)

    def require_tokenizer(self, method: str, what: str):
        """The call's tokenizer: `generate(tokenizer=...)`, else the one saved with a local checkpoint
        (`model.name_or_path`); a ConfigError saying how to pass one otherwise."""
        tokenizer = self.tokenizer or _saved_tokenizer(self.name_or_path)
        if tokenizer is None:
            raise ConfigError(
                f"{method} needs the model's tokenizer to encode {what}: call "
                "model.generate(..., tokenizer=processor.tokenizer)"
            )
        return tokenizer


@dataclass
class Step:
    """What one forward produced for the decoding method, beside the main rows' logits.

    Attributes:
        index: how many tokens each row generated before this step (0 at the first one).
        branch_logits: per branch, (rows, vocab) float32 next-token logits, in the main rows' order.
            At cached decoding steps only the columns of the method's `branch_vocabulary(scores)`
            are computed (the others are 0: the method masks them).
        layer_logits: per requested layer j, (rows * (1 + branches), vocab) float32 logits of
            `hidden_states[j]` at the last position (final norm and LM head applied): the main rows
            first, then each branch's.
        context: what the method's `context(call)` returned for this call.
    """

    index: int
    branch_logits: list[torch.Tensor] = field(default_factory=list)
    layer_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    context: Any = None
    branch_hidden: list[torch.Tensor] = field(default_factory=list)  # per branch, (rows, hidden) before the LM head


class BranchLogitsProcessor(LogitsProcessor):
    """The decoding method's step, as a `LogitsProcessor`; built fresh for each `generate()` call.

    It reads what the patched forward produced for this step (branch logits, early-exit logits)
    and returns the method's combination of them with `scores`; `scores` is never modified in
    place. Under beam search the result is re-normalised (`log_softmax`) so that beam scores stay
    sums of log-probabilities of the contrasted distribution.
    """

    def __init__(self, session: "DecodeSession"):
        self.session = session

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = self.session.take_step(scores)
        combined = self.session.method.combine(scores, step)
        return torch.log_softmax(combined, dim=-1) if self.session.beam else combined


@dataclass
class _Branch:
    """One branch, prepared for its forwards."""

    inputs: dict[str, Any]  # forward kwargs of its prompt (expanded), `input_ids` included
    mask: torch.Tensor  # (rows, length) prompt mask
    positions: torch.Tensor  # its prompt's position ids, (rows, length) or (k, rows, length)
    encoded: dict  # its encoder records (EngineState.encoded while it runs)
    next: torch.Tensor | None = None  # position ids of its next token, once prefilled with a cache


class DecodeSession:
    """The branches of one `generate()` call of a model patched with a decoding method."""

    def __init__(self, patch: "Patch", method: "DecodeMethod", call: CallInputs):
        self.model, self.adapter, self.state, self.method = patch.model, patch.adapter, patch.state, method
        self.calls = method.branches(call)  # built before generate() starts: bad inputs fail first
        self.context = method.context(call)
        tied = self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight
        self.layers = method.layers(len(self.adapter.decoder_layers), tied)
        self.batch = int(call.input_ids.shape[0])
        self.expand, self.beam = 1, False
        self.phase = "prefill"  # then "cached" (branch rows live in the main cache) or "recompute"
        self.nested = False
        self.pending: Step | None = None
        self.generated = 0
        self.rows = 0  # main rows (batch * expansion)
        self.prompt_length = 0
        self.prompt_mask: torch.Tensor | None = None  # the main prefill's attention mask (None: no padding)
        self.branches: list[_Branch] = []
        self.mask: torch.Tensor | None = None  # (all rows, physical length) while the cache is uncompacted
        self.padded = False
        self.compact = False
        self.main_pad = 0  # left padding added to the main rows' cache
        self.branch_hidden: list[torch.Tensor] = []  # the LM-head pre-hook's branch rows, until the post-hook
        self.expanded = False  # inside a forward whose rows the pre-hook extended with the branch rows
        self.keep_hidden = self.keep_attentions = False

    # ----------------------------------------------------------------- generate() entry points
    def start(self, generation_config) -> BranchLogitsProcessor:
        """Check the call's decoding settings against what the method supports; make its processor."""
        method, name = self.method, self.method.name
        beams = int(generation_config.num_beams or 1)
        if beams > 1 and not method.supports_beam:
            raise ConfigError(f"{name} does not support beam search (num_beams={beams}); use greedy or sampling")
        if generation_config.do_sample and not method.supports_sampling:
            raise ConfigError(f"{name} does not support sampling (do_sample=True); use greedy or beam search")
        if self.batch > 1 and not method.supports_batch:
            raise ConfigError(f"{name} supports batch size 1 only, got {self.batch} prompts")
        if getattr(generation_config, "prefill_chunk_size", None) is not None:
            raise ConfigError(f"{name}: chunked prefill (prefill_chunk_size) is not supported with decoding branches")
        self.expand = max(beams, int(generation_config.num_return_sequences or 1))
        self.beam = beams > 1
        self.keep_hidden = bool(generation_config.output_hidden_states)
        self.keep_attentions = bool(generation_config.output_attentions)
        return BranchLogitsProcessor(self)

    def take_step(self, scores: torch.Tensor) -> Step:
        """This step's extras; at cached decoding steps the branch logits are computed here, from
        the branch rows' last hidden states, on the columns the method reads given `scores` only."""
        step = self.pending
        if step is None:
            raise InputError(
                f"the {self.method.name} logits processor ran without a forward of its patched model; "
                "it only works inside that model's generate()"
            )
        if step.branch_hidden:
            vocabulary = self.method.branch_vocabulary(scores)
            step.branch_logits = [self._lm_head(hidden, vocabulary) for hidden in step.branch_hidden]
        self.pending = None
        self.generated += 1
        return step

    def _lm_head(self, hidden: torch.Tensor, vocabulary: torch.Tensor | None) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        if vocabulary is None or 4 * vocabulary.numel() > head.weight.shape[0]:  # gathering rows would cost more
            return torch.nn.functional.linear(hidden, head.weight, head.bias).float()
        logits = torch.zeros(hidden.shape[0], head.weight.shape[0], dtype=torch.float32, device=hidden.device)
        if vocabulary.numel():
            bias = None if head.bias is None else head.bias[vocabulary]
            logits[:, vocabulary] = torch.nn.functional.linear(hidden, head.weight[vocabulary], bias).float()
        return logits

    def split_lm_head_input(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """LM-head pre-hook at cached decoding steps: keep the branch rows' states for `take_step`
        and let the head run on the main rows only."""
        if not self.expanded or hidden.shape[0] != self.rows * (1 + len(self.branches)):
            return None
        self.branch_hidden = [hidden[self.rows * (k + 1) : self.rows * (k + 2), -1] for k in range(len(self.branches))]
        return hidden[: self.rows]

    def reorder(self, beam_idx: torch.Tensor) -> torch.Tensor:
        """`beam_idx` over the main rows -> the same permutation over all rows."""
        if self.phase != "cached" or not self.branches:
            return beam_idx
        return torch.cat([beam_idx + k * self.rows for k in range(1 + len(self.branches))])

    def strip(self, result: Any) -> Any:
        """Drop the branch rows (and any left padding added for them) from a returned cache."""
        cache = getattr(result, "past_key_values", None)
        if cache is None or self.phase != "cached" or not self.branches:
            return result
        main = torch.arange(self.rows, device=cache.layers[0].keys.device)
        for layer in cache.layers:
            layer.batch_select_indices(main)
            if self.main_pad and not isinstance(layer, CompactLayer):
                layer.keys, layer.values = layer.keys[:, :, self.main_pad :], layer.values[:, :, self.main_pad :]
        return result

    # ----------------------------------------------------------------- forward hooks
    def before_forward(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """Pre-hook: note the main prefill's shape; at cached decoding steps, append the branch rows."""
        if self.nested:
            return None
        if self.layers:
            kwargs["output_hidden_states"] = True
        if self.phase == "prefill":
            if kwargs.get("input_ids") is None:
                raise ConfigError(f"{self.method.name} needs input_ids; generate() from inputs_embeds is not supported")
            self.rows, self.prompt_length = kwargs["input_ids"].shape
            self.prompt_mask = kwargs.get("attention_mask")
        elif self.phase == "cached" and self.branches:
            self._append_branch_rows(kwargs)
        return kwargs

    def after_forward(self, kwargs: dict[str, Any], outputs: Any) -> Any:
        """Post-hook: run or split off the branches, compute early-exit logits, leave the step for the processor."""
        if self.nested:
            return None
        self.expanded = False
        step = Step(self.generated, context=self.context)
        hidden = [outputs.hidden_states] if self.layers else []  # per row group: main, then each branch
        if self.phase == "prefill":
            self.phase = "cached" if outputs.past_key_values is not None else "recompute"
            if self.calls:
                self._run_nested(self._prepare_branches)
            if self.phase == "cached" and self.branches:
                self._run_nested(lambda: self._prefill_branches(outputs.past_key_values, step, hidden))
        elif self.phase == "cached" and self.branches:
            step.branch_hidden, self.branch_hidden = self.branch_hidden, []
        if self.phase == "recompute" and self.branches:
            self._run_nested(lambda: self._recompute_branches(kwargs["input_ids"], step, hidden))
        if self.layers:
            step.layer_logits = self._layer_logits(hidden)
        self._trim_outputs(outputs)
        self.pending = step
        return outputs

    # ----------------------------------------------------------------- branches
    def _run_nested(self, function) -> None:
        self.nested = True
        try:
            with torch.no_grad():
                function()
        finally:
            self.nested = False

    def _prepare_branches(self) -> None:
        """Each branch's prompt inputs, prepared as generate() prepares the main rows'."""
        model, adapter = self.model, self.adapter
        for call in self.calls:
            kwargs = dict(call.kwargs)
            input_ids = kwargs.pop("input_ids")
            mask = call.attention_mask
            kwargs["attention_mask"] = mask
            encoded: dict = {}
            with self.state.branch_scope(encoded, prune=self.method.prune_branches):
                # Qwen2-VL's position helper caches its M-RoPE deltas on the model: keep the main call's
                deltas = adapter.rope_deltas
                kwargs["position_ids"] = model._prepare_position_ids_for_generation(input_ids, {**kwargs, "input_ids": input_ids})
                adapter.rope_deltas = deltas
                if bool(mask.all()):
                    kwargs["attention_mask"] = None  # as generate() does: no padding, no mask
                visual = any(key not in ("attention_mask", "position_ids", *TOKEN_KEYS) for key in kwargs)
                if visual and model._supports_mm_encoder_outputs():
                    kwargs = model._prepare_multimodal_encoder_kwargs_for_generation(kwargs)
                input_ids, kwargs = model._expand_inputs_for_generation(
                    expand_size=self.expand, input_ids=input_ids, **kwargs
                )
            positions = kwargs.pop("position_ids")
            self.branches.append(
                _Branch({"input_ids": input_ids, **kwargs}, mask.repeat_interleave(self.expand, dim=0), positions, encoded)
            )

    def _forward(self, branch: _Branch, **inputs: Any):
        with self.state.branch_scope(branch.encoded, prune=self.method.prune_branches):
            return self.model(
                **inputs,
                logits_to_keep=1,
                return_dict=True,
                output_hidden_states=bool(self.layers),
            )

    def _prefill_branches(self, cache, step: Step, hidden: list) -> None:
        caches = []
        for branch in self.branches:
            out = self._forward(branch, **branch.inputs, position_ids=branch.positions, use_cache=True)
            step.branch_logits.append(out.logits[:, -1].float())
            caches.append(out.past_key_values)
            if self.layers:
                hidden.append(out.hidden_states)
            branch.next = branch.positions[..., -1:] + 1  # as generate() steps position ids
        self._merge_caches(cache, caches)

    def _recompute_branches(self, input_ids: torch.Tensor, step: Step, hidden: list) -> None:
        """No cache: each branch runs its prompt plus everything generated so far."""
        suffix = input_ids[:, self.prompt_length :]
        count = suffix.shape[1]
        for branch in self.branches:
            inputs = dict(branch.inputs)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], suffix], dim=1)
            mask = torch.cat([branch.mask, branch.mask.new_ones(branch.mask.shape[0], count)], dim=1)
            inputs["attention_mask"] = None if bool(mask.all()) else mask
            for key in TOKEN_KEYS:
                if inputs.get(key) is not None:
                    inputs[key] = torch.cat([inputs[key], inputs[key].new_zeros(suffix.shape)], dim=1)
            steps = torch.arange(1, count + 1, device=branch.positions.device)
            positions = torch.cat([branch.positions, branch.positions[..., -1:] + steps], dim=-1)
            out = self._forward(branch, **inputs, position_ids=positions, use_cache=False)
            step.branch_logits.append(out.logits[:, -1].float())
            if self.layers:
                hidden.append(out.hidden_states)

    def _merge_caches(self, cache, branch_caches: list) -> None:
        """Append each branch cache's rows to the main cache, left-padding to a common length."""
        main_mask = self.prompt_mask
        if main_mask is None:
            main_mask = torch.ones(self.rows, self.prompt_length, dtype=torch.long, device=self.branches[0].mask.device)
        masks = [main_mask, *(branch.mask for branch in self.branches)]
        self.compact = any(isinstance(layer, CompactLayer) for c in (cache, *branch_caches) for layer in c.layers)
        if not isinstance(cache, DynamicCache):
            raise ConfigError(f"decoding branches need a DynamicCache (the default of generate()), got {type(cache).__name__}")
        # plain layers of one row group, kind and length share a layout
        converted: dict[tuple[int, type, int], SlotLayout] = {}
        joined: dict[tuple[SlotLayout, ...], SlotLayout] = {}  # layers whose parts shared layouts keep sharing one

        def as_compact(row_group: int, layer) -> CompactLayer:
            if isinstance(layer, CompactLayer):
                return layer
            if isinstance(layer, DynamicSlidingWindowLayer):
                compact = CompactSlidingLayer.from_sliding(layer, masks[row_group])
            else:
                compact = CompactLayer.from_layer(layer, masks[row_group])
            compact.layout = converted.setdefault((row_group, type(compact), compact.physical_length), compact.layout)
            return compact

        for index in range(len(cache.layers)):
            parts = [cache.layers[index], *(c.layers[index] for c in branch_caches)]
            if any(type(part) not in (DynamicLayer, DynamicSlidingWindowLayer) and not isinstance(part, CompactLayer)
                   for part in parts):
                raise ConfigError("decoding branches support full-attention and sliding-window DynamicCache layers only")
            if len({isinstance(part, (DynamicSlidingWindowLayer, CompactSlidingLayer)) for part in parts}) > 1:
                raise ConfigError(f"decoding branches: layer {index} is a sliding-window layer in some rows' caches only")
            if self.compact:
                parts = [as_compact(row_group, part) for row_group, part in enumerate(parts)]
            length = max(p.keys.shape[-2] for p in parts)
            merged = parts[0]
            merged.keys = torch.cat([_pad_left(p.keys, length, dim=-2) for p in parts])
            merged.values = torch.cat([_pad_left(p.values, length, dim=-2) for p in parts])
            if isinstance(merged, DynamicSlidingWindowLayer):
                # each row's window holds its last tokens, right-aligned as the left-padded rows' masks are; the
                # merged layer counts the common (padded) length
                merged.cumulative_length = max(p.cumulative_length for p in parts)
            if self.compact:
                key = tuple(p.layout for p in parts)
                if key not in joined:
                    visual = [p.layout.visual for p in parts]
                    joined[key] = SlotLayout(
                        torch.cat([_pad_left(p.layout.valid, length, dim=-1) for p in parts]),
                        torch.cat([_pad_left(p.layout.slot, length, dim=-1, value=-1) for p in parts]),
                        torch.cat([p.layout.shift for p in parts]),
                        None if any(v is None for v in visual) else [row for rows in visual for row in rows],
                    )
                merged.layout = joined[key]
            cache.layers[index] = merged
        if not self.compact:
            length = max(m.shape[1] for m in masks)
            self.main_pad = length - masks[0].shape[1]
            self.mask = torch.cat([_pad_left(m, length, dim=-1) for m in masks])
            self.padded = not bool(self.mask.all())

    def _append_branch_rows(self, kwargs: dict[str, Any]) -> None:
        """Decoding step: the branch rows join the main rows' forward."""
        rows, copies = self.rows, 1 + len(self.branches)
        ids = kwargs["input_ids"]
        kwargs["input_ids"] = ids.repeat(copies, 1)
        positions = kwargs.get("position_ids")
        if positions is None:
            raise ConfigError(f"{self.method.name}: generate() passed no position ids; decoding branches need them")
        batch_dim = positions.ndim - 2
        kwargs["position_ids"] = torch.cat([positions, *(b.next for b in self.branches)], dim=batch_dim)
        for branch in self.branches:
            branch.next = branch.next + 1
        if self.compact:  # compacted layers keep per-slot validity: the mask only marks the new token valid
            mask = kwargs.get("attention_mask")
            kwargs["attention_mask"] = None if mask is None else mask.new_ones(rows * copies, mask.shape[1])
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], ids.shape[1])], dim=1)
            kwargs["attention_mask"] = self.mask if self.padded else None
        for key, value in kwargs.items():
            if key not in ("input_ids", "position_ids", "attention_mask") and torch.is_tensor(value) and value.ndim and value.shape[0] == rows:
                kwargs[key] = value.repeat(copies, *([1] * (value.ndim - 1)))
        self.expanded = True

    def _layer_logits(self, hidden: list[tuple[torch.Tensor, ...]]) -> dict[int, torch.Tensor]:
        head, norm = self.model.get_output_embeddings(), self.adapter.final_norm
        final = len(hidden[0]) - 1  # hidden_states[-1] already went through the final norm
        logits = {}
        for layer in self.layers:
            last = torch.cat([states[layer][:, -1] for states in hidden])
            logits[layer] = head(last if layer == final else norm(last)).float()
        return logits

    def _trim_outputs(self, outputs: Any) -> None:
        """Keep only the main rows in what generate() may return; drop what it did not ask for."""
        rows = self.rows
        if getattr(outputs, "hidden_states", None) is not None:
            outputs.hidden_states = tuple(h[:rows] for h in outputs.hidden_states) if self.keep_hidden else None
        if getattr(outputs, "attentions", None) is not None and self.keep_attentions:
            outputs.attentions = tuple(a[:rows] for a in outputs.attentions)


def _pad_left(tensor: torch.Tensor, length: int, dim: int, value: int = 0) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_full(shape, value), tensor], dim=dim)


def install(patch: "Patch", method: "DecodeMethod") -> None:
    """Install `method`'s branches on `patch.model` (this instance only), recording every undo action."""
    model = patch.model
    holder: dict[str, DecodeSession | None] = {"session": None}
    original_generate = model.generate
    signature = inspect.signature(GenerationMixin.generate)
    forward_parameters = set(inspect.signature(model.forward).parameters) - _CONTROL_KEYS
    text_config = patch.adapter.text_config

    @functools.wraps(original_generate)
    def generate(*args, **kwargs):
        if holder["session"] is not None:
            raise ConfigError(f"{method.name}: generate() is already running on this model (re-entrant call)")
        call = _call_inputs(patch, signature, forward_parameters, text_config, args, kwargs)
        holder["session"] = session = DecodeSession(patch, method, call)
        try:
            return session.strip(original_generate(*args, **kwargs))
        finally:
            holder["session"] = None

    original_processors = model._get_logits_processor

    @functools.wraps(original_processors)
    def get_logits_processor(*args, **kwargs):
        processors = original_processors(*args, **kwargs)
        session = holder["session"]
        if session is not None:
            bound = inspect.signature(original_processors).bind(*args, **kwargs)
            processors.insert(0, session.start(bound.arguments["generation_config"]))
        return processors

    def reorder_cache(cache, beam_idx):
        session = holder["session"]
        cache.reorder_cache(beam_idx if session is None else session.reorder(beam_idx))
        return cache

    def lm_head_hook(module, args):
        session = holder["session"]
        hidden = None if session is None else session.split_lm_head_input(args[0])
        return None if hidden is None else (hidden, *args[1:])

    def pre_hook(module, args, kwargs):
        session = holder["session"]
        if session is None or args:  # generate() calls the model with keyword arguments only
            return None
        kwargs = session.before_forward(kwargs)
        return None if kwargs is None else (args, kwargs)

    def post_hook(module, args, kwargs, outputs):
        session = holder["session"]
        return None if session is None or args else session.after_forward(kwargs, outputs)

    name = method.name
    patch._set_instance_attr(f"{name}:logits:generate", model, "generate", generate)
    patch._set_instance_attr(f"{name}:logits:processors", model, "_get_logits_processor", get_logits_processor)
    patch._set_instance_attr(f"{name}:logits:reorder", model, "_reorder_cache", reorder_cache)
    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    patch._record(f"{name}:logits:rows", handle.remove)
    handle = model.register_forward_hook(post_hook, with_kwargs=True)
    patch._record(f"{name}:logits:split", handle.remove)
    handle = model.get_output_embeddings().register_forward_pre_hook(lm_head_hook)
    patch._record(f"{name}:logits:lm_head", handle.remove)


def _call_inputs(patch: "Patch", signature, forward_parameters, text_config, args, kwargs) -> CallInputs:
    bound = signature.bind(patch.model, *args, **kwargs).arguments
    extra = bound.get("kwargs", {})
    inputs = {key: value for key, value in extra.items() if key in forward_parameters and value is not None}
    if bound.get("inputs") is not None:
        inputs["input_ids"] = bound["inputs"]
    if inputs.get("input_ids") is None:
        raise ConfigError("decoding methods need input_ids (or inputs=) in generate(); inputs_embeds are not supported")
    if "position_ids" in inputs:
        raise ConfigError("decoding methods compute each branch's positions; do not pass position_ids to generate()")
    pad = text_config.pad_token_id
    if pad is None:
        eos = text_config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0)
    return CallInputs(
        inputs,
        patch.adapter.placeholder_ids(),
        int(pad),
        text_config.bos_token_id,
        extra.get("tokenizer"),
        getattr(patch.model.config, "vision_config", None),
        str(getattr(patch.model, "name_or_path", "") or ""),
    )


@functools.lru_cache(maxsize=8)
def _saved_tokenizer(path: str):
    """The tokenizer saved in a local checkpoint folder, or None."""
    if not path or not Path(path, "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
