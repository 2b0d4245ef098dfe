"""parse_completions on real vLLM 0.32 bodies (captured from the tiny teacher) and broken ones.

The fixtures in tests/data/vllm were answered by the real server with ``return_token_ids`` and
``return_tokens_as_token_ids``: a chat-template token-id prompt at n=2, K=3 (every token has the
sampled token as a 4th entry), a text prompt at K=20 (21 entries), and a greedy answer at K=3
(the sampled token is the best, 3 entries).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from samples import same

from schemas.wire import Sample
from workers.answers import fastparse, parse
from workers.answers.parse import parse_completions
from workers.errors import InvalidResponse, MissingLogprobs

DATA = Path(__file__).resolve().parents[2] / "data" / "vllm"


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def core(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the fast path's compiled core and with its numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(fastparse, "compiled", None)
    else:
        assert fastparse.compiled is not None, (
            "workers.answers._topk was not built: `pip install -e .` compiles it when a C compiler "
            "is there (the numpy fallback costs about twice the worker CPU per answer)"
        )
    return str(request.param)


def body(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


def check_against_raw(raw: dict[str, Any], k: int) -> None:
    """Every sample holds exactly the server's tokens and its K best alternatives, best first."""
    answer = parse_completions(raw, k)
    assert answer.prompt_token_ids == raw["choices"][0]["prompt_token_ids"]
    assert answer.prompt_tokens == raw["usage"]["prompt_tokens"] == len(answer.prompt_token_ids)
    assert [s.sample_index for s in answer.samples] == list(range(len(raw["choices"])))
    for choice, sample in zip(raw["choices"], answer.samples, strict=True):
        lp = choice["logprobs"]
        assert sample.token_ids == choice["token_ids"]
        assert sample.logprobs == lp["token_logprobs"]
        assert sample.response == choice["text"] and sample.finish_reason == "length"
        for entry, ids, lps in zip(
            lp["top_logprobs"], sample.top_token_ids, sample.top_logprobs, strict=True
        ):
            best = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]
            assert ids.tolist() == [int(t.removeprefix("token_id:")) for t, _ in best]
            assert lps.tolist() == [v for _, v in best] and len(ids) == k


def test_token_id_prompt_n2_with_k_plus_1_entries() -> None:
    raw = body("completions_token_ids_n2_k3")
    assert {len(e) for c in raw["choices"] for e in c["logprobs"]["top_logprobs"]} == {4}
    check_against_raw(raw, 3)
    answer = parse_completions(raw, 3)
    # The sampled token (listed first by vLLM) is the one cut: it is outside the top 3.
    first = raw["choices"][0]["logprobs"]["top_logprobs"][0]
    sampled = int(next(iter(first)).removeprefix("token_id:"))
    assert sampled == answer.samples[0].token_ids[0]
    assert sampled not in answer.samples[0].top_token_ids[0]


def test_text_prompt_at_top_20() -> None:
    raw = body("completions_text_k20")
    assert {len(e) for e in raw["choices"][0]["logprobs"]["top_logprobs"]} == {21}
    check_against_raw(raw, 20)


def test_greedy_k_entries() -> None:
    raw = body("completions_greedy_k3")
    check_against_raw(raw, 3)
    sample = parse_completions(raw, 3).samples[0]
    assert [ids[0] for ids in sample.top_token_ids] == sample.token_ids  # greedy: best = sampled


def test_k0_keeps_only_the_sampled_logprobs() -> None:
    answer = parse_completions(body("completions_greedy_k3"), 0)
    assert answer.samples[0].top_token_ids.shape == (3, 0)


def test_choices_out_of_order_are_sorted_by_index() -> None:
    raw = body("completions_token_ids_n2_k3")
    raw["choices"].reverse()
    answer = parse_completions(raw, 3)
    assert [s.sample_index for s in answer.samples] == [0, 1]
    assert answer.samples[0].token_ids == raw["choices"][1]["token_ids"]


def test_usage_missing_counts_the_prompt_ids() -> None:
    raw = body("completions_greedy_k3")
    del raw["usage"]
    assert parse_completions(raw, 3).prompt_tokens == 5


def choice0(raw: dict[str, Any]) -> dict[str, Any]:
    return raw["choices"][0]


