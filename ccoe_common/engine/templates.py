"""Turning a request into prompt text: raw text, chat messages, or the Alpaca instruction format.

The Alpaca format is what the CCoE papers' instruction data uses; training renders records with
it and serving must render requests the same way, so both call `render_alpaca`.

    render_alpaca("Add 2 and 3.")  ->
    "Below is an instruction ...\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from ccoe_common.errors import CCoEError

Template = Literal["raw", "alpaca", "chat"]
TEMPLATES: tuple[Template, ...] = ("raw", "alpaca", "chat")

_ALPACA_HEAD = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
_ALPACA_HEAD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)


class TemplateError(CCoEError, ValueError):
    """A request that cannot be rendered with the chosen template."""

    code = "INVALID_ARGUMENT"


def render_alpaca(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt up to and including "### Response:\\n" (the response follows it)."""
    if input_text:
        return (f"{_ALPACA_HEAD_WITH_INPUT}### Instruction:\n{instruction}\n\n"
                f"### Input:\n{input_text}\n\n### Response:\n")
    return f"{_ALPACA_HEAD}### Instruction:\n{instruction}\n\n### Response:\n"


def render_chat(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The tokenizer's own chat template, with the assistant turn opened for generation."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TemplateError(f"messages[{i}] must be {{'role': str, 'content': str}}, got {m!r}")
    if not messages:
        raise TemplateError("messages must not be empty")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the backbone's tokenizer has no chat template; send a prompt or use template='alpaca'")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
