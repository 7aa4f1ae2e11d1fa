"""The text-stack runner: the one place where selections, routes, positions, masks and cache edits
become a decoder pass.

While a patch has a method at a stack site (`embeds`, `layer`, `route`, `position`, `attention`,
`cache`), it replaces the `forward` of the text model *instance* and runs the same decoder layers,
through the adapter, for every call a site acts on (a prefill with visual tokens, and every later
call on the cache it built); other calls go to the stock forward:

* selections (sites `embeds`, `layer`) shrink the token stream before a layer; every sample of a
  padded batch keeps its own tokens and is re-padded on the left so that the newest token stays
  last; hidden states of dropped tokens ride the residual: the returned `last_hidden_state` has the
  caller's layout, each dropped token carrying the state it had when it left;
* routes (site `route`) run a subset of the visual tokens through one layer: "skip" gathers the
  running tokens into a shorter stream for that layer only (the others write no KV there), "freeze"
  computes every key and value but queries, attention and MLP for the running tokens only;
* positions follow the selection's policy (`keep` the original ids, or `reindex` the kept
  sequence) or a position method; decoding continues from the recorded shift;
* masks come from the adapter, per distinct key layout and layer kind, combined with an attention
  method's mask; where the adapter gives bidirectional blocks (Gemma 3: each image's placeholders, from
  the base model's `token_type_ids`), a query in a block also sees every key of it still in the stream,
  so the kept tokens of one image keep seeing each other after pruning; a sliding-window layer
  (`Adapter.layer_window`) sees the keys less than the window back in the caller's positions, and so
  do the attention scores read from it (a pruned token leaves a hole in the window, no older token
  enters it: at neutral settings this is the model's own window, and it moves with neither `reindex`
  nor position methods); rotary tables are built per layer kind (Gemma 3's local and global bases); a
  text model that receives its masks prepared per layer kind gets the engine's own, from the 2-D mask
  the base model received;
* DeepStack (Qwen3-VL: visual features of intermediate vision layers added to the visual tokens'
  hidden states after the first decoder layers) follows the stream: after each such layer every
  visual token still in it gets its own features at its current row (pruned tokens get none, routed
  and skipped tokens get theirs, as the addition is to the residual stream, not the layer's work),
  and a kept token that a selection merges from others gets the same combination of their features;
* each layer's KV cache holds only what that layer saw (`CompactLayer` with its `SlotLayout`; a
  sliding-window layer's `CompactSlidingLayer` drops, after each call, what no later query can see), so
  decoding attends to the kept tokens with no double cache and no recomputation; a cache method
  edits it after the prefill and after each step, by slot or per KV head (`HeadEdit`: each head
  keeps its own entries, merged ones rewritten), reading each slot's accumulated attention per head
  when it needs it (one extra query-key pass per layer, whatever the attention implementation).

Scores for in-LLM selection and routing are computed from the one query row needed (the last token)
against that layer's keys, whatever the attention implementation (no eager attention, no layer run
twice). The engine also counts what ran: LLM FLOPs per sample of each prefill and the KV bytes it
left in the cache (`EngineState.cost`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import and_masks
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.output_capturing import capture_outputs

from vlmkit import kernels
from vlmkit.engine.cache import CompactLayer, CompactSlidingLayer, SlotLayout, pack
from vlmkit.engine.contexts import AttentionContext, CacheContext, GateContext, HeadEdit, PositionContext, RouteContext
from vlmkit.engine.heads import HeadReplay, apply_head_edit
from vlmkit.engine.selection import ATTENTION_NEEDS, SelectionContext, VisualTokens
from vlmkit.errors import ConfigError, InputError

if TYPE_CHECKING:
    from vlmkit.adapters.base import Adapter
    from vlmkit.engine.install import Plan
    from vlmkit.engine.state import EngineState


@dataclass
class Stream:
    """The tokens flowing through the decoder at one point of a call.

    Attributes:
        hidden: (B, L, D) hidden states.
        valid: (B, L) bool, False on padding.
        slot: (B, L) long, each token's position in the caller's layout (for scattering back).
        positions: rotary position ids, (B, L) or (3, B, L) for M-RoPE (float for position methods).
        layer_positions: what decoder layers receive as `position_ids` (Qwen2-VL: the text row).
        visual: per sample, its remaining visual tokens (slots refer to this stream).
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    slot: torch.Tensor
    positions: torch.Tensor
    layer_positions: torch.Tensor | None
    visual: list[VisualTokens] | None
    # built once per stream and position shift: [(shift, value)]
    rotary_tables: list = field(default_factory=list)
    fresh_layouts: list = field(default_factory=list)

    def take(self, tensor: torch.Tensor | None, gather: torch.Tensor) -> torch.Tensor | None:
        """`tensor` (B, L), (k, B, L) or (1, L) gathered along the stream by `gather` (B, L')."""
        if tensor is None:
            return None
        batch, length = self.valid.shape
        if tensor.ndim == 3:
            expanded = tensor.expand(-1, batch, length)
            return expanded.gather(2, gather[None].expand(tensor.shape[0], -1, -1))
        return tensor.expand(batch, length).gather(1, gather)


@dataclass
class Pass:
    """The bookkeeping of one call through the stack."""

    cache: Any
    logical_past: int
    length: int
    prefill: bool
    shift: torch.Tensor  # subtracted from later tokens' positions (recorded in each layer's layout)
    no_shift: torch.Tensor
    masks: dict
    layouts: dict  # a decoding step: old layout -> extended layout (shared by the layers that shared it)
    visual: list[VisualTokens] | None  # the prefill's visual tokens, caller-layout slots
    flops: torch.Tensor  # (B,) float64 LLM FLOPs of this call
    deepstack: Any = None  # the adapter's `DeepStackInputs` of this call, if any
    # (B, S) the bidirectional block of each caller-layout position (-1: none; Gemma 3's images), or None
    blocks: torch.Tensor | None = None
    cache_attention: dict = field(default_factory=dict)  # layer -> (B, S) last token's attention, for the cache method


