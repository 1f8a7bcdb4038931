"""The gateway as other programs use it: the real shell, the real llama-server and rpc-servers, and
the real `openai` and `ollama` Python clients (and curl) talking to the port `coordinator start`
prints. Each request's `gateway/request` event is read from a real Redis, as a dashboard would.
"""
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import ollama
import openai
import pytest
from llama_support import TAG_VAR, tagged, tagged_processes
from support import PipedShell, RedisCliSubscriber, free_port, wait_for

pytestmark = pytest.mark.llama

API = r"OpenAI-compatible API: (http://127\.0\.0\.1:(\d+))/v1 \(Ollama API at /api\)"
STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


@pytest.fixture
def tag(monkeypatch):
    with tagged() as value:
        monkeypatch.setenv(TAG_VAR, value)
        yield value


class Gateway:
    """A shell with its coordinator started, and the gateway's URL."""

    def __init__(self, tmp_path: Path, tag: str, redis_url: str, *args: str, backends: int = 0, **env: str) -> None:
        self.port = free_port()
        env = {TAG_VAR: tag, "SOLLOL_REDIS_URL": redis_url, "SYNAPTICLLAMAS_GATEWAY_PORT": str(self.port),
               "SYNAPTICLLAMAS_COORDINATOR_ARGS": "-t 1", **env}
        self.shell = PipedShell(tmp_path, *args, **env)
        self.shell.send("redis on")
        self.shell.expect("Redis publishing ON")
        if backends:
            self.shell.send(f"backends spawn {backends}")
            found = self.shell.expect(r"Started \d+ local backends: (.+) \(")
            self.backends = [b.strip() for b in found.group(1).split(",")]

    def start(self) -> str:
        self.shell.send("coordinator start")
        return self.url_line()

    def url_line(self) -> str:
        found = self.shell.expect(API, timeout=120)
        assert int(found.group(2)) == self.port
        return found.group(1)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, **kw)

    def ollama(self, **kw) -> ollama.Client:
        return ollama.Client(host=self.base, **kw)

    def close(self) -> None:
        """SIGTERM: the shell stops what it started (a frozen llama-server gets SIGKILL in time)."""
        self.shell.kill(grace=30)


def request_arrived(port: int, count: int = 1) -> bool:
    """`count` client connections to the gateway are open and the gateway has read what they sent
    (nothing left in its receive queue): their requests are inside it."""
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True).stdout.splitlines()
    return len(out) >= count and all(line.split()[0] == "0" for line in out)


def gateway_events(sub: RedisCliSubscriber) -> list[dict]:
    return [e["details"] for e in sub.events() if e["component"] == "gateway" and e["event_type"] == "request"]


def greedy_story(client: openai.OpenAI, n: int, on_chunk=None) -> tuple[str, list[str]]:
    """A streamed greedy chat answer: its text and every finish_reason the stream carried."""
    parts, finishes = [], []
    stream = client.chat.completions.create(model="demo", messages=STORY, max_tokens=n, temperature=0, stream=True)
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
                if on_chunk:
                    on_chunk(len(parts))
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return "".join(parts), finishes


# ---------------------------------------------------------------- the endpoint

