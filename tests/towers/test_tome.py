"""ToMe inside vision towers: the merge and the schedule by hand, an independent re-computation of a
merged forward, the three layouts against each other with copied weights, batch == singles,
SDPA == eager, exact removal, and the errors."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.models.vision_transformer import ResPostBlock
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlmkit.errors import ConfigError, ConflictError, UnsupportedModelError
from vlmkit.towers import bipartite_matching, install_tome, r_schedule, raster_order
from vlmkit.towers.tome import ToMeHandle, ToMeState

IMAGE, PATCH, WIDTH, DEPTH, HEADS = 48, 8, 32, 3, 4  # 36 patches (+ [CLS])
TOWERS = ["clip", "siglip", "timm", "open_clip"]


def hf_config(config_class, attention: str = "eager"):
    return config_class(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        image_size=IMAGE, patch_size=PATCH, hidden_act="gelu", attn_implementation=attention,
    )


def timm_vit(**overrides) -> TimmViT:
    settings = {
        "img_size": IMAGE, "patch_size": PATCH, "embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS, "mlp_ratio": 2,
        "qkv_bias": True, "pre_norm": True, "num_classes": 0, "global_pool": "",
        "norm_layer": functools.partial(nn.LayerNorm, eps=1e-5),
    }
    return TimmViT(**{**settings, **overrides}).eval()


def open_clip_vit() -> OpenClipViT:
    return OpenClipViT(IMAGE, PATCH, WIDTH, DEPTH, HEADS, mlp_ratio=2, output_dim=16, output_tokens=True).eval()


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "clip":
        return CLIPVisionModel(hf_config(CLIPVisionConfig)).eval()
    if name == "siglip":
        return SiglipVisionModel(hf_config(SiglipVisionConfig)).eval()
    return timm_vit() if name == "timm" else open_clip_vit()


def run(name: str, tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's output tokens (after its final norm)."""
    with torch.no_grad():
        if name in ("clip", "siglip"):
            return tower(pixel_values=pixels).last_hidden_state
        if name == "timm":
            return tower(pixels)
        return tower(pixels)[1]


