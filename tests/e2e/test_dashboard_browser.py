"""The dashboard page in Debian's headless Chromium, driven by Playwright, fed by real shells.

Chromium is never downloaded: scripts/test installs the Debian package, and a missing binary fails
these tests (it does not skip them). Screenshots go to test-artifacts/ (gitignored).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest
from dashboard_support import ContractPublisher, Dashboard, Node, Shell, instance_of
from support import PYTHON, ROOT, free_port, shell_env, wait_for

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: the browser tests need Debian's chromium (scripts/test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Watched:
    """A page plus everything it said: console errors, uncaught exceptions, dialogs."""

    def __init__(self, browser, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1100})
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(url)

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def env(tmp_path, redis_server, browser):
    dash = Dashboard(tmp_path, redis_server.url, token="pagetoken")
    pages: list[Watched] = []
    shells: list[Shell] = []

    class Env:
        redis = redis_server
        dashboard = dash
        client = redis_server.client()

        @staticmethod
        def open() -> Watched:
            watched = Watched(browser, dash.page_url())
            pages.append(watched)
            return watched

        @staticmethod
        def shell(name: str, *args: str, **vars: str) -> Shell:
            shell = Shell(tmp_path, redis_server.url, name, **vars)
            shells.append(shell)
            return shell

    yield Env
    for watched in pages:
        watched.close()
    for shell in shells:
        shell.kill()
    dash.stop()


def load_an_image_now(page) -> None:
    """Load an image (the page's own icon, with a fresh URL: not from the cache), and return once it
    has: a marker for what the page asked for before."""
    page.evaluate("""() => new Promise((loaded, failed) => {
        const url = new URL("static/favicon.svg", location.href);
        url.search = location.search;
        url.searchParams.set("marker", String(Date.now()));
        const img = new Image();
        img.onload = loaded;
        img.onerror = () => failed(new Error(`the marker image ${url} did not load`));
        img.src = url.href;
    })""")


def expect():
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect


def test_two_shells_heartbeats_gaps_and_a_hostile_log_line_render_as_text(env):
    watched = env.open()
    page = watched.page
    a = env.shell("a", SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="1")
    b = env.shell("b", SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="1")
    inst_a, inst_b = instance_of(env.client, a.pid), instance_of(env.client, b.pid)
    a.send("backends add 127.0.0.1:9")
    for inst in (inst_a, inst_b):
        row = page.locator("#apps tbody tr", has_text=inst)
        expect()(row).to_contain_text("live", timeout=10000)
    expect()(page.locator("#backends tbody tr", has_text=inst_a)).to_contain_text("127.0.0.1:9", timeout=10000)
    expect()(page.locator("#events tbody")).to_contain_text("rpc_backend_connect on rpc_registry: 127.0.0.1:9",
                                                            timeout=10000)

    # a llama.cpp line as the coordinator would push it (no shell command prints a chosen line)
    llama = ContractPublisher(env.client, "llama-host:42")
    llama.emit("raw", "log", XSS)
    llama.emit("system", "note", "before the gap")
    llama.emit("system", "note", "after the gap", seq=5)        # seq 3 and 4 never arrive
    hostile = ContractPublisher(env.client, "<script>alert(2)</script>:1")
    hostile.emit("system", "note", "<b>bold?</b>", level="warning")

    raw = page.locator("#raw")
    expect()(raw).to_contain_text(f"llama-host:42 {XSS}", timeout=5000)
    after_gap = page.locator("#events tbody tr", has_text="after the gap").locator("td").nth(2)
    expect()(after_gap).to_have_text("5 +2 lost")     # sampled stayed at 0: nothing was sampled out
    assert after_gap.locator(".lost").get_attribute("title").startswith("2 events between seq 3 and 4 never arrived")
    expect()(page.locator("#apps tbody tr", has_text="llama-host:42").locator("td").nth(8)).to_have_text("2")
    expect()(page.locator("#apps tbody tr", has_text="<script>alert(2)</script>:1")).to_be_visible()
    expect()(page.locator("#events tbody")).to_contain_text("<b>bold?</b>")
    assert page.locator("img").count() == 0, "a log line became an <img> element"
    assert page.locator("#events b, #apps script, main script").count() == 0
    assert page.locator("#raw div").last.text_content().endswith(XSS)
    # an <img src=x> made from the line, even a detached one, asked for x before this image, so its
    # onerror has run by the time this one has loaded
    load_an_image_now(page)
    assert watched.dialogs == [], f"event text ran as script: {watched.dialogs}"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10000
    assert a.exit() == 0 and b.exit() == 0
    expect()(page.locator("#apps tbody tr", has_text=inst_a)).to_contain_text("stopped", timeout=5000)
    assert watched.errors == [], f"console errors: {watched.errors}"


def test_a_coordinator_start_from_a_real_shell_shows_in_the_panel_within_1s(env):
    from synapticllamas.llama import binaries

    try:
        binaries.llama_server()
        model = binaries.demo_model()
    except binaries.NotFound as exc:
        pytest.fail(f"this test needs llama-server and the demo model (scripts/test installs them): {exc}")
    watched = env.open()
    page = watched.page
    started = threading.Event()
    subscriber = env.client.pubsub()
    subscriber.subscribe("synapticllamas:llama_cpp:coordinator")

    def listen():
        for message in subscriber.listen():
            if message["type"] == "message" and '"event_type":"start"' in message["data"]:
                started.set()
                return

    threading.Thread(target=listen, daemon=True).start()
    shell = env.shell("coord")
    port = free_port()
    shell.send(f"coordinator start --port {port}")
    instance = instance_of(env.client, shell.pid)
    assert started.wait(300), f"no coordinator start event; shell said:\n{shell.output()}"
    row = page.locator("#coordinators tbody tr", has_text=instance)
    # live, with no reload (how soon after the event: bench/dashboard.py)
    expect()(row.locator("td").nth(1)).to_have_text("running", timeout=10000)
    expect()(row).to_contain_text(model.name)
    expect()(row.locator("td").nth(3)).to_have_text(str(port))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-coordinator.png"), full_page=True)
    shell.send("coordinator stop")
    expect()(row.locator("td").nth(1)).to_have_text("stopped (user)", timeout=30000)
    assert shell.exit() == 0, shell.output()
    subscriber.close()
    assert watched.errors == [], f"console errors: {watched.errors}"


def test_redis_restart_shows_the_banner_then_events_flow_without_a_reload(env):
    watched = env.open()
    page = watched.page
    shell = env.shell("beating", SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="0.5")
    instance = instance_of(env.client, shell.pid)
    expect()(page.locator("#apps tbody tr", has_text=instance)).to_contain_text("live", timeout=10000)
    page.evaluate("window.__sameDocument = 42")
    banner = page.locator("#banner")
    expect()(banner).to_be_hidden()

    env.redis.kill()
    expect()(banner).to_be_visible(timeout=5000)
    expect()(banner).to_contain_text(f"Redis at {env.redis.url} is unreachable")
    expect()(page.locator("#conn")).to_have_text("Redis down")
    env.redis.start()
    expect()(banner).to_be_hidden(timeout=15000)
    after = ContractPublisher(env.client, "after-restart:1")
    after.emit("system", "note", "pushed after the restart")
    expect()(page.locator("#events tbody")).to_contain_text("pushed after the restart", timeout=5000)
    # the shell's own events flow again too (its publisher reconnected and flushed)
    count = page.locator("#events tbody tr", has_text=instance).count()
    wait_for(lambda: page.locator("#events tbody tr", has_text=instance).count() > count + 2, 15,
             what="the shell's heartbeats after the restart")
    assert page.evaluate("window.__sameDocument") == 42, "the page was reloaded"
    assert shell.exit() == 0
    assert watched.errors == [], f"console errors: {watched.errors}"   # the feed itself never broke


def test_a_hung_redis_shows_the_banner_and_events_flow_again_after_it_wakes(env):
    """SIGSTOP: Redis keeps every connection open and answers nothing (a hang, not a crash)."""
    watched = env.open()
    page = watched.page
    pub = ContractPublisher(env.client, "hang:1")
    pub.emit("system", "note", "before the hang")
    expect()(page.locator("#events tbody")).to_contain_text("before the hang", timeout=5000)
    banner = page.locator("#banner")
    env.redis.proc.send_signal(signal.SIGSTOP)
    try:
        # a PING every 5 s, answered within 5 s: the banner shows within 10 s
        expect()(banner).to_be_visible(timeout=20000)
        expect()(banner).to_contain_text(f"Redis at {env.redis.url} is unreachable")
        expect()(page.locator("#conn")).to_have_text("Redis down")
    finally:
        env.redis.proc.send_signal(signal.SIGCONT)
    expect()(banner).to_be_hidden(timeout=20000)
    pub.emit("system", "note", "after the hang")
    expect()(page.locator("#events tbody")).to_contain_text("after the hang", timeout=5000)
    assert watched.errors == [], f"console errors: {watched.errors}"


def test_malformed_events_and_a_forged_seq_from_another_publisher_break_no_panel(env):
    """Anyone who can publish on the shared Redis can send any JSON: fields of the wrong type,
    missing or not objects, absurd numbers, escape sequences, and real apps' instances with any seq.
    What is not a valid event is skipped and counted (the summary says how many); a forged seq
    freezes no app's counts; every panel keeps updating."""
    watched = env.open()
    page = watched.page
    good = ContractPublisher(env.client, "good:1")
    good.emit("system", "note", "first good event")
    expect()(page.locator("#events tbody")).to_contain_text("first good event", timeout=5000)

    base = {"timestamp": time.time(), "component": "system", "event_type": "note", "level": "info"}
    odd = [
        base | {"source": {"app": "other", "instance": 12345}, "message": "numeric instance", "details": {},
                "seq": 1},
        base | {"source": {"instance": "odd:2"}, "message": {"not": "a string"}, "details": "not an object"},
        base | {"source": "not an object", "message": None},
        base | {"source": {"instance": "odd:3"}, "component": "coordinator", "event_type": "start",
                "message": 7, "details": [1, 2], "seq": "3"},
        base | {"source": {"instance": "odd:4"}, "component": "rpc_registry", "event_type": "heartbeat",
                "message": "odd heartbeat", "details": {"backends": "x", "interval_s": "3"}},
        base | {"source": {"instance": ["odd", 5]}, "component": ["x"], "event_type": None, "level": 5,
                "message": "odd types everywhere", "details": {"address": {"a": 1}}},
        base | {"source": {"instance": "odd:6"}, "component": "rpc_backend", "event_type": "connect",
                "message": "backend as an object", "details": {"address": {"host": "h"}, "state": 1}},
        base | {"timestamp": 1e20, "source": {"instance": "odd:7"}, "message": "from the far future"},
        base | {"source": {"instance": "odd:8"}, "component": "node", "event_type": "node_up", "message": "escape",
                "details": {"address": "10.0.0.9:50052", "rpc_version": "7\x1b]0;x\x07"}},
    ]
    pipe = env.client.pipeline(transaction=True)
    for ev in odd:
        text = json.dumps(ev)
        pipe.xadd("synapticllamas:events", {"event": text})
        pipe.publish("synapticllamas:llama_cpp:system", text)
    pipe.execute()
    # a forged event with the good app's instance and a huge seq; the good app goes on below it
    forger = ContractPublisher(env.client, "good:1")
    forger.emit("system", "note", "forged far ahead", seq=2**53 - 1)
    for i in range(3):
        good.emit("system", "note", f"good event {i + 2}")

    events = page.locator("#events tbody")
    expect()(events).to_contain_text("good event 4", timeout=5000)
    for text in ("numeric instance", "odd types everywhere", "backend as an object", "from the far future", "escape"):
        expect()(events).not_to_contain_text(text)
    expect()(page.locator("#apps tbody tr", has_text="odd:6")).to_have_count(0)
    good_row = page.locator("#apps tbody tr", has_text="good:1")
    expect()(good_row).to_be_visible()
    # its four events and the forged one are counted; the forged seq made no gap: nothing lost, nothing sampled
    cells = good_row.locator("td")
    assert [cells.nth(i).inner_text() for i in (6, 7, 8)] == ["5", "0", "0"], good_row.inner_text()
    expect()(page.locator("#summary")).to_contain_text(f"{len(odd)} invalid events skipped", timeout=5000)
    # the panels keep re-rendering: a new app after the malformed ones still appears
    ContractPublisher(env.client, "later:9").emit("system", "note", "from a later app")
    expect()(page.locator("#apps tbody tr", has_text="later:9")).to_be_visible(timeout=5000)
    # two more renders of the panels with all of them listed (the summary is the last thing written),
    # at least one of them the per-second one (wait_for_function would need the 'unsafe-eval' the CSP refuses)
    page.evaluate("""() => {
        window.__renders = 0;
        new MutationObserver(() => { window.__renders += 1; })
            .observe(document.getElementById("summary"), { childList: true });
    }""")
    wait_for(lambda: page.evaluate("window.__renders") >= 2, 5, what="two renders of the panels")
    assert watched.errors == [], f"console errors: {watched.errors}"
    health = env.dashboard.get("/healthz")[1]
    assert health["invalid"]["journal"]["invalid"] == len(odd), health


def test_filters_pause_row_cap_and_staleness(env):
    watched = env.open()
    page = watched.page
    noisy = ContractPublisher(env.client, "noisy:1")
    quiet = ContractPublisher(env.client, "quiet:2")
    quiet.register(backend_heartbeat_interval=1.0, heartbeat_interval=1.0)
    quiet.emit("rpc_registry", "heartbeat", "rpc_backend_connect on rpc_registry",
               {"backends": [], "total_configured": 0, "total_active": 0, "interval_s": 1.0})
    quiet_row = page.locator("#apps tbody tr", has_text="quiet:2")
    expect()(quiet_row.locator("td").nth(4)).to_have_text("live", timeout=5000)

    batch = [noisy.event("system", "note", f"n{i}", level="error" if i % 10 == 0 else "info") for i in range(600)]
    for start in range(0, 600, 100):
        noisy.push(*batch[start:start + 100])
    rows = page.locator("#events tbody tr")
    expect()(page.locator("#events tbody")).to_contain_text("n599", timeout=10000)
    assert rows.count() == 500, "the table keeps at most 500 rows in the DOM"

    page.select_option("#filter-level", "error")
    expect()(rows).to_have_count(60)
    assert set(page.locator("#events tbody tr td:nth-child(6)").all_text_contents()) == {"error"}
    page.select_option("#filter-level", "debug")
    page.select_option("#filter-app", "quiet:2")
    expect()(rows).to_have_count(2)          # its register and heartbeat, nothing from noisy
    page.select_option("#filter-app", "")
    page.select_option("#filter-component", "rpc_registry")
    expect()(rows).to_have_count(1)
    page.select_option("#filter-component", "")

    page.click("#pause")
    noisy.emit("system", "note", "while paused")
    expect()(page.locator("#events-note")).to_have_text("paused: 1 new event not shown", timeout=5000)
    assert "while paused" not in page.locator("#events tbody").text_content()
    page.click("#pause")
    expect()(page.locator("#events tbody")).to_contain_text("while paused")

    # quiet:2 promised a heartbeat every 1 s and sent one: after 2 s of silence it is stale
    expect()(quiet_row.locator("td").nth(4)).to_have_text("stale", timeout=15000)
    assert watched.errors == [], f"console errors: {watched.errors}"


# ---------------------------------------------------------------- issue 12: a monitoring page

LOST_ORANGE = "rgb(217, 98, 11)"      # --lost in style.css
WIDTHS = (1400, 1280, 800)
MIB = 1 << 20

# every element that holds a table or a chart: none may be wider than its box, nor stick out of its panel
CLIPPED = """() => {
    const bad = [];
    const check = (el, what) => { if (el.scrollWidth > el.clientWidth + 1) bad.push(`${what}: ${el.scrollWidth} > ${el.clientWidth}`); };
    check(document.documentElement, "page");
    for (const el of document.querySelectorAll("header, section, table, .scroll, .log, figure, .legend, svg")) {
        check(el, `${el.tagName.toLowerCase()}#${el.id || el.className.baseVal || el.className}`);
    }
    for (const el of document.querySelectorAll("section table, section svg")) {
        const box = el.closest("section").getBoundingClientRect(), r = el.getBoundingClientRect();
        if (r.right > box.right + 1 || r.left < box.left - 1) bad.push(`${el.id} sticks out of its panel`);
    }
    return bad;
}"""


def colour(page, selector: str, containing: str, inner: str | None = None) -> str | None:
    """The computed colour of the first `selector` element whose text contains `containing` (or of its
    `inner` part), looked up and read in one go: the panels are rebuilt every second."""
    return page.evaluate("""([selector, containing, inner]) => {
        const el = Array.from(document.querySelectorAll(selector)).find((e) => e.textContent.includes(containing));
        const part = el && (inner ? el.querySelector(inner) : el);
        return part ? getComputedStyle(part).color : null;
    }""", [selector, containing, inner])


def chart_number(page, chart: str, attribute: str) -> int:
    return int(page.locator(f"#{chart}").get_attribute(f"data-{attribute}") or 0)


def metrics(dash) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = dash.get("/metrics")
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def viewer_summary(redis_url: str, tmp_path, instance: str) -> str:
    """What `python3 main.py events` says at the end about this app's gaps (stderr)."""
    proc = subprocess.run([PYTHON, str(ROOT / "main.py"), "events", "--redis-url", redis_url, "--replay", "100000",
                           "--component", "system"], capture_output=True, text=True, env=shell_env(tmp_path),
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return next((line for line in proc.stderr.splitlines() if line.startswith(f"{instance}: ")), "")


def test_a_real_coordinator_sampling_is_quiet_a_curl_request_is_an_inference_event_and_charts_update(env, tmp_path):
    """Default sampling (1 in 10) over llama-server's hundreds of load lines: nothing reads as
    missing or lost. A request made with curl straight to llama-server's port is an inference
    event, and the charts draw it live."""
    from synapticllamas.llama import binaries

    try:
        binaries.llama_server()
        binaries.demo_model()
    except binaries.NotFound as exc:
        pytest.fail(f"this test needs llama-server and the demo model (scripts/test installs them): {exc}")
    watched = env.open()
    page = watched.page
    shell = env.shell("sampling")             # default settings: observer_sample_rate 0.1
    instance = instance_of(env.client, shell.pid)
    port = free_port()
    shell.send(f"coordinator start --port {port}")
    coordinator = page.locator("#coordinators tbody tr", has_text=instance)
    expect()(coordinator.locator("td").nth(1)).to_have_text("running", timeout=300000)

    # sampling: grey "+N sampled" on rows, the Apps panel's sampled count with the rate; nothing lost
    app = page.locator("#apps tbody tr", has_text=instance)
    expect()(app.locator("td").nth(7)).to_contain_text("(1 in 10 kept)")
    sampled = int(app.locator("td").nth(7).text_content().split()[0])
    assert sampled > 50, f"llama-server's load lines should have been sampled: {sampled}"
    expect()(app.locator("td").nth(8)).to_have_text("0")
    assert page.locator("#events .sampled").count() > 0
    assert page.locator("#events .lost, #apps td.lost").count() == 0
    assert "missing" not in page.locator("body").inner_text()
    grey = colour(page, "#events tbody tr", "sampled", ".sampled")
    assert grey is not None and grey != LOST_ORANGE

    # charts drawn from what the page has: events per second, the model's memory on this machine
    expect()(page.locator("#chart-events polyline[data-series=info]")).to_have_count(1)
    expect()(page.locator(f'#chart-memory g.bar[data-address^="{instance} "]').first).to_be_visible()
    assert page.locator("#chart-tokens circle").count() == 0
    events_before = chart_number(page, "chart-events", "total")

    # a request with curl, straight to llama-server: nobody told the shell about it
    curl = subprocess.run(["curl", "-s", "-X", "POST", f"http://127.0.0.1:{port}/completion", "-H",
                           "Content-Type: application/json", "-d", json.dumps({"prompt": "Once upon a time",
                                                                               "n_predict": 8})],
                          capture_output=True, text=True, timeout=120)
    assert curl.returncode == 0 and "content" in json.loads(curl.stdout), curl.stdout
    inference = page.locator("#events tbody tr", has_text=instance).filter(
        has=page.locator("td:nth-child(5)", has_text=re.compile(r"^inference$")))
    expect()(inference).to_have_count(1, timeout=10000)
    expect()(inference).to_contain_text("generated tokens")
    expect()(coordinator.locator("td").nth(7)).to_have_text("1")           # requests
    dot = page.locator(f'#chart-tokens circle[data-series="{instance}"]')
    expect()(dot).to_have_count(1, timeout=5000)                            # drawn live, no reload
    expect()(page.locator("#legend-tokens")).to_contain_text(instance)
    wait_for(lambda: chart_number(page, "chart-events", "total") > events_before, 5,
             what="the events chart to count the new events")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-monitoring.png"), full_page=True)
    # a page opened now draws the same charts from the replayed journal
    late = env.open()
    expect()(late.page.locator(f'#chart-tokens circle[data-series="{instance}"]')).to_have_count(1, timeout=10000)
    expect()(late.page.locator("#chart-events polyline[data-series=info]")).to_have_count(1)
    expect()(late.page.locator(f'#chart-memory g.bar[data-address^="{instance} "]').first).to_be_visible()
    assert late.errors == [], f"console errors on the late page: {late.errors}"

    # `events` in the shell speaks of sampling the same way
    shell.send("events 1")
    footer = shell.read_until(r"sampled out \(not lost; 1 in 10 kept\) of \d+ emitted", stream="stdout")[0].string
    assert int(re.search(r"(\d+) sampled out", footer).group(1)) >= sampled

    assert shell.exit() == 0, shell.output()
    expect()(app.locator("td").nth(4)).to_contain_text("stopped", timeout=30000)
    expect()(app.locator("td").nth(8)).to_have_text("0")
    # the terminal viewer, reading the same journal, counts the same
    page_sampled = app.locator("td").nth(7).text_content().split()[0]
    assert viewer_summary(env.redis.url, tmp_path, instance) == \
        f"{instance}: {page_sampled} sampled out by the app (not lost), 0 lost"
    assert watched.errors == [], f"console errors: {watched.errors}"


def test_events_dropped_in_a_real_outage_show_as_lost_loudly(env):
    """A shell's outage buffer of 20 overflows while Redis is stopped (SIGSTOP: it keeps its journal):
    the events it dropped are lost, in orange, as many as system/events_dropped says."""
    watched = env.open()
    page = watched.page
    shell = env.shell("outage", SOLLOL_OBSERVER_MAX_EVENTS="20", SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="0.1")
    instance = instance_of(env.client, shell.pid)
    app = page.locator("#apps tbody tr", has_text=instance)
    expect()(app.locator("td").nth(4)).to_have_text("live", timeout=10000)
    expect()(app.locator("td").nth(8)).to_have_text("0")

    def dropped() -> int:
        shell.send("redis status")
        return int(shell.read_until(r"^dropped\s+(\d+)", stream="stdout")[0].group(1))

    env.redis.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: dropped() >= 10, 30, interval=0.2, what="the shell to drop heartbeats from its full buffer")
    finally:
        env.redis.proc.send_signal(signal.SIGCONT)
    notice = page.locator("#events tbody tr", has_text="events were dropped").filter(has_text=instance)
    expect()(notice.first).to_be_visible(timeout=30000)
    total = max(json.loads(fields["event"])["details"]["total_dropped"]
                for _, fields in env.client.xrange("synapticllamas:events")
                if '"events_dropped"' in fields["event"] and instance in fields["event"])
    lost_cell = app.locator("td").nth(8)
    expect()(lost_cell).to_have_text(str(total), timeout=10000)
    assert colour(page, "#apps tbody tr", instance, "td:nth-child(9)") == LOST_ORANGE
    marker = page.locator("#events .lost", has_text=f"+{total} lost")
    expect()(marker).to_have_count(1)
    assert colour(page, "#events .lost", f"+{total} lost") == LOST_ORANGE
    assert "dropped in a Redis outage" in marker.get_attribute("title")
    lost = metrics(env.dashboard)[("synapticllamas_events_lost_total", (("app_instance", instance),))]
    assert lost == total
    assert shell.exit() == 0, shell.output()
    assert watched.errors == [], f"console errors: {watched.errors}"


def test_three_shells_two_nodes_one_redis_the_page_and_metrics_show_all_and_nothing_clips(env, tmp_path):
    from llama_support import tagged

    client = env.client
    # an app that ran 22 minutes ago: replayed, it is stopped and folded away
    old = ContractPublisher(client, "old-run:5")
    gone = time.time() - 22 * 60
    old.push(old.event("system", "register", "started", {"app": "synapticllamas", "mode": "standard"},
                       timestamp=gone - 60),
             old.event("system", "unregister", "stopped (exit)", {"reason": "exit"}, timestamp=gone))
    with tagged() as tag:
        nodes = [Node(tmp_path, env.redis.url, f"node{i}", tag) for i in range(2)]
        try:
            shells = [env.shell(f"s{i}", SOLLOL_RPC_BACKEND_HEARTBEAT_INTERVAL="1") for i in range(3)]
            instances = [instance_of(client, shell.pid) for shell in shells]
            registrations = [wait_for(lambda n=n: n.registered(client), 60, what=f"node {n.address} up")
                             for n in nodes]
            # a coordinator with long names, so the tables have something wide to hold
            wide = ContractPublisher(client, "wide-host-name-of-a-lab-machine:4242")
            wide.register(heartbeat_interval=30.0, backend_heartbeat_interval=30.0)
            wide.emit("coordinator", "start", "llama.cpp coordinator started",
                      {"state": "running", "port": 18080, "model_path": "/models/" + "very-long-model-name-" * 5 + ".gguf",
                       "rpc_backends": [f"192.168.100.{i}:50052" for i in range(10, 18)]})
            watched = env.open()
            page = watched.page
            for inst in instances:
                expect()(page.locator("#apps tbody tr", has_text=inst).locator("td").nth(4)).to_have_text(
                    "live", timeout=15000)
            for node, reg in zip(nodes, registrations, strict=True):
                row = page.locator("#nodes tbody tr", has_text=node.address)
                expect()(row.locator("td").nth(6)).to_have_text("up", timeout=10000)
                got = row.locator("td").all_text_contents()
                assert got[1] == reg["hostname"] and got[2] == f"v{reg['rpc_version']}"
                assert "free /" in got[3] and reg["devices"][0]["name"] in got[3]
                assert got[7].endswith(" ago")
                expect()(page.locator(f'#chart-memory g.bar[data-address="{node.address}"]')).to_have_count(1)
                # both nodes run on this machine: its memory is one bar of its own, theirs show no free/total
                bar = page.locator(f'#chart-memory g.bar[data-address="{node.address}"] text.bar-label')
                expect()(bar).to_contain_text(" on ")
                assert " free " not in bar.text_content()
            machine = page.locator('#chart-memory g.bar[data-address^="host "] text.bar-label')
            expect()(machine).to_have_count(1)
            assert all(n.address in machine.text_content() for n in nodes) and " free " in machine.text_content()
            # the old run is folded away, one click shows it
            assert page.locator("#apps tbody tr", has_text="old-run:5").count() == 0
            expect()(page.locator("#stopped-note")).to_have_text("show 1 stopped app (folded after 10 min)")
            page.check("#show-stopped")
            expect()(page.locator("#apps tbody tr", has_text="old-run:5").locator("td").nth(4)).to_have_text(
                "stopped 22 min ago")
            page.uncheck("#show-stopped")
            expect()(page.locator("#apps tbody tr", has_text="old-run:5")).to_have_count(0)
            # live ones first
            states = page.locator("#apps tbody tr td:nth-child(5)").all_text_contents()
            assert states == sorted(states, key=lambda s: s != "live"), states

            samples = metrics(env.dashboard)
            assert samples[("synapticllamas_apps", ())] == 4        # three shells and `wide`
            for inst in instances:
                labels = {"app_instance": inst, "app": "synapticllamas", "state": "live", "mode": "standard",
                          "version": json.loads(client.hget("synapticllamas:apps", inst))["version"]}
                assert samples[("synapticllamas_app_info", tuple(sorted(labels.items())))] == 1
            for node, reg in zip(nodes, registrations, strict=True):
                assert samples[("synapticllamas_node_up", (("node", node.address),))] == 1
                for d in reg["devices"]:
                    key = ("synapticllamas_node_memory_total_bytes", (("device", d["name"]), ("node", node.address)))
                    assert samples[key] == d["total_mib"] * MIB
            assert samples[("synapticllamas_coordinator_up", (("app_instance", wide.source["instance"]),))] == 1

            ARTIFACTS.mkdir(exist_ok=True)
            for width in WIDTHS:
                page.set_viewport_size({"width": width, "height": 1100})
                assert page.evaluate(CLIPPED) == [], f"clipped at {width} px"
                page.screenshot(path=str(ARTIFACTS / f"dashboard-{width}.png"), full_page=True)
            assert watched.errors == [], f"console errors: {watched.errors}"
            for shell in shells:
                assert shell.exit() == 0, shell.output()
        finally:
            codes = [node.stop() for node in nodes]
        assert codes == [0, 0]


# ---------------------------------------------------------------- issue 16: the gateway

def gateway_request(pub: ContractPublisher, api: str, kind: str, status: str, seconds: float, level: str = "info",
                    **details) -> dict:
    http = {"ok": 200, "unavailable": 503, "refused": 429, "failed": 502, "cancelled": 499}[status]
    return pub.emit("gateway", "request", f"{api} {kind}: {status}", {
        "api": api, "kind": kind, "model": "SmolLM2-135M-Instruct", "status": status, "http_status": http,
        "queue_depth": 0, "in_flight": 0, "seconds": seconds, "prompt_tokens": 9, "tokens": 16, "tokens_per_s": 20.5,
        "held": 0, "resumed": 0, **details}, level=level)


def test_gateway_requests_fill_the_gateways_panel_and_the_latency_chart(env):
    """Two shells' gateways: one serving (OpenAI and Ollama clients, the shell's chat; a request held
    and resumed; one turned away with 503 while two waited), one whose port was taken. What a user
    sees: where each listens, the line behind it, requests by status, held and resumed, and each
    request served on the latency chart; a malformed gateway event is skipped and counted."""
    watched = env.open()
    page = watched.page
    a = ContractPublisher(env.client, "gw-a:1")
    a.register()
    a.emit("gateway", "listening", "gateway listening: OpenAI-compatible API: http://127.0.0.1:11434/v1",
           {"port": 11434, "url": "http://127.0.0.1:11434", "status": "ok", "keys": 1})
    gateway_request(a, "openai", "chat", "ok", 2.0, queue_s=0.01, first_token_s=0.4)
    gateway_request(a, "openai", "chat", "ok", 5.5, queue_s=2.5, first_token_s=3.1, held=1, resumed=1,
                    queue_depth=1, in_flight=1)
    gateway_request(a, "shell", "chat", "ok", 0.8, tokens=0, tokens_per_s=None)       # no text: no first token
    gateway_request(a, "ollama", "generate", "unavailable", 0.002, level="warning", queue_depth=2, in_flight=1,
                    tokens=0, tokens_per_s=None)
    b = ContractPublisher(env.client, "gw-b:2")
    b.register()
    taken = "gateway port 11434 on 127.0.0.1 is taken (Address already in use); going on without the gateway"
    b.emit("gateway", "listening", taken, {"port": 11434, "status": "unavailable"}, level="warning")
    gateway_request(b, "shell", "chat", "ok", 1.0, first_token_s=0.2, model=XSS)
    # not a valid gateway event: the page skips it (and says so), the panels go on
    ContractPublisher(env.client, "gw-c:3").emit("gateway", "request", "forged",
                                                 {"status": "ok", "queue_depth": "many"})

    row_a = page.locator("#gateways tbody tr", has_text="gw-a:1")
    expect()(row_a.locator("td").nth(5)).to_have_text("4: ok 3, unavailable 1", timeout=10000)
    cells = row_a.locator("td").all_text_contents()
    assert cells[:5] == ["gw-a:1", "http://127.0.0.1:11434", "SmolLM2-135M-Instruct", "2", "1"], cells
    assert cells[6:8] == ["1", "1"] and cells[8].endswith(" ago"), cells          # held, resumed
    assert colour(page, "#gateways td span", "unavailable 1") == "rgb(183, 121, 31)"   # --warn
    row_b = page.locator("#gateways tbody tr", has_text="gw-b:2")
    endpoint = row_b.locator("td").nth(1)
    expect()(endpoint).to_have_text("unavailable")
    assert endpoint.get_attribute("title") == taken
    expect()(row_b.locator("td").nth(2)).to_have_text(XSS)                          # a model name is text
    assert page.locator("#gateways img").count() == 0
    expect()(page.locator("#gateways tbody tr", has_text="gw-c:3")).to_have_count(0)
    expect()(page.locator("#summary")).to_contain_text("1 invalid event skipped")
    expect()(page.locator("#gateways-panel .empty")).to_be_hidden()

    # the chart: each request served, at the seconds to its first token and in total
    chart = page.locator("#chart-gateway")
    first = chart.locator('polyline[data-series="gw-a:1 first token"]')
    total = chart.locator('polyline[data-series="gw-a:1 total"]')
    expect()(first).to_have_attribute("data-points", "2", timeout=5000)
    expect()(total).to_have_attribute("data-points", "3")
    expect()(chart.locator('circle[data-series="gw-b:2 first token"]')).to_have_count(1)
    expect()(chart.locator("circle")).to_have_count(2 + 3 + 1 + 1)
    legend = page.locator("#legend-gateway")
    expect()(legend).to_contain_text("gw-a:1 first token last 3.1 s, 2 requests")
    expect()(legend).to_contain_text("gw-a:1 total last 0.8 s, 3 requests")
    # the dots say their figure when pointed at
    assert sorted(chart.locator('circle[data-series="gw-a:1 first token"] title').all_text_contents()) == ["0.4 s", "3.1 s"]

    # /metrics counts the same requests
    samples = metrics(env.dashboard)
    assert samples[("synapticllamas_gateway_requests_total",
                    (("api", "openai"), ("app_instance", "gw-a:1"), ("status", "ok")))] == 2
    assert samples[("synapticllamas_gateway_queue_depth", (("app_instance", "gw-a:1"),))] == 2

    # a page opened now draws the same from the replayed journal
    late = env.open()
    expect()(late.page.locator('#chart-gateway polyline[data-series="gw-a:1 first token"]')).to_have_attribute(
        "data-points", "2", timeout=10000)
    expect()(late.page.locator("#gateways tbody tr", has_text="gw-a:1").locator("td").nth(5)).to_have_text(
        "4: ok 3, unavailable 1")
    assert late.errors == [], f"console errors on the late page: {late.errors}"

    # the app said goodbye: its line is gone with it, its counts stay
    a.emit("system", "unregister", "stopped (exit)", {"reason": "exit"})
    expect()(row_a.locator("td").nth(3)).to_have_text("-", timeout=5000)
    expect()(row_a.locator("td").nth(1)).to_have_text("http://127.0.0.1:11434 (app stopped)")
    expect()(row_a.locator("td").nth(5)).to_have_text("4: ok 3, unavailable 1")

    ARTIFACTS.mkdir(exist_ok=True)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 1100})
        assert page.evaluate(CLIPPED) == [], f"clipped at {width} px"
    page.screenshot(path=str(ARTIFACTS / "dashboard-gateway.png"), full_page=True)
    load_an_image_now(page)
    assert watched.dialogs == [], f"event text ran as script: {watched.dialogs}"
    assert watched.errors == [], f"console errors: {watched.errors}"
