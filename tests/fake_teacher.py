"""An in-process fake of vLLM's OpenAI API for fast unit tests (httpx.MockTransport).

It answers in the exact shapes vLLM 0.32 sends with ``return_tokens_as_token_ids`` (checked
against the real server in tests/integration), including the chat quirk of listing the sampled
token first in ``top_logprobs``. Real-teacher proof lives in tests/integration.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson

Script = Callable[[dict[str, Any], int], httpx.Response | None]


class FakeTeacher:
    """Deterministic answers; ``script(body, call_no)`` may return a response to inject."""

    def __init__(self, model: str = "fake", script: Script | None = None, vocab: int = 100) -> None:
        self.model = model
        self.script = script
        self.vocab = vocab
        self.calls: list[tuple[float, str, dict[str, Any], httpx.Headers]] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content) if request.content else {}
        self.calls.append((time.monotonic(), request.url.path, body, request.headers))
        if self.script is not None:
            injected = self.script(body, len(self.calls))
            if injected is not None:
                return injected
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": self.model, "root": "/m"}]})
        if body.get("model") != self.model:
            return httpx.Response(404, json={"error": {"message": "no such model"}})
        chat = request.url.path.endswith("/chat/completions")
        return httpx.Response(200, content=orjson.dumps(self.answer(body, chat)))

    def _steps(self, body: dict[str, Any], index: int) -> list[tuple[int, float, list]]:
        """(sampled id, its logprob, [(alt id, logprob)] in vLLM's order) per token."""
        seed = hash((str(body.get("prompt") or body.get("messages")), index)) & 0xFFFF
        rng = random.Random(seed)
        k = body["top_logprobs"] if "top_logprobs" in body else body["logprobs"]
        steps = []
        for _ in range(body["max_tokens"]):
            ranked = rng.sample(range(self.vocab), max(k, 1) + 1)
            lps = sorted((-rng.uniform(0.1, 8.0) for _ in ranked), reverse=True)
            pick = rng.randrange(len(ranked))  # sometimes outside the top k
            sampled, sampled_lp = ranked[pick], lps[pick]
            alts = list(zip(ranked[:k], lps[:k], strict=True))
            if pick >= k:
                alts = [(sampled, sampled_lp), *alts]  # vLLM adds the sampled token first
            steps.append((sampled, sampled_lp, alts))
        return steps

    def answer(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        choices = []
        for i in range(body.get("n", 1)):
            steps = self._steps(body, i)
            text = "".join(f"<{t}>" for t, _, _ in steps)
            if chat:
                k = body["top_logprobs"]
                content = [
                    {
                        "token": f"token_id:{t}",
                        "logprob": lp,
                        "top_logprobs": [
                            {"token": f"token_id:{a}", "logprob": alp} for a, alp in alts[:k]
                        ],
                    }
                    for t, lp, alts in steps
                ]
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": {"content": content},
                        "finish_reason": "length",
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": text,
                        "logprobs": {
                            "tokens": [f"token_id:{t}" for t, _, _ in steps],
                            "token_logprobs": [lp for _, lp, _ in steps],
                            "top_logprobs": [
                                {f"token_id:{a}": alp for a, alp in alts} for _, _, alts in steps
                            ],
                        },
                        "finish_reason": "length",
                    }
                )
        return {"choices": choices, "usage": {"prompt_tokens": 7}}
