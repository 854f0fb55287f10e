"""Request bodies of the OpenAI routes: vLLM's own request models, with checks they lack.

vLLM's ``check_structured_outputs_count`` (a ``mode="before"`` model validator of both request
models, ``vllm/entrypoints/openai/{completion,chat_completion}/protocol.py``) calls ``.get`` on
``structured_outputs`` before pydantic checks its type, so ``"structured_outputs": "x"`` raised
``AttributeError`` and came back as a 500. A before-validator of a subclass runs first, so the
type is checked here and a wrong one is a 400 naming the field (found by ``python -m loadtests fuzz``).
"""

from __future__ import annotations

from typing import Any

from pydantic import model_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletionRequest


def _structured_outputs_is_an_object(data: Any) -> Any:
    """``data`` unchanged, or ValueError if its ``structured_outputs`` is neither absent, null nor an object."""
    if isinstance(data, dict) and not isinstance(data.get("structured_outputs", {}), dict | None):
        raise ValueError(
            f'structured_outputs must be an object (e.g. {{"json": {{...}}}}, {{"regex": "..."}} or '
            f'{{"choice": [...]}}), got {type(data["structured_outputs"]).__name__}'
        )
    return data


class CompletionRequest(VllmCompletionRequest):
    """vLLM's ``CompletionRequest`` (OpenAI Completions body) with ``structured_outputs`` type-checked first."""

    @model_validator(mode="before")
    @classmethod
    def _structured_outputs_type(cls, data: Any) -> Any:
        return _structured_outputs_is_an_object(data)


class ChatCompletionRequest(VllmChatCompletionRequest):
    """vLLM's ``ChatCompletionRequest`` (OpenAI Chat Completions body) with ``structured_outputs`` type-checked first."""

    @model_validator(mode="before")
    @classmethod
    def _structured_outputs_type(cls, data: Any) -> Any:
        return _structured_outputs_is_an_object(data)