def test_both_apis_with_the_real_clients_and_curl(tmp_path, redis_server, tag):
    sub = RedisCliSubscriber(redis_server.port)
    gw = Gateway(tmp_path, tag, redis_server.url)
    try:
        gw.start()
        client = gw.openai()
        # OpenAI: chat (whole and streamed), completions, models
        whole = client.chat.completions.create(model="demo", messages=STORY, max_tokens=12, temperature=0)
        assert whole.choices[0].message.content.strip() and whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
        text, finishes = greedy_story(client, 12)
        assert text == whole.choices[0].message.content and finishes == ["length"]
        done = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=6, temperature=0)
        assert done.choices[0].text.strip()
        assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct.Q4_1"]
        with pytest.raises(openai.APIStatusError) as no_embeddings:        # not started with --embeddings
            client.embeddings.create(model="demo", input="hello")
        assert no_embeddings.value.status_code == 501
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(model="demo", messages=STORY, temperature="hot")  # type: ignore[arg-type]
        # Ollama: chat (streamed by default), generate, tags, show, version, ps
        o = gw.ollama()
        pieces = list(o.chat(model="SmolLM2-135M-Instruct.Q4_1", messages=STORY, stream=True,
                             options={"num_predict": 12, "temperature": 0}))
        assert "".join(p.message.content for p in pieces) == whole.choices[0].message.content
        assert [p.done for p in pieces].count(True) == 1 and pieces[-1].done_reason == "length"
        gen = o.generate(model="demo", prompt="Say hi", options={"num_predict": 8}, stream=False)
        assert gen.response.strip() and gen.done and gen.eval_count == 8
        assert [m.model for m in o.list().models] == ["SmolLM2-135M-Instruct.Q4_1"]
        assert o.show("SmolLM2-135M-Instruct.Q4_1").details.quantization_level == "Q4_1"
        assert [m.model for m in o.ps().models] == ["SmolLM2-135M-Instruct.Q4_1"]
        # curl, as a script would use it: the NDJSON stream of /api/generate
        curl = subprocess.run(["curl", "-sN", gw.base + "/api/generate", "-d",
                               '{"model":"demo","prompt":"Hello","options":{"num_predict":5}}'],
                              capture_output=True, text=True, timeout=60)
        lines = curl.stdout.splitlines()
        assert len(lines) >= 2 and '"done":true' in lines[-1] and all('"done":false' in x for x in lines[:-1])
        version = subprocess.run(["curl", "-s", gw.base + "/api/version"], capture_output=True, text=True, timeout=10)
        assert '"version"' in version.stdout
        # one event per request, with the figures a dashboard needs
        events = wait_for(lambda: (e := gateway_events(sub)) and len(e) >= 8 and e, 20, what="the requests' events")
        # the embeddings llama-server does not serve (501) and the bad temperature (400) are events too
        assert [(e["api"], e["status"]) for e in events] == [("openai", "ok")] * 3 + [("openai", "refused")] * 2 + \
            [("ollama", "ok")] * 3
        first = events[0]
        assert first["tokens"] == 12 and first["first_token_s"] > 0 and first["prompt_tokens"] > 0
        assert first["held"] == 0 and first["resumed"] == 0 and first["queue_depth"] == 0
        gw.shell.send("status")
        gw.shell.expect(r"^gateway\s+OpenAI-compatible API: http://127\.0\.0\.1:\d+/v1 \(Ollama API at /api\); "
                        r"\d+ requests \(\d+ ok")
    finally:
        gw.close()
        sub.close()


def test_embeddings_when_the_model_serves_them(tmp_path, redis_server, tag):
    gw = Gateway(tmp_path, tag, redis_server.url, SYNAPTICLLAMAS_COORDINATOR_ARGS="-t 1 --embeddings --pooling mean")
    try:
        gw.start()
        vectors = gw.openai().embeddings.create(model="demo", input=["hello", "world"])
        assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 100
    finally:
        gw.close()


def test_a_request_during_start_is_held_then_answered(tmp_path, redis_server, tag):
    """llama-server is frozen mid-load (SIGSTOP): a chat request that comes meanwhile waits in the
    gateway, and is answered once the coordinator runs; its event says it was held."""
    sub = RedisCliSubscriber(redis_server.port)
    gw = Gateway(tmp_path, tag, redis_server.url)
    try:
        gw.shell.send("coordinator start")
        pid = int(gw.shell.expect(r"Starting llama-server \(pid (\d+)\)").group(1))
        os.kill(pid, signal.SIGSTOP)
        answers: list = []
        thread = threading.Thread(target=lambda: answers.append(gw.ollama().chat(
            model="demo", messages=STORY, options={"num_predict": 6}, stream=False)))
        thread.start()
        wait_for(lambda: request_arrived(gw.port), 20, what="the request to reach the gateway")
        os.kill(pid, signal.SIGCONT)
        gw.url_line()
        thread.join(60)
        assert answers and answers[0].message.content.strip() and answers[0].eval_count == 6
        event = wait_for(lambda: gateway_events(sub), 20, what="the request's event")[0]
        assert event["status"] == "ok" and event["held"] == 1 and event["queue_s"] > 0
    finally:
        gw.close()
        sub.close()


