"""How a task prompt becomes the model's input ids: one place for vLLM, the learner's SFT rows,
evaluation and the AGSER judge, so all of them see the same tokens.

The R1 instruction (the R1-Zero template's preamble) goes to the model through its chat
template: the embedded presets' template renders it itself; any other chat model (SmolLM2,
Qwen2.5-Instruct, ...) gets it as the system turn, the task prompt as the user turn.
"""
from __future__ import annotations


class ModelInputError(ValueError):
    """A model, tokenizer or model file that r1ray cannot use; raised before any actor starts."""


R1_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>."
)


def chat_messages(tokenizer, prompt: str) -> list[dict]:
    """The chat turns of one task prompt for this tokenizer's chat template."""
    template = tokenizer.chat_template
    if not template:
        raise ModelInputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: "
                              "the R1 prompt cannot be rendered (give the model one; `r1ray sft --no-template` "
                              "trains on raw prompts)")
    if isinstance(template, dict):
        template = template.get("default", "")
    if R1_SYSTEM in template:            # the embedded presets: the template carries the instruction
        return [{"role": "user", "content": prompt}]
    return [{"role": "system", "content": R1_SYSTEM}, {"role": "user", "content": prompt}]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` rendered by the chat template, ending where the assistant's answer starts."""
    return list(tokenizer.apply_chat_template(chat_messages(tokenizer, prompt), add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def prompt_text(tokenizer, prompt: str) -> str:
    """The rendered text of prompt_ids (for display and for locating the query inside the template)."""
    return tokenizer.apply_chat_template(chat_messages(tokenizer, prompt), add_generation_prompt=True,
                                         tokenize=False)


def completion_ids(tokenizer, prompt_rendered: str, completion: str) -> list[int]:
    """Token ids of an assistant answer that follows `prompt_rendered`, closed by the EOS token.

    A space separates it from the prompt ("... Assistant:"), except after a template that
    ends its assistant header with a newline ("<|im_start|>assistant\\n").
    """
    lead = "" if prompt_rendered.endswith("\n") else " "
    return tokenizer.encode(lead + completion.strip(), add_special_tokens=False) + [tokenizer.eos_token_id]