def pixels(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def timm_from_clip(clip: CLIPVisionModel) -> TimmViT:
    """A timm ViT with the CLIP tower's weights (its final norm is CLIP's post_layernorm)."""
    embeddings = clip.embeddings
    weights = {
        "patch_embed.proj.weight": embeddings.patch_embedding.weight,
        "cls_token": embeddings.class_embedding.view(1, 1, -1),
        "pos_embed": embeddings.position_embedding.weight[None],
        "norm_pre.weight": clip.pre_layrnorm.weight, "norm_pre.bias": clip.pre_layrnorm.bias,
        "norm.weight": clip.post_layernorm.weight, "norm.bias": clip.post_layernorm.bias,
    }
    for index, layer in enumerate(clip.encoder.layers):
        attention, prefix = layer.self_attn, f"blocks.{index}."
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        weights[prefix + "attn.qkv.weight"] = torch.cat([p.weight for p in projections])
        weights[prefix + "attn.qkv.bias"] = torch.cat([p.bias for p in projections])
        pairs = {"norm1": layer.layer_norm1, "norm2": layer.layer_norm2, "attn.proj": attention.out_proj,
                 "mlp.fc1": layer.mlp.fc1, "mlp.fc2": layer.mlp.fc2}
        for name, module in pairs.items():
            weights[f"{prefix}{name}.weight"], weights[f"{prefix}{name}.bias"] = module.weight, module.bias
    vit = timm_vit()
    vit.load_state_dict(weights)
    return vit


def open_clip_from_timm(vit: TimmViT) -> OpenClipViT:
    """An open_clip ViT with the timm ViT's weights (its ``proj`` stays random)."""
    tower = open_clip_vit()
    weights = {
        "conv1.weight": vit.patch_embed.proj.weight, "class_embedding": vit.cls_token.view(-1),
        "positional_embedding": vit.pos_embed[0], "proj": tower.proj,
        "ln_pre.weight": vit.norm_pre.weight, "ln_pre.bias": vit.norm_pre.bias,
        "ln_post.weight": vit.norm.weight, "ln_post.bias": vit.norm.bias,
    }
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for index in range(DEPTH):
        ours, theirs = f"transformer.resblocks.{index}.", f"blocks.{index}."
        weights[ours + "attn.in_proj_weight"] = vit.state_dict()[theirs + "attn.qkv.weight"]
        weights[ours + "attn.in_proj_bias"] = vit.state_dict()[theirs + "attn.qkv.bias"]
        for name, source in names.items():
            for kind in ("weight", "bias"):
                weights[f"{ours}{name}.{kind}"] = vit.state_dict()[f"{theirs}{source}.{kind}"]
    tower.load_state_dict(weights)
    return tower


# ---------------------------------------------------------------- the merge by hand
# 7 tokens, [CLS] + 6, with 2-d keys. A = positions 0, 2, 4, 6; B = 1, 3, 5.
METRIC = torch.tensor([[[1.0, 0.0],    # 0 [CLS] (A): as close to 1 as can be, but protected
                        [1.0, 0.0],    # 1 B
                        [1.0, 0.1],    # 2 A: cos to 1 = 1/sqrt(1.01) = 0.9950, to 3 = 0.0995
                        [0.0, 1.0],    # 3 B
                        [0.2, 1.0],    # 4 A: cos to 3 = 1/sqrt(1.04) = 0.9806, to 1 = 0.1961
                        [-1.0, 0.0],   # 5 B
                        [-1.0, 0.5]]])  # 6 A: cos to 5 = 1/sqrt(1.25) = 0.8944, to 3 = 0.4472


def test_merge_by_hand_protects_cls_and_merges_the_two_best_edges():
    # edges: 2 -> 1 (0.995), 4 -> 3 (0.981), 6 -> 5 (0.894); r = 2 merges 2 into 1 and 4 into 3.
    # output order [CLS, unmerged A (6), B (1, 3, 5)]
    assert bipartite_matching(METRIC, r=2, protected=1).tolist() == [[0, 2, 2, 3, 3, 4, 1]]
    state = ToMeState(protected=1)
    x = torch.tensor([[[10.0], [1.0], [3.0], [5.0], [7.0], [9.0], [11.0]]])
    state.reset(x)
    state.size = torch.tensor([[1.0, 1.0, 3.0, 2.0, 2.0, 1.0, 1.0]])
    merged = state.merge(x, METRIC, r=2)
    # token 1: (1*1 + 3*3) / (1 + 3) = 2.5, size 4; token 3: (5*2 + 7*2) / 4 = 6, size 4
    assert merged[0, :, 0].tolist() == [10.0, 11.0, 2.5, 6.0, 9.0]
    assert state.size.tolist() == [[1.0, 1.0, 4.0, 4.0, 1.0]]
    assert state.patch_token.tolist() == [[0, 2, 2, 3, 3, 4, 1]]
    assert state.source[0].tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1],
        [0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
    ]
    bias = state.attention_bias(torch.float32)
    assert bias.shape == (1, 1, 1, 5)
    torch.testing.assert_close(bias.flatten(), torch.tensor([0.0, 0.0, math.log(4), math.log(4), 0.0]))


def test_merge_by_hand_without_protection_merges_cls_first():
    # the [CLS] edge (cos 1 to token 1) is now the best: 0 and 2 merge into 1; order [4, 6, 1, 3, 5]
    assert bipartite_matching(METRIC, r=2, protected=0).tolist() == [[2, 2, 2, 3, 0, 4, 1]]


def test_without_protection_unmerged_a_tokens_stay_by_descending_edge_as_tome():
    # A = 0, 2, 4; B = 1, 3. Edges: 0 -> 1 (0.447), 2 -> 1 (1.0), 4 -> 3 (0.981). r = 1 merges 2 into 1;
    # the unmerged A tokens leave by descending edge, 4 (0.981) before 0 (0.447): order [4, 0, 1, 3]
    metric = torch.tensor([[[1.0, 2.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.2, 1.0]]])
    assert bipartite_matching(metric, r=1, protected=0).tolist() == [[1, 2, 2, 3, 0]]
    # with a protected first token the unmerged A tokens are sorted by position: [0 (protected), 4, 1, 3]
    assert bipartite_matching(metric, r=1, protected=1).tolist() == [[0, 2, 2, 3, 1]]


def test_equal_edges_merge_the_lower_a_token_first():
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])  # both edges are 1
    assert bipartite_matching(metric, r=1).tolist() == [[2, 1, 0, 2]]


