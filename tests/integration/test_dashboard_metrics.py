"""GET /metrics: Prometheus text from the events the dashboard reads, parsed with prometheus_client's
own parser; counters after a restart; a scrape holds Redis only for --metrics-hold seconds; /api/nodes.

The dashboard is the real process; events are pushed in the contract's format (ContractPublisher)
so every expected value is known exactly.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
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
    # its gateway: two OpenAI chats (the second held while the coordinator restarted, then resumed
    # after a cut) and an Ollama generate refused with 503 while three more waited
    shell.emit("gateway", "listening", "gateway listening", {"port": 11434, "url": "http://127.0.0.1:11434",
                                                             "status": "ok", "keys": 0})
    for first, total, held, depth in ((0.2, 1.5, 0, 0), (3.0, 6.0, 1, 1)):
        shell.emit("gateway", "request", "openai chat", {
            "api": "openai", "kind": "chat", "model": "demo", "status": "ok", "http_status": 200,
            "queue_depth": depth, "in_flight": 1, "queue_s": 0.01, "first_token_s": first, "seconds": total,
            "prompt_tokens": 12, "tokens": 30, "tokens_per_s": 22.1, "held": held, "resumed": held})
    shell.emit("gateway", "request", "ollama generate unavailable (503)", {
        "api": "ollama", "kind": "generate", "model": "demo", "status": "unavailable", "http_status": 503,
        "queue_depth": 3, "in_flight": 4, "seconds": 0.002, "tokens": 0, "tokens_per_s": None, "held": 0,
        "resumed": 0}, level="warning")

    node = ContractPublisher(client, "worker-1:77", app="synapticllamas-node")
    devices = [{"name": "CPU", "description": "AMD EPYC", "total_mib": 24105, "free_mib": 20000},
               {"name": "CUDA0", "description": "RTX", "total_mib": 8192, "free_mib": 8000}]
    machine = {"id": "boot-0123456789abcdef", "id_source": "boot id", "name": "worker", "cpus": 2.0,
               "mem_total_mib": 24105, "mem_available_mib": 20000}
    node.emit("node", "node_up", "node up", {"address": "10.0.0.5:50052", "state": "up", "rpc_version": "7.0.0",
                                             "devices": devices, "memory_offered_mib": 2048, "host": machine})
    node.emit("node", "heartbeat", "rpc_backend_connect on 10.0.0.5:50052",
              {"address": "10.0.0.5:50052", "state": "up", "cache_bytes": 12345, "interval_s": 30.0,
               "memory_offered_mib": 2048})
    # a second node on the same machine: each of its CPU devices reports the machine's memory
    other = ContractPublisher(client, "worker-1:78", app="synapticllamas-node")
    other.emit("node", "node_up", "node up", {"address": "10.0.0.5:50053", "state": "up", "rpc_version": "7.0.0",
                                              "devices": devices[:1], "host": machine})
    stopped = ContractPublisher(client, "gone:3")
    stopped.register()
    stopped.emit("system", "unregister", "bye", {"reason": "exit"})
    return {"requests": requests, "devices": devices, "shell": shell, "machine": machine}


def check(samples, sent, later: int = 0) -> None:
    """`later`: inference events pushed after push_a_cluster (by other apps)."""
    assert value(samples, "synapticllamas_apps") == 1                     # shell-a; gone:3 said goodbye
    assert value(samples, "synapticllamas_app_info", app_instance="gone:3", app="synapticllamas", state="stopped",
                 mode="standard", version="test") == 1
    assert value(samples, "synapticllamas_coordinator_up", app_instance="shell-a:11") == 1
    assert value(samples, "synapticllamas_backends", state="up") == 1
    assert value(samples, "synapticllamas_backends", state="down") == 1
    assert value(samples, "synapticllamas_inference_requests_total", app_instance="shell-a:11") == 3
    assert value(samples, "synapticllamas_inference_tokens_total", app_instance="shell-a:11", kind="prompt") == 15
    assert value(samples, "synapticllamas_inference_tokens_total", app_instance="shell-a:11", kind="generated") == 56
    assert value(samples, "synapticllamas_coordinator_restarts_total", app_instance="shell-a:11") == 1
    assert value(samples, "synapticllamas_events_sampled_total", app_instance="shell-a:11") == 30
    assert value(samples, "synapticllamas_events_lost_total", app_instance="shell-a:11") == 2
    assert value(samples, "synapticllamas_events_dropped_total", app_instance="shell-a:11") == 2
    assert value(samples, "synapticllamas_events_lost_total", app_instance="worker-1:77") == 0
    assert value(samples, "synapticllamas_events_total", component="coordinator", level="info") == 7 + later
    assert value(samples, "synapticllamas_events_total", component="system", level="warning") == 1
    assert value(samples, "synapticllamas_events_total", component="gateway", level="info") == 3
    assert sum(v for (name, _), v in samples.items() if name == "synapticllamas_events_total") == 21 + later
    # the gateway: requests by API and status, the queue its last request left, time to first text
    shell = {"app_instance": "shell-a:11"}
    gateway = {(dict(labels)["api"], dict(labels)["status"]): v for (name, labels), v in samples.items()
               if name == "synapticllamas_gateway_requests_total"}
    assert gateway == {("openai", "ok"): 2, ("ollama", "unavailable"): 1}
    assert value(samples, "synapticllamas_gateway_queue_depth", **shell) == 3
    openai = shell | {"api": "openai"}
    buckets = {dict(labels)["le"]: v for (name, labels), v in samples.items()
               if name == "synapticllamas_gateway_first_token_seconds_bucket" and dict(labels)["api"] == "openai"}
    assert [buckets[le] for le in ("0.1", "0.25", "2.5", "5.0", "60.0", "+Inf")] == [0, 1, 1, 2, 2, 2]
    assert value(samples, "synapticllamas_gateway_first_token_seconds_count", **openai) == 2
    assert value(samples, "synapticllamas_gateway_first_token_seconds_sum", **openai) == 3.2
    # a request that never produced text has no time to first token
    assert not [k for k in samples if k[0].startswith("synapticllamas_gateway_first_token") and ("api", "ollama") in k[1]]
    assert value(samples, "synapticllamas_model_memory_bytes", app_instance="shell-a:11", backend="10.0.0.5:50052",
                 kind="model") == round(33.82 * MIB)
    assert value(samples, "synapticllamas_node_up", node="10.0.0.5:50052") == 1
    for d in sent["devices"]:
        labels = {"node": "10.0.0.5:50052", "device": d["name"]}
        assert value(samples, "synapticllamas_node_memory_total_bytes", **labels) == d["total_mib"] * MIB
        assert value(samples, "synapticllamas_node_memory_free_bytes", **labels) == d["free_mib"] * MIB
    assert value(samples, "synapticllamas_node_memory_offered_bytes", node="10.0.0.5:50052") == 2048 * MIB
    assert value(samples, "synapticllamas_node_cache_bytes", node="10.0.0.5:50052") == 12345
    # two nodes on one machine: the machine's memory once, whatever the nodes' devices say
    machine = sent["machine"]
    for address in ("10.0.0.5:50052", "10.0.0.5:50053"):
        assert value(samples, "synapticllamas_node_host_info", node=address, host=machine["id"], host_name="worker") == 1
    assert value(samples, "synapticllamas_host_nodes", host=machine["id"]) == 2
    totals = [v for (name, _), v in samples.items() if name == "synapticllamas_host_memory_total_bytes"]
    assert totals == [machine["mem_total_mib"] * MIB]
    assert value(samples, "synapticllamas_host_memory_available_bytes", host=machine["id"]) == 20000 * MIB
    assert value(samples, "synapticllamas_host_cpus", host=machine["id"]) == 2.0
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
        wait_for(lambda: ("synapticllamas_inference_requests_total", (("app_instance", "shell-b:12"),)) in scrape(dash),
                 10, interval=0.2, what="a live inference event in /metrics")
        again = scrape(dash)
        assert value(again, "synapticllamas_inference_tokens_total", app_instance="shell-b:12", kind="generated") == 5
        assert value(again, "synapticllamas_inference_requests_total", app_instance="shell-a:11") == 3
    finally:
        dash.stop()
    # a new dashboard process: counters start again from what the journal holds (a reset, with a new start time)
    later = Dashboard(tmp_path, redis_server.url, token="m3trics")
    try:
        restarted = scrape(later)
        check(restarted, sent, later=1)
        assert value(restarted, "synapticllamas_inference_requests_total", app_instance="shell-b:12") == 1
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
        assert value(samples, "synapticllamas_inference_requests_total", app_instance="later:2") == 1
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


def families(body: str) -> dict[str, str]:
    """{family name: type} as prometheus_client's parser reads the text."""
    return {f.name: f.type for f in text_string_to_metric_families(body)}


