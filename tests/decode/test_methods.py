"""The decoding methods on hand-made tensors, their image-side inputs, and their configuration errors."""
from __future__ import annotations

import math

import pytest
import torch

import vlmkit
from tests.conftest import photos
from tests.engine.models import inputs, model
from vlmkit.engine.branches import CallInputs, Step
from vlmkit.errors import ConfigError, UnknownMethodError
from vlmkit.methods.decode.base import contrast, plausibility_cutoff, plausible_tokens
from vlmkit.methods.decode.debias import calibrate
from vlmkit.methods.decode.images import TRANSFORMS, _patchify, _unpatchify, diffusion_alpha_bar, map_images, random_transform
from vlmkit.methods.decode.layers import candidate_layers, gather_rows, jensen_shannon, most_divergent


def test_contrast_and_plausibility_on_hand_made_logits():
    scores = torch.tensor([[2.0, 1.0, 2.0 + math.log(0.1) - 1e-4, -5.0]])
    negative = torch.tensor([[1.0, 3.0, 0.0, 0.0]])
    assert plausibility_cutoff(scores, 0.1).tolist() == [[False, False, True, True]]
    out = contrast(scores, negative, alpha=1.0, beta=0.1)
    assert out[0, :2].tolist() == [3.0, -1.0] and math.isinf(out[0, 2]) and math.isinf(out[0, 3])
    assert torch.equal(contrast(scores, negative, alpha=0.0, beta=0.1), scores)  # off: no mask either
    assert contrast(scores, negative, 0.0, 0.1) is not scores  # never the input tensor itself
    two_rows = torch.tensor([[5.0, 0.0, 4.5, 0.0], [0.0, 5.0, 0.0, 0.0]])
    assert plausible_tokens(two_rows, 0.1).tolist() == [0, 1, 2]  # plausible in some row
    assert plausible_tokens(two_rows, 0.1, active=False).numel() == 0


def test_m3id_weight_grows_with_time():
    m3id = vlmkit.parse_spec("m3id")
    weights = [m3id.weight(t) for t in (0, 1, 10, 50)]
    assert weights[0] == 0.0 and weights == sorted(weights)
    assert weights[2] == pytest.approx((1 - math.exp(-0.2)) / math.exp(-0.2))
    scores, negative = torch.tensor([[1.0, 0.5, -3.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    # t = 0: no contrast yet, but the reference's plausibility mask already applies
    # (-3 is below log(0.1) + max = 1 - 2.303 in probability terms: e^-3 < 0.1 e^1)
    assert torch.equal(m3id.combine(scores, Step(0, [negative])), torch.tensor([[1.0, 0.5, -math.inf]]))
    off = vlmkit.parse_spec("m3id:decay=0")  # no contrast at any step: plain decoding, no mask
    assert torch.equal(off.combine(scores, Step(0, [negative])), scores)
    w = m3id.weight(10)
    expected = torch.tensor([[1.0 + w, 0.5 - 0.5 * w, -math.inf]])
    assert torch.allclose(m3id.combine(scores, Step(10, [negative])), expected)


def test_calibration_makes_the_image_absent_answer_uniform():
    absent = torch.tensor([[3.0, 0.0, 1.0, -1.0, 0.5]])  # the prior prefers class 0 (tokens 0, 1)
    classes = [[0, 1], [2, 3]]
    out = calibrate(absent, absent, classes).softmax(-1)
    assert float(out[0, [0, 1]].sum()) == pytest.approx(float(out[0, [2, 3]].sum()), rel=1e-5)
    assert float(out[0, 4]) == pytest.approx(float(absent.softmax(-1)[0, 4]), rel=1e-5)  # other tokens keep their probability
    present = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    probs = calibrate(present, absent, classes).softmax(-1)[0]
    prior = absent.softmax(-1)[0]
    ratio = float((probs[0] + probs[1]) / (probs[2] + probs[3]))
    assert ratio == pytest.approx(float((prior[2] + prior[3]) / (prior[0] + prior[1])), rel=1e-5)  # W = diag(prior)^-1


def test_jensen_shannon_and_layer_choice():
    p = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]]), -1)
    near, far = p.clone(), torch.log_softmax(torch.tensor([[0.0, 0.0, 2.0], [2.0, 0.0, 0.0]]), -1)
    assert torch.allclose(jensen_shannon(p, near), torch.zeros(2), atol=1e-7)
    assert torch.allclose(jensen_shannon(p, far), jensen_shannon(far, p))
    assert float(jensen_shannon(p, far)[0]) <= math.log(2)
    mixed = torch.stack([near[0], far[1]])  # per row: row 0 of `mixed` equals p, row 1 is far from it
    choice = most_divergent(p, [near, mixed])
    assert choice.tolist() == [0, 1]
    assert torch.equal(gather_rows([near, mixed], choice), torch.stack([near[0], mixed[1]]))


