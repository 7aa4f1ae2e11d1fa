import pytest

from vlmkit.errors import ConfigError
from vlmkit.zoo import FAMILIES
from vlmkit.zoo.tokenizer import tiny_tokenizer

MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
    {"role": "user", "content": "And now?"},
]
RENDERED = {
    "llava": "USER: <image>\nWhat is shown? ASSISTANT: A red circle. </s>USER: And now? ASSISTANT:",
    "llava_next": "[INST] <image>\nWhat is shown? [/INST] A red circle.</s>[INST] And now? [/INST]",
    "llava_onevision": (
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "internvl": (
        "<|im_start|>user\n<IMG_CONTEXT>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "idefics3": (
        "User:<image>What is shown?<end_of_utterance>\nAssistant: A red circle.<end_of_utterance>\n"
        "User: And now?<end_of_utterance>\nAssistant:"
    ),
}
RENDERED["smolvlm"] = "<|im_start|>" + RENDERED["idefics3"]
RENDERED["qwen2_5_vl"] = RENDERED["qwen2_vl"]
RENDERED["qwen3_vl"] = RENDERED["qwen2_vl"].removeprefix("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
RENDERED["llava_next_video"] = RENDERED["llava"]
# FastVLM: a turn's images first, then each text after a newline (an assistant turn opens with one)
RENDERED["fast_vlm"] = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
    "<|im_start|>assistant\n\nA red circle.<|im_end|>\n<|im_start|>user\n\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
)

# Gemma 3: the assistant's role is "model"; an image is <start_of_image> where it stands in the turn
RENDERED["gemma3"] = (
    "<start_of_turn>user\n<start_of_image>What is shown?<end_of_turn>\n<start_of_turn>model\nA red circle.<end_of_turn>\n"
    "<start_of_turn>user\nAnd now?<end_of_turn>\n<start_of_turn>model\n"
)


def test_vocabulary_is_frozen():
    # Trained checkpoints depend on these ids; a change here breaks them.
    tokenizer = tiny_tokenizer("llava")
    assert len(tokenizer) == 762
    assert tokenizer("Is there a red circle left of the blue square?").input_ids == [
        1, 715, 288, 270, 446, 478, 420, 348, 274, 450, 482, 44,
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_mimics_the_real_layout(family):
    assert tiny_tokenizer(family).apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        RENDERED[family]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_any_text_round_trips_and_special_tokens_are_atomic(family):
    tokenizer = tiny_tokenizer(family)
    text = "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich 🙂 <|im_start|><image>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("<image>") in ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


def test_internvl_image_tokens_come_after_the_shared_vocabulary():
    shared, tokenizer = tiny_tokenizer("qwen2_vl"), tiny_tokenizer("internvl")
    assert len(tokenizer) == len(shared) + 3
    text = "<img><IMG_CONTEXT></img> Is there a red circle?<|im_end|><video>"
    ids = tokenizer(text).input_ids
    assert ids[:3] == [763, 762, 764]  # <IMG_CONTEXT>, <img>, </img> take the next ids, in that order
    assert ids[3:] == shared(" Is there a red circle?<|im_end|><video>").input_ids
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_image_tokens_come_after_the_shared_vocabulary(family):
    shared, tokenizer = tiny_tokenizer("llava"), tiny_tokenizer(family)
    assert len(tokenizer) == len(shared) + 3 + 36
    text = "<fake_token_around_image><row_1_col_2><image><global-img> Is there a red circle?<end_of_utterance><video>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # <fake_token_around_image>, <global-img>, <end_of_utterance>, then <row_1_col_1> ... <row_6_col_6>
    assert ids[:4] == [762, 762 + 3 + 1, 4, 763]
    assert tokenizer.convert_tokens_to_ids(["<end_of_utterance>", "<row_6_col_6>"]) == [764, 762 + 3 + 35]
    assert ids[4:-2] == shared(" Is there a red circle?", add_special_tokens=False).input_ids
    assert ids[-2:] == [764, 5]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<end_of_utterance>"
    assert tokenizer("Hi").input_ids[0] == (1 if family == "idefics3" else tokenizer.convert_tokens_to_ids("H"))


def test_left_padding_uses_the_pad_token():
    tokenizer = tiny_tokenizer("llava")
    tokenizer.padding_side = "left"
    batch = tokenizer(["a red circle", "red"], padding=True)
    assert batch.input_ids[1][:2] == [tokenizer.pad_token_id] * 2
    assert batch.attention_mask[1] == [0, 0, 1, 1]


def test_unknown_family():
    with pytest.raises(ConfigError, match="valid families"):
        tiny_tokenizer("idefics")


def test_gemma3_image_and_turn_tokens_come_after_the_shared_vocabulary():
    shared, tokenizer = tiny_tokenizer("llava"), tiny_tokenizer("gemma3")
    assert len(tokenizer) == len(shared) + 5
    names = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"]
    assert tokenizer.convert_tokens_to_ids(names) == list(range(762, 767))
    text = "<start_of_turn>user\n<start_of_image><image_soft_token><end_of_image> Is there a red circle?<end_of_turn>"
    ids = tokenizer(text).input_ids
    assert ids[:2] == [1, 765]  # <s> prepended, then <start_of_turn>
    assert tokenizer.decode(ids[1:]) == text
    assert (tokenizer.eos_token, tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token) == (
        "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
