"""Text-side branch inputs: ICD's disturbance instruction, shared by ICD and LOL."""
from __future__ import annotations

DISTURBANCE = "You are a confused objects detector to provide a fuzzy overview or impression of the image."


def instruction_branch(call, instruction: str, method: str):
    """The call with `instruction` (and a space) inserted at the start of every prompt."""
    tokenizer = call.require_tokenizer(method, "its instruction")
    return call.with_prefix(tokenizer(instruction.strip() + " ", add_special_tokens=False)["input_ids"])