def test_candidate_layers_follow_dola():
    assert candidate_layers("dola", "low", 32, tied_embeddings=False) == tuple(range(0, 16, 2))
    assert candidate_layers("dola", "high", 32, tied_embeddings=False) == tuple(range(16, 32, 2))
    assert candidate_layers("dola", "low", 32, tied_embeddings=True) == tuple(range(2, 16, 2))
    assert candidate_layers("dola", "low", 48, tied_embeddings=False) == tuple(range(0, 20, 2))
    assert candidate_layers("dola", "high", 48, tied_embeddings=False) == tuple(range(28, 48, 2))
    assert candidate_layers("dola", "low", 2, tied_embeddings=True) == (1,)
    assert candidate_layers("dola", (3, 1), 4, tied_embeddings=False) == (3, 1)
    with pytest.raises(ConfigError, match="valid: 0..3"):
        candidate_layers("dola", (4,), 4, tied_embeddings=False)


def test_diffusion_schedule():
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    assert diffusion_alpha_bar(0) == pytest.approx(1 - float(betas[0]))
    assert diffusion_alpha_bar(500) == pytest.approx(float(torch.prod(1 - betas[:501])))
    assert diffusion_alpha_bar(999) < 0.1 < diffusion_alpha_bar(500) < 1


def test_branch_images_are_per_image_and_batch_independent():
    _, processor = model("llava")
    two = inputs(processor, photos()[:2], ["What?", "What?"])
    one = inputs(processor, photos()[1:2], ["What?"])
    noise = lambda block, grid, generator: torch.randn(block.shape, generator=generator)  # noqa: E731
    assert torch.equal(map_images(two, 3, noise)["pixel_values"][1], map_images(one, 3, noise)["pixel_values"][0])
    assert not torch.equal(map_images(two, 3, noise)["pixel_values"][0], map_images(two, 3, noise)["pixel_values"][1])
    assert not torch.equal(map_images(one, 3, noise)["pixel_values"], map_images(one, 4, noise)["pixel_values"])


def test_transforms_in_pixel_space():
    _, processor = model("llava")
    pixels = inputs(processor, photos()[:1], ["What?"])["pixel_values"]
    mean, std = torch.tensor(processor.image_processor.image_mean), torch.tensor(processor.image_processor.image_std)
    generator = torch.Generator().manual_seed(0)
    flipped = random_transform(pixels, None, generator, choices=("hflip",), mean=mean, std=std)
    torch.testing.assert_close(flipped, pixels.flip(-1), rtol=0, atol=1e-5)
    for name in TRANSFORMS:
        out = random_transform(pixels, None, torch.Generator().manual_seed(1), choices=(name,), mean=mean, std=std)
        assert out.shape == pixels.shape and torch.isfinite(out).all() and not torch.allclose(out, pixels), name
        again = random_transform(pixels, None, torch.Generator().manual_seed(1), choices=(name,), mean=mean, std=std)
        assert torch.equal(out, again), name


