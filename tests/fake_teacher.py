"""An in-process fake of vLLM's OpenAI API for fast unit tests (httpx.MockTransport).

It answers ``/v1/completions`` in the exact shape vLLM 0.32 sends with
``return_tokens_as_token_ids`` and ``return_token_ids`` (captured bodies in tests/data/vllm),
including the sampled token listed first and added as a K+1st alternative when it is outside
the top K, ``prompt_logprobs`` (``null`` first, then entries keyed by token id, with the actual
token added as a K+1st key when it is outside the top K) and ``/tokenize`` for a prompt or a
conversation (``add_special_tokens`` decides a text's BOS when ``add_bos`` is on), and, for
the fault teacher server, a ``/v1/chat/completions`` body made from the same answer
(``chat_answer``: vLLM's chat shape, exactly K ``top_logprobs`` best first). Its toy
tokenizer and chat template are invertible, so a server can tell which prompt a token-id request
carries. Real-teacher proof lives in tests/integration.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson

Script = Callable[[dict[str, Any], int], httpx.Response | None]

# The toy tokenizer: byte b is id b + OFFSET; ids below OFFSET are the chat template's markers.
BOS, TURN, SEP, EOT = 1, 2, 3, 4
OFFSET = 8
MAX_MODEL_LEN = 1024


def encode_text(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode()]


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    """``BOS (TURN role SEP content EOT)* [TURN "assistant" SEP]``."""
    ids = [BOS]
    for m in messages:
        ids += [TURN, *encode_text(str(m.get("role"))), SEP, *encode_text(str(m.get("content")))]
        ids.append(EOT)
    if add_generation_prompt:
        ids += [TURN, *encode_text("assistant"), SEP]
    return ids


def decode_prompt(ids: list[int]) -> str | list[dict[str, str]] | None:
    """Invert ``encode_text`` (a str) or ``render_chat`` (messages); None for foreign ids."""
    try:
        if not ids or ids[0] != BOS:
            return bytes(i - OFFSET for i in ids).decode()
        messages, i = [], 1
        while i < len(ids):
            if ids[i] != TURN:
                return None
            sep = ids.index(SEP, i)
            end = ids.index(EOT, sep) if EOT in ids[sep:] else len(ids)
            role = bytes(t - OFFSET for t in ids[i + 1 : sep]).decode()
            content = bytes(t - OFFSET for t in ids[sep + 1 : end]).decode()
            if end < len(ids) or content:  # the generation prompt has no content and no EOT
                messages.append({"role": role, "content": content})
            i = end + 1
        return messages
    except (ValueError, UnicodeDecodeError):
        return None


def prompt_ids(body: dict[str, Any]) -> list[int]:
    """The ids the fake teacher sees for a completions or tokenize body."""
    if isinstance(body.get("messages"), list):
        return render_chat(body["messages"], bool(body.get("add_generation_prompt")))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return [int(i) for i in prompt]
    return encode_text(str(prompt))


class FakeTeacher:
    """Deterministic answers; ``script(body, call_no)`` may return a response to inject."""

    def __init__(
        self,
        model: str = "fake",
        script: Script | None = None,
        vocab: int = 100,
        add_bos: bool = False,
    ) -> None:
        self.model = model
        self.script = script
        self.vocab = vocab
        self.add_bos = add_bos  # /tokenize of a text starts with BOS unless add_special_tokens
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
        path = request.url.path
        if path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": self.model, "root": "/m"}]})
        if path.endswith("/health"):
            return httpx.Response(200)
        if body.get("model") != self.model:
            return httpx.Response(404, json={"error": {"message": "no such model"}})
        if path.endswith("/tokenize"):
            return httpx.Response(200, content=orjson.dumps(self.tokenize(body)))
        if path.endswith("/completions") and not path.endswith("/chat/completions"):
            return httpx.Response(200, content=orjson.dumps(self.answer(body)))
        return httpx.Response(404, json={"error": {"message": f"Not Found: {path}"}})

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = prompt_ids(body)
        if self.add_bos and "prompt" in body and body.get("add_special_tokens", True):
            ids = [BOS, *ids]
        return {"tokens": ids, "count": len(ids), "max_model_len": MAX_MODEL_LEN}

    def _steps(self, body: dict[str, Any], index: int) -> list[tuple[int, float, list]]:
        """(sampled id, its logprob, [(alt id, logprob)] in vLLM's order) per token."""
        blob = orjson.dumps([prompt_ids(body), index, body.get("seed")])
        rng = random.Random(hashlib.blake2b(blob, digest_size=8).digest())
        k = body.get("logprobs") or 0
        steps = []
        for _ in range(body["max_tokens"]):
            ranked = rng.sample(range(self.vocab), max(k, 1) + 1)
            lps = sorted((-rng.uniform(0.1, 8.0) for _ in ranked), reverse=True)
            pick = rng.randrange(len(ranked))  # sometimes outside the top k
            sampled, sampled_lp = ranked[pick], lps[pick]
            # vLLM lists the sampled token first, then the top k (once each): k or k+1 entries.
            alts = dict([(sampled, sampled_lp), *zip(ranked[:k], lps[:k], strict=True)])
            steps.append((sampled, sampled_lp, list(alts.items())))
        return steps

    def prompt_logprob(self, prefix: list[int], actual: int, k: int) -> dict[str, Any]:
        """The entry for ``actual`` after ``prefix``: it depends on nothing else (teacher
        forcing). About half the time the actual token is in the top K (K keys), else added."""
        rng = random.Random(hashlib.blake2b(orjson.dumps([prefix, actual]), digest_size=8).digest())
        top = [t for t in rng.sample(range(self.vocab + 1), k + 1) if t != actual][:k]
        lps = sorted((-rng.uniform(0.1, 8.0) for _ in top), reverse=True)
        if k and rng.random() < 0.5:
            top[rng.randrange(k)] = actual
            own = next(lp for t, lp in zip(top, lps, strict=True) if t == actual)
        else:
            own = (lps[-1] if lps else 0.0) - rng.uniform(0.01, 2.0)
        entry = {str(actual): {"logprob": own, "rank": 1 + sum(lp > own for lp in lps)}}
        for rank, (t, lp) in enumerate(zip(top, lps, strict=True), start=1):
            entry[str(t)] = {"logprob": lp, "rank": rank, "decoded_token": f"<{t}>"}
        return entry

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """A 200 body for a ``/v1/completions`` request, shaped as vLLM 0.32 sends it; a list of
        prompts gets each prompt's choices in turn, indexed on (prompt j, sample i: j * n + i)."""
        return batched(self.answer_one, body)

    def answer_one(self, body: dict[str, Any]) -> dict[str, Any]:
        """``answer`` for a body of one prompt."""
        ids = prompt_ids(body)
        with_ids = bool(body.get("return_token_ids"))
        prompt_lps = None
        if body.get("prompt_logprobs") is not None:
            k = body["prompt_logprobs"]
            prompt_lps = [None] + [
                self.prompt_logprob(ids[:j], ids[j], k) for j in range(1, len(ids))
            ]
        choices = []
        for i in range(body.get("n", 1)):
            steps = self._steps(body, i)
            tokens = [f"token_id:{t}" for t, _, _ in steps]
            logprobs = None
            if body.get("logprobs") is not None:
                logprobs = {
                    "text_offset": [len(f"<{t}>") * j for j, (t, _, _) in enumerate(steps)],
                    "token_logprobs": [lp for _, lp, _ in steps],
                    "tokens": tokens,
                    "top_logprobs": [
                        {f"token_id:{a}": alp for a, alp in alts} for _, _, alts in steps
                    ],
                }
            choices.append(
                {
                    "index": i,
                    "text": "".join(f"<{t}>" for t, _, _ in steps),
                    "logprobs": logprobs,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "token_ids": [t for t, _, _ in steps] if with_ids else None,
                    "prompt_logprobs": prompt_lps,
                    "prompt_token_ids": ids if with_ids else None,
                }
            )
        usage = {"prompt_tokens": len(ids), "completion_tokens": body["max_tokens"] * len(choices)}
        return {
            "object": "text_completion",
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }

    def chat_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """A 200 body for a ``/v1/chat/completions`` request: the completions answer for the
        conversation's rendered ids (``render_chat(..., add_generation_prompt=True)``), in vLLM's
        chat shape (``return_tokens_as_token_ids``, ``return_token_ids`` honoured)."""
        return chat_from_completion(self.answer(completion_body(body)), body)


Answerer = Callable[[dict[str, Any]], dict[str, Any]]


def batched(one: Answerer, body: dict[str, Any]) -> dict[str, Any]:
    """What ``one`` answers for each prompt of a batch body (a list of id lists), joined as vLLM
    joins them: the choices in prompt order, reindexed, and the usage summed."""
    prompt = body.get("prompt")
    if not (isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt)):
        return one(body)
    answers = [one({**body, "prompt": p}) for p in prompt]
    choices = [c for a in answers for c in a["choices"]]
    choices = [{**c, "index": index} for index, c in enumerate(choices)]
    usage = {key: sum(a["usage"][key] for a in answers) for key in answers[0]["usage"]}
    return {**answers[0], "choices": choices, "usage": usage}