class TextStackRunner:
    """Runs the decoder stack of one model instance with the stack-site methods of one patch."""

    def __init__(self, adapter: "Adapter", state: "EngineState", plan: "Plan"):
        self.adapter, self.state, self.plan = adapter, state, plan
        self.num_layers = len(adapter.decoder_layers)
        # layer K-1 -> the selector before layer K that reads its attention
        self.probe_layers = {
            layer - 1: s for layer, s in plan.selectors.items()
            if ATTENTION_NEEDS & s.needs and s.attention_layer == "previous" and layer > 0
        }
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
            inputs_embeds = self.adapter.embed(input_ids)
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        use_cache = text_model.config.use_cache if use_cache is None else use_cache
        call_inputs = self.state.take_call_inputs()

        visual = self.state.take_visual_tokens(batch, length, device)
        engine_cache = past_key_values is not None and any(
            isinstance(layer, CompactLayer) for layer in getattr(past_key_values, "layers", [])
        )
        if visual is None and not engine_cache:
            return self._original(text_model, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, kwargs)
        if isinstance(attention_mask, dict):  # masks prepared per layer kind (Gemma 3): the engine builds its own
            if call_inputs is None:
                raise ConfigError("vlmkit's engine needs the 2-D attention mask (batch, length); the text model got "
                                  "prepared masks per layer kind without a call of the multimodal model")
            attention_mask = call_inputs["attention_mask"]
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ConfigError("vlmkit's engine needs a 2-D attention mask (batch, length), not a prepared 4-D mask")

        deepstack = self.adapter.deepstack_inputs(kwargs)  # removed from what the layers receive
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=text_model.config)
        logical_past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_key_values is not None:
            self._compact_cache_layers(past_key_values, attention_mask)
        if visual is not None and logical_past > 0:
            # Images in a continued conversation are kept whole: the cached prefix was laid out already.
            visual = None

        positions, layer_positions = self.adapter.split_positions(position_ids, batch, length, logical_past, device)
        valid = (
            attention_mask[:, -length:].to(torch.bool)
            if attention_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        slot = (torch.arange(length, device=device) + logical_past).expand(batch, length)
        stream = Stream(inputs_embeds, valid, slot, positions, layer_positions, visual)
        if deepstack is not None and visual is not None:
            self._attach_deepstack(deepstack, visual, length)
        zero = torch.zeros(batch, device=device, dtype=positions.dtype)
        run = Pass(
            cache=past_key_values, logical_past=logical_past, length=length, prefill=visual is not None,
            shift=zero, no_shift=zero, masks={}, layouts={}, flops=torch.zeros(batch, dtype=torch.float64, device=device),
            visual=self._caller_visual(stream), deepstack=deepstack,
            blocks=self._blocks(call_inputs, batch, logical_past + length, device),
        )
        if run.prefill:
            self.state.start_prefill(length)
            if self.plan.position is not None:
                self._set_positions(stream, run)
        full = None  # caller-layout buffer where dropped tokens are frozen
        scores: dict = {}  # what the next selector reads from the layer before it
        embeds = inputs_embeds
        previous = None  # the previous layer's input, for routes that read update norms

        for index, layer in enumerate(self.adapter.decoder_layers):
            selector = self.plan.selectors.get(index) if run.prefill else None
            if selector is not None and stream.visual is not None:
                if ATTENTION_NEEDS & selector.needs and selector.attention_layer == "own":
                    rotary = self._rotary(stream, run, index)
                    probe = self.adapter.probe_projections(
                        layer, stream.hidden, rotary, keys=True, all_queries="text_attention" in selector.needs
                    )
                    scores = self._attention_scores(selector, layer, index, probe, stream, stream.valid, None, stream.slot)
                if "embeds" in selector.needs:
                    scores["embeds"] = embeds.gather(1, (stream.slot - logical_past)[..., None].expand(-1, -1, embeds.shape[-1]))
                selection = self._select(selector, stream, index, scores)
                scores = {}
                if full is None:
                    full = stream.hidden.clone()
                stream = self._apply(selector, selection, stream, full, run, index)
            router = self.plan.routers.get(index)
            routes_visual = router is not None and run.prefill and stream.visual is not None
            gates = router is not None and router.gates_tokens and (routes_visual or not run.prefill)
            if routes_visual or gates:
                route = self._route(router, stream, index, layer, run, previous, text_model.training) if routes_visual else None
                gate = self._gate(router, stream, index, layer, run, text_model.training) if gates else None
                layer_input = stream.hidden
                stream.hidden = self._run_routed(route, gate, layer, index, stream, run, kwargs, use_cache)
            else:
                layer_input = stream.hidden
                probe = None
                rotary = self._rotary(stream, run, index)
                last_query = None
                if self._cache_reads_attention(run):
                    last_query, _ = self.adapter.probe_projections(layer, stream.hidden, rotary, keys=False)
                head_query = None
                if self._cache_reads_heads(run):
                    head_query, _ = self.adapter.probe_projections(layer, stream.hidden, rotary, keys=False, all_queries=True)
                reader = self.probe_layers.get(index) if stream.visual is not None else None
                if reader is not None:
                    probe = self.adapter.probe_projections(
                        layer, stream.hidden, rotary, keys=run.cache is None, all_queries="text_attention" in reader.needs
                    )
                layout = self._layout(run, index, stream)
                replay = self._head_replay(run, index, stream)
                if replay is not None:
                    mask = self.adapter.mask(stream.hidden, replay.key_valid(), replay.key_valid().shape[1] - length,
                                             extra=replay.mask_function(), replace_causal=True)
                else:
                    mask = self._mask(run, index, layout, stream.hidden, stream)
                stream.hidden = self.adapter.run_layer(
                    layer,
                    stream.hidden,
                    attention_mask=mask,
                    position_embeddings=rotary,
                    position_ids=self._layer_positions(stream, run, index),
                    past_key_values=run.cache if replay is None else replay,
                    use_cache=use_cache,
                    **kwargs,
                )
                self._count(run, stream.valid.sum(dim=1), stream.valid.sum(dim=1), layout.valid.sum(dim=1))
                if probe is not None:
                    scores = self._attention_scores(reader, layer, index, probe, stream, layout.valid, run.cache, layout.slot)
                if run.cache is not None:
                    run.cache.layers[index].record(layout, length)
                if head_query is not None and (run.prefill or run.cache.layers[index].scores is not None):
                    # scores start at a prefill (a layer routed then has none: its later sums would be partial)
                    run.cache.layers[index].add_scores(
                        self._head_scores(layer, head_query, run.cache.layers[index].keys, stream.valid, layout.valid)
                    )
                if last_query is not None:
                    attention = self.adapter.attention_module(layer)
                    windowed = self._window_keys(index, layout.slot, stream.slot[:, -1:])
                    run.cache_attention[index] = kernels.attention_rows(
                        last_query, run.cache.layers[index].keys, scale=attention.scaling,
                        kv_mask=layout.valid if windowed is None else layout.valid & windowed[:, 0],
                        num_kv_groups=attention.num_key_value_groups, reduce="mean",
                    )[:, 0]
            previous = (layer_input, stream.hidden, stream.visual)
            if run.deepstack is not None and index in run.deepstack.layers:
                stream.hidden = self._add_deepstack(stream, run, run.deepstack.layers.index(index))

        if self._cache_edits(run):
            self._edit_cache(run)
        if run.cache is not None:
            trimmed: dict = {}
            for layer in run.cache.layers[: self.num_layers]:
                if isinstance(layer, CompactSlidingLayer):
                    layer.trim(trimmed)
        if run.prefill:
            self.state.finish_prefill(run.flops, run.cache, self.num_layers)
        hidden = stream.hidden
        if full is not None:
            rows = torch.arange(batch, device=hidden.device)[:, None].expand_as(stream.slot)
            full[rows[stream.valid], stream.slot[stream.valid] - logical_past] = hidden[stream.valid]
            hidden = full
        return BaseModelOutputWithPast(last_hidden_state=self.adapter.final_norm(hidden), past_key_values=run.cache)

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
                f"vlmkit's engine needs a DynamicCache (the default of generate()), got {type(cache).__name__}"
            )
        while len(cache.layers) < self.num_layers:
            window = self.adapter.layer_window(len(cache.layers))
            cache.layers.append(CompactLayer() if window is None else CompactSlidingLayer(window))
        converted: dict[tuple, SlotLayout] = {}  # layers of one kind and length share one layout
        for index, layer in enumerate(cache.layers[: self.num_layers]):
            if isinstance(layer, CompactLayer):
                continue
            if type(layer) is DynamicSlidingWindowLayer:
                compact = CompactSlidingLayer.from_sliding(layer, attention_mask)
            elif type(layer) is DynamicLayer:
                compact = CompactLayer.from_layer(layer, attention_mask)
            else:
                raise ConfigError(
                    f"vlmkit's engine supports full-attention and sliding-window DynamicCache layers only; layer {index} "
                    f"is {type(layer).__name__}"
                )
            if compact.layout is not None:
                kind = (type(compact), compact.physical_length)
                compact.layout = converted.setdefault(kind, compact.layout)
            cache.layers[index] = compact

    @staticmethod
    def _incoming_shift(run: Pass, index: int) -> torch.Tensor:
        """What layer `index` subtracts from the stream's positions of this call's tokens.

        A prefill's positions are final (compactions and position methods rewrite them: the shift
        they leave for later tokens is `run.shift`, recorded in each layer's layout); tokens that
        arrive later (decoding) carry caller-layout positions and get the shift the layer recorded.
        """
        if not run.prefill and run.cache is not None and run.cache.layers[index].layout is not None:
            return run.cache.layers[index].layout.shift
        return run.no_shift

    @staticmethod
    def _shifted(positions: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor | None:
        if positions is None or not bool(shift.any()):
            return positions
        return positions - shift[..., None]

    def _layer_positions(self, stream: Stream, run: Pass, index: int) -> torch.Tensor | None:
        """What the layer receives as `position_ids` (1-D: the rotary positions; M-RoPE: the text row)."""
        return self._shifted(stream.layer_positions, self._incoming_shift(run, index))

    def _rotary(self, stream: Stream, run: Pass, index: int):
        """Rotary tables of the stream's positions for layer `index`, built once per distinct shift and
        layer kind (Gemma 3's sliding and global layers have their own bases)."""
        shift = self._incoming_shift(run, index)
        kind = self.adapter.layer_type(index)
        for known, known_kind, rotary in stream.rotary_tables:
            if known_kind == kind and torch.equal(known, shift):
                return rotary
        rotary = self.adapter.rotary(stream.hidden, self._shifted(stream.positions, shift), kind)
        stream.rotary_tables.append((shift, kind, rotary))
        return rotary

    def _blocks(self, call_inputs: dict | None, batch: int, total: int, device) -> torch.Tensor | None:
        """(B, total) the bidirectional block of each caller-layout position of the call (-1: none), from
        the adapter's blocks of the call's last tokens, or None where every token is causal."""
        blocks = None if call_inputs is None else self.adapter.bidirectional_blocks(call_inputs)
        if blocks is None or not bool((blocks >= 0).any()):
            return None
        blocks = blocks.to(device)[:, -total:]
        if blocks.shape[0] != batch:
            return None
        return torch.cat([torch.full((batch, total - blocks.shape[1]), -1, dtype=blocks.dtype, device=device), blocks], dim=1)

    @staticmethod
    def _block_of(blocks: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(B, N) the block of each caller-layout slot (-1 for none, and for slots -1 or past the blocks)."""
        inside = (slots >= 0) & (slots < blocks.shape[1])
        return torch.where(inside, blocks.gather(1, slots.clamp(0, blocks.shape[1] - 1)), torch.full_like(slots, -1))

    def _window_keys(self, index: int, key_slots: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor | None:
        """(B, Q, K) which keys each query's sliding window holds in layer `index` (positions less than the
        window back, in the caller's layout), or None for a full-attention layer."""
        window = self.adapter.layer_window(index)
        if window is None:
            return None
        return query_slots[:, :, None] - key_slots[:, None, :] < window

    def _layout(self, run: Pass, index: int, stream: Stream) -> SlotLayout:
        """The key layout layer `index` attends over: its cached slots plus the stream's tokens.

        Layers whose caches share a layout share the extended one (and so one mask); layers with no
        cache yet share the stream's own layout.
        """
        slot = stream.slot.masked_fill(~stream.valid, -1)
        if run.cache is None or run.cache.layers[index].layout is None:
            for layout in stream.fresh_layouts:
                if torch.equal(layout.shift, run.shift):
                    return layout
            layout = SlotLayout(stream.valid, slot, run.shift, run.visual)
            stream.fresh_layouts.append(layout)
            return layout
        previous = run.cache.layers[index].layout
        if previous not in run.layouts:
            run.layouts[previous] = previous.extended(stream.valid, slot)
        return run.layouts[previous]

    def _mask(self, run: Pass, index: int, layout: SlotLayout, hidden: torch.Tensor, stream: Stream,
              query_rows: torch.Tensor | None = None):
        """The mask of layer `index` (built once per layout and query set; per layer with an
        attention method)."""
        evicted = self.state.evictions.get(index) if self.state.reuse else None
        window = self.adapter.layer_window(index)
        key = (layout, query_rows, window, index if self.plan.attention is not None or evicted else None)
        if key not in run.masks:
            physical_past = layout.valid.shape[1] - hidden.shape[1] if query_rows is None else 0
            extra = None
            rows = query_rows if query_rows is not None else torch.arange(hidden.shape[1], device=hidden.device) + physical_past
            query_slots = layout.slot.gather(1, rows.expand(hidden.shape[0], -1))
            if self.plan.attention is not None:
                extra = self.plan.attention.mask_function(AttentionContext(index, layout.slot, query_slots, layout.visual))
            replace = extra is not None and self.plan.attention.replaces_causal
            if evicted:
                hidden_keys = evicted_keys_mask(evicted, layout.slot, query_slots)
                extra = hidden_keys if extra is None else and_masks(extra, hidden_keys)
            bidirectional = None
            if run.blocks is not None:  # a visual query sees every key of its own block (kept ones, after pruning)
                query_block, key_block = self._block_of(run.blocks, query_slots), self._block_of(run.blocks, layout.slot)
                if bool((query_block >= 0).any()):
                    bidirectional = lambda b, h, q, kv: (query_block[b, q] >= 0) & (query_block[b, q] == key_block[b, kv])  # noqa: E731
            visible = None
            if window is not None:  # measured in the caller's positions (`CompactSlidingLayer`)
                key_slots = layout.slot
                visible = lambda b, h, q, kv: query_slots[b, q] - key_slots[b, kv] < window  # noqa: E731
            run.masks[key] = self.adapter.mask(hidden, layout.valid, physical_past, query_rows, extra, replace,
                                               bidirectional=bidirectional, window=visible)
        return run.masks[key]

    def _cache_edits(self, run: Pass) -> bool:
        """Whether the cache method edits after this call (every prefill; decoding steps if it says so)."""
        return run.cache is not None and self.plan.cache is not None and (
            run.prefill or self.plan.cache.edits_while_decoding)

    def _cache_reads_attention(self, run: Pass) -> bool:
        return self._cache_edits(run) and "attention" in self.plan.cache.cache_needs

    def _cache_reads_heads(self, run: Pass) -> bool:
        return self._cache_edits(run) and "head_attention" in self.plan.cache.cache_needs

    def _head_scores(self, layer, query: torch.Tensor, keys: torch.Tensor, query_valid: torch.Tensor,
                     key_valid: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, S) the attention each cached slot received from this call's valid queries, per KV
        head (summed over its query heads), the queries being the last rows of the keys (causal)."""
        attention = self.adapter.attention_module(layer)
        groups = attention.num_key_value_groups
        return torch.stack([
            kernels.attention_colsum(
                query[:, head * groups : (head + 1) * groups], keys[:, head : head + 1], scale=attention.scaling,
                causal=True, q_mask=query_valid, kv_mask=key_valid, num_kv_groups=groups,
            )
            for head in range(keys.shape[1])
        ], dim=1)

    def _head_replay(self, run: Pass, index: int, stream: Stream) -> HeadReplay | None:
        """A recomputation under `reuse_selections()` of a generation whose cache had per-head edits in
        layer `index`: the replay that shows each query the entries it saw then."""
        records = self.state.head_edits.get(index) if self.state.reuse and run.cache is None else None
        if not records:
            return None
        config = self.adapter.text_config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        replay = HeadReplay(records, self.state.row_maps, stream.slot, stream.valid, heads)
        return replay if replay.active else None

    @staticmethod
    def _attach_deepstack(deepstack, visual: list[VisualTokens], length: int) -> None:
        """Give each sample's visual tokens their DeepStack features (the call's features are in
        batch-major order of its visual positions)."""
        mask = deepstack.mask[:, -length:].to(visual[0].slots.device)
        rank = mask.flatten().long().cumsum(0).view(mask.shape) - 1  # each visual position's feature row
        for row, tokens in enumerate(visual):
            if not bool(mask[row, tokens.slots].all()):
                raise InputError("DeepStack features do not cover every visual token of the prompt; pass the "
                                 "visual_pos_masks the model builds from input_ids")
            tokens.deepstack = deepstack.features[:, rank[row, tokens.slots].to(deepstack.features.device)]

    @staticmethod
    def _add_deepstack(stream: Stream, run: Pass, level: int) -> torch.Tensor:
        """The stream's hidden states with DeepStack level `level` added: at each remaining visual
        token its own (or merged) features; without visual tokens in the stream (a prompt continuing a
        cache keeps its images whole), at the call's visual positions."""
        hidden = stream.hidden.clone()
        if stream.visual is None:
            mask = run.deepstack.mask[:, -run.length:].to(hidden.device)
            if mask.shape == stream.valid.shape:  # the caller's layout (nothing was selected)
                hidden[mask] = hidden[mask] + run.deepstack.features[level].to(hidden.device, hidden.dtype)
            return hidden
        for row, tokens in enumerate(stream.visual):
            if len(tokens):
                features = tokens.deepstack[level].to(hidden.device, hidden.dtype)
                hidden[row, tokens.slots] = hidden[row, tokens.slots] + features
        return hidden

    @staticmethod
    def _caller_visual(stream: Stream) -> list[VisualTokens] | None:
        """The stream's visual tokens with caller-layout positions as slots."""
        if stream.visual is None:
            return None
        result = []
        for row, visual in enumerate(stream.visual):
            caller = visual.subset(torch.arange(len(visual), device=visual.slots.device))
            caller.slots = stream.slot[row, visual.slots]
            result.append(caller)
        return result

    def _count(self, run: Pass, queries: torch.Tensor, computed: torch.Tensor, keys: torch.Tensor) -> None:
        """Add one layer's LLM FLOPs per sample (as `vlmkit.zoo.flops`: projections, the full query x
        key score and value products, gated MLP) for `queries` query rows, `computed` key/value rows
        and `keys` keys attended to."""
        if not run.prefill:
            return
        config = self.adapter.text_config
        d, h = config.hidden_size, config.num_attention_heads
        g = getattr(config, "num_key_value_heads", None) or h
        k = getattr(config, "head_dim", None) or d // h
        f = config.intermediate_size
        q, c, m = queries.double(), computed.double(), keys.double()
        run.flops += 2 * q * d * k * 2 * h + 2 * c * d * k * 2 * g + 4 * h * k * q * m + 6 * q * d * f

    def _attention_scores(self, selector, layer, index, probe, stream, kv_valid, cache, key_slots) -> dict:
        """What `selector` needs from one layer's attention, as `SelectionContext` fields.

        The query rows are projected from the layer's input; the keys are the layer's own cached keys
        (or, without a cache, projected once from the same input). "last_row_attention": per sample,
        the last token's attention to each visual token; "text_attention": per sample, (T, n) the
        attention of each text token after the sample's last visual token (its rows in
        `text_rows`); "keys": (B, H_kv, L, d) the stream's rotated keys; all means over heads, softmax
        over every key a query sees (in a sliding-window layer, the keys of its window).
        """
        attention = self.adapter.attention_module(layer)
        query, keys = probe
        if cache is not None:
            keys = cache.layers[index].keys
        length = stream.hidden.shape[1]
        past = keys.shape[2] - length
        rows = functools.partial(
            kernels.attention_rows, scale=attention.scaling, num_kv_groups=attention.num_key_value_groups, reduce="mean"
        )
        scores: dict = {}
        if "keys" in selector.needs:
            scores["keys"] = keys[:, :, past:]
        if "last_row_attention" in selector.needs:
            windowed = self._window_keys(index, key_slots, stream.slot[:, -1:])
            last_valid = kv_valid if windowed is None else kv_valid & windowed[:, 0]
            last = rows(query[:, :, -1:], keys, kv_mask=last_valid)[:, 0, past:]
            scores["last_row_attention"] = [last[row, visual.slots] for row, visual in enumerate(stream.visual)]
        if "text_attention" in selector.needs:
            position = torch.arange(length, device=keys.device)
            causal = torch.cat([torch.ones(length, past, dtype=torch.bool, device=keys.device),
                                position[None, :] <= position[:, None]], dim=1)
            visible = kv_valid[:, None, :] & causal[None]
            windowed = self._window_keys(index, key_slots, stream.slot)
            if windowed is not None:
                visible = visible & windowed
            every = rows(query, keys, kv_mask=visible)[..., past:]
            text_rows, attention_rows = [], []
            for row, visual in enumerate(stream.visual):
                after = int(visual.slots.max()) + 1 if len(visual) else length
                text = torch.nonzero(stream.valid[row, after:]).flatten() + after
                text_rows.append(text)
                attention_rows.append(every[row][text][:, visual.slots])
            scores["text_attention"], scores["text_rows"] = attention_rows, text_rows
        return scores

    def _select(self, selector, stream: Stream, layer: int, scores: dict):
        recorded = self.state.replay(("select", layer))
        if recorded is not None:
            return recorded
        context = SelectionContext(
            hidden=stream.hidden,
            visual=stream.visual,
            valid=stream.valid,
            layer=layer,
            num_layers=self.num_layers,
            last_row_attention=scores.get("last_row_attention"),
            text_attention=scores.get("text_attention"),
            text_rows=scores.get("text_rows"),
            keys=scores.get("keys"),
            embeds=scores.get("embeds"),
            final_norm=self.adapter.final_norm,
            vision=[v.probes for v in stream.visual],
            call_index=self.state.calls.get(selector.name, 0),
        )
        selection = selector.select(context)
        self.state.calls[selector.name] = context.call_index + 1
        if len(selection.samples) != len(stream.visual):
            raise InputError(f"{selector.name} returned {len(selection.samples)} selections for {len(stream.visual)} samples")
        for sample, visual in zip(selection.samples, stream.visual):
            sample.validate(len(visual), selector.name)
        self.state.record(("select", layer), selection)
        return selection

    def _apply(self, selector, selection, stream: Stream, full: torch.Tensor, run: Pass, layer: int) -> Stream:
        """Shrink the stream to the selection; freeze dropped tokens into `full`."""
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
            elif sample.combine is not None:
                changed = sample.changed_rows()
                if changed.numel():
                    if merged_hidden is None:
                        merged_hidden = hidden.clone()
                    merged_hidden[row, kept_slots[changed]] = self._combined(selector, sample, changed, visual, hidden[row])
            kept = visual.subset(sample.keep if sample.order is None else sample.keep[sample.order])
            if visual.deepstack is not None and (sample.merge_target is not None or sample.combine is not None):
                kept.deepstack = self._merged_deepstack(sample, visual.deepstack)
            new_visual.append(kept)
            stage = self.state.stage_selections.setdefault(selector.name, {}).setdefault(layer, [])
            stage.append(torch.sort(visual.origin[sample.keep]).values.cpu())
            self.state.selections[selector.name] = stage  # the method's latest stage

        rows = torch.arange(batch, device=hidden.device)[:, None].expand(batch, length)
        dropped = stream.valid & ~keep
        full[rows[dropped], stream.slot[dropped] - run.logical_past] = hidden[dropped]
        if merged_hidden is not None:
            hidden = merged_hidden

        gather, new_valid, rank = pack(keep)
        for row, (sample, visual) in enumerate(zip(selection.samples, stream.visual)):
            if sample.order is not None:  # the kept tokens fill their places in the selection's order
                kept_slots = visual.slots[sample.keep]
                gather[row, rank[row, kept_slots]] = kept_slots[sample.order]
        positions, layer_positions = stream.take(stream.positions, gather), stream.take(stream.layer_positions, gather)
        if selector.position_policy(self.adapter.mrope, self.plan.position and self.plan.position.name, layer) == "reindex":
            reindexed = (new_valid.long().cumsum(dim=1) - 1).clamp(min=0).to(positions.dtype)
            run.shift = run.shift + positions[..., -1] - reindexed[:, -1]
            positions = reindexed
            layer_positions = reindexed if layer_positions is not None else None
        for row, visual in enumerate(new_visual):
            visual.slots = torch.sort(rank[row, visual.slots]).values  # each kept token's row in the new stream
        return Stream(
            hidden=hidden.gather(1, gather[..., None].expand(-1, -1, hidden.shape[-1])),
            valid=new_valid,
            slot=stream.slot.gather(1, gather),
            positions=positions,
            layer_positions=layer_positions,
            visual=new_visual,
        )

    @staticmethod
    def _merged_deepstack(sample, deepstack: torch.Tensor) -> torch.Tensor:
        """(levels, k, D) the kept tokens' DeepStack features when the selection merges tokens: the
        same combination of the sample's features as of its tokens (the `merge_target` mean with its
        weights, or the `combine` rows; for combine_space "vision" too, applied to the DeepStack
        features as the LLM receives them), in the order the kept tokens enter the sequence."""
        if sample.merge_target is not None:
            merged, _ = kernels.merge_tokens(
                deepstack, sample.merge_target[None].expand(deepstack.shape[0], -1).to(deepstack.device),
                None if sample.merge_weight is None else sample.merge_weight[None].expand(deepstack.shape[0], -1).to(deepstack.device),
                num_targets=int(sample.keep.numel()),
            )
            merged = merged.to(deepstack.dtype)
        else:
            merged = deepstack[:, sample.keep.to(deepstack.device)].clone()
            changed = sample.changed_rows()
            if changed.numel():
                weights = sample.combine[changed].float().to(deepstack.device)
                merged[:, changed.to(deepstack.device)] = (weights @ deepstack.float()).to(deepstack.dtype)
        return merged if sample.order is None else merged[:, sample.order.to(deepstack.device)]

    def _combined(self, selector, sample, changed: torch.Tensor, visual: VisualTokens, hidden: torch.Tensor) -> torch.Tensor:
        """The kept tokens at `changed` (positions in `keep`) as `sample.combine` defines them, in
        the LLM's input or, for combine_space "vision", in the vision features, then projected."""
        weights = sample.combine[changed].float()
        if sample.combine_space == "llm":
            return (weights.to(hidden.device) @ hidden[visual.slots].float()).to(hidden.dtype)
        probes = visual.probes
        if not probes or any(p is None or "features" not in p for p in probes):
            raise InputError(
                f"{selector.name}: combine_space='vision' needs the vision features of every image of the sample "
                "(declare needs={'vision_features'} at the vision site; videos pooled after the projector have none)"
            )
        features = torch.cat([p["features"] for p in probes])
        parameter = next(self.adapter.projector.parameters())
        combined = weights.to(features.device) @ features.float()
        return self.adapter.project(combined.to(parameter.device, parameter.dtype)).to(hidden.device, hidden.dtype)

    # ------------------------------------------------------------------ routes
    def _route(self, router, stream: Stream, index: int, layer, run: Pass, previous, training: bool):
        recorded = self.state.replay(("route", index))
        if recorded is None:
            context = RouteContext(
                hidden=stream.hidden, visual=stream.visual, layer=index, num_layers=self.num_layers,
                call_index=self.state.calls.get(router.name, 0), training=training, valid=stream.valid,
                normed=self.adapter.input_norm(layer, stream.hidden) if "normed" in router.needs else None,
            )
            if "attention" in router.needs:
                rotary = self._rotary(stream, run, index)
                query, keys = self.adapter.probe_projections(layer, stream.hidden, rotary, keys=True)
                attention = self.adapter.attention_module(layer)
                windowed = self._window_keys(index, stream.slot, stream.slot[:, -1:])
                scores = kernels.attention_rows(
                    query, keys, scale=attention.scaling, kv_mask=stream.valid if windowed is None else stream.valid & windowed[:, 0],
                    num_kv_groups=attention.num_key_value_groups, reduce="mean",
                )[:, 0]
                context.attention = [scores[row, visual.slots] for row, visual in enumerate(stream.visual)]
            if "update" in router.needs:
                context.update = self._update_norms(stream, previous)
            recorded = router.route(context)
            self.state.calls[router.name] = context.call_index + 1
            recorded.validate(stream.visual, router.name)
            self.state.record(("route", index), recorded.detached())
        self.state.routes.setdefault(router.name, {})[index] = [
            visual.origin[run_].cpu() for visual, run_ in zip(stream.visual, recorded.run)
        ]
        return recorded

    def _gate(self, router, stream: Stream, index: int, layer, run: Pass, training: bool):
        """The token gate of a routed layer: generated rows are every row of a decoding step, or the rows
        after the recorded prompt in a recomputation."""
        if not run.prefill:
            generated = stream.valid
        elif self.state.reuse:
            generated = stream.valid & (stream.slot >= self.state.prompt_length)
        else:
            generated = torch.zeros_like(stream.valid)
        normed = self.adapter.input_norm(layer, stream.hidden) if "normed" in router.needs else None
        gate = router.gate(GateContext(stream.hidden, stream.valid, generated, index, self.num_layers, training, normed))
        gate.validate(tuple(stream.valid.shape), router.name)
        gate.rest = gate.rest & generated
        return gate

    @staticmethod
    def _token_weights(route, stream: Stream) -> torch.Tensor:
        """(B, L) the route's weight of every stream row (1 for text and padding)."""
        weight = torch.ones(stream.valid.shape, dtype=torch.float32, device=stream.hidden.device)
        for row, (visual, weights) in enumerate(zip(stream.visual, route.weights)):
            weight[row, visual.slots] = weights.float().to(weight.device)
        return weight

    @staticmethod
    def _update_norms(stream: Stream, previous) -> list[torch.Tensor]:
        """Per sample, each visual token's update norm in the previous layer (0 before layer 1)."""
        if previous is None or previous[2] is not stream.visual:
            return [torch.zeros(len(visual), device=stream.hidden.device) for visual in stream.visual]
        before, after, _ = previous
        change = (after - before).float().norm(dim=-1)
        return [change[row, visual.slots] for row, visual in enumerate(stream.visual)]

    def _run_routed(self, route, gate, layer, index: int, stream: Stream, run: Pass, kwargs, use_cache) -> torch.Tensor:
        """Run layer `index` for the prompt text, the routed visual tokens and the generated tokens the gate
        lets through; the others keep their state."""
        batch = stream.valid.shape[0]
        resting = torch.zeros_like(stream.valid) if gate is None else gate.rest.clone()
        if route is not None:
            for row, (visual, running) in enumerate(zip(stream.visual, route.run)):
                resting[row, visual.slots] = True
                resting[row, visual.slots[running]] = False
        gather, query_valid, _ = pack(stream.valid & ~resting)
        rows = torch.arange(batch, device=gather.device)[:, None].expand_as(gather)
        if route is not None and route.mode == "freeze":
            # every token keeps its key and value; queries are the running rows (padding rows point at
            # the last token, always real, and are discarded)
            last = stream.valid.shape[1] - 1
            query_rows = torch.where(query_valid, gather, torch.full_like(gather, last))
            rotary = self._rotary(stream, run, index)
            layout = self._layout(run, index, stream)
            queries = stream.hidden.gather(1, query_rows[..., None].expand(-1, -1, stream.hidden.shape[-1]))
            mask = self._mask(run, index, layout, queries, stream, query_rows)
            hidden = self.adapter.run_layer_queries(
                layer, stream.hidden, query_rows, query_valid, attention_mask=mask, position_embeddings=rotary,
                past_key_values=run.cache,
            )
            self._count(run, query_valid.sum(dim=1), stream.valid.sum(dim=1), stream.valid.sum(dim=1))
        else:
            sub = Stream(
                hidden=stream.hidden.gather(1, gather[..., None].expand(-1, -1, stream.hidden.shape[-1])),
                valid=query_valid, slot=stream.slot.gather(1, gather),
                positions=stream.take(stream.positions, gather), layer_positions=stream.take(stream.layer_positions, gather),
                visual=None,
            )
            layout = self._layout(run, index, sub)
            string = None if route is None or route.weights is None else self._token_weights(route, stream)
            weight = gate.weights if gate is not None else string
            hidden = stream.hidden.clone()
            if string is not None:  # STRing: a resting token leaves as w * x
                hidden = torch.where(resting[..., None], hidden * string[..., None].to(hidden.dtype), hidden)
            if gather.shape[1]:  # a decoding step whose tokens all rest skips the layer
                rotary = self._rotary(sub, run, index)
                mask = self._mask(run, index, layout, sub.hidden, stream)
                handle = None
                if weight is not None:  # a running token's MLP output is scaled by its weight
                    running = weight.gather(1, gather)[..., None].to(sub.hidden.dtype)
                    handle = self.adapter.mlp_module(layer).register_forward_hook(lambda module, args, out: out * running)
                try:
                    output = self.adapter.run_layer(
                        layer, sub.hidden, attention_mask=mask, position_embeddings=rotary,
                        position_ids=self._layer_positions(sub, run, index),
                        past_key_values=run.cache, use_cache=use_cache, **kwargs,
                    )
                finally:
                    if handle is not None:
                        handle.remove()
                hidden[rows[query_valid], gather[query_valid]] = output[query_valid]
            self._count(run, query_valid.sum(dim=1), query_valid.sum(dim=1), query_valid.sum(dim=1))
        if run.cache is not None:
            run.cache.layers[index].record(layout, run.length)
        return hidden

    # ------------------------------------------------------------------ positions and cache
    def _set_positions(self, stream: Stream, run: Pass) -> None:
        """Prefill: the position method's positions; later tokens continue from its last one."""
        method = self.plan.position
        positions = method.positions(PositionContext(stream.positions, stream.visual, stream.valid))
        expected = stream.positions.expand(*stream.positions.shape[:-2], *stream.valid.shape).shape
        if tuple(positions.shape) != tuple(expected):
            raise InputError(f"{method.name} returned positions of shape {tuple(positions.shape)}, expected {tuple(expected)}")
        default = stream.positions.expand(expected)
        shift = default[..., -1] - positions[..., -1]
        if shift.ndim == 2:  # M-RoPE: later text tokens advance all three axes together
            if not bool((shift == shift[:1]).all()):
                raise ConfigError(
                    f"{method.name}: its M-RoPE positions move the three axes of the last token apart; the engine "
                    "continues decoding with one shift per sample"
                )
            shift = shift[0]
        run.shift = shift.to(positions.dtype)
        stream.positions = positions
        if stream.layer_positions is not None:
            stream.layer_positions = positions if positions.ndim == 2 else stream.layer_positions

    def _edit_cache(self, run: Pass) -> None:
        """After the prefill or a decoding step: let the cache method remove slots."""
        layers = run.cache.layers[: self.num_layers]
        context = CacheContext(
            keys=[layer.keys for layer in layers], valid=[layer.layout.valid for layer in layers],
            slots=[layer.layout.slot for layer in layers], visual=layers[0].layout.visual,
            prefill=run.prefill, logical_length=layers[0].logical_length,
        )
        if "attention" in self.plan.cache.cache_needs:
            context.attention = [run.cache_attention.get(index) for index in range(self.num_layers)]
        if self.plan.cache.per_head:
            context.head_slots = [layer.layout.slots_per_head(layer.keys.shape[1]) for layer in layers]
        if "head_attention" in self.plan.cache.cache_needs:
            context.head_attention = [layer.scores for layer in layers]
        if run.prefill and not self.state.reuse:
            self.state.row_maps = layers[0].row_maps
        edits = self.plan.cache.edit_cache(context) or {}
        rebuilt: dict = {}
        for index, keep in edits.items():
            layer = layers[index]
            if keep is None:
                continue
            if isinstance(keep, HeadEdit):
                record = apply_head_edit(layer, keep, self.plan.cache.name, context.logical_length)
                if record is not None:
                    self.state.head_edits.setdefault(index, []).append(record)
                continue
            if keep.shape != layer.layout.valid.shape:
                raise InputError(f"{self.plan.cache.name}: the keep mask of layer {index} must have shape {tuple(layer.layout.valid.shape)}")
            keep = keep & layer.layout.valid
            rows, removed = torch.nonzero(layer.layout.valid & ~keep, as_tuple=True)
            if rows.numel():
                self.state.evictions.setdefault(index, []).append(
                    (rows, layer.layout.slot[rows, removed], context.logical_length)
                )
            key = (layer.layout, keep)
            if key not in rebuilt:
                gather, valid, _ = pack(keep)
                slot = layer.layout.slot.gather(1, gather).masked_fill(~valid, -1)
                rebuilt[key] = SlotLayout(valid, slot, layer.layout.shift, layer.layout.visual)
            layer.keep_slots(keep, rebuilt[key])


def evicted_keys_mask(evicted, key_slots: torch.Tensor, query_slots: torch.Tensor):
    """Mask function hiding each key a cache edit removed from the queries at or after the logical
    length it was removed at (what the cached run's later steps could no longer see).

    Args:
        evicted: [(rows, caller-layout slots, logical length)] of one layer's removals.
        key_slots, query_slots: (B, K) and (B, Q) caller-layout positions of the keys and queries.
    """
    size = max(int(key_slots.max()), max(int(slots.max()) for _, slots, _ in evicted)) + 1
    removed_at = torch.full((key_slots.shape[0], size), torch.iinfo(torch.long).max, dtype=torch.long, device=key_slots.device)
    for rows, slots, length in evicted:
        removed_at[rows, slots] = torch.clamp(removed_at[rows, slots], max=length)
    key_removed = removed_at.gather(1, key_slots.clamp(min=0))
    return lambda b, h, q, kv: key_removed[b, kv] > query_slots[b, q]
