"""The sites where a method can act, and the one conflict rule of each.

A method declares the sites it handles (`register_method(..., sites=...)`); `vlmkit.apply` installs
it by site. One table says, per site, what a method there implements and how many methods may
share it; `vlmkit.engine.install.build_plan` enforces it before anything is installed.

This module imports nothing heavy: the registry reads `SITES` to check declarations.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    """One site.

    Attributes:
        name: the site's name.
        where: where in the model it acts.
        implements: what a method at this site implements.
        shared_by: "many" (any number of methods), "one" (one method per patch), or "one per layer"
            (one method per decoder layer; a method may claim several layers).
    """

    name: str
    where: str
    implements: str
    shared_by: str


SITES: dict[str, Site] = {
    site.name: site
    for site in (
        Site("vision", "inside the vision tower: read between blocks (attention probes)",
             "TokenSelector.vision_layer and needs={'vision_attention'}", "many"),
        Site("embeds", "after the projector, before decoder layer 0: the stream shrinks",
             "TokenSelector.select (selection_layers includes 0)", "one per layer"),
        Site("layer", "before decoder layer K during prefill: the stream shrinks from K on",
             "TokenSelector.select (selection_layers)", "one per layer"),
        Site("route", "inside decoder layer K: a subset of the visual tokens runs it, the rest ride the residual",
             "Router.route (routed_layers)", "one per layer"),
        Site("position", "the rotary positions of a call's tokens (float allowed)", "PositionMethod.positions", "one"),
        Site("attention", "the attention mask of every decoder layer (SDPA and eager)",
             "AttentionMethod.mask_function", "one"),
        Site("cache", "the KV cache after the prefill and after each decoding step", "CacheMethod.edit_cache", "one"),
        Site("logits", "the decoding step: contrastive branches as a LogitsProcessor", "DecodeMethod.combine", "one"),
    )
}

#: sites whose methods act on the decoder stack, run by the engine's text-stack runner
STACK_SITES = frozenset({"embeds", "layer", "route", "position", "attention", "cache"})
