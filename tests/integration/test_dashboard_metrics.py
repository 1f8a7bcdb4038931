"""GET /metrics: Prometheus text from the events the dashboard reads, parsed with prometheus_client's
own parser; counters after a restart; a scrape holds Redis only for --metrics-hold seconds; /api/nodes.

The dashboard is the real process; events are pushed in the contract's format (ContractPublisher)
so every expected value is known exactly.
"""
from __future__ import annotations

import json
import time

from dashboard_support import ContractPublisher, Dashboard, command_counts
from prometheus_client.parser import text_string_to_metric_families
from support import wait_for

from synapticllamas.dashboard.hub import HEALTH_INTERVAL

MIB = 1 << 20


def scrape(dash: Dashboard) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one GET /metrics, through the real text parser."""
    status, body = dash.get("/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def push_a_cluster(client) -> dict:
    """A shell with a coordinator that served three requests and restarted once, that sampled 30 raw
    lines and lost 2 events; a node with two devices. Returns what was sent."""
    shell = ContractPublisher(client, "shell-a:11")
    shell.register(heartbeat_interval=30.0, backend_heartbeat_interval=30.0, sampling=True, sample_rate=0.1)
    shell.emit("rpc_registry", "heartbeat", "rpc_backend_connect on rpc_registry",
               {"backends": [{"address": "10.0.0.5:50052", "state": "up"}, {"address": "10.0.0.6:50052",
                                                                            "state": "down"}],
                "interval_s": 30.0})
    shell.emit("coordinator", "starting", "starting", {"state": "starting", "reason": "user"})
    shell.emit("coordinator", "starting", "restarting", {"state": "starting", "reason": "restart"})
    shell.emit("coordinator", "start", "started", {"state": "running", "port": 18080, "devices": {
        "10.0.0.5:50052": {"total_mib": 4096, "free_mib": 4000, "model_mib": 33.82, "kv_mib": 6.0,
                           "compute_mib": 29.05}}})
    shell.emit("raw", "log", "after ten sampled-out lines", sampled=10, seq=shell.seq + 11)
    shell.emit("raw", "log", "after twenty more", sampled=30, seq=shell.seq + 21)
    requests = [(4, 16), (10, 32), (1, 8)]
    for prompt, generated in requests:
        shell.emit("coordinator", "inference", "request", {"prompt_tokens": prompt, "generated_tokens": generated,
                                                           "tokens_per_second": 50.0, "port": 18080})
    shell.emit("coordinator", "heartbeat", "after two lost events", {"state": "running"}, seq=shell.seq + 3)
    shell.emit("system", "events_dropped", "2 events were dropped", {"dropped": 2, "total_dropped": 2},
               level="warning")

    node = ContractPublisher(client, "worker-1:77", app="synapticllamas-node")
    devices = [{"name": "CPU", "description": "AMD EPYC", "total_mib": 24105, "free_mib": 20000},
               {"name": "CUDA0", "description": "RTX", "total_mib": 8192, "free_mib": 8000}]
    node.emit("node", "node_up", "node up", {"address": "10.0.0.5:50052", "state": "up", "rpc_version": "7.0.0",
                                             "devices": devices, "memory_offered_mib": 2048})
    node.emit("node", "heartbeat", "rpc_backend_connect on 10.0.0.5:50052",
              {"address": "10.0.0.5:50052", "state": "up", "cache_bytes": 12345, "interval_s": 30.0,
               "memory_offered_mib": 2048})
    stopped = ContractPublisher(client, "gone:3")
    stopped.register()
    stopped.emit("system", "unregister", "bye", {"reason": "exit"})
    return {"requests": requests, "devices": devices}


def check(samples, sent, later: int = 0) -> None:
    """`later`: inference events pushed after push_a_cluster (by other apps)."""
    assert value(samples, "synapticllamas_apps") == 1                     # shell-a; gone:3 said goodbye
    assert value(samples, "synapticllamas_app_info", instance="gone:3", app="synapticllamas", state="stopped",
                 mode="standard", version="test") == 1
    assert value(samples, "synapticllamas_coordinator_up", instance="shell-a:11") == 1
    assert value(samples, "synapticllamas_backends", state="up") == 1
    assert value(samples, "synapticllamas_backends", state="down") == 1
    assert value(samples, "synapticllamas_inference_requests_total", instance="shell-a:11") == 3
    assert value(samples, "synapticllamas_inference_tokens_total", instance="shell-a:11", kind="prompt") == 15
    assert value(samples, "synapticllamas_inference_tokens_total", instance="shell-a:11", kind="generated") == 56
    assert value(samples, "synapticllamas_coordinator_restarts_total", instance="shell-a:11") == 1
    assert value(samples, "synapticllamas_events_sampled_total", instance="shell-a:11") == 30
    assert value(samples, "synapticllamas_events_lost_total", instance="shell-a:11") == 2
    assert value(samples, "synapticllamas_events_dropped_total", instance="shell-a:11") == 2
    assert value(samples, "synapticllamas_events_lost_total", instance="worker-1:77") == 0
    assert value(samples, "synapticllamas_events_total", component="coordinator", level="info") == 7 + later
    assert value(samples, "synapticllamas_events_total", component="system", level="warning") == 1
    assert sum(v for (name, _), v in samples.items() if name == "synapticllamas_events_total") == 16 + later
    assert value(samples, "synapticllamas_model_memory_bytes", instance="shell-a:11", backend="10.0.0.5:50052",
                 kind="model") == round(33.82 * MIB)
    assert value(samples, "synapticllamas_node_up", node="10.0.0.5:50052") == 1
    for d in sent["devices"]:
        labels = {"node": "10.0.0.5:50052", "device": d["name"]}
        assert value(samples, "synapticllamas_node_memory_total_bytes", **labels) == d["total_mib"] * MIB
        assert value(samples, "synapticllamas_node_memory_free_bytes", **labels) == d["free_mib"] * MIB
    assert value(samples, "synapticllamas_node_memory_offered_bytes", node="10.0.0.5:50052") == 2048 * MIB
    assert value(samples, "synapticllamas_node_cache_bytes", node="10.0.0.5:50052") == 12345
    assert value(samples, "synapticllamas_dashboard_redis_up") == 1


def test_metrics_parse_and_match_what_was_sent_and_a_restart_starts_from_the_journal(tmp_path, redis_server):
    client = redis_server.client()
    sent = push_a_cluster(client)
    dash = Dashboard(tmp_path, redis_server.url, token="m3trics")
    try:
        status, _ = dash.get("/metrics", auth=False)
        assert status == 401                      # the token rules hold for scrapers too
        first = scrape(dash)
        check(first, sent)
        started = value(first, "process_start_time_seconds")
        assert abs(started - time.time()) < 120
        # live events count on top, once each
        ContractPublisher(client, "shell-b:12").emit("coordinator", "inference", "request",
                                                     {"prompt_tokens": 2, "generated_tokens": 5})
        wait_for(lambda: ("synapticllamas_inference_requests_total", (("instance", "shell-b:12"),)) in scrape(dash),
                 10, interval=0.2, what="a live inference event in /metrics")
        again = scrape(dash)
        assert value(again, "synapticllamas_inference_tokens_total", instance="shell-b:12", kind="generated") == 5
        assert value(again, "synapticllamas_inference_requests_total", instance="shell-a:11") == 3
    finally:
        dash.stop()
    # a new dashboard process: counters start again from what the journal holds (a reset, with a new start time)
    later = Dashboard(tmp_path, redis_server.url, token="m3trics")
    try:
        restarted = scrape(later)
        check(restarted, sent, later=1)
        assert value(restarted, "synapticllamas_inference_requests_total", instance="shell-b:12") == 1
        assert value(restarted, "process_start_time_seconds") > started
    finally:
        later.stop()


def test_a_scrape_holds_redis_for_metrics_hold_seconds_then_nothing(tmp_path, redis_server):
    client = redis_server.client()
    ContractPublisher(client, "quiet:1").register()
    dash = Dashboard(tmp_path, redis_server.url, "--metrics-hold", "2")
    try:
        assert client.execute_command("PUBSUB", "NUMPAT") == 0
        scrape(dash)
        assert client.execute_command("PUBSUB", "NUMPAT") == 1       # subscribed for the hold
        wait_for(lambda: client.execute_command("PUBSUB", "NUMPAT") == 0, 10, interval=0.1,
                 what="the subscription to end after the hold")
        # and then nothing at all, for longer than the hub's longest period (no event to wait for)
        before = command_counts(client)
        time.sleep(HEALTH_INTERVAL + 1)
        after = command_counts(client)
        changed = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        assert changed == {"info": 1}, f"Redis commands after the scraper's hold ended: {changed}"
        # a new scrape catches up with what was journaled meanwhile, counted once
        ContractPublisher(client, "later:2").emit("coordinator", "inference", "request",
                                                  {"prompt_tokens": 1, "generated_tokens": 2})
        samples = scrape(dash)
        assert value(samples, "synapticllamas_inference_requests_total", instance="later:2") == 1
        assert value(samples, "synapticllamas_events_total", component="system", level="info") == 1
    finally:
        dash.stop()


def test_api_nodes_lists_the_nodes_hash(tmp_path, redis_server):
    client = redis_server.client()
    reg = {"address": "10.0.0.7:50052", "hostname": "w7", "rpc_version": "7.0.0", "state": "up",
           "devices": [{"name": "CPU", "total_mib": 1000, "free_mib": 900}], "memory_offered_mib": 512,
           "cache": {"enabled": True, "bytes": 10, "max_bytes": None}, "last_heartbeat": time.time(),
           "heartbeat_interval": 30, "redis_url": "redis://:pw@db:6379"}
    client.hset("synapticllamas:nodes", "10.0.0.7:50052", json.dumps(reg))
    dash = Dashboard(tmp_path, redis_server.url)
    try:
        status, body = dash.get("/api/nodes")
        assert status == 200
        assert body["nodes"] == [reg | {"redis_url": "redis://:***@db:6379"}]
    finally:
        dash.stop()