def test_qwen2_vl_patch_rows_round_trip():
    tiny, processor = model("qwen2_vl")
    data = inputs(processor, photos()[:1], ["What?"])
    grid, patches = data["image_grid_thw"][0], data["pixel_values"]
    frames = _unpatchify(patches, grid, tiny.config.vision_config)
    assert frames.shape[:2] == (2, 3)  # temporal patch of 2 copies of the still image, RGB
    assert torch.equal(frames[0], frames[1])
    assert torch.equal(_patchify(frames, grid, tiny.config.vision_config), patches)
    flipped = processor.image_processor(images=[photos()[0].transpose(0)], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(_unpatchify(flipped, grid, tiny.config.vision_config), frames.flip(-1), rtol=0, atol=0.1)


def test_branch_inputs_without_images_and_with_a_prefix():
    _, processor = model("qwen2_vl")
    data = inputs(processor, photos()[:2], ["What is shown?", "Is there a cat in the image? Answer."])
    call = CallInputs(dict(data), {"image": processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")}, 0, None)
    text = call.without_visual()
    assert set(text.kwargs) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    for row, original in zip(text.rows(), call.rows()):
        keep = original["input_ids"] != call.placeholder_ids["image"]
        assert torch.equal(row["input_ids"], original["input_ids"][keep])
        assert not row["mm_token_type_ids"].any()
    prefixed = call.with_prefix([7, 8])
    assert torch.equal(prefixed.kwargs["pixel_values"], data["pixel_values"])
    for row, original in zip(prefixed.rows(), call.rows()):
        assert row["input_ids"][:2].tolist() == [7, 8] and torch.equal(row["input_ids"][2:], original["input_ids"])
        assert torch.equal(row["mm_token_type_ids"][2:], original["mm_token_type_ids"])


# ---------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("vcd:alpha=-1", r"alpha=-1 is out of range; valid values are in \[0.0, inf\)"),
        ("vcd:beta=0", r"beta=0 is out of range; valid values are in \(0.0, 1.0\]"),
        ("vcd:beta=1.5", r"beta=1.5 is out of range"),
        ("vcd:noise_step=1000", r"noise_step=1000 must be an integer in \[0, 999\]"),
        ("vcd:branch_pruning='some'", "branch_pruning='some' is not one of 'same', 'none'"),
        ("icd:instruction=''", "instruction='' must be a non-empty string"),
        ("m3id:decay=-0.1", "decay=-0.1 is out of range"),
        ("ritual:transforms=('hflip','mirror')", r"unknown transform\(s\) \['mirror'\]; valid transforms: hflip, vflip, rotate, color_jitter, blur, crop"),
        ("ritual:alpha_pos=-3", "alpha_pos=-3 is out of range"),
        ("ritual:pixel_std=(0.5,0,0.5)", "pixel_std"),
        ("dola:layers='middle'", "layers='middle' is not one of 'low', 'high' or a tuple"),
        ("dola:relative_top=0", "relative_top=0 is out of range"),
        ("lol:amateur='model'", "amateur='model' is not one of 'instruction', 'noise', 'none'"),
        ("lol:omega=-1", "omega=-1 is out of range"),
        ("debias:mode='post'", "mode='post' is not one of 'calibrate', 'sample'"),
        ("debias:answers=('yes',)", "two or more non-empty words"),
        ("debias:absent='blank'", "absent='blank' is not one of 'none', 'noise'"),
    ],
)
def test_bad_parameters_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        vlmkit.parse_spec(spec)


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(UnknownMethodError, match="Did you mean 'alpha'.*Valid parameters: branch_pruning, alpha, beta, noise_step, seed"):
        vlmkit.parse_spec("vcd:alpah=1")


def test_specs_take_tuples_and_strings_with_commas():
    assert vlmkit.parse_spec("debias:answers=('yes','no','maybe'),steps=2").config.answers == ("yes", "no", "maybe")
    assert vlmkit.parse_spec("dola:layers=(0,2),relative_top=0.2").config.layers == (0, 2)
    assert vlmkit.parse_spec("icd:instruction='Be vague, please.',alpha=2").config.instruction == "Be vague, please."
    assert vlmkit.parse_spec("ritual:transforms='blur'").config.transforms == ("blur",)


def test_manifests_are_listed():
    infos = {info.name: info for info in vlmkit.list_methods() if info.family == "decode"}
    assert set(infos) == {"vcd", "icd", "m3id", "ritual", "dola", "lol", "debias"}
    assert all(info.site == "logits" and info.paper.startswith("https://arxiv.org/abs/") for info in infos.values())
    vcd = {p.name: p for p in infos["vcd"].params}
    assert (vcd["alpha"].default, vcd["beta"].default, vcd["noise_step"].default) == (1.0, 0.1, 500)