# Each edit turns a real answer into a wrong-shape 200: retried, never a TypeError/KeyError.
MALFORMED = {
    "body not an object": lambda r: [],
    "no choices": lambda r: r.pop("choices"),
    "empty choices": lambda r: r.update(choices=[]),
    "choice not an object": lambda r: r["choices"].__setitem__(0, "x"),
    "null logprob": lambda r: choice0(r)["logprobs"]["token_logprobs"].__setitem__(1, None),
    "string logprob": lambda r: choice0(r)["logprobs"]["token_logprobs"].__setitem__(0, "-1.5"),
    "bool logprob": lambda r: choice0(r)["logprobs"]["token_logprobs"].__setitem__(0, True),
    "null top logprob": lambda r: _first_top(r).update({"token_id:5": None}),
    "top entry not a dict": lambda r: choice0(r)["logprobs"]["top_logprobs"].__setitem__(0, []),
    "null top entry": lambda r: choice0(r)["logprobs"]["top_logprobs"].__setitem__(2, None),
    "top_logprobs not a list": lambda r: choice0(r)["logprobs"].update(top_logprobs={}),
    "short top_logprobs": lambda r: choice0(r)["logprobs"]["top_logprobs"].pop(),
    "short token_logprobs": lambda r: choice0(r)["logprobs"]["token_logprobs"].pop(),
    "no token_logprobs": lambda r: choice0(r)["logprobs"].pop("token_logprobs"),
    "tokens not a list": lambda r: choice0(r)["logprobs"].update(tokens="token_id:1"),
    "token not a string": lambda r: choice0(r)["logprobs"]["tokens"].__setitem__(0, 98),
    "token id not an int": lambda r: choice0(r)["logprobs"]["tokens"].__setitem__(0, "token_id:x"),
    "negative token id": lambda r: choice0(r)["logprobs"]["tokens"].__setitem__(0, "token_id:-1"),
    "top key not an int": lambda r: _first_top(r).update({"token_id:1.5": -1.0}),
    "too many alternatives": lambda r: _first_top(r).update({f"token_id:{900 + i}": -9.0
                                                              for i in range(3)}),
    "logprobs not an object": lambda r: choice0(r).update(logprobs=[1]),
    "token_ids disagree": lambda r: choice0(r)["token_ids"].__setitem__(1, 7),
    "token_ids not ints": lambda r: choice0(r).update(token_ids=["98", "98", "98"]),
    "prompt ids not ints": lambda r: choice0(r)["prompt_token_ids"].__setitem__(0, 1.0),
    "prompt ids not a list": lambda r: choice0(r).update(prompt_token_ids="1 2"),
    "usage disagrees": lambda r: r["usage"].update(prompt_tokens=6),
    "usage not an int": lambda r: r["usage"].update(prompt_tokens="5"),
    "index not an int": lambda r: choice0(r).update(index="0"),
    "text not a string": lambda r: choice0(r).update(text=7),
    "finish_reason not a string": lambda r: choice0(r).update(finish_reason=1),
}  # fmt: skip


def _first_top(raw: dict[str, Any]) -> dict[str, Any]:
    return choice0(raw)["logprobs"]["top_logprobs"][0]


@pytest.mark.parametrize("edit", list(MALFORMED), ids=list(MALFORMED))
def test_wrong_shape_is_invalid_response(edit: str) -> None:
    raw = body("completions_greedy_k3")
    changed = MALFORMED[edit](raw)
    if isinstance(changed, list):  # the edit replaces the whole body
        raw = changed
    with pytest.raises(InvalidResponse):
        parse_completions(raw, 3)


def test_choices_disagreeing_on_the_prompt_or_index() -> None:
    raw = body("completions_token_ids_n2_k3")
    bad = copy.deepcopy(raw)
    bad["choices"][1]["prompt_token_ids"] = bad["choices"][1]["prompt_token_ids"][1:]
    with pytest.raises(InvalidResponse):
        parse_completions(bad, 3)
    twins = copy.deepcopy(raw)
    twins["choices"][1]["index"] = 0  # two samples with one index: duplicate request ids
    with pytest.raises(InvalidResponse):
        parse_completions(twins, 3)


MISSING = {
    "no logprobs": lambda r: choice0(r).update(logprobs=None),
    "logprobs key absent": lambda r: choice0(r).pop("logprobs"),
    "no tokens": lambda r: choice0(r)["logprobs"].pop("tokens"),
    "no top_logprobs": lambda r: choice0(r)["logprobs"].update(top_logprobs=None),
    "decoded strings, not ids": lambda r: choice0(r)["logprobs"].update(tokens=["\n"] * 3),
    "fewer than K": lambda r: _first_top(r).pop("token_id:596"),
    "no prompt ids": lambda r: choice0(r).pop("prompt_token_ids"),
}


@pytest.mark.parametrize("edit", list(MISSING), ids=list(MISSING))
def test_teacher_without_what_we_asked_for_is_missing_logprobs(edit: str) -> None:
    raw = body("completions_greedy_k3")
    MISSING[edit](raw)
    with pytest.raises(MissingLogprobs):
        parse_completions(raw, 3)


