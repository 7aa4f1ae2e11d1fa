"""The text-stack runner: the one place where token selections become shorter sequences.

It replaces the `forward` of one text model *instance* (Llama, Qwen2, Qwen2-VL text) while a patch
is applied and runs the same decoder layers, with the same masks and rotary embeddings, over a
token stream that can shrink before any layer:

* before layer 0 for pre-LLM methods (sites "vision", "embeds"), before layer K for in-LLM methods
  (site "layer", FastV);
* every sample of a padded batch keeps its own tokens; the stream is re-padded on the left so that
  the newest token stays last;
* positions follow the method's policy (`keep` the original ids, or `reindex` the kept sequence);
* each layer's KV cache holds only what that layer saw (`CompactLayer`), so decoding attends to the
  kept tokens with no double cache and no recomputation;
* hidden states of dropped tokens ride the residual: the returned `last_hidden_state` has the
  caller's layout, each dropped token carrying the state it had when it left.

Scores for in-LLM selection are computed from the one query row needed (the last token) against
that layer's keys, whatever the attention implementation (no eager attention, no layer run twice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.output_capturing import capture_outputs

from vlmkit import kernels
from vlmkit.engine.cache import CompactLayer
from vlmkit.engine.selection import Selection, SelectionContext, VisualTokens
from vlmkit.errors import ConfigError, InputError

if TYPE_CHECKING:
    from vlmkit.adapters.base import Adapter
    from vlmkit.engine.state import EngineState
    from vlmkit.methods.base import TokenSelector


@dataclass
class Stream:
    """The tokens flowing through the decoder at one point of a call.

    Attributes:
        hidden: (B, L, D) hidden states.
        valid: (B, L) bool, False on padding.
        slot: (B, L) long, each token's position in the caller's layout (for scattering back).
        positions: rotary position ids, (B, L) or (3, B, L) for M-RoPE.
        layer_positions: what decoder layers receive as `position_ids` (Qwen2-VL: the text row).
        visual: per sample, its remaining visual tokens (slots refer to this stream).
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    slot: torch.Tensor
    positions: torch.Tensor
    layer_positions: torch.Tensor | None
    visual: list[VisualTokens] | None


