"""An offline, deterministic tokenizer for the tiny zoo models.

No training and no download: the vocabulary is written out below. It is a byte-level BPE
(`tokenizers.models.BPE` with `ignore_merges=True`) whose vocabulary holds

1. the special tokens of every supported family (`<s>`, `<image>`, `<|im_start|>`, ...),
2. the 256 byte symbols of the GPT-2 byte-level alphabet, so any text encodes and decodes
   losslessly, and
3. a fixed list of whole English words (with and without a leading space), so the prompts of
   tests and of the synthetic shapes data take one token per word.

A word found in the vocabulary is one token; anything else falls back to one token per byte.
All families share one vocabulary (same ids everywhere); they differ in which special tokens
play bos/eos/pad, whether `<s>` is prepended, and the chat template. A family whose image tokens
are not among the shared ones (InternVL's `<img>`, `</img>`, `<IMG_CONTEXT>`; Idefics3's and SmolVLM's
`<fake_token_around_image>`, `<global-img>`, `<end_of_utterance>` and the 36 `<row_i_col_j>` tile
tags; Gemma 3's `<start_of_image>`, `<end_of_image>`, `<image_soft_token>`, `<start_of_turn>` and
`<end_of_turn>`) gets them as special tokens after the shared vocabulary, so every other id stays the same.

The vocabulary is frozen: trained checkpoints (`vlmkit/zoo/checkpoints/`) and golden test
values depend on every id, so `SPECIAL_TOKENS` and `_WORDS` must not change.
"""
from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vlmkit.errors import ConfigError, did_you_mean

SPECIAL_TOKENS = (
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<video>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_WORDS = """
a an the this that these those it its there here what which who how many much where when why
is are was were be been do does did has have had can could will would should may might
of in on at to from by with without for and or not no yes as than then but if into onto over
under above below behind between near next inside outside around through across along
left right top bottom middle center corner edge side front back up down
red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver
circle circles square squares triangle triangles rectangle rectangles star stars ellipse
hexagon pentagon diamond cross heart line lines dot dots shape shapes object objects ball box
color colors colour size big small large tiny medium long short tall wide thin thick
zero one two three four five six seven eight nine ten eleven twelve
first second third last number count total same different other another more most less fewest
image images picture photo video videos frame frames scene background foreground
describe shown show see seen look looks appear appears visible present contain contains
move moves moving moved stay stays still static rotate rotates grow grows shrink shrinks
answer question word single briefly please detail details
What Which How Where Is Are Does Do Describe Answer Count The There It Yes No A An And now
user assistant system USER ASSISTANT INST You helpful
""".split()

# Chat templates: same structure as each real checkpoint's (role markers, where image/video
# placeholders go, generation prompt), written for these tiny models. Every literal is an
# expression so that the whitespace control of the tags never eats a newline.
_PARTS = (
    "{%- macro parts(message, image, video, sep) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + sep }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ image }}"
    "{%- elif item['type'] == 'video' -%}{{ video }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] + sep }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

def _vicuna_template(video: str) -> str:
    """The vicuna layout ("USER: <image>\\nWhat is this? ASSISTANT:") with `video` as a video's placeholder."""
    return _PARTS + (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ parts(message, '', '', ' ') }}"
        "{%- else -%}{{ message['role'] | upper }}{{ ': ' }}{{ parts(message, '<image>\\n', '" + video + "', ' ') }}"
        "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


# LLaVA-1.5 (vicuna): "USER: <image>\nWhat is this? ASSISTANT: answer</s>"
_LLAVA_TEMPLATE = _vicuna_template("")
# LLaVA-NeXT-Video-7B (vicuna): "USER: <video>\nWhat is moving? ASSISTANT:"
_LLAVA_NEXT_VIDEO_TEMPLATE = _vicuna_template("<video>\\n")

# LLaVA-NeXT (mistral): "[INST] <image>\nWhat is this? [/INST] answer</s>"
_LLAVA_NEXT_TEMPLATE = _PARTS + (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ ' ' }}{{ parts(message, '', '', '') }}{{ '</s>' }}"
    "{%- else -%}{{ '[INST] ' }}{{ parts(message, '<image>\\n', '', ' ') }}{{ '[/INST]' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# LLaVA-OneVision (qwen chatml): "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n"