def test_fuzzed_answers_raise_only_our_errors() -> None:
    """Replace every leaf of a real answer, one at a time, by values of the wrong type."""
    raw = body("completions_token_ids_n2_k3")
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict | list):
            for key, child in node.items() if isinstance(node, dict) else enumerate(node):
                walk(child, (*path, key))

    walk(raw, ())
    assert len(paths) > 100
    for path in paths[1:]:
        for junk in (None, "x", 1.5, -3, True, [], {}, [None], {"token_id:1": None}):
            broken = copy.deepcopy(raw)
            parent = broken
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = junk
            try:
                parse_completions(broken, 3)
            except (InvalidResponse, MissingLogprobs):
                pass


# ---- the fast path (``fastparse.fast_sample``) against the checked reference ------------------


def _both(choice: Any, k: int) -> tuple[Sample | None, Sample | Exception]:
    fast = fastparse.fast_sample(copy.deepcopy(choice), 0, k)
    try:
        checked: Sample | Exception = parse._checked_sample(copy.deepcopy(choice), 0, k)
    except (InvalidResponse, MissingLogprobs) as err:
        checked = err
    return fast, checked


@pytest.mark.parametrize("name", [p.stem for p in sorted(DATA.glob("*.json"))])
def test_fast_path_takes_real_answers_and_gives_the_same_samples(name: str) -> None:
    raw = body(name)
    k = len(raw["choices"][0]["logprobs"]["top_logprobs"][0]) - 1 or 1
    for choice in raw["choices"]:
        for kk in sorted({0, 1, k - 1, k} - {-1}):
            fast, checked = _both(choice, kk)
            if isinstance(checked, Exception):
                assert fast is None
                continue
            assert fast is not None, f"fast path refused a real answer at k={kk}"
            assert same(fast, checked)


def test_fast_path_on_synthetic_top20_n2_vocab_32000() -> None:
    from fake_teacher import FakeTeacher

    fake = FakeTeacher(model="m", vocab=32_000)
    req = {"model": "m", "prompt": "hi", "max_tokens": 256, "logprobs": 20, "n": 2}
    raw = fake.answer(req | {"return_token_ids": True, "seed": 5})
    assert any(len(e) == 21 for e in raw["choices"][0]["logprobs"]["top_logprobs"])
    for choice in raw["choices"]:
        fast, checked = _both(choice, 20)
        assert fast is not None and same(fast, checked)


@pytest.mark.parametrize(
    "token",
    ["token_id:007", "token_id:\u00b2", "token_id:" + "9" * 30, "token_id:1\ntoken_id:2",
     "token_id:", "token_id:+1", "token_id: 1", "token_id:1_0", "xtoken_id:1", "token_id:0"],
)  # fmt: skip
def test_odd_token_strings_agree_and_never_escape(token: str) -> None:
    raw = body("completions_greedy_k3")
    choice = raw["choices"][0]
    choice["logprobs"]["tokens"][1] = token
    choice.pop("token_ids")
    first_top = choice["logprobs"]["top_logprobs"][0]
    first_top[token] = first_top.pop(next(iter(first_top)))
    fast, checked = _both(choice, 3)
    if isinstance(checked, Exception):
        assert fast is None
    else:
        assert fast is None or same(fast, checked)


def test_ties_keep_the_checked_paths_order() -> None:
    raw = body("completions_token_ids_n2_k3")
    choice = raw["choices"][0]
    for entry in choice["logprobs"]["top_logprobs"]:
        for key in entry:
            entry[key] = -1.0  # every alternative ties: the server's order decides
    fast, checked = _both(choice, 3)
    assert fast is not None and same(fast, checked)


def test_nan_and_subclasses_are_left_to_the_checked_path() -> None:
    """No order to agree on for NaN; list and dict subclasses are not what orjson builds."""
    raw = body("completions_token_ids_n2_k3")
    choice = raw["choices"][0]
    entry = choice["logprobs"]["top_logprobs"][2]
    entry[next(iter(entry))] = float("nan")
    assert fastparse.fast_sample(copy.deepcopy(choice), 0, 3) is None

    class Tops(dict):
        pass

    choice = body("completions_token_ids_n2_k3")["choices"][0]
    tops = choice["logprobs"]["top_logprobs"]
    tops[1] = Tops(tops[1])
    fast, checked = _both(choice, 3)
    assert fast is None and isinstance(checked, InvalidResponse)