class TextStackRunner:
    """Runs the decoder stack of one model instance with the selectors of one patch."""

    def __init__(self, adapter: "Adapter", state: "EngineState", selectors: list["TokenSelector"]):
        self.adapter = adapter
        self.state = state
        self.num_layers = len(adapter.decoder_layers)
        self.selectors: dict[int, TokenSelector] = {}
        for selector in selectors:
            layer = selector.compaction_layer(self.num_layers)
            if not 0 <= layer < self.num_layers:
                raise ConfigError(
                    f"{selector.name}: layer={layer} is out of range for a language model with "
                    f"{self.num_layers} decoder layers (valid: 0..{self.num_layers - 1})"
                )
            selector.position_policy(adapter.mrope)  # raises for an undefined policy, before any mutation
            self.selectors[layer] = selector
        self.probe_layers = {
            layer - 1 for layer, s in self.selectors.items() if "last_row_attention" in s.needs and layer > 0
        }
        if any("last_row_attention" in s.needs for layer, s in self.selectors.items() if layer == 0):
            raise ConfigError("last-token attention needs a layer before the selection: use layer >= 1")
        self.original_forward = type(adapter.text_model).forward

    # ------------------------------------------------------------------ entry point
    def bind(self):
        """The function installed as the text model instance's `forward`."""
        runner = self

        @capture_outputs
        def forward(
            text_model,
            input_ids: torch.LongTensor | None = None,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.LongTensor | None = None,
            past_key_values=None,
            inputs_embeds: torch.Tensor | None = None,
            use_cache: bool | None = None,
            **kwargs: Any,
        ) -> BaseModelOutputWithPast:
            return runner.run(
                text_model, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, kwargs
            )

        forward.__wrapped__ = self.original_forward  # keeps `inspect.signature` of the original
        return forward.__get__(self.adapter.text_model)

    def run(self, text_model, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = text_model.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        use_cache = text_model.config.use_cache if use_cache is None else use_cache
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ConfigError("token pruning needs a 2-D attention mask (batch, length), not a prepared 4-D mask")

        visual = self.state.take_visual_tokens(batch, length, inputs_embeds.device)
        compacted_cache = past_key_values is not None and any(
            isinstance(layer, CompactLayer) for layer in getattr(past_key_values, "layers", [])
        )
        if visual is None and not compacted_cache:
            return self._original(text_model, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, kwargs)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=text_model.config)
        logical_past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_key_values is not None:
            self._compact_cache_layers(past_key_values, attention_mask)
        if visual is not None and logical_past > 0:
            # Images in a continued conversation are kept whole: the cached prefix was laid out already.
            visual = None

        positions, layer_positions = self.adapter.split_positions(position_ids, batch, length, logical_past, inputs_embeds.device)
        query_valid = (
            attention_mask[:, -length:].to(torch.bool)
            if attention_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device)
        )
        stream = Stream(
            hidden=inputs_embeds,
            valid=query_valid,
            slot=torch.arange(length, device=inputs_embeds.device).expand(batch, length),
            positions=positions,
            layer_positions=layer_positions,
            visual=visual,
        )
        if visual is not None:
            self.state.selections = {}
        full = None  # caller-layout buffer where dropped tokens are frozen
        masks: dict[Any, Any] = {}
        validity: dict[int, torch.Tensor] = {}
        rotary = None
        shift = torch.zeros(batch, dtype=torch.long, device=inputs_embeds.device)
        no_shift = shift
        probe = None
        last_row = None

        for index, layer in enumerate(self.adapter.decoder_layers):
            selector = self.selectors.get(index)
            if selector is not None and stream.visual is not None:
                selection = self._select(selector, stream, index, last_row)
                if full is None:
                    full = stream.hidden.clone()
                stream, dropped_shift = self._apply(selector, selection, stream, full)
                shift = shift + dropped_shift
                rotary, masks, validity = None, {}, {}
            layer_shift = self._incoming_shift(past_key_values, index, no_shift)
            if rotary is None or not (rotary[0] is layer_shift or torch.equal(rotary[0], layer_shift)):
                rope_positions = self._shifted(stream.positions, layer_shift)
                rotary = (layer_shift, text_model.rotary_emb(stream.hidden, rope_positions))
            kv_valid, physical_past = self._kv_validity(past_key_values, index, stream.valid, validity)
            mask_key = (physical_past, id(kv_valid))
            if mask_key not in masks:
                masks[mask_key] = self._mask(text_model, stream.hidden, kv_valid, physical_past)
            if index in self.probe_layers and stream.visual is not None:
                probe = self.adapter.probe_projections(layer, stream.hidden, rotary[1], keys=past_key_values is None)
            stream.hidden = layer(
                stream.hidden,
                attention_mask=masks[mask_key],
                position_embeddings=rotary[1],
                position_ids=self._shifted(stream.layer_positions, layer_shift),
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
            if index in self.probe_layers and stream.visual is not None:
                last_row = self._last_row_attention(layer, index, probe, stream, kv_valid, past_key_values)
            if past_key_values is not None:
                past_key_values.layers[index].record(kv_valid, length, shift + layer_shift)

        hidden = stream.hidden
        if full is not None:
            rows = torch.arange(batch, device=hidden.device)[:, None].expand_as(stream.slot)
            full[rows[stream.valid], stream.slot[stream.valid]] = hidden[stream.valid]
            hidden = full
        return BaseModelOutputWithPast(last_hidden_state=text_model.norm(hidden), past_key_values=past_key_values)

    # ------------------------------------------------------------------ pieces
    def _original(self, text_model, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, kwargs):
        forward = self.original_forward
        while hasattr(forward, "__wrapped__"):  # skip the output-capturing wrapper: ours already runs
            forward = forward.__wrapped__
        return forward(
            text_model,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

    def _compact_cache_layers(self, cache, attention_mask) -> None:
        if not isinstance(cache, DynamicCache):
            raise ConfigError(
                f"token pruning needs a DynamicCache (the default of generate()), got {type(cache).__name__}"
            )
        while len(cache.layers) < self.num_layers:
            cache.layers.append(CompactLayer())
        for index, layer in enumerate(cache.layers[: self.num_layers]):
            if isinstance(layer, CompactLayer):
                continue
            if type(layer) is not DynamicLayer:
                raise ConfigError(
                    f"token pruning supports full-attention cache layers only; layer {index} is {type(layer).__name__}"
                )
            cache.layers[index] = CompactLayer.from_layer(layer, attention_mask)

    @staticmethod
    def _incoming_shift(cache, index: int, zero: torch.Tensor) -> torch.Tensor:
        """What layer `index` subtracts from the caller's positions of this call's tokens.

        Positions of tokens compacted in this call are rewritten by the compaction itself; tokens that
        arrive later (decoding) carry caller-layout positions and get the shift the layer recorded.
        """
        if cache is not None and cache.layers[index].position_shift is not None:
            return cache.layers[index].position_shift
        return zero

    @staticmethod
    def _shifted(positions: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor | None:
        if positions is None or not bool(shift.any()):
            return positions
        return positions - shift.view(-1, 1)

    @staticmethod
    def _kv_validity(cache, index: int, query_valid: torch.Tensor, shared: dict) -> tuple[torch.Tensor, int]:
        """Validity of the keys layer `index` attends to, and its cached (physical) length.

        Layers that cached the same slots share one tensor (and so one mask), via `shared`.
        """
        if cache is None or cache.layers[index].valid is None:
            return query_valid, 0
        layer = cache.layers[index]
        key = id(layer.valid)
        if key not in shared:
            shared[key] = torch.cat([layer.valid, query_valid], dim=1)
        return shared[key], layer.physical_length

    @staticmethod
    def _mask(text_model, hidden: torch.Tensor, kv_valid: torch.Tensor, physical_past: int):
        """The 4-D causal + padding mask, built exactly as `create_causal_mask` would for this layer."""
        config = text_model.config
        implementation = config._attn_implementation
        if implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise ConfigError(f"attention implementation {implementation!r} has no registered mask function")
        return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
            batch_size=hidden.shape[0],
            q_length=hidden.shape[1],
            kv_length=kv_valid.shape[1],
            q_offset=physical_past,
            kv_offset=0,
            mask_function=causal_mask_function,
            attention_mask=kv_valid,
            allow_is_causal_skip=True,
            dtype=hidden.dtype,
            config=config,
            use_vmap=False,
            device=hidden.device,
        )

    def _last_row_attention(self, layer, index, probe, stream, kv_valid, cache):
        """Per sample, the attention the last token pays to each visual token (mean over heads).

        The query row is projected from the layer's input; the keys are the layer's own cached keys
        (or, without a cache, projected once from the same input).
        """
        attention = self.adapter.attention_module(layer)
        query, keys = probe
        if cache is not None:
            keys = cache.layers[index].keys
        scores = kernels.attention_rows(
            query,
            keys,
            scale=attention.scaling,
            kv_mask=kv_valid,
            num_kv_groups=attention.num_key_value_groups,
            reduce="mean",
        )[:, 0, -stream.hidden.shape[1] :]
        return [scores[row, visual.slots] for row, visual in enumerate(stream.visual)]

    def _select(self, selector, stream: Stream, layer: int, last_row) -> Selection:
        if self.state.reuse:
            if layer not in self.state.recorded:
                raise ConfigError("reuse_selections(): no recorded selection for this layer; run a prefill first")
            return self.state.recorded[layer]
        context = SelectionContext(
            hidden=stream.hidden,
            visual=stream.visual,
            layer=layer,
            num_layers=self.num_layers,
            last_row_attention=last_row,
            vision=[v.probes for v in stream.visual],
            call_index=self.state.calls.get(selector.name, 0),
        )
        selection = selector.select(context)
        self.state.calls[selector.name] = context.call_index + 1
        if len(selection.samples) != len(stream.visual):
            raise InputError(f"{selector.name} returned {len(selection.samples)} selections for {len(stream.visual)} samples")
        for sample, visual in zip(selection.samples, stream.visual):
            sample.validate(len(visual), selector.name)
        self.state.recorded[layer] = selection
        return selection

    def _apply(self, selector, selection: Selection, stream: Stream, full: torch.Tensor):
        """Shrink the stream to the selection; freeze dropped tokens into `full`. Returns (stream, shift)."""
        batch, length = stream.valid.shape
        hidden = stream.hidden
        keep = stream.valid.clone()
        merged_hidden = None
        new_visual = []
        for row, (sample, visual) in enumerate(zip(selection.samples, stream.visual)):
            keep[row, visual.slots] = False
            kept_slots = visual.slots[sample.keep]
            keep[row, kept_slots] = True
            if sample.merge_target is not None:
                merged, _ = kernels.merge_tokens(
                    hidden[row, visual.slots][None],
                    sample.merge_target[None],
                    None if sample.merge_weight is None else sample.merge_weight[None],
                    num_targets=int(sample.keep.numel()),
                )
                if merged_hidden is None:
                    merged_hidden = hidden.clone()
                merged_hidden[row, kept_slots] = merged[0].to(hidden.dtype)
            new_visual.append(visual.subset(sample.keep))
            self.state.selections.setdefault(selector.name, []).append(visual.origin[sample.keep].cpu())

        rows = torch.arange(batch, device=hidden.device)[:, None].expand(batch, length)
        dropped = stream.valid & ~keep
        full[rows[dropped], stream.slot[dropped]] = hidden[dropped]
        if merged_hidden is not None:
            hidden = merged_hidden

        counts = keep.sum(dim=1)
        new_length = int(counts.max())
        pad = new_length - counts
        rank = keep.long().cumsum(dim=1) - 1 + pad[:, None]
        old_slot = torch.arange(length, device=hidden.device).expand(batch, length)
        gather = torch.zeros(batch, new_length, dtype=torch.long, device=hidden.device)
        gather[rows[keep], rank[keep]] = old_slot[keep]
        new_valid = torch.arange(new_length, device=hidden.device)[None, :] >= pad[:, None]
        # where each kept token of the old stream sits in the new one (-1: left the stream)
        new_slot_of_old = torch.full((batch, length), -1, dtype=torch.long, device=hidden.device)
        new_slot_of_old[rows[keep], old_slot[keep]] = rank[keep]

        def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            if tensor.ndim == 3 and tensor.shape[1] == batch and tensor.shape[-1] == length:  # (3, B, L) M-RoPE
                return tensor.gather(2, gather[None].expand(tensor.shape[0], -1, -1))
            expanded = tensor.expand(batch, length) if tensor.shape[0] == 1 else tensor
            return expanded.gather(1, gather)

        new_hidden = hidden.gather(1, gather[..., None].expand(-1, -1, hidden.shape[-1]))
        positions, layer_positions = take(stream.positions), take(stream.layer_positions)
        shift = torch.zeros(batch, dtype=torch.long, device=hidden.device)
        if selector.position_policy(self.adapter.mrope) == "reindex":
            reindexed = (new_valid.long().cumsum(dim=1) - 1).clamp(min=0)
            last_before, last_after = positions[:, -1], reindexed[:, -1]
            shift = last_before - last_after
            positions = reindexed
            layer_positions = reindexed if layer_positions is not None else None
        for row, visual in enumerate(new_visual):
            visual.slots = new_slot_of_old[row, visual.slots]
        new_stream = Stream(
            hidden=new_hidden,
            valid=new_valid,
            slot=stream.slot.gather(1, gather),
            positions=positions,
            layer_positions=layer_positions,
            visual=new_visual,
        )
        return new_stream, shift
