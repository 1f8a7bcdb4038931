"""The encrypted RPC link by itself: the real stunnel at both ends, the real ggml-rpc-server behind
it and the real llama-server in front, loading the demo model and answering through it.

What only a key holder gets through is read where it shows: rpc-server prints `Accepted client
connection` for every client it serves, so a stranger, a wrong key and a plain rpc-server client
leave no such line; the link's own check (one connection when it opens) leaves exactly one.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import urllib.request

import pytest
from llama_run import LlamaServer, start_rpc_server
from llama_support import llama_binaries
from support import free_port, until

from synapticllamas.trust.key import ClusterKey
from synapticllamas.trust.link_server import LinkServer
from synapticllamas.trust.links import LinkManager
from synapticllamas.trust.stunnel import LinkError

pytestmark = pytest.mark.llama

ACCEPTED = "Accepted client connection"


def accepted(out) -> int:
    return sum(1 for line in list(out.lines) if ACCEPTED in line)


def complete(port: int, prompt: str) -> str:
    body = json.dumps({"prompt": prompt, "n_predict": 8}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["content"]


def test_only_a_key_holder_reaches_rpc_server_and_llama_server_runs_through_the_link(tmp_path):
    server_bin, rpc_bin, model = llama_binaries()
    rpc_port, front = free_port(), free_port()
    rpc, out, _ = start_rpc_server(lambda argv, **kw: __import__("subprocess").Popen(argv, **kw), rpc_bin,
                                   "127.0.0.1", rpc_port)
    key, other = ClusterKey(os.urandom(32), "test"), ClusterKey(os.urandom(32), "other")
    backend = f"127.0.0.1:{front}"

    async def scenario() -> None:
        server = LinkServer(key.derive("link"), "127.0.0.1", front, rpc_port)
        await server.start()
        links, strangers = LinkManager(key), LinkManager(other)
        try:
            dialled = await links.dial([backend])
            assert list(dialled) == [backend] and dialled[backend].startswith("127.0.0.1:")
            assert dialled[backend] != backend and links.backend_of(dialled[backend]) == backend
            await until(lambda: accepted(out) == 1, 10, "the link's check to reach rpc-server")

            # a stranger speaking anything at all, and a client of another cluster: nothing gets through
            reader, writer = await asyncio.open_connection("127.0.0.1", front)
            writer.write(b"\x00" * 64 + b"GET / HTTP/1.0\r\n\r\n")
            await writer.drain()
            try:
                answer = await reader.read()
            except ConnectionResetError:                     # refused outright
                answer = b""
            assert answer == b""
            writer.close()
            with pytest.raises(LinkError) as refused:
                await strangers.dial([backend])
            assert str(refused.value) == f"link to {backend} failed to authenticate (wrong cluster key?)"
            assert refused.value.backend == backend
            await until(lambda: server.refused >= 2, 10, "the server end to count both refusals")

            # the link in front of a plain rpc-server (a node started with --insecure) says so
            with pytest.raises(LinkError, match="did not answer as an encrypted link"):
                await links.dial([f"127.0.0.1:{rpc_port}"])

            # llama-server through the link: the demo model loads and answers
            # the check, and the plain rpc-server's TLS hello (its line comes through a reader thread)
            await until(lambda: accepted(out) == 2, 10, "rpc-server's line for the TLS hello")
            again = await links.dial([backend])              # reused: no second check
            assert again == dialled and accepted(out) == 2
            llama = LlamaServer(server_bin, model, tmp_path / "llama.log", rpc=[dialled[backend]], extra=["-lv", "4"])
            try:
                await asyncio.to_thread(llama.wait_healthy, 120)
                text = await asyncio.to_thread(complete, llama.port, "Once upon a time")
                assert text.strip(), "no tokens through the link"
                log = llama.log.read_text()                 # the weights went to rpc-server, through the link
                assert re.search(rf"RPC\d*\[{re.escape(dialled[backend])}\] model buffer size", log), llama.output()
            finally:
                await asyncio.to_thread(llama.stop)
            assert accepted(out) >= 3
            assert links.status()[backend]["checked"] is True
        finally:
            await links.close()
            await strangers.close()
            await server.stop()
        assert not server.running

    try:
        asyncio.run(scenario())
        # the stranger's bytes and the other key's handshake never reached rpc-server
        lines = [line for line in out.lines if ACCEPTED in line]
        assert len(lines) >= 3
    finally:
        rpc.terminate()
        rpc.wait(10)


def test_a_link_to_nobody_is_one_line(tmp_path):
    key = ClusterKey(os.urandom(32), "test")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]

    async def scenario() -> str:
        links = LinkManager(key)
        try:
            with pytest.raises(LinkError) as failed:
                await links.dial([f"127.0.0.1:{port}"])
            return str(failed.value)
        finally:
            await links.close()

    message = asyncio.run(scenario())
    assert message == f"link to 127.0.0.1:{port}: the node does not answer (Connection refused (111))", message


def test_without_stunnel_a_link_is_one_line_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))       # no stunnel4, no stunnel
    key = ClusterKey(os.urandom(32), "test")

    async def scenario() -> LinkError:
        links = LinkManager(key)
        try:
            with pytest.raises(LinkError) as failed:
                await links.dial(["10.9.9.9:50052"])
            return failed.value
        finally:
            await links.close()

    error = asyncio.run(scenario())
    assert str(error) == "stunnel is not installed (the encrypted RPC links need it): apt-get install stunnel4"
    assert error.backend is None            # not one node's fault: the pre-flight refuses the start with it
