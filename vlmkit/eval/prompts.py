"""Default prompts per benchmark, in one place, each with the codebase it comes from.

Templates are plain ``str.format`` strings. ``{question}`` is the benchmark's question (for MME without
its trailing "Please answer yes or no."), ``{options}`` the options one per line, already lettered as
the benchmark letters them. The model's chat template is the runner's business, not these strings'.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    """A prompt template and where it comes from.

    Attributes:
        template: ``str.format`` template with ``{question}`` and, for multiple choice, ``{options}``.
        answer_prefix: Text the reference protocol pre-fills at the start of the assistant's turn
            (MVBench's ``"Best option:("``); empty when none. Runners that cannot pre-fill may skip
            it: the matching parser accepts replies either way.
        source: The file the prompt follows.
    """

    template: str
    answer_prefix: str = ""
    source: str = ""


SHORT_ANSWER = "\nAnswer the question using a single word or phrase."

POPE = {
    "llava": Prompt(
        "{question}" + SHORT_ANSWER, source="haotian-liu/LLaVA playground/data/eval/pope/llava_pope_test.jsonl"
    ),
    "vcd": Prompt(
        "{question} Please answer this question with one word.",
        source="DAMO-NLP-SG/VCD experiments/eval/object_hallucination_vqa_llava.py",
    ),
    "opera": Prompt("{question}", source="shikiw/OPERA pope_eval.py (the question alone in the model template)"),
}
"""POPE prompts by codebase; ``"llava"`` (also lmms-eval's) is the default."""

CHAIR = Prompt("Please describe this image in detail.", source="shikiw/OPERA chair_eval.py")

MME = Prompt("{question}" + SHORT_ANSWER, source="haotian-liu/LLaVA playground/data/eval/MME/llava_mme.jsonl")
"""MME: the question without "Please answer yes or no." (and the spaces before it), then the LLaVA suffix."""

MME_YES_NO = "Please answer yes or no."

MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, select the "
    "best option that accurately addresses the question.\n"
)
MVBENCH = Prompt(
    MVBENCH_SYSTEM + "Question: {question}\nOptions:\n{options}\nOnly give the best option.",
    answer_prefix="Best option:(",
    source="OpenGVLab/Ask-Anything video_chat2/mvbench.ipynb (system_llm=True: the system text leads the question)",
)
"""MVBench: options are lettered ``(A) text``."""

VIDEOMME = Prompt(
    "Select the best answer to the following multiple-choice question based on the video. Respond with only "
    "the letter (A, B, C, or D) of the correct option.\n{question}\n{options}\nThe best answer is:",
    source="BradyFU/Video-MME README.md (without subtitles)",
)
"""Video-MME: options are lettered ``A. text``."""

EGOSCHEMA = Prompt(
    "{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
    source="EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/egoschema/utils.py",
)
"""EgoSchema: options are lettered ``A. text``."""