# ---------------------------------------------------------------- the schedule by hand
def test_schedule_by_hand():
    assert r_schedule(3, 4) == [3, 3, 3, 3]
    assert r_schedule([1, 0, 2], 3) == [1, 0, 2]
    # (16, -1) on 12 blocks: m = int(16 * 2) = 32, top = 2 * 16 - 32 = 0, step = -32 / 11 = -2.909...
    # int(32 - 2.909 l): 32, 29.09, 26.18, 23.27, 20.36, 17.45, 14.55, 11.64, 8.73, 5.82, 2.91, 0
    assert r_schedule((16, -1), 12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    # (8, 0.5) on 12 blocks: m = int(8 * 0.5) = 4, top = 12, step = 8 / 11 = 0.727...
    # int(4 + 0.727 l): 4, 4.73, 5.45, 6.18, 6.91, 7.64, 8.36, 9.09, 9.82, 10.55, 11.27, 12
    assert r_schedule((8, 0.5), 12) == [4, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12]
    assert r_schedule((5, 0), 3) == [5, 5, 5]


def test_later_blocks_clamp_with_a_warning():
    # ViT-B/16 at 224: 197 tokens, r = 16 in 12 blocks; block 11 receives 197 - 11 * 16 = 21 tokens
    # and can merge (21 - 1) // 2 = 10
    handle = ToMeHandle(None, None, [16] * 12, True, ToMeState(protected=1))
    with pytest.warns(UserWarning, match=r"they merge \[16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 10\]"):
        assert handle.effective_schedule(197) == [16] * 11 + [10]


# ---------------------------------------------------------------- forwards
def reference_timm_forward(vit: TimmViT, images: torch.Tensor, r: int) -> torch.Tensor:
    """ToMe on a timm ViT written out: eager attention + log(size), merge by one-hot sums, then the MLP."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    size = None
    for block in vit.blocks:
        batch, tokens, width = x.shape
        q, k, v = block.attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) * block.attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :]
        x = x + block.attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, width))
        groups = F.one_hot(bipartite_matching(k.mean(1), r, protected=1), tokens - r).transpose(1, 2).float()
        weights = torch.ones(batch, tokens) if size is None else size
        size = (groups @ weights[..., None])[..., 0]
        x = (groups @ (x * weights[..., None])) / size[..., None]
        x = x + block.mlp(block.norm2(x))
    return vit.norm(x)


def test_merged_timm_forward_equals_a_written_out_reference():
    vit = build("timm")
    handle = install_tome(vit, r=5)
    with torch.no_grad():
        expected = reference_timm_forward(vit, pixels(2), r=5)
    got = run("timm", vit, pixels(2))
    assert got.shape == (2, 37 - 15, WIDTH)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert handle.state.size.sum(1).tolist() == [37.0, 37.0]


@pytest.mark.parametrize("name", TOWERS)
def test_r0_is_bit_identical_and_remove_restores_exactly(name):
    tower = build(name)
    images = pixels(2)
    before = run(name, tower, images)
    weights = {key: value.clone() for key, value in tower.state_dict().items()}
    hooks = {key: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for key, m in tower.named_modules()}

    with install_tome(tower, r=0):
        assert torch.equal(run(name, tower, images), before)
    handle = install_tome(tower, r=3)
    merged = run(name, tower, images)
    assert merged.shape[1] == before.shape[1] - 3 * DEPTH
    handle.remove()
    handle.remove()

    assert torch.equal(run(name, tower, images), before)
    assert tower.state_dict().keys() == weights.keys()
    assert all(torch.equal(value, weights[key]) for key, value in tower.state_dict().items())
    assert {key: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for key, m in tower.named_modules()} == hooks
    assert not [key for key, module in tower.named_modules() if "forward" in module.__dict__]


def test_clip_timm_and_open_clip_with_the_same_weights_merge_the_same_tokens():
    clip = build("clip")
    vit = timm_from_clip(clip)
    open_clip = open_clip_from_timm(vit)
    images = pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(vit(images), clip.post_layernorm(run("clip", clip, images)), atol=1e-5, rtol=1e-5)
    handles = [install_tome(tower, r=(4, -0.5)) for tower in (clip, vit, open_clip)]
    with torch.no_grad():
        clip_tokens = clip.post_layernorm(run("clip", clip, images))
    timm_tokens, open_clip_tokens = run("timm", vit, images), run("open_clip", open_clip, images)

    assert handles[0].schedule == [6, 4, 2]
    assert clip_tokens.shape == (2, 37 - 12, WIDTH)
    for handle in handles[1:]:
        assert torch.equal(handle.state.source, handles[0].state.source)
    torch.testing.assert_close(timm_tokens, clip_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(open_clip_tokens, clip_tokens[:, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TOWERS)
def test_a_batch_equals_single_images(name):
    tower = build(name)
    handle = install_tome(tower, r=4)
    images = pixels(3)
    batched = run(name, tower, images)
    sources = handle.state.source
    for row in range(3):
        single = run(name, tower, images[row : row + 1])
        assert torch.equal(handle.state.source, sources[row : row + 1])
        torch.testing.assert_close(single, batched[row : row + 1], atol=1e-5, rtol=1e-5)


def test_sdpa_equals_eager_for_clip():
    torch.manual_seed(0)
    eager = CLIPVisionModel(hf_config(CLIPVisionConfig, "eager")).eval()
    sdpa = CLIPVisionModel(hf_config(CLIPVisionConfig, "sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    handles = [install_tome(tower, r=5) for tower in (eager, sdpa)]
    images = pixels(2)
    torch.testing.assert_close(run("clip", sdpa, images), run("clip", eager, images), atol=1e-5, rtol=1e-5)
    assert torch.equal(handles[0].state.source, handles[1].state.source)


def test_proportional_attention_changes_only_blocks_after_the_first_merge():
    tower = build("timm")
    images = pixels(2)
    with install_tome(tower, r=[0, 4, 0], proportional=True) as handle:
        proportional = run("timm", tower, images)
        sizes = handle.state.size
    with install_tome(tower, r=[0, 4, 0], proportional=False):
        plain = run("timm", tower, images)
    with install_tome(tower, r=[0, 0, 4], proportional=True):
        last_only = run("timm", tower, images)
    with install_tome(tower, r=[0, 0, 4], proportional=False):
        assert torch.equal(run("timm", tower, images), last_only)  # no block runs after the merge
    assert (sizes > 1).any() and not torch.allclose(proportional, plain)


def test_raster_order_puts_tokens_where_their_first_patch_was():
    clip = build("clip")
    open_clip = open_clip_from_timm(timm_from_clip(clip))
    handles = [install_tome(clip, r=4), install_tome(open_clip, r=4)]
    images = pixels(2)
    tokens, sources = raster_order(run("clip", clip, images), handles[0].state)
    first = sources.argmax(-1)  # the first original token each output token holds
    assert first[:, 0].tolist() == [0, 0] and (first.diff(dim=1) > 0).all()
    assert sources.sum(1).eq(1).all()  # every original token is held by exactly one output token
    order = handles[0].state.source.argmax(-1).argsort(-1)
    torch.testing.assert_close(tokens, run("clip", clip, images).gather(1, order[..., None].expand(-1, -1, WIDTH)))

    without_cls, cls_free_sources = raster_order(run("open_clip", open_clip, images), handles[1].state)
    assert torch.equal(cls_free_sources, sources[:, 1:])
    assert without_cls.shape == (2, 37 - 12 - 1, WIDTH)


# ---------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(UnsupportedModelError, match=r"Linear is not a supported vision tower. Supported: transformers CLIPVisionModel"):
        install_tome(nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match=r"blocks of type \['ResPostBlock'\]; only timm.models.vision_transformer.Block"):
        install_tome(timm_vit(block_fn=ResPostBlock))
    tower = build("timm")
    with pytest.raises(ConfigError, match=r"r=19 exceeds the 18 tokens the first block can merge \(37 tokens, 1 protected"):
        install_tome(tower, r=19)
    with pytest.raises(ConfigError, match=r"the r list has 2 entries for 3 blocks; give one r per block"):
        install_tome(tower, r=[1, 2])
    with pytest.raises(ConfigError, match=r"inflection=2 must be a number in \[-1, 1\]"):
        install_tome(tower, r=(4, 2))
    with pytest.raises(TypeError, match=r"r must be an int, a list of ints or \(int, inflection\), got '8'"):
        install_tome(tower, r="8")
    with pytest.raises(ConfigError, match=r"r=-1 is negative"):
        install_tome(tower, r=-1)
    with pytest.raises(ConfigError, match=r"protect_cls=True but this transformers CLIP/SigLIP has no \[CLS\]"):
        install_tome(build("siglip"), protect_cls=True)
    with install_tome(tower, r=2):
        with pytest.raises(ConflictError, match=r"already have a replaced forward"):
            install_tome(tower, r=2)
        with pytest.raises(ConfigError, match=r"got attn_mask; ToMe merges the tokens a mask would index"):
            tower.forward_features(pixels(), attn_mask=torch.zeros(37, 37))
    dynamic = timm_vit(dynamic_img_size=True)
    too_small = pytest.raises(ConfigError, match=r"r=3 exceeds the 2 tokens the first block can merge \(5 tokens")
    with install_tome(dynamic, r=3), too_small:  # a 16 x 16 image has 4 patches + [CLS]: at most 2 merge
        dynamic(torch.randn(1, 3, 16, 16))


def test_flash_attention_is_refused_naming_the_implementations_that_work():
    clip = build("clip")
    clip.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match=r"'flash_attention_2' attention implementation cannot take; use one of \('eager', 'sdpa'\)"):
        install_tome(clip, r=2)
    install_tome(clip, r=2, proportional=False).remove()
    handle = install_tome(build("clip"), r=2)
    handle.layout.blocks[0].self_attn.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match=r"'flash_attention_2' attention implementation"):
        run("clip", handle.tower, pixels())
