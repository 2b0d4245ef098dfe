"""What the client sends a vLLM teacher: ``/v1/completions`` and ``/tokenize`` requests, typed.

A request says what it asks for (``mode``) instead of leaving it to be found from which keys a
dict happens to hold; its JSON body is built in one place (``body``), in vLLM's field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["generate", "score"]


@dataclass(slots=True)
class CompletionRequest:
    """One row's ``/v1/completions`` request, across its attempts.

    ``generate``: ``n`` samples of up to ``max_tokens``, each token with its top-``k``.
    ``score``: the prompt (the sequence to score, as token ids) with its top-``k`` per token
    (vLLM's ``prompt_logprobs``); the one token generated is discarded. ``prompt`` is None
    until known: a chat row's rendering and a scored row's ids come from ``/tokenize``. A score
    request may carry several sequences (a list of id lists), one choice each in the answer."""

    mode: Mode
    model: str
    max_tokens: int
    n: int
    temperature: float
    k: int
    sampling: dict[str, Any]  # what decides the records' content (request ids hash it)
    prompt: str | list[int] | list[list[int]] | None = None  # a list of id lists: a batch
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def scoring(self) -> bool:
        return self.mode == "score"

    def body(self) -> dict[str, Any]:
        """The JSON body, as vLLM names its fields."""
        out: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens}
        if self.scoring:
            out |= {"n": self.n, "temperature": self.temperature, "prompt_logprobs": self.k}
            out["return_token_ids"] = True  # the ids the teacher scored, checked against ours
        else:
            out |= {"temperature": self.temperature, "top_p": self.top_p, "n": self.n}
            out["logprobs"] = self.k
            out["return_tokens_as_token_ids"] = True  # ids, never strings that can collide
            out["return_token_ids"] = True  # the prompt's ids, as the teacher saw them
            if self.seed is not None:
                out["seed"] = self.seed
            if self.stop:
                out["stop"] = self.stop
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


@dataclass(slots=True, frozen=True)
class TokenizeRequest:
    """A ``/tokenize`` request: a text prompt or a conversation (rendered by the server's chat
    template), never both."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    add_generation_prompt: bool | None = None  # messages: end with the assistant's header
    add_special_tokens: bool | None = None  # prompt: False for a continuation (no BOS)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a /tokenize request has a prompt or messages, exactly one")

    def body(self, model: str) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model}
        for name in ("prompt", "messages", "add_generation_prompt", "add_special_tokens"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out
