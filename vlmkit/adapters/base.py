"""What an adapter is: the only code that knows where a model family keeps its parts.

Methods and the engine talk to an `Adapter`, never to `model.model.language_model.layers[3]`. An
adapter names the base (multimodal) model, the text model and its decoder layers, the vision
layers, the placeholder token ids, how each encoded image or video maps onto its placeholder tokens
(`VisualMeta`), how rotary positions look (1-D or 3-D M-RoPE), and everything the engine needs to
run the decoder stack itself: embedding, rotary tables for given (float, 3-D) positions, masks,
the final norm, how a layer is called (whole, or for a subset of query rows), `rope_deltas`, and
how to probe attention scores from a layer's input without running the layer twice.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks, causal_mask_function, or_masks
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

from vlmkit import kernels
from vlmkit.engine.state import VisualMeta
from vlmkit.errors import ConfigError


class Adapter:
    """Base adapter for LLaVA-style models whose LLM is a Llama/Qwen2-style decoder."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: what the family feeds its LLM: "images", and "videos" where it encodes clips
    media: ClassVar[tuple[str, ...]] = ("images",)
    #: True when rotary positions are 3-D (M-RoPE)
    mrope: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    # ----------------------------------------------------------------- structure
    @property
    def base_model(self) -> nn.Module:
        """The multimodal model that embeds, encodes images and calls the text model."""
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        return self.base_model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def vision_tower(self) -> nn.Module:
        """The vision tower module (what the model calls on pixels)."""
        return self.base_model.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision tower's layers (CLIP and SigLIP towers keep them in `encoder.layers`)."""
        return self.base_model.vision_tower.encoder.layers

    def vision_attention(self, layer_index: int) -> nn.Module:
        """The attention module of vision layer `layer_index` (negative counts from the end)."""
        return self.vision_layers[layer_index].self_attn

    def placeholder_ids(self) -> dict[str, int]:
        """Placeholder token id per modality ("image", "video") this family uses."""
        config = self.model.config
        ids = {"image": config.image_token_id}
        video = getattr(config, "video_token_id", None)
        if video is not None:
            ids["video"] = video
        return ids

    #: how to join the metas of adjacent placeholder runs into one image (families whose encoder takes
    #: an image's tiles as separate images), or None: every run is its own image
    join_runs = None

    def feature_functions(self) -> dict[str, str]:
        """Name of the base model's encoder function per modality."""
        return {modality: f"get_{modality}_features" for modality in self.placeholder_ids()}

    # ----------------------------------------------------------------- visual tokens
    def visual_metas(
        self, modality: str, call: dict[str, Any], output: Any, probes: list[dict[str, torch.Tensor]] | None
    ) -> list[VisualMeta]:
        """One `VisualMeta` per image/video encoded by one call of the encoder function.

        Args:
            modality: "image" or "video".
            call: the encoder function's bound arguments (pixel values, sizes, grids...).
            output: what it returned (`pooler_output` holds the per-image features).
            probes: raw vision probe results recorded during the call, in the order the tower ran.
        """
        raise NotImplementedError

    def default_vision_layer(self) -> int:
        """The vision layer whose output the LLM reads (where VisionZip-style methods probe)."""
        layer = self.model.config.vision_feature_layer
        layer = layer if isinstance(layer, int) else layer[-1]
        # hidden_states[k] is the output of layer k - 1; hidden_states[-1] of the last layer.
        return layer - 1 if layer >= 0 else len(self.vision_layers) + layer

    def select_strategy(self, call: dict | None = None) -> str:
        """The call's `vision_feature_select_strategy`, else the config's ("default" drops [CLS])."""
        return (call or {}).get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy

    def patch_probe(self, probes: list[dict[str, torch.Tensor]] | None, call: dict) -> dict[str, torch.Tensor] | None:
        """The probes of all tower passes joined, without the [CLS] row where the projector drops it."""
        probe = concat_probes(probes)
        if probe is not None and self.select_strategy(call) == "default":  # [CLS] at index 0; the LLM has none
            probe = {name: value[:, 1:] for name, value in probe.items()}
        return probe

    def vision_marginals(self, attention: nn.Module, hidden: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor] | None:
        """The patch-to-patch attention map's marginals at one vision attention call (see
        `attention_marginals`), or None where the tower's attention is not one dense map per row."""
        return attention_marginals(attention, hidden, skip_first=self.select_strategy() == "default")

    def vision_full_keys(self, attention: nn.Module, hidden: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor] | None:
        """"full_keys": (rows, N, heads * d) every head's key of each token side by side (the key
        projection's output), or None where the tower's attention is not one dense map per row."""
        return {"full_keys": attention.k_proj(hidden)}

    @property
    def projector(self) -> nn.Module | None:
        """The projector from vision features to the LLM's input when it maps token to token (LLaVA's
        MLP), else None (a projector that joins patches, as Qwen2-VL's merger)."""
        return getattr(self.base_model, "multi_modal_projector", None)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(n, d_vision) vision features -> (n, d_llm) LLM input embeddings, as the model projects them."""
        return self.projector(features[None])[0]

    def with_features(
        self, probes: list[dict[str, torch.Tensor]], features: list[torch.Tensor], call: dict
    ) -> list[dict[str, torch.Tensor]]:
        """The probes of one encoder call joined into one, plus "features": the projector's input per
        tower row, aligned with the tower's tokens (a zero row for a [CLS] the projector does not read)."""
        joined = concat_probes(probes) or {}
        features = torch.cat(features)
        if self.select_strategy(call) == "default":
            features = torch.cat([torch.zeros_like(features[:, :1]), features], dim=1)
        joined["features"] = features
        return [joined]

    def vision_probe(self, attention: nn.Module, hidden: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor]:
        """Scores from one vision attention call, from its input only (no attention weights needed).

        Returns per tower row (crop/frame/image) "importance" (N,) and head-mean "keys" (N, d).
        """
        raise NotImplementedError

    # ----------------------------------------------------------------- the decoder stack, as the engine runs it
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (the text model's input)."""
        return self.text_model.embed_tokens(input_ids)

    @property
    def rotary_module(self) -> nn.Module:
        """The text model's rotary embedding (called as `module(hidden, positions) -> (cos, sin)`)."""
        return self.text_model.rotary_emb

    def rotary(
        self, hidden: torch.Tensor, positions: torch.Tensor, layer_type: str = "full_attention"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary (cos, sin) for `positions`: (B, L) or (3, B, L) for M-RoPE, integer or float, for decoder
        layers of `layer_type` (families whose layer kinds have their own rotary base)."""
        return self.rotary_module(hidden, positions)

    def layer_type(self, index: int) -> str:
        """The attention kind of decoder layer `index` ("full_attention", "sliding_attention")."""
        return "full_attention"

    def layer_window(self, index: int) -> int | None:
        """The sliding window of decoder layer `index` (a query sees the keys less than this many
        positions back), or None for a full-attention layer."""
        return None

    def bidirectional_blocks(self, call_inputs: dict[str, Any]) -> torch.Tensor | None:
        """(B, T) for the last T tokens of a text-model call, the block of tokens each one attends to both
        ways (-1: none; the image placeholders of Gemma 3), from the base model's call inputs
        (`attention_mask`, `token_type_ids`); None where every token is causal."""
        return None

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text_model.norm(hidden)

    @property
    def attention_implementation(self) -> str:
        """The text model's attention implementation ("sdpa", "eager", ...)."""
        return self.text_model.config._attn_implementation

    def mask(
        self,
        hidden: torch.Tensor,
        kv_valid: torch.Tensor,
        physical_past: int,
        query_rows: torch.Tensor | None = None,
        extra: Callable | None = None,
        replace_causal: bool = False,
        bidirectional: Callable | None = None,
        window: Callable | None = None,
    ):
        """The attention mask of one layer, in the format its attention implementation expects.

        Args:
            hidden: the layer's queries (B, Q, D) (batch, length, dtype and device).
            kv_valid: (B, K) bool, which keys hold a token.
            physical_past: keys cached before this call; the queries are the last Q keys.
            query_rows: (B, Q) long, the key index of each query when the queries are a subset of
                the keys (a frozen route), else None.
            extra: a further mask function `(batch, head, query, key) -> bool` to combine with the
                causal one (the attention site); `query` indexes this call's queries (0 .. Q-1) and
                `key` the keys (0 .. K-1).
            replace_causal: `extra` is the whole structure (it says itself which earlier and later
                keys each query sees); only padding (and `window`) is added to it.
            bidirectional: a mask function (indexed as `extra`) of the further keys a query sees besides
                the earlier ones (an image's own tokens, both ways); joined to the causal mask by "or".
            window: a mask function (indexed as `extra`) every visible key must also pass (a sliding
                window), whatever the rest says.

        Raises:
            ConfigError: the attention implementation has no registered mask function.
        """
        implementation = self.attention_implementation
        if implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise ConfigError(f"attention implementation {implementation!r} has no registered mask function")
        if query_rows is None:
            function, offset = causal_mask_function, physical_past
        else:
            function, offset = (lambda b, h, q, kv: kv <= query_rows[b, q]), 0

        def shifted(piece: Callable) -> Callable:  # the pieces take the query's index among this call's queries
            return lambda b, h, q, kv: piece(b, h, q - offset, kv)

        if bidirectional is not None and not (extra is not None and replace_causal):
            function = or_masks(function, shifted(bidirectional))
        if extra is not None:
            function = shifted(extra) if replace_causal else and_masks(function, shifted(extra))
        if window is not None:
            function = and_masks(function, shifted(window))
        return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
            batch_size=hidden.shape[0],
            q_length=hidden.shape[1],
            kv_length=kv_valid.shape[1],
            q_offset=offset,
            kv_offset=0,
            mask_function=function,
            attention_mask=kv_valid,
            allow_is_causal_skip=query_rows is None and extra is None and bidirectional is None and window is None,
            dtype=hidden.dtype,
            config=self.text_model.config,
            use_vmap=False,
            device=hidden.device,
        )

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """One decoder layer, called as the text model calls it (returns its output hidden states)."""
        return layer(hidden, **kwargs)

    def run_layer_queries(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        query_rows: torch.Tensor,
        query_valid: torch.Tensor,
        *,
        attention_mask,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values=None,
    ) -> torch.Tensor:
        """One decoder layer run for a subset of its tokens: every token's key and value are computed
        (and cached), only the rows `query_rows` (B, Q) (where `query_valid`) get a query, attention
        and the MLP; the other rows leave the layer unchanged.

        The same arithmetic as the layer's own forward (pre-norm, rotary, the model's attention
        implementation, residuals, MLP). The layer is called as a module, so its hooks (output
        capturing for `output_hidden_states` among them) see the call and its (B, L, D) output.
        """
        attention = self.attention_module(layer)

        def forward(hidden_states, **_):
            batch, _, width = hidden_states.shape
            index = query_rows[..., None].expand(-1, -1, width)
            residual = hidden_states.gather(1, index)
            normed = self.input_norm(layer, hidden_states)
            cos, sin = (table.expand(batch, -1, -1) for table in position_embeddings)
            rows = query_rows[..., None].expand(-1, -1, cos.shape[-1])
            query = self.llm_queries(attention, normed.gather(1, index))
            key = self.llm_keys(attention, normed)
            value = attention.v_proj(normed).view(batch, hidden_states.shape[1], -1, attention.head_dim).transpose(1, 2)
            query = rotate(query, cos.gather(-2, rows), sin.gather(-2, rows))
            key = rotate(key, cos, sin)
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, attention.layer_idx)
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.attention_implementation, eager_attention_forward)
            output, _ = interface(attention, query, key, value, attention_mask, dropout=0.0, scaling=attention.scaling,
                                  **self.attention_options(attention))
            output = attention.o_proj(output.reshape(batch, query_rows.shape[1], -1).contiguous())
            states = self.layer_residuals(layer, residual, output)
            updated = hidden_states.clone()
            batch_rows = torch.arange(batch, device=query_rows.device)[:, None].expand_as(query_rows)
            updated[batch_rows[query_valid], query_rows[query_valid]] = states[query_valid]
            return updated

        layer.forward = forward  # for this call only: the module's hooks run around it
        try:
            return layer(hidden, attention_mask=attention_mask, position_embeddings=position_embeddings,
                         past_key_values=past_key_values)
        finally:
            del layer.forward

    @property
    def rope_deltas(self) -> torch.Tensor | None:
        """The base model's cached M-RoPE `rope_deltas` (None for 1-D rotary families)."""
        return getattr(self.base_model, "rope_deltas", None)

    @rope_deltas.setter
    def rope_deltas(self, value: torch.Tensor | None) -> None:
        if hasattr(self.base_model, "rope_deltas"):
            self.base_model.rope_deltas = value

    # ----------------------------------------------------------------- text positions and probes
    def split_positions(
        self, position_ids: torch.Tensor | None, batch: int, length: int, past: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rotary positions, what decoder layers receive as `position_ids`), as the text model builds them."""
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past).unsqueeze(0)
        return position_ids, position_ids

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def attention_options(self, attention: nn.Module) -> dict[str, Any]:
        """Extra keyword arguments of the attention function for a decoder attention (e.g. its window)."""
        return {}

    def layer_residuals(self, layer: nn.Module, residual: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """A decoder layer's output from its input rows and its attention's projected output: the
        residual attention, then the residual MLP on the post-attention norm (Llama, Qwen)."""
        states = residual + attention_output
        return states + layer.mlp(layer.post_attention_layernorm(states))

    def input_norm(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder layer's normalised input (what its attention projects)."""
        return layer.input_layernorm(hidden)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        """The decoder layer's MLP (its output is added to the residual stream)."""
        return layer.mlp

    def probe_projections(
        self, layer: nn.Module, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], keys: bool,
        all_queries: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last token's rotated query (B, H, 1, d) (every token's, (B, H, L, d), with `all_queries`),
        and all rotated keys (B, H_kv, L, d) when `keys`.

        Recomputes only the projections needed from the layer's input, exactly as its attention does.
        """
        attention = self.attention_module(layer)
        normed = self.input_norm(layer, hidden)
        cos, sin = rotary
        batch, length, _ = hidden.shape
        rows = length if all_queries else 1
        query = rotate(self.llm_queries(attention, normed[:, -rows:]), cos[..., -rows:, :], sin[..., -rows:, :])
        if not keys:
            return query, None
        return query, rotate(self.llm_keys(attention, normed), cos, sin)

    def llm_queries(self, attention: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """(B, H, L, d) a decoder attention's queries of normalised inputs (B, L, D), before rotary."""
        batch, length, _ = normed.shape
        return attention.q_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)

    def llm_keys(self, attention: nn.Module, normed: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, L, d) a decoder attention's keys of normalised inputs (B, L, D), before rotary."""
        batch, length, _ = normed.shape
        return attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)

    # ----------------------------------------------------------------- DeepStack
    def deepstack_inputs(self, kwargs: dict[str, Any]) -> "DeepStackInputs | None":
        """Remove the text model's DeepStack arguments from `kwargs` (the text model's call) and return
        them, or None where the family has none or the call carries none.

        DeepStack (Qwen3-VL) adds visual features from intermediate vision layers to the hidden states
        of the visual tokens after some of the first decoder layers; the engine, which runs the decoder
        loop, adds each kept visual token's own features (`vlmkit.engine.runner`).
        """
        return None


