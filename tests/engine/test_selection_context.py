"""What the engine shows a selector, against eager attention maps and the unpatched model's own
cache and embeddings: last-token and text-token attention rows, keys, input embeddings, from the
layer before the selection or (attention_layer = "own") from the selection's own layer."""
from __future__ import annotations

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import inputs, model, tower_projections
from vlmkit.methods.prune.fastv import FastV

QUESTIONS = ["What is shown?", "Is there a cat in the image? Answer yes or no."]  # different lengths: left padding


class Recorder(FastV):
    """FastV that keeps everything and records what it was shown."""

    name = "recorder"

    def __init__(self, needs, attention_layer="previous", **params):
        super().__init__(**params)
        self.needs, self.attention_layer, self.seen = frozenset(needs), attention_layer, []

    def select(self, context):
        self.seen.append(context)
        return super().select(context)


def eager_run(tiny, batch):
    seen = {}
    hook = tiny.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        out = tiny(**batch, output_attentions=True, use_cache=True)
    hook.remove()
    return out, seen["embeds"]


@pytest.mark.parametrize("attention_layer,source", [("previous", 1), ("own", 2)])
def test_attention_rows_keys_and_embeds_match_the_eager_model(attention_layer, source):
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    assert (batch["attention_mask"] == 0).any()
    out, embeds = eager_run(tiny, batch)
    recorder = Recorder({"last_row_attention", "text_attention", "keys", "embeds"}, attention_layer, layer=2, keep=1.0)
    with vlmkit.apply(tiny, recorder), torch.no_grad():
        tiny(**batch)
    (context,) = recorder.seen
    attention = out.attentions[source].mean(dim=1)  # (B, L, L), mean over heads
    keys = out.past_key_values.layers[source].keys
    torch.testing.assert_close(context.embeds, embeds)
    for row in range(2):
        visual = torch.nonzero(batch["input_ids"][row] == tiny.config.image_token_id).flatten()
        valid = batch["attention_mask"][row].bool()
        text_after = torch.nonzero(valid & (torch.arange(valid.numel()) > visual.max())).flatten()
        torch.testing.assert_close(context.last_row_attention[row], attention[row, -1, visual], rtol=1e-5, atol=1e-6)
        assert torch.equal(context.text_rows[row], text_after)
        torch.testing.assert_close(context.text_attention[row], attention[row][text_after][:, visual], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(context.keys[row][:, valid], keys[row][:, valid], rtol=1e-5, atol=1e-6)


def test_own_layer_attention_may_select_before_the_llm_and_previous_may_not():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    recorder = Recorder({"last_row_attention"}, "own", layer=1, keep=1.0)
    recorder.selection_layers, recorder.sites = (lambda num_layers: (0,)), ("embeds",)
    with vlmkit.apply(tiny, recorder), torch.no_grad():
        tiny(**batch)
    assert recorder.seen[0].layer == 0 and recorder.seen[0].last_row_attention[0].numel() == 144
    previous = Recorder({"last_row_attention"}, layer=1, keep=1.0)
    previous.selection_layers, previous.sites = (lambda num_layers: (0,)), ("embeds",)
    with pytest.raises(vlmkit.errors.ConfigError, match="needs a layer before the selection"):
        vlmkit.apply(tiny, previous)


def test_the_cls_probe_gives_the_cls_rows_logits_mean_over_heads():
    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    tower = tiny.model.vision_tower
    layer = len(tower.encoder.layers) - 2  # the layer VisionZip probes on LLaVA
    query, key, scale = tower_projections(tower, batch["pixel_values"], layer)
    expected = (query[:, :, :1] @ key.transpose(-1, -2))[:, :, 0].mean(dim=1) * scale
    with vlmkit.apply(tiny, "visionzip:tokens=20") as patch, torch.no_grad():
        tiny(**batch)
        metas = [meta for _, meta in patch.state.encoded["image"][1]]
    for image, meta in enumerate(metas):
        torch.testing.assert_close(meta.probe["cls_logits"], expected[image, 1:], rtol=1e-5, atol=1e-6)  # patches only


def test_the_vision_marginals_are_the_patch_to_patch_maps_row_and_column_sums_and_means():
    from vlmkit.methods.prune.visionzip import VisionZip

    class Marginals(VisionZip):
        name = "marginals"
        needs = frozenset({"vision_attention", "vision_marginals"})

        def select(self, context):
            self.seen = context.vision
            return super().select(context)

    tiny, processor = model("llava", "eager")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    tower = tiny.model.vision_tower
    layer = len(tower.encoder.layers) - 2
    with torch.no_grad():
        attention = tower(batch["pixel_values"], output_attentions=True).attentions[layer].mean(dim=1)[:, 1:, 1:]
    query, key, scale = tower_projections(tower, batch["pixel_values"], layer)
    logits = ((query @ key.transpose(-1, -2)) * scale).mean(dim=1)[:, 1:, 1:]
    method = Marginals(keep=1.0)
    with vlmkit.apply(tiny, method), torch.no_grad():
        tiny(**batch)
    for image in range(2):
        probe = method.seen[image][0]
        torch.testing.assert_close(probe["received"], attention[image].mean(dim=0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probe["paid"], attention[image].sum(dim=1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probe["received_logits"], logits[image].mean(dim=0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probe["paid_logits"], logits[image].mean(dim=1), rtol=1e-5, atol=1e-5)


def test_full_keys_are_the_key_projection_of_every_token():
    from vlmkit.methods.prune.visionzip import VisionZip

    class FullKeys(VisionZip):
        name = "full_keys"
        needs = frozenset({"vision_attention", "vision_full_keys"})

        def select(self, context):
            self.seen = context.vision
            return super().select(context)

    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:2], QUESTIONS[:2])
    tower = tiny.model.vision_tower
    layer = len(tower.encoder.layers) - 2
    _, key, _ = tower_projections(tower, batch["pixel_values"], layer)
    expected = key.transpose(1, 2).flatten(2)[:, 1:]  # every head's key side by side
    method = FullKeys(keep=1.0)
    with vlmkit.apply(tiny, method), torch.no_grad():
        tiny(**batch)
    for image in range(2):
        torch.testing.assert_close(method.seen[image][0]["full_keys"], expected[image], rtol=1e-5, atol=1e-6)
