"""`tome` through `vlmkit.apply`: what a VLM's LLM receives after merging in its vision tower (checked
against the tower merged by hand), and the same method on bare timm, open_clip and transformers towers."""
from __future__ import annotations

import pytest
import timm
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import QUESTIONS, inputs, model
from vlmkit.adapters import adapter_for
from vlmkit.errors import UnsupportedModelError
from vlmkit.towers import install_tome, raster_order


def llm_input(tiny, batch):
    """The embeddings decoder layer 0 receives."""
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("x", kwargs.get("hidden_states", args[0] if args else None))

    hook = adapter_for(tiny).decoder_layers[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            tiny(**batch)
    finally:
        hook.remove()
    return seen["x"]


def test_the_llm_receives_the_merged_tokens_in_raster_order():
    tiny, processor = model("llava")
    batch = inputs(processor, photos()[:1], QUESTIONS[:1])
    adapter = adapter_for(tiny)
    read = adapter.default_vision_layer()  # the block whose output the projector reads
    blocks = len(adapter.vision_layers)
    with vlmkit.apply(tiny, "tome:r=4") as patch:
        received = llm_input(tiny, batch)
        kept = patch.selections["tome"][0]
    schedule = patch.methods[0].handle.schedule
    assert schedule == [4 if block <= read else 0 for block in range(blocks)]  # later blocks are not read
    # by hand: the tower merged with the same schedule, its output at the read layer in raster order,
    # [CLS] dropped (LLaVA's "default" strategy), projected
    tower = adapter.vision_tower
    with install_tome(tower, schedule) as handle, torch.no_grad():
        hidden = tower(batch["pixel_values"], output_hidden_states=True).hidden_states[read + 1]
        state = handle.state
        state.patch_token = state.history[read]
        state.size = torch.zeros(1, hidden.shape[1]).scatter_add(1, state.patch_token, torch.ones_like(state.patch_token, dtype=torch.float))
        tokens, sources = raster_order(hidden, state)
        expected = adapter.project(tokens[0, 1:])
    patches = 144
    assert len(kept) == patches - 4 * (read + 1)
    assert hidden.shape[1] == patches + 1 - 4 * (read + 1)
    first = sources[0, 1:].float().argmax(dim=1) - 1  # each merged token's first patch
    assert torch.equal(kept, first)
    slots = torch.nonzero(batch["input_ids"][0] == tiny.config.image_token_id).flatten()[: len(kept)]
    torch.testing.assert_close(received[0, slots], expected, rtol=1e-5, atol=1e-5)
    text_after = received[0, slots[-1] + 1]
    assert not torch.equal(text_after, expected[-1])  # the dropped placeholders are gone from the stream


def timm_tower():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, global_pool="").eval()


def open_clip_tower():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=64, patch_size=16, width=64, layers=3, heads=4, mlp_ratio=2.0, output_dim=32).eval()


def clip_tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4)
    return CLIPVisionModel(config).eval()


@pytest.mark.parametrize("build", [timm_tower, open_clip_tower, clip_tower], ids=["timm", "open_clip", "transformers"])
def test_apply_on_a_bare_tower_equals_the_tower_merge_and_removes_exactly(build):
    tower = build()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    run = (lambda m: m(pixel_values=pixels).last_hidden_state) if build is clip_tower else (lambda m: m(pixels))
    with torch.no_grad():
        plain = run(tower)
        with install_tome(tower, 2) as handle:
            merged = run(tower)
            sizes = handle.state.size.clone()
        state = {k: v.clone() for k, v in tower.state_dict().items()}
        with vlmkit.apply(tower, "tome:r=2") as patch:
            assert torch.equal(run(tower), merged)
            assert torch.equal(patch.methods[0].state.size, sizes)
            assert vlmkit.patch_of(tower) is patch
        assert torch.equal(run(tower), plain)
    assert all(torch.equal(v, state[k]) for k, v in tower.state_dict().items())
    assert "forward" not in tower.__dict__ and vlmkit.patch_of(tower) is None


def test_a_bare_tower_refuses_vlm_methods_by_name():
    with pytest.raises(UnsupportedModelError, match=r"fastv acts on a vision-language model; .* vlmkit applies: dymu, tome"):
        vlmkit.apply(timm_tower(), "fastv:keep=0.5")
    with pytest.raises(UnsupportedModelError, match="tome does not support qwen2_vl: its packed ViT joins 2 x 2 patches"):
        vlmkit.apply(model("qwen2_vl")[0], "tome:r=2")
