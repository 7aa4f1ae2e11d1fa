"""The offline word-level tokenizer of the shapes models, and their LLaVA-1.5-like chat format.

The vocabulary is every word the shapes templates can produce (`vlmkit.data.shapes_text`,
`vlmkit.data.shapes_video`), in lower and capitalised form, plus punctuation, the option
markers "(A)".."(D)" and the special tokens of both model families. Text is split on whitespace
and punctuation, so tokenizing a conversation turn by turn gives the same ids as tokenizing it
whole; unknown words become `<unk>`.

The chat template renders `USER: <image>\\n{question} ASSISTANT: {answer}</s>` like LLaVA-1.5
(`<video>` for a video). Qwen2-VL's special tokens stay in the vocabulary (the first shapes-video
recipes used them), so the ids of the shipped model do not move.
"""
from __future__ import annotations

import re

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vlmkit.data.shapes_text import all_template_texts
from vlmkit.data.shapes_video import video_template_texts

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
OPTION_TOKENS = ("(A)", "(B)", "(C)", "(D)")
_EXTRA_WORDS = """USER ASSISTANT SYSTEM user assistant system image images picture video frame
frames object objects shape shapes color colour background what which where how many is are
there a an the in on at of to and or not no yes it this that with one word phrase""".split()

_LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ (message['content'] if message['content'] is string else message['content'][0]['text']) + ' ' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ IMAGE + '\\n' }}"
    "{%- elif item['type'] == 'video' -%}{{ VIDEO + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ ' ' }}"
    "{%- else -%}"
    "{{ 'ASSISTANT: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

PLACEHOLDERS = {
    "llava": ("<image>", "<video>"),
    "qwen2_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"),
}
"""What the chat template writes for an image and a video, per model family."""


def chat_template(family: str = "llava") -> str:
    """The jinja chat template (LLaVA-1.5 style) with `family`'s image and video placeholders."""
    image, video = PLACEHOLDERS[family]
    return _LLAVA_TEMPLATE.replace("IMAGE", repr(image)).replace("VIDEO", repr(video))


def vocabulary() -> list[str]:
    """All words, in a fixed order: specials, option markers, then sorted words."""
    words: set[str] = set(_EXTRA_WORDS)
    for text in all_template_texts() + video_template_texts():
        for word in re.findall(r"\w+|[^\w\s]", text):
            words |= {word, word.lower(), word.capitalize()}
    words |= set("ABCD") | set(".,;:?!()'\"-/")
    return [*SPECIAL_TOKENS, *OPTION_TOKENS, *sorted(words - set(SPECIAL_TOKENS))]


def build_tokenizer(family: str = "llava") -> PreTrainedTokenizerFast:
    """The shapes tokenizer: word level, `<s>` prepended, `</s>` ends assistant turns.

    Args:
        family: "llava" (`<image>` / `<video>` placeholders) or "qwen2_vl" (`<|image_pad|>` /
            `<|video_pad|>` between `<|vision_start|>` and `<|vision_end|>`); the ids are the same.

    Returns:
        A `PreTrainedTokenizerFast` with `chat_template` set; `save_pretrained` stores it.
    """
    vocab = {word: i for i, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in OPTION_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    image, video = ("<image>", "<video>") if family == "llava" else ("<|image_pad|>", "<|video_pad|>")
    extra = {"image_token": image, "video_token": video}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", chat_template=chat_template(family),
        model_input_names=["input_ids", "attention_mask"], extra_special_tokens=extra,
    )