_ONEVISION_TEMPLATE = _PARTS + (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{{ parts(message, '<image>\\n', '<video>\\n', '') }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Qwen2-VL: chatml with a default system turn and vision_start/pad/end placeholders.
_QWEN2_VL_TEMPLATE = _PARTS + (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{{ parts(message, '<|vision_start|><|image_pad|><|vision_end|>',"
    " '<|vision_start|><|video_pad|><|vision_end|>', '') }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Qwen3-VL: Qwen2-VL's chatml and vision tokens without the default system turn; the processor expands a
# video's <|video_pad|> to one "<t seconds><|vision_start|><|video_pad|>...<|vision_end|>" run per
# temporal patch (the layout Qwen3-VL's own processor gives the whole vision_start/pad/end triple)
_QWEN3_VL_TEMPLATE = _PARTS + (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{{ parts(message, '<|vision_start|><|image_pad|><|vision_end|>', '<|video_pad|>', '') }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# InternVL (chatml, no default system turn): "<|im_start|>user\n<IMG_CONTEXT>\nWhat?<|im_end|>\n"; the
# processor expands each <IMG_CONTEXT> to <img>, one <IMG_CONTEXT> per visual token, </img>
_INTERNVL_TEMPLATE = _PARTS + (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{{ parts(message, '<IMG_CONTEXT>\\n', '<video>\\n', '') }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# FastVLM (Qwen2 chatml with a default system turn): a turn's images first, then each text after a newline
# ("<|im_start|>user\n<image>\nWhat?<|im_end|>\n"); the processor expands each <image> to one per token
_FAST_VLM_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ '\\n' + message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ '\\n' + item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Gemma 3: "<s><start_of_turn>user\n<start_of_image>What?<end_of_turn>\n<start_of_turn>model\n" (the assistant's
# role is "model"); the processor expands each <start_of_image> to "\n\n<start_of_image>", one <image_soft_token> per
# visual token and "<end_of_image>\n\n" (pan-and-scan: the whole image, then each crop so)
_GEMMA3_TEMPLATE = _PARTS + (
    "{%- for message in messages -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{{ parts(message, '<start_of_image>', '', '') }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
_GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

def _idefics3_template(prefix: str) -> str:
    """Idefics3's layout ("User:<image>What is this?<end_of_utterance>\nAssistant:"; ": " after the role
    when the turn does not open with an image), after `prefix` (SmolVLM's "<|im_start|>")."""
    return _PARTS + (
        "{{ '" + prefix + "' }}"
        "{%- for message in messages -%}"
        "{{ message['role'] | capitalize }}"
        "{%- if message['content'] is not string and message['content'][0]['type'] == 'image' -%}{{ ':' }}"
        "{%- else -%}{{ ': ' }}{%- endif -%}"
        "{{ parts(message, '<image>', '<video>', '') }}{{ '<end_of_utterance>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
    )


# Idefics3 (Llama 3): "<s>User:<image>What?<end_of_utterance>\nAssistant:"; the processor expands each
# <image> to its tiles (<fake_token_around_image><row_i_col_j> and one <image> per visual token each,
# a newline after each row of tiles) and the global image (\n<fake_token_around_image><global-img>
# <image>... <fake_token_around_image>)
_IDEFICS3_TEMPLATE = _idefics3_template("")
# SmolVLM: the same turns after "<|im_start|>"
_SMOLVLM_TEMPLATE = _idefics3_template("<|im_start|>")
_IDEFICS3_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
# the tile tags, after the named tokens: <row_1_col_1> ... <row_6_col_6>, row-major
_TILE_TAGS = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))

_LLAMA_ROLES = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
_QWEN_ROLES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
# both end a turn with <end_of_utterance>, which is what generation stops at
_IDEFICS3_ROLES = {**_LLAMA_ROLES, "eos_token": "<end_of_utterance>"}
_SMOLVLM_ROLES = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|endoftext|>"}
# Gemma 3: Llama's roles; generation stops at the end of the model's turn
_GEMMA3_ROLES = {**_LLAMA_ROLES, "eos_token": "<end_of_turn>"}

_QWEN2_VL_TOKENIZER = (
    _QWEN_ROLES,
    False,
    _QWEN2_VL_TEMPLATE,
    {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    },
)

# family -> (special-token roles, prepend <s>?, chat template, extra named tokens)
_FAMILY_TOKENIZERS = {
    "llava": (_LLAMA_ROLES, True, _LLAVA_TEMPLATE, {"image_token": "<image>"}),
    "llava_next": (_LLAMA_ROLES, True, _LLAVA_NEXT_TEMPLATE, {"image_token": "<image>"}),
    "llava_next_video": (_LLAMA_ROLES, True, _LLAVA_NEXT_VIDEO_TEMPLATE, {"image_token": "<image>", "video_token": "<video>"}),
    "llava_onevision": (
        _QWEN_ROLES,
        False,
        _ONEVISION_TEMPLATE,
        {"image_token": "<image>", "video_token": "<video>"},
    ),
    "qwen2_vl": _QWEN2_VL_TOKENIZER,
    "qwen2_5_vl": _QWEN2_VL_TOKENIZER,  # Qwen2.5-VL kept Qwen2-VL's tokens and template
    "qwen3_vl": (_QWEN_ROLES, False, _QWEN3_VL_TEMPLATE, _QWEN2_VL_TOKENIZER[3]),
    "internvl": (
        _QWEN_ROLES,
        False,
        _INTERNVL_TEMPLATE,
        {
            "context_image_token": "<IMG_CONTEXT>",
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "video_token": "<video>",
        },
    ),
    "idefics3": (_IDEFICS3_ROLES, True, _IDEFICS3_TEMPLATE, _IDEFICS3_TOKENS),
    "smolvlm": (_SMOLVLM_ROLES, False, _SMOLVLM_TEMPLATE, _IDEFICS3_TOKENS),
    "fast_vlm": (_QWEN_ROLES, False, _FAST_VLM_TEMPLATE, {"image_token": "<image>"}),
    "gemma3": (_GEMMA3_ROLES, True, _GEMMA3_TEMPLATE, _GEMMA3_TOKENS),
}
# special tokens a family appends after its named ones, without a name of their own
_APPENDED = {"idefics3": _TILE_TAGS, "smolvlm": _TILE_TAGS, "gemma3": ("<start_of_turn>", "<end_of_turn>")}


def _vocabulary() -> dict[str, int]:
    """Special tokens, then the 256 byte symbols, then the word list; ids in that order."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for word in _WORDS:
        for text in (word, " " + word):
            (piece, _span), = splitter.pre_tokenize_str(text)
            vocab.setdefault(piece, len(vocab))
    return vocab


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The offline tokenizer of a tiny zoo family, with that family's special tokens and chat template.

    Args:
        family: one of `vlmkit.zoo.FAMILIES`.

    Returns:
        A `PreTrainedTokenizerFast`; identical (same ids) on every call and in every process.

    Raises:
        ConfigError: unknown family.
    """
    if family not in _FAMILY_TOKENIZERS:
        raise ConfigError(
            f"no tiny tokenizer for family {family!r}; valid families: {', '.join(_FAMILY_TOKENIZERS)}."
            + did_you_mean(family, _FAMILY_TOKENIZERS)
        )
    roles, prepend_bos, chat_template, named_tokens = _FAMILY_TOKENIZERS[family]
    vocabulary = _vocabulary()
    appended = tuple(token for token in named_tokens.values() if token not in vocabulary) + _APPENDED.get(family, ())
    backend = Tokenizer(models.BPE(vocab=vocabulary, merges=[], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + appended])
    if prepend_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=chat_template,
        extra_special_tokens=named_tokens,
        model_max_length=4096,
        **roles,
    )
    return tokenizer