def completion_body(chat: dict[str, Any]) -> dict[str, Any]:
    """The ``/v1/completions`` body that asks for what a chat body asks: same ids, same K."""
    ids = render_chat(chat.get("messages") or [], add_generation_prompt=True)
    k = chat.get("top_logprobs") or 0
    out = {key: chat[key] for key in ("model", "max_tokens", "n", "seed") if key in chat}
    out |= {"prompt": ids, "return_token_ids": bool(chat.get("return_token_ids"))}
    return out | {"logprobs": k if chat.get("logprobs") else None}


def chat_from_completion(answer: dict[str, Any], chat: dict[str, Any]) -> dict[str, Any]:
    """A completions answer as vLLM's chat answer: per token ``{token, logprob, bytes,
    top_logprobs}`` with exactly K alternatives best first (the sampled one only if it is
    among them), tokens as ``token_id:N`` when asked; ``prompt_token_ids`` on the body and
    ``token_ids`` on each choice with ``return_token_ids``."""
    k = chat.get("top_logprobs") or 0
    as_ids = bool(chat.get("return_tokens_as_token_ids"))
    with_ids = bool(chat.get("return_token_ids"))

    def token(name: str) -> dict[str, Any]:
        text = name if as_ids else f"<{name[9:]}>"
        return {"token": text, "bytes": list(text.encode())}

    choices = []
    for c in answer["choices"]:
        logprobs = None
        if c["logprobs"] is not None:
            lp = c["logprobs"]
            content = []
            for name, own, entry in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                        strict=True):  # fmt: skip
                best = sorted(entry.items(), key=lambda a: -a[1])[:k]
                tops = [{**token(t), "logprob": v} for t, v in best]
                content.append({**token(name), "logprob": own, "top_logprobs": tops})
            logprobs = {"content": content}
        choice = {
            "index": c["index"], "message": {"role": "assistant", "content": c["text"]},
            "logprobs": logprobs, "finish_reason": c["finish_reason"],
            "stop_reason": c["stop_reason"],
        }  # fmt: skip
        if with_ids:
            choice["token_ids"] = c["token_ids"]
        choices.append(choice)
    out = {
        "id": "chatcmpl-fake", "object": "chat.completion", "model": answer["model"],
        "choices": choices, "usage": answer["usage"],
    }  # fmt: skip
    if with_ids:
        out["prompt_token_ids"] = answer["choices"][0]["prompt_token_ids"]
    return out
