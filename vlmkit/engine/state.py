"""Per-model-instance state the hooks share during one top-level call.

One `EngineState` lives on a `Patch`. The wrapped `get_image_features` / `get_video_features`
record one `VisualMeta` per image or video they encode; the base model's pre-hook stashes the
call's `input_ids` and where its features come from (encoded inside the call, or the
`mm_encoder_outputs` that `generate()` encoded once and passes to every step without a cache);
the text-stack runner turns both into per-sample `VisualTokens`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vlmkit.engine.selection import VisualTokens
from vlmkit.errors import ConfigError, InputError


@dataclass
class VisualMeta:
    """One image or video as the LLM sees it.

    Attributes:
        modality: "image" or "video".
        grid: (frames, rows, cols) of its token grid (for AnyRes: of the base view).
        coords: (n, 4) long, per placeholder token in sequence order: frame, row, col, crop; crop -1
            marks a structural token (e.g. LLaVA-NeXT's image newline) that is never pruned.
        probe: vision-tower probe results mapped to the n tokens ("importance" (n,), "keys" (n, d)),
            when a method asked for them.
        runs: the placeholder count of each run when the prompt splits the item's placeholders into
            several runs with text between them (Qwen3-VL's frames, each after its timestamp), in
            order; None: one contiguous run.
    """

    modality: str
    grid: tuple[int, int, int]
    coords: torch.Tensor
    probe: dict[str, torch.Tensor] | None = None
    runs: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.coords.shape[0])


@dataclass
class EngineState:
    image_token_ids: dict[str, int]
    # the adapter's `join_runs`: joins the metas of adjacent placeholder runs into one image, or None
    join_runs: object = None
    input_ids: torch.Tensor | None = None
    # per modality, where this call's features come from: None = encoded inside the call, else the
    # `mm_encoder_outputs` entry generate() passed in
    sources: dict[str, object] = field(default_factory=dict)
    # per modality, the last encoder output and (feature, meta) for each image/video it encoded
    encoded: dict[str, tuple[object, list[tuple[torch.Tensor, VisualMeta]]]] = field(default_factory=dict)
    # what the last prefill selected: per method name, per sample, original visual-token indices kept
    selections: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # the same per selection layer, for methods that select at several (PyramidDrop's stages)
    stage_selections: dict[str, dict[int, list[torch.Tensor]]] = field(default_factory=dict)
    # what the last prefill routed: per router name, per layer, per sample, original indices that ran it
    routes: dict[str, dict[int, list[torch.Tensor]]] = field(default_factory=dict)
    # raw selections and routes by (site, layer), for `Patch.reuse_selections()`
    recorded: dict[tuple[str, int], object] = field(default_factory=dict)
    reuse: bool = False
    # cache edits of the last generation, for `Patch.reuse_selections()`: per decoder layer, a list of
    # (row, caller-layout slot, logical length when removed) tensors; a recomputation masks a removed
    # key for the queries from that length on
    evictions: dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]] = field(default_factory=dict)
    # per-head cache edits of the last generation (`vlmkit.engine.replay.HeadEditRecord`), per decoder
    # layer in time order, and the row changes of its cache (beam search: `CompactLayer.row_maps`), for
    # `Patch.reuse_selections()`: a recomputation shows the queries from each edit's logical length on
    # the edited entries in place of the prefix
    head_edits: dict[int, list] = field(default_factory=dict)
    row_maps: list = field(default_factory=list)
    # what the last prefill cost, counted from what ran: {"llm_flops": per sample, "kv_bytes": per sample}
    cost: dict[str, list[float]] = field(default_factory=dict)
    # a contrastive-decoding branch that opted out of pruning: its forwards keep every visual token
    bypass: bool = False
    calls: dict[str, int] = field(default_factory=dict)
    # the caller-layout length of the last prompt (a recomputation's later rows are generated tokens)
    prompt_length: int = 0
    # the base model's `attention_mask` and `token_type_ids` of this call (the text model may receive the
    # mask already expanded, one per layer kind), or None before the base model's forward stashed them
    call_inputs: dict | None = None

    def begin_call(self, input_ids: torch.Tensor | None, sources: dict[str, object], call_inputs: dict | None = None) -> None:
        """The base model's forward starts (its pre-hook): remember the ids, the feature sources and the
        call's 2-D attention mask and token types."""
        self.input_ids, self.sources, self.call_inputs = input_ids, sources, call_inputs

    def take_call_inputs(self) -> dict | None:
        """The call inputs the base model's forward stashed (once: a later text-model call without a base
        model call gets None)."""
        call_inputs, self.call_inputs = self.call_inputs, None
        return call_inputs

    def encoded_by_us(self, modality: str, output: object, metas: list[VisualMeta]) -> None:
        """Record an encoder call; inside a forward, check its features fit the placeholders."""
        self.encoded[modality] = (output, list(zip(list(output.pooler_output), metas)))
        if self.input_ids is not None and self.sources.get(modality, 0) is None:
            placeholders = int((self.input_ids == self.image_token_ids[modality]).sum())
            features = sum(meta.num_tokens for meta in metas)
            if placeholders != features:
                raise InputError(
                    f"image/placeholder count mismatch: input_ids hold {placeholders} {modality} placeholder tokens "
                    f"but the {len(metas)} {modality}(s) encode to {features} tokens; build the prompt with the "
                    "model's processor so that each image gets exactly its placeholders"
                )

    def _metas_of(self, modality: str) -> list[VisualMeta]:
        """Metas for the features the encoder output holds now.

        generate() may have repeated them (beam search, `num_return_sequences`) or re-stacked them, so
        each current feature is matched to the encoded one it is (or equals).
        """
        output, encoded = self.encoded[modality]
        metas = []
        for feature in output.pooler_output:
            match = next((m for f, m in encoded if f is feature), None)
            if match is None:
                match = next((m for f, m in encoded if f.shape == feature.shape and torch.equal(f, feature)), None)
            if match is None:
                raise InputError(
                    f"a {modality} feature of this call matches none of the {len(encoded)} encoded by this patched "
                    "model; vlmkit cannot tell which placeholder tokens it fills"
                )
            metas.append(match)
        return metas

    def clear(self) -> None:
        self.input_ids, self.sources, self.encoded = None, {}, {}

    # ----------------------------------------------------------------- what a prefill decided and cost
    def start_prefill(self, length: int) -> None:
        """A prefill of `length` tokens with visual tokens starts: forget the previous one's selections
        and routes (and, unless it replays them, its cache edits and prompt length)."""
        self.selections, self.stage_selections, self.routes = {}, {}, {}
        if not self.reuse:
            self.evictions, self.head_edits, self.row_maps = {}, {}, []
            self.prompt_length = length

    def record(self, key: tuple[str, int], decision: object) -> None:
        """Keep a selection or route (key: (site, layer)) for `replay`."""
        self.recorded[key] = decision

    def replay(self, key: tuple[str, int]) -> object | None:
        """Inside `Patch.reuse_selections()`, the decision the last prefill recorded at `key`; else None."""
        if not self.reuse:
            return None
        if key not in self.recorded:
            raise ConfigError(f"reuse_selections(): no recorded {key[0]} decision at layer {key[1]}; run a prefill first")
        return self.recorded[key]

    def finish_prefill(self, flops: torch.Tensor, cache, num_layers: int) -> None:
        """Book the prefill's LLM FLOPs per sample and the KV bytes per sample it left in the cache."""
        kv = torch.zeros_like(flops)
        if cache is not None:
            for layer in cache.layers[:num_layers]:
                per_slot = 2 * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
                kv += layer.layout.valid.sum(dim=1).double() * per_slot
        self.cost = {"llm_flops": flops.tolist(), "kv_bytes": kv.tolist()}

    @contextlib.contextmanager
    def branch_scope(self, encoded: dict, prune: bool) -> Iterator[None]:
        """Run one forward of a contrastive-decoding branch (`vlmkit.engine.branches`).

        Its rows are the main rows' rows, so with `prune` it replays the selections and routes the main
        rows' prefill recorded (as `Patch.reuse_selections()` does); without, it keeps every visual
        token and runs every layer whole. Its encoder records go to `encoded` (the branch's own dict,
        kept across its forwards); the main call's records, selections, routes, cost, stash and reuse
        flag are restored afterwards.
        """
        saved = (self.input_ids, self.sources, self.encoded, self.selections, self.stage_selections, self.routes, self.cost,
                 self.reuse, self.bypass)
        self.encoded, self.reuse, self.bypass = encoded, prune, not prune
        try:
            yield
        finally:
            (self.input_ids, self.sources, self.encoded, self.selections, self.stage_selections, self.routes, self.cost,
             self.reuse, self.bypass) = saved

    def take_visual_tokens(self, num_rows: int, length: int, device: torch.device) -> list[VisualTokens] | None:
        """Per-sample visual tokens of this call's query tokens, or None when the call has none.

        Placeholders are matched to the encoded images/videos in sequence order, each modality in the
        order it was encoded (the order in which the model scatters features into placeholders).
        """
        input_ids, sources = self.input_ids, self.sources
        self.input_ids, self.sources = None, {}
        if self.bypass or input_ids is None or input_ids.shape[-1] != length or input_ids.shape[0] != num_rows or not sources:
            return None
        queues = {}
        for modality, source in sources.items():
            output = self.encoded.get(modality, (None,))[0]
            if output is None or (source is not None and source is not output):
                raise InputError(
                    f"the {modality} features of this call were not encoded by this patched model; pass pixel "
                    "values (or features from its own get_*_features) so that vlmkit can locate each visual token"
                )
            queues[modality] = self._metas_of(modality)
        samples: list[VisualTokens] = []
        any_visual = False
        for row in range(num_rows):
            parts = _sample_parts(input_ids[row], self.image_token_ids, queues, row)
            if self.join_runs is not None:
                parts = _joined_runs(parts, self.join_runs)
            any_visual |= bool(parts)
            samples.append(_visual_tokens(parts, device))
        leftover = {m: len(q) for m, q in queues.items() if q}
        if leftover:
            raise InputError(
                f"image/placeholder count mismatch: {leftover} encoded image(s)/video(s) have no placeholder "
                "tokens in input_ids; pass one placeholder per image as the processor writes it"
            )
        return samples if any_visual else None


def _sample_parts(ids: torch.Tensor, token_ids: dict[str, int], queues: dict[str, list[VisualMeta]], row: int):
    """[(start, meta, positions)] for each image/video in one row of input ids (positions: (n,) long,
    the item's placeholder positions)."""
    parts = []
    for modality, token_id in token_ids.items():
        positions = torch.nonzero(ids == token_id).flatten().tolist()
        cursor = 0
        while cursor < len(positions):
            if not queues.get(modality):
                raise InputError(
                    f"image/placeholder count mismatch in sample {row}: {len(positions) - cursor} {modality} "
                    f"placeholder token(s) have no encoded {modality}; pass as many images as placeholders"
                )
            meta = queues[modality].pop(0)
            span = positions[cursor : cursor + meta.num_tokens]
            runs, first, contiguous = meta.runs or (meta.num_tokens,), 0, len(span) == meta.num_tokens
            for count in runs if contiguous else ():
                contiguous &= span[first + count - 1] - span[first] == count - 1
                first += count
            if not contiguous:
                what = "contiguous placeholder tokens" if meta.runs is None else f"placeholder tokens in runs of {list(runs)}"
                raise InputError(
                    f"image/placeholder count mismatch in sample {row}: a {modality} has {meta.num_tokens} "
                    f"features but {len(span)} {what}"
                )
            parts.append((span[0], meta, torch.tensor(span, dtype=torch.long)))
            cursor += meta.num_tokens
    return sorted(parts, key=lambda part: part[0])


def _joined_runs(parts, join) -> list:
    """[(start, meta, positions)] with each group of image runs that follow one another with no token
    between them joined by `join(metas) -> meta` (the tiles of one image, for families whose encoder sees
    tiles as separate images)."""
    groups: list[list] = []
    for part in parts:
        start, meta, _ = part
        last = groups[-1][-1] if groups else None
        if (last is not None and meta.modality == last[1].modality == "image" and meta.runs is None
                and last[1].runs is None and last[0] + last[1].num_tokens == start):
            groups[-1].append(part)
        else:
            groups.append([part])
    return [
        (group[0][0], join([meta for _, meta, _ in group]), torch.cat([positions for _, _, positions in group]))
        if len(group) > 1 else group[0]
        for group in groups
    ]


def _visual_tokens(parts, device: torch.device) -> VisualTokens:
    slots, coords, image, probes = [], [], [], []
    for index, (_, meta, positions) in enumerate(parts):
        prunable = meta.coords[:, 3] >= 0
        probes.append(None if meta.probe is None else {k: v[prunable] for k, v in meta.probe.items()})
        slots.append(positions[prunable])
        coords.append(meta.coords[prunable])
        image.append(torch.full((int(prunable.sum()),), index, dtype=torch.long))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return VisualTokens(empty, empty, empty, empty, empty, empty, empty)
    slots_t = torch.cat(slots).to(device)
    coords_t = torch.cat(coords).to(device)
    return VisualTokens(
        slots=slots_t,
        origin=torch.arange(slots_t.numel(), device=device),
        image=torch.cat(image).to(device),
        frame=coords_t[:, 0], row=coords_t[:, 1], col=coords_t[:, 2], crop=coords_t[:, 3],
        grids=[meta.grid for _, meta, _ in parts],
        spans=[(start, int(positions[-1]) - start + 1) for start, _, positions in parts],
        modality=[meta.modality for _, meta, _ in parts],
        probes=probes,
    )