@pytest.mark.parametrize("k", [1, 2, 50])
def test_any_k_on_synthetic_answers(k: int) -> None:
    """K below and above vLLM's default cap of 20, with K+1 entries where the sampled token is
    outside the top K."""
    from fake_teacher import FakeTeacher

    fake = FakeTeacher(model="m", vocab=32_000)
    req = {"model": "m", "prompt": "hi", "max_tokens": 64, "logprobs": k, "n": 1}
    choice = fake.answer(req | {"return_token_ids": True, "seed": 3})["choices"][0]
    assert {len(e) for e in choice["logprobs"]["top_logprobs"]} == {k, k + 1}
    fast, checked = _both(choice, k)
    assert fast is not None and same(fast, checked)


def test_fuzzed_answers_fast_path_never_disagrees() -> None:
    """Wherever the fast path answers, the checked path gives the same sample."""
    raw = body("completions_token_ids_n2_k3")
    choice = raw["choices"][0]
    leaves: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        leaves.append(path)
        if isinstance(node, dict | list):
            for key, child in node.items() if isinstance(node, dict) else enumerate(node):
                walk(child, (*path, key))

    walk(choice, ())
    taken = 0
    for path in leaves[1:]:
        for junk in (None, "x", 1.5, -3, 0, True, [], {}, [None], {"token_id:1": None}):
            broken = copy.deepcopy(choice)
            parent = broken
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = junk
            fast, checked = _both(broken, 3)
            if fast is not None:
                taken += 1
                assert not isinstance(checked, Exception), path
                assert same(fast, checked), path
    assert taken > 0  # some edits are harmless (a logprob that is another number)


_ODD_KEYS = ["token_id:007", "token_id:\u00b2", "token_id:" + "9" * 19, "token_id:" + "9" * 18,
             "token_id:1\ntoken_id:2", "token_id:", "token_id:-1", "token_id:1 ", "Token_id:1",
             "token_id:1.0", "token_id:\u0661", "token_id:0"]  # fmt: skip
_ODD_VALUES = [0.0, -0.0, -1e-300, -1e308, 5, -3, True, None, "x", 2**70, -9999.0, 1.5]


def test_random_edits_of_a_top20_answer_never_disagree() -> None:
    """Seeded random edits of keys, values and ties in a K=20 answer with K+1 entries: where the
    fast path answers, it equals the checked path; where the checked path refuses, it refuses."""
    import random

    from fake_teacher import FakeTeacher

    fake = FakeTeacher(model="m", vocab=32_000)
    req = {"model": "m", "prompt": "hi", "max_tokens": 16, "logprobs": 20, "n": 1}
    base = fake.answer(req | {"return_token_ids": True, "seed": 9})["choices"][0]
    rng = random.Random(11)
    taken = refused = 0
    for _ in range(400):
        choice = copy.deepcopy(base)
        tops = choice["logprobs"]["top_logprobs"]
        for _ in range(rng.randint(1, 3)):
            entry = rng.choice(tops)
            key = rng.choice(list(entry))
            what = rng.random()
            if what < 0.3:
                entry[key] = rng.choice(_ODD_VALUES)
            elif what < 0.6:
                entry[rng.choice(_ODD_KEYS)] = entry.pop(key)
            elif what < 0.8:  # a tie with another alternative of the same token
                entry[key] = entry[rng.choice(list(entry))]
            else:
                entry.pop(key)
        fast, checked = _both(choice, 20)
        if isinstance(checked, Exception):
            assert fast is None
            refused += 1
        elif fast is not None:
            assert same(fast, checked)
            taken += 1
    assert taken > 50 and refused > 50  # both outcomes were exercised


@pytest.mark.parametrize("name", [p.stem for p in sorted(DATA.glob("*.json"))])
def test_records_from_both_paths_are_identical(name: str) -> None:
    """The shard rows built from the fast path's samples equal those from the checked path."""
    from workers.shards.columns import compact, data_columns

    raw = body(name)
    k = len(raw["choices"][0]["logprobs"]["top_logprobs"][0]) - 1 or 1
    tables = []
    for parse_one in (parse._sample, parse._checked_sample):
        columns = data_columns(k)
        for i, choice in enumerate(raw["choices"]):
            s = compact(parse_one(copy.deepcopy(choice), i, k))
            columns.append(
                request_id=f"r{i}", prompt_id="p", sample_index=s.sample_index, api="completions",
                prompt="x", response=s.response, finish_reason=s.finish_reason, prompt_tokens=1,
                completion_tokens=len(s.token_ids), prompt_token_ids=[1], token_ids=s.token_ids,
                logprobs=s.logprobs, top_token_ids=s.top_token_ids, top_logprobs=s.top_logprobs,
                teacher="t", endpoint="e", attempts=1, latency_ms=1.0,
            )  # fmt: skip
        tables.append(columns.table())
    assert fastparse.fast_sample(copy.deepcopy(raw["choices"][0]), 0, k) is not None
    assert tables[0].equals(tables[1])