def test_api_keys_401_in_each_apis_format_and_never_shown(tmp_path, redis_server, tag):
    key = "sk-gw-Zq7Zq7Zq7"
    gw = Gateway(tmp_path, tag, redis_server.url, SYNAPTICLLAMAS_GATEWAY_API_KEYS=f"other-key,{key}")
    sub = RedisCliSubscriber(redis_server.port)
    try:
        gw.start()
        with pytest.raises(openai.AuthenticationError) as refused:
            gw.openai("wrong").chat.completions.create(model="demo", messages=STORY, max_tokens=4)
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        with pytest.raises(ollama.ResponseError) as no_key:
            gw.ollama().chat(model="demo", messages=STORY, options={"num_predict": 4})
        assert no_key.value.status_code == 401 and "API key" in no_key.value.error
        answer = gw.openai(key).chat.completions.create(model="demo", messages=STORY, max_tokens=4)
        assert answer.choices[0].message.content
        assert gw.ollama(headers={"Authorization": f"Bearer {key}"}).generate(
            model="demo", prompt="Hi", options={"num_predict": 3}).response
        gw.shell.send("config")
        gw.shell.expect(r"^gateway_api_keys\s+\*\*\*\s")
        gw.shell.send("exit")
        assert gw.shell.close() == 0
        # the shell's last event: what it published before has reached the subscriber too, and
        # all it printed has been read
        sub.wait_for_event("system", "unregister", timeout=20)
        gw.shell.unread(timeout=10)
        refused = [e["details"] for e in sub.events() if e["component"] == "gateway" and e["details"]["status"] == "refused"]
        assert [(e["api"], e["http_status"]) for e in refused] == [("openai", 401), ("ollama", 401)]
        published = "\n".join(sub.raw)
        log = tmp_path / "state" / "synapticllamas" / "synapticllamas.log"
        assert key not in gw.shell.output() and key not in published
        assert not log.exists() or key not in log.read_text()
    finally:
        gw.close()
        sub.close()


def test_a_keyless_gateway_beyond_loopback_is_refused_at_start(tmp_path):
    proc = subprocess.run([shutil.which("python3") or "python3", "main.py", "-c", "status"],
                          capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, "SYNAPTICLLAMAS_GATEWAY_HOST": "0.0.0.0",
                               "XDG_CONFIG_HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "Error: SYNAPTICLLAMAS_GATEWAY_HOST=0.0.0.0 is not a loopback address and no API key is set: anyone who "
        "reaches it could use the model; set SYNAPTICLLAMAS_GATEWAY_API_KEYS or SYNAPTICLLAMAS_GATEWAY_API_KEYS_FILE, "
        "or bind 127.0.0.1"]


def test_a_taken_port_is_one_line_and_the_coordinator_goes_on(tmp_path, redis_server, tag):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    gw = Gateway(tmp_path, tag, redis_server.url, SYNAPTICLLAMAS_GATEWAY_PORT=str(taken.getsockname()[1]))
    try:
        gw.shell.send("coordinator start", 'coordinator ask "Once upon a time" --n 4', "exit")
        line = gw.shell.expect(r"gateway port \d+ on 127\.0\.0\.1 is taken .*going on without the gateway$").group(0)
        assert f"port {taken.getsockname()[1]}" in line and "SYNAPTICLLAMAS_GATEWAY_PORT" in line
        gw.shell.expect(r"^\[4 tokens in ")
        assert gw.shell.close() == 0
    finally:
        taken.close()
        gw.close()


# ---------------------------------------------------------------- bounds, queue, departures

def test_past_the_bound_503_with_retry_after(tmp_path, redis_server, tag):
    """No slot free (-np 1, one answer generating, llama-server frozen) and a line of one: the
    next request waits its 1 s and gets 503 with Retry-After and why; one more is refused at once."""
    gw = Gateway(tmp_path, tag, redis_server.url, SYNAPTICLLAMAS_COORDINATOR_PARALLEL="1",
                 SYNAPTICLLAMAS_GATEWAY_MAX_WAITING="1", SYNAPTICLLAMAS_GATEWAY_HOLD_TIMEOUT="1")
    try:
        gw.start()
        pid = int(re.search(r"\(pid (\d+)\)", "\n".join(line for _, line in gw.shell.transcript)).group(1))
        first = gw.openai().chat.completions.create(model="demo", messages=STORY, max_tokens=200, stream=True)
        next(iter(first))                     # admitted: the one slot is taken
        os.kill(pid, signal.SIGSTOP)          # and stays taken
        try:
            import httpx

            waiting: list = []
            thread = threading.Thread(target=lambda: waiting.append(httpx.post(
                gw.base + "/v1/chat/completions", json={"messages": STORY, "max_tokens": 4}, timeout=30)))
            thread.start()
            wait_for(lambda: request_arrived(gw.port, 2), 20, what="the second request in the line")
            with pytest.raises(ollama.ResponseError) as full:
                gw.ollama().chat(model="demo", messages=STORY, stream=False)
            assert full.value.status_code == 503 and "gateway_max_waiting=1" in full.value.error
            thread.join(30)
            late = waiting[0]
            assert late.status_code == 503 and late.headers["retry-after"] == "5"
            assert "waited 1s (gateway_hold_timeout): all 1 llama-server slots are busy" in \
                late.json()["error"]["message"]
        finally:
            os.kill(pid, signal.SIGCONT)
        first.close()
    finally:
        gw.close()


