"""A cold model load over slow links: the user sees the upload move, and Redis gets it in 5 % steps.

Three simulated hosts (tests/cluster.py) on 60 Mbit/s links, each running `python3 main.py node`
with an empty cache; a piped shell (`--distributed`, `redis on`) lists them and runs
`coordinator start` with the demo model. About 92 MiB of the demo model goes to the RPC devices;
llama-server sends it one tensor after another, so one link at a time carries it: ~13 s of upload
at 60 Mbit/s, during which llama-server itself prints nothing. The progress comes from the kernel's
byte counters of llama-server's connections (llama/load_progress.py, supervisor `_watch_upload`).

Counts and order are asserted, never how long anything took.
"""
import re
from itertools import pairwise

import pytest
from llama_support import tagged
from node_support import NodesOnHosts

pytestmark = pytest.mark.llama

RATE_MBIT = 60          # 92 MiB over one link at a time: ~13 s of upload
LINE = re.compile(r"sending weights to 3 RPC backends, (\d+)% \(([\d.]+) of ([\d.]+) MiB\)")


@pytest.fixture
def tag():
    with tagged() as value:
        yield value


def test_a_cold_load_over_slow_links_shows_moving_progress_and_5_percent_events(tmp_path, make_cluster, tag):
    cluster = make_cluster(3, rate_mbit=RATE_MBIT)
    # fresh caches: a cold load; with the cluster key, so the bytes counted are llama-server's to
    # the local ends of the encrypted links
    with NodesOnHosts(cluster, tmp_path, tag, secure=True) as on_hosts:
        sub, addresses = on_hosts.sub, on_hosts.addresses
        on_hosts.wait_all_up()
        shell = on_hosts.shell("--distributed")
        shell.send("redis on", "coordinator start")
        match, _ = shell.read_until(r"Coordinator running .* RPC backends: (.*); ready", timeout=120,
                                    stream="stdout")
        assert sorted(match.group(1).split(", ")) == sorted(addresses)
        shell.send("exit")
        assert shell.wait() == 0, shell.output()
        stdout = [line for name, line in shell.transcript if name == "stdout"]

        # the progress line: several distinct samples, moving forward, before the model is loaded
        loaded_at = next(i for i, line in enumerate(stdout) if re.search(r"^Model .* loaded in", line))
        samples = [(i, int(m[1]), float(m[2]), float(m[3])) for i, line in enumerate(stdout)
                   if (m := LINE.search(line))]
        assert len(samples) >= 5, "\n".join(stdout)
        assert all(i < loaded_at for i, *_ in samples), "\n".join(stdout)
        percents = [p for _, p, _, _ in samples]
        sent = [s for _, _, s, _ in samples]
        assert percents == sorted(percents) and len(set(percents)) >= 5, percents
        assert all(a < b for a, b in pairwise(sent)), sent          # each line printed is news
        assert all(b - a <= 35 for a, b in pairwise(percents)), percents    # it moves, no long stall
        # the last sample may come up to a second (~7.5 % here) before the upload ends, and llama-server's
        # warm-up after it can be shorter than the rest of that second: near 100, not always 100
        assert percents[-1] >= 85, percents
        totals = {t for *_, t in samples}
        assert len(totals) == 1 and 85 <= totals.pop() <= 100, samples    # the RPC devices' model buffers

        # the model_loading events: one per 5 % step reached at most, in order, up to (nearly) 100
        sub.wait_for_event("model", "model_load", timeout=10)
        events = [e for e in sub.events()
                  if e["component"] == "model" and e["event_type"] == "model_loading"
                  and e["details"].get("stage") == "sending weights"]
        steps = [e["details"]["percent"] for e in events]
        assert len(steps) >= 3, steps
        assert all(p % 5 == 0 for p in steps), steps
        assert all(a < b for a, b in pairwise(steps)), steps
        assert 85 <= steps[-1] <= 100, steps
        for e in events:
            d = e["details"]
            # the step reached: the exact figure (sent_mib, total_mib: 0.1 MiB rounded) is in [step, step + 5)
            assert d["percent"] - 0.5 <= 100 * d["sent_mib"] / d["total_mib"] < d["percent"] + 5.5, d
            assert sorted(d["rpc_backends"]) == sorted(addresses), d
