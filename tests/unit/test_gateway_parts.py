"""The gateway's pure parts: the admission line, the resume bookkeeping, the wire formats."""
import asyncio
import json

import pytest

from synapticllamas.gateway import wire
from synapticllamas.gateway.admission import Admission, Full
from synapticllamas.gateway.keys import ApiKeys
from synapticllamas.gateway.resume import Diverged, Progress, deterministic

# ---------------------------------------------------------------- admission


def test_slots_are_granted_in_arrival_order_and_only_while_ready():
    async def main():
        ready = [False]
        line = Admission(1, 10, lambda: ready[0])
        order: list[str] = []

        async def one(name, front=False):
            await line.acquire(5, front)
            order.append(name)

        tasks = [asyncio.ensure_future(one(n)) for n in "abc"]
        await asyncio.sleep(0)
        assert line.waiting == 3 and order == []        # not ready: everyone held
        ready[0] = True
        line.poke()
        await asyncio.sleep(0)
        assert order == ["a"] and line.busy == 1
        cut = asyncio.ensure_future(one("a-again", front=True))   # a cut-off request goes first
        await asyncio.sleep(0)
        line.release()
        await asyncio.sleep(0)
        assert order == ["a", "a-again"]
        for _ in range(2):
            line.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks, cut)
        assert order == ["a", "a-again", "b", "c"]

    asyncio.run(main())


def test_the_bound_refuses_at_once_the_timeout_ends_the_wait_and_a_departure_leaves_the_line():
    async def main():
        line = Admission(1, 1, lambda: True)
        await line.acquire(1)                      # the slot
        waiter = asyncio.ensure_future(line.acquire(5))
        await asyncio.sleep(0)
        with pytest.raises(Full):
            await line.acquire(5)                  # the line (of one) is full
        waiter.cancel()                            # its client went away
        await asyncio.gather(waiter, return_exceptions=True)
        assert line.waiting == 0
        with pytest.raises(TimeoutError):
            await line.acquire(0.01)
        assert line.waiting == 0 and line.busy == 1
        line.release()
        await line.acquire(1)
        assert line.busy == 1

    asyncio.run(main())


# ---------------------------------------------------------------- resume

def chunk(text, tok, predicted, **kw):
    return {"content": text, "tokens": [tok], "tokens_predicted": predicted, **kw}


def test_a_prefix_resume_sends_the_delivered_ids_and_asks_for_the_rest():
    p = Progress({"n_predict": 10, "temperature": 0.8})
    assert p.payload("PROMPT")["prompt"] == "PROMPT"
    assert [p.feed(chunk("Hel", 1, 1)), p.feed(chunk("", 2, 2)), p.feed(chunk("lo w", 3, 3))] == ["Hel", "", "lo w"]
    p.feed(chunk("", 4, 4))                         # held back (a possible stop word): not delivered
    p.cut()
    assert p.mode == "prefix"
    body = p.payload("PROMPT")
    assert body["prompt"] == ["PROMPT", 1, 2, 3] and body["n_predict"] == 7
    assert p.feed(chunk("orld", 9, 1)) == "orld" and p.text == "Hello world" and p.tokens == 4


def test_a_replay_skips_what_the_client_has_and_goes_on_after_it():
    p = Progress({"n_predict": 10, "temperature": 0})
    assert deterministic(p.params)
    p.payload("P")
    for i, t in enumerate(["Once", " upon", " a"], 1):
        p.feed(chunk(t, i, i))
    p.cut()
    assert p.mode == "replay"
    body = p.payload("P")
    assert body["prompt"] == "P" and body["n_predict"] == 10
    out = [p.feed(chunk(t, i, i)) for i, t in enumerate(["Once", " up", "on a", " time"], 1)]
    assert out == ["", "", "", " time"] and p.text == "Once upon a time" and p.tokens == 4
    assert p.committed == [1, 2, 3, 4]


def test_a_replay_that_differs_says_so_and_goes_on_as_a_prefix():
    p = Progress({"seed": 7})
    p.payload("P")
    p.feed(chunk("Once", 1, 1))
    p.feed(chunk(" upon", 2, 2))
    p.cut()
    p.payload("P")
    with pytest.raises(Diverged):
        p.feed(chunk("Twice", 5, 1))
    p.diverged()
    assert p.payload("P")["prompt"] == ["P", 1, 2]


def test_a_token_without_its_id_falls_back_to_the_text():
    p = Progress({"temperature": 1.0})
    p.payload("P")
    p.feed(chunk("a", 1, 1))
    p.feed(chunk("é", 3, 3))                       # the first half of é came with no chunk, no id
    assert not p.ids_ok
    p.cut()
    assert p.payload("P")["prompt"] == "Paé"


# ---------------------------------------------------------------- wire

def test_openai_fields_are_checked_and_mapped():
    req, opts = wire.openai_request({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                     "temperature": 0, "stop": "\n", "stream": True,
                                     "stream_options": {"include_usage": True}}, "chat")
    assert req.params == {"temperature": 0.0, "stop": ["\n"], "n_predict": 5}
    assert opts["stream"] and opts["include_usage"]
    for body, word in (({"messages": []}, "messages"), ({"messages": [{"role": "user"}], "n": 2}, "n="),
                       ({"messages": [{"role": "user"}], "temperature": "x"}, "temperature="),
                       ({"messages": [{"role": "user"}], "tools": [{}]}, "tools")):
        with pytest.raises(wire.BadRequest, match=word):
            wire.openai_request(body, "chat")
    req, _ = wire.openai_request({"prompt": ["one"]}, "completion")
    assert req.prompt == "one" and req.params["n_predict"] == 16


def test_ollama_fields_and_shapes():
    req, opts = wire.ollama_request({"model": "m", "prompt": "hi", "system": "be brief",
                                     "options": {"num_predict": 3, "num_ctx": 4096, "top_k": 1}}, "generate")
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert req.params == {"top_k": 1, "n_predict": 3} and opts["stream"] is True
    raw, _ = wire.ollama_request({"prompt": "hi", "raw": True, "stream": False}, "generate")
    assert raw.prompt == "hi" and raw.messages is None
    line = json.loads(wire.OllamaShape("chat", "m").end("length", 4, 3, 0.1))
    assert line["done"] is True and line["done_reason"] == "length" and line["eval_count"] == 3
    end = wire.OpenAIShape("chat", "m", True).end("stop", wire.usage(4, 3)).decode()
    assert end.endswith("data: [DONE]\n\n") and '"usage":{"prompt_tokens":4' in end


def test_api_keys_are_matched_from_either_header_and_read_from_a_file(tmp_path):
    class S:
        gateway_api_keys = "k1, k2"
        gateway_api_keys_file = str(tmp_path / "keys")

    (tmp_path / "keys").write_text("# ours\nk3\n\n")
    keys = ApiKeys.from_settings(S)
    assert len(keys) == 3
    assert keys.allows({"authorization": "Bearer k3"}) and keys.allows({"x-api-key": "k1"})
    assert not keys.allows({"authorization": "Bearer k4"}) and not keys.allows({})
    assert ApiKeys([]).allows({})


def test_a_deterministic_request_batched_with_others_resumes_by_prefix():
    """Decoded in one batch with other requests, not even an uninterrupted greedy answer repeats:
    a replay would only cost time, so the cut request goes on from its delivered tokens."""
    p = Progress({"temperature": 0})
    p.payload("P")
    p.feed(chunk("Once", 1, 1))
    p.shared = True
    p.cut()
    assert p.mode == "prefix" and p.payload("P")["prompt"] == ["P", 1]
