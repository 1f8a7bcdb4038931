import pytest

from support import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    """A fresh real redis-server on a free loopback port, killed after the test."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()