@dataclass
class DeepStackInputs:
    """The DeepStack features of one text-model call.

    Attributes:
        mask: (B, L) bool, the visual positions of the call, in batch-major order.
        features: (levels, N, D) one feature per visual position (N = mask.sum()) and level.
        layers: the decoder layer after whose output each level is added (one per level).
    """

    mask: torch.Tensor
    features: torch.Tensor
    layers: tuple[int, ...]


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, heads, L, d) states, the same arithmetic as the decoders' attention."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return states * cos + rotate_half(states) * sin


class SiglipTowerAdapter(Adapter):
    """A family whose SigLIP tower has no [CLS]: the LLM side reads every row of the tower's last layer
    (after its post-layernorm), and a patch's importance is the attention it receives."""

    def default_vision_layer(self) -> int:
        return len(self.vision_layers) - 1

    def select_strategy(self, call: dict | None = None) -> str:
        return "full"

    def vision_probe(self, attention, hidden, kwargs):
        return received_attention_probe(attention, hidden)


def cls_row_probe(attention: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """For a CLIP-style attention input: [CLS] attention (mean over heads), "cls_logits" (the [CLS]
    row's pre-softmax logits, scale q.k, mean over heads) and head-mean keys."""
    batch, length, _ = hidden.shape
    head_dim = attention.head_dim
    query = attention.q_proj(hidden[:, :1]).view(batch, 1, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    importance = kernels.attention_rows(query, key, scale=attention.scale, reduce="mean")[:, 0]
    logits = (query.float() @ key.float().transpose(-1, -2))[:, :, 0].mean(dim=1) * attention.scale
    return {"importance": importance, "cls_logits": logits, "keys": key.mean(dim=1)}


def received_attention_probe(attention: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean attention each token receives (over queries and heads) and head-mean keys, for towers
    without [CLS] (SigLIP)."""
    batch, length, _ = hidden.shape
    head_dim = attention.head_dim
    query = attention.q_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    received = kernels.attention_colsum(query, key, scale=attention.scale, causal=False)
    return {"importance": received / (length * query.shape[1]), "keys": key.mean(dim=1)}


def attention_marginals(attention: nn.Module, hidden: torch.Tensor, skip_first: bool) -> dict[str, torch.Tensor]:
    """Marginals of the head-mean attention map among the patches: "received" (N,) the mean attention
    a patch receives from the patch queries, "paid" (N,) the attention a patch pays to the patch keys
    (softmax over every key, [CLS] included), and the same of the pre-softmax logits (scale q.k, mean
    over heads): "received_logits" (mean over the patch queries), "paid_logits" (mean over the patch
    keys). With `skip_first`, [CLS] at index 0 is neither query nor key and gets 0, so the entries stay
    aligned with the tower's tokens. Builds the (N x N) map.
    """
    batch, length, _ = hidden.shape
    head_dim = attention.head_dim
    query = attention.q_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2).float()
    key = attention.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2).float()
    logits = (query @ key.transpose(-1, -2)) * attention.scale
    first = int(skip_first)
    weights = logits.softmax(dim=-1).mean(dim=1)[:, first:, first:]
    logits = logits.mean(dim=1)[:, first:, first:]
    pad = torch.zeros(batch, first, device=hidden.device)
    marginals = {"received": weights.mean(dim=1), "paid": weights.sum(dim=2),
                 "received_logits": logits.mean(dim=1), "paid_logits": logits.mean(dim=2)}
    return {name: torch.cat([pad, value], dim=1) for name, value in marginals.items()}


def concat_probes(probes: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor] | None:
    """Join the probe results of several tower passes along their first (tower batch) dimension."""
    if not probes:
        return None
    return {name: torch.cat([p[name] for p in probes]) for name in probes[0]}


def grid_coords(frames: int, rows: int, cols: int, crop: int = 0) -> torch.Tensor:
    """(frames*rows*cols, 4) long coordinates (frame, row, col, crop) in row-major token order."""
    frame, row, col = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([frame.flatten(), row.flatten(), col.flatten(), torch.full_like(frame.flatten(), crop)], dim=1)


def join_tiles(metas: list[VisualMeta]) -> VisualMeta:
    """The tiles of one image (its placeholder runs, in prompt order) as one image, for an adapter's
    `join_runs`: tiles are crops 1..n, the whole-image view (the last run: a thumbnail or global image)
    crop 0, as LLaVA-NeXT's base view; the grid is that view's."""
    crops = list(range(1, len(metas))) + [0]
    coords = []
    for meta, crop in zip(metas, crops):
        tile = meta.coords.clone()
        tile[:, 3] = crop
        coords.append(tile)
    probes = [meta.probe for meta in metas]
    probe = None if probes[0] is None else {key: torch.cat([p[key] for p in probes]) for key in probes[0]}
    return VisualMeta("image", metas[-1].grid, torch.cat(coords), probe)