def test_queued_in_order_and_a_departed_client_leaves_the_line(tmp_path, redis_server, tag):
    """-np 1: a second request waits for the first to finish; a third, whose client gives up while
    it waits, is dropped from the line, and a client that leaves mid-answer stops its generation."""
    sub = RedisCliSubscriber(redis_server.port)
    gw = Gateway(tmp_path, tag, redis_server.url, SYNAPTICLLAMAS_COORDINATOR_PARALLEL="1")
    try:
        gw.start()
        pid = int(re.search(r"\(pid (\d+)\)", "\n".join(line for _, line in gw.shell.transcript)).group(1))
        client = gw.openai()
        first = client.chat.completions.create(model="demo", messages=STORY, max_tokens=200, temperature=0,
                                               stream=True)
        chunks = iter(first)
        next(chunks)                           # the first holds the only slot...
        os.kill(pid, signal.SIGSTOP)           # ...for as long as this test needs
        second_text: list[str] = []
        thread = threading.Thread(target=lambda: second_text.extend(
            p.message.content for p in gw.ollama().chat(model="demo", messages=STORY, stream=True,
                                                        options={"num_predict": 5})))
        thread.start()
        wait_for(lambda: request_arrived(gw.port, 2), 20, what="the second request in the line")
        # a third client gives up while it waits (curl with a 1 s limit)
        gone = subprocess.run(["curl", "-s", "-m", "1", gw.base + "/api/generate", "-d",
                               '{"model":"demo","prompt":"Hi","options":{"num_predict":5}}'], capture_output=True)
        assert gone.returncode == 28            # curl: timed out, it went away
        cancelled = wait_for(lambda: [e for e in gateway_events(sub) if e["status"] == "cancelled"], 20,
                             what="the departed client's event")
        assert cancelled[0]["api"] == "ollama" and cancelled[0]["tokens"] == 0 and "first_token_s" not in cancelled[0]
        os.kill(pid, signal.SIGCONT)
        assert len(list(chunks)) > 10
        thread.join(60)
        assert "".join(second_text).strip()
        # served in arrival order, one at a time: the first ended before the second
        done = wait_for(lambda: (e := gateway_events(sub)) and len(e) >= 3 and e, 20, what="the events")
        assert [(e["api"], e["status"]) for e in done] == [("ollama", "cancelled"), ("openai", "ok"), ("ollama", "ok")]
        assert done[2]["queue_s"] > 0
        # the one that leaves mid-answer: its generation stops there
        stream = client.chat.completions.create(model="demo", messages=STORY, max_tokens=1000, stream=True)
        next(iter(stream))
        stream.close()
        left = wait_for(lambda: [e for e in gateway_events(sub) if e["status"] == "cancelled" and e["api"] == "openai"],
                        20, what="the mid-answer departure's event")[0]
        assert 1 <= left["tokens"] < 1000
        # and the line moves on: the slot is free for the next
        assert client.completions.create(model="demo", prompt="Hello", max_tokens=3).choices[0].text is not None
    finally:
        gw.close()
        sub.close()


# ---------------------------------------------------------------- failover

def test_a_stream_cut_by_a_killed_backend_is_resumed_with_the_uninterrupted_answer(tmp_path, redis_server, tag):
    """Two local backends; a greedy streamed chat answer once without trouble, then again with one
    backend SIGKILLed mid-stream: the coordinator fails over, the gateway resumes the stream, and
    the client gets exactly the same text, with one finish_reason and no error."""
    sub = RedisCliSubscriber(redis_server.port)
    gw = Gateway(tmp_path, tag, redis_server.url, "--distributed", backends=2,
                 SYNAPTICLLAMAS_COORDINATOR_BACKOFF="0.1")
    try:
        gw.start()
        client = gw.openai()
        reference, finishes = greedy_story(client, 120)
        assert finishes == ["length"] and len(reference) > 200
        doomed = gw.backends[1]
        pids = [pid for pid, name in tagged_processes(tag) if name == "ggml-rpc-server" and
                doomed.rsplit(":", 1)[1].encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(pids) == 1

        def kill_at_chunk(n: int) -> None:
            if n == 20:
                os.kill(pids[0], signal.SIGKILL)

        resumed, finishes = greedy_story(client, 120, kill_at_chunk)
        assert finishes == ["length"]
        assert resumed == reference
        events = wait_for(lambda: (e := gateway_events(sub)) and len(e) >= 2 and e, 30, what="both requests' events")
        assert events[1]["status"] == "ok" and events[1]["resumed"] >= 1 and events[1]["tokens"] == 120
        _, failover = sub.wait_for_event("coordinator", "failover", timeout=30)
        assert failover["details"]["lost"] == [doomed]
    finally:
        gw.close()
        sub.close()
