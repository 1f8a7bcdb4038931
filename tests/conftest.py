import pytest
from cluster import make_cluster  # noqa: F401  (the simulated cluster's fixture, for every test)
from support import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    """A fresh real redis-server on a free loopback port, killed after the test."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def rpc_server_binary():
    """The real ggml-rpc-server; a missing binary fails the tests that need it, it does not skip them."""
    from synapticllamas.llama import binaries

    try:
        return binaries.rpc_server()
    except binaries.NotFound as exc:
        pytest.fail(f"these tests need the real ggml-rpc-server: {exc}")