def test_the_exposition_is_what_promtool_and_the_parser_accept(tmp_path, redis_server):
    """Each family's samples under its own HELP/TYPE (interleaved, the parser read two families as
    untyped), and no label called `instance`: Prometheus sets that one to the scraped target."""
    client = redis_server.client()
    push_a_cluster(client)
    dash = Dashboard(tmp_path, redis_server.url)
    try:
        status, body = dash.get("/metrics")
        assert status == 200
    finally:
        dash.stop()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (scripts/test installs Debian's prometheus package when root)"
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stdout + checked.stderr
    types = families(body)
    assert types["synapticllamas_events_lost"] == "counter" and types["synapticllamas_events_sampled"] == "counter"
    assert types["synapticllamas_gateway_requests"] == "counter"
    assert types["synapticllamas_gateway_queue_depth"] == "gauge"
    assert types["synapticllamas_gateway_first_token_seconds"] == "histogram"
    assert "untyped" not in types.values(), types
    assert not re.search(r'[{,]instance="', body)
    assert 'synapticllamas_events_lost_total{app_instance="shell-a:11"} 2' in body.splitlines()
    assert 'synapticllamas_gateway_first_token_seconds_bucket{app_instance="shell-a:11",api="openai",le="+Inf"} 2' \
        in body.splitlines()


def test_a_forged_seq_neither_freezes_nor_poisons_an_apps_counters_and_bad_events_are_counted(tmp_path,
                                                                                              redis_server):
    client = redis_server.client()
    real = push_a_cluster(client)["shell"]            # it goes on where it left off
    forger = ContractPublisher(client, "shell-a:11")  # anyone on the Redis can use a real instance
    bad = [
        forger.event("coordinator", "inference", "forged", {"prompt_tokens": 1}, seq=2**53 - 1),
        forger.event("coordinator", "inference", "forged", {"prompt_tokens": 1}, seq=real.seq + 50),
    ]
    forger.push(*bad)
    for text in ('{"timestamp": 1e20, "component": "raw", "event_type": "log"}',
                 '{"timestamp": 1, "component": "raw", "event_type": "log", "seq": 1e999}',
                 '{"timestamp": 1, "component": "node", "event_type": "node_up", "source": "str"}', "not json"):
        client.xadd("synapticllamas:events", {"event": text})
    dash = Dashboard(tmp_path, redis_server.url)
    try:
        for _ in range(3):                           # the real app goes on below the forged seqs
            real.emit("coordinator", "inference", "request", {"prompt_tokens": 1, "generated_tokens": 1})
        wait_for(lambda: value(scrape(dash), "synapticllamas_inference_requests_total", app_instance="shell-a:11")
                 == 3 + 2 + 3, 10, interval=0.2, what="the real app's requests to go on counting")
        samples = scrape(dash)
        # the forged events are counted as events (nobody can tell them apart), but their seqs cost nothing
        assert value(samples, "synapticllamas_events_lost_total", app_instance="shell-a:11") == 2
        assert value(samples, "synapticllamas_events_sampled_total", app_instance="shell-a:11") == 30
        assert value(samples, "synapticllamas_dashboard_messages_invalid_total", source="journal") == 4
        health = dash.get("/healthz")[1]
        assert health["invalid"]["journal"]["invalid"] == 4 and health["counters"]["invalid"] == 4
        assert "timestamp" in health["invalid"]["journal"]["invalid_by_field"]
    finally:
        dash.stop()


def test_the_fold_forgets_what_it_cannot_keep_and_counts_it(tmp_path, redis_server):
    from synapticllamas.dashboard.metrics import MAX_APPS

    client = redis_server.client()
    pipe = client.pipeline(transaction=False)
    for i in range(MAX_APPS + 200):                  # invented instances, one event each
        ev = ContractPublisher(client, f"forged:{i}").event("system", "error", "x")
        pipe.xadd("synapticllamas:events", {"event": json.dumps(ev)})
    pipe.execute()
    dash = Dashboard(tmp_path, redis_server.url)
    try:
        samples = scrape(dash)
        assert value(samples, "synapticllamas_dashboard_forgotten_total", kind="app") == 200
        assert sum(name == "synapticllamas_app_info" for name, _ in samples) == MAX_APPS
    finally:
        dash.stop()
