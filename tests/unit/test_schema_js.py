"""The page's decoder (static/schema.js, rules from /contract.js) accepts and refuses what the Python
schema does: the bad cases of test_schema.py, and a few thousand events mutated at random.

The script runs in Node.js, the one inside the playwright package (a test dependency), with the
real /contract.js text; the browser tests run it in Chromium with the page.
"""
import json
import random
import subprocess
from pathlib import Path

import playwright
from test_schema import BAD, DEVICE, SOURCE

from synapticllamas.dashboard import contract_script
from synapticllamas.events.schema import Invalid, decode_event, decode_registration

STATIC = Path(__file__).resolve().parents[2] / "synapticllamas" / "dashboard" / "static"
NODE = Path(playwright.__file__).parent / "driver" / "node"

RUNNER = """
const fs = require("fs");
globalThis.window = globalThis;
eval(fs.readFileSync(0, "utf8").split("\\n//--cases--\\n")[0]);
const cases = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const out = cases.map(([text, registration]) => {
  try {
    if (registration) window.SynapticSchema.registration(JSON.parse(text), false);
    else window.SynapticSchema.decode(text);
    return null;
  } catch (err) {
    if (!(err instanceof window.SynapticSchema.Invalid)) return "CRASH " + err;
    return err.message;
  }
});
process.stdout.write(JSON.stringify(out));
"""


def page_verdicts(cases: list[tuple[str, bool]], tmp_path: Path) -> list[str | None]:
    assert NODE.exists(), f"playwright's Node.js is missing at {NODE} (pip install playwright)"
    script = contract_script.script() + "\n" + (STATIC / "schema.js").read_text()
    data = tmp_path / "cases.json"
    data.write_text(json.dumps(cases))
    runner = tmp_path / "runner.js"
    runner.write_text(RUNNER)
    proc = subprocess.run([str(NODE), str(runner), str(data)], input=script + "\n//--cases--\n", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def python_verdict(text: str, registration: bool) -> str | None:
    try:
        decode_registration(text) if registration else decode_event(text)
    except Invalid as exc:
        return str(exc)
    return None


WEIRD = [None, True, False, 0, -1, 1.5, 2**53, 2**53 - 1, 1e20, 1e22, -1e300, "", " ", "x", "x" * 70, "A:1",
         "localhost:50052", "[::1]:50052", "10.0.0.1:0", "up", "UP", "7.0.0", "7 0", "\x1b[31m", "a\u202eb", "\ud800",
         "é", "日本", [], [1], {}, {"a": 1}, [[[[[[[[[[]]]]]]]]]], {"name": "CPU"}, [DEVICE], [dict(DEVICE, name=5)]]
FIELDS = ["timestamp", "component", "event_type", "message", "level", "source", "seq", "sampled", "details"]
TYPED = ["address", "state", "interval_s", "rpc_version", "devices", "memory_offered_mib", "rpc_pid", "cache_bytes"]


def mutated(rng: random.Random) -> str:
    ev = {"timestamp": 1.7e9, "component": "node", "event_type": rng.choice(["node_up", "heartbeat", "future_kind"]),
          "message": "m", "details": {"address": "10.0.0.5:50052", "state": "up", "devices": [DEVICE]},
          "level": "info", "source": dict(SOURCE), "seq": 5, "sampled": 1}
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        where = rng.random()
        if where < 0.3 and isinstance(ev.get("details"), dict):     # an untyped field: only sizes apply
            ev["details"][rng.choice(["extra", "note", "n"])] = rng.choice(WEIRD)
        elif where < 0.5:
            ev[rng.choice(FIELDS)] = rng.choice(WEIRD)
        elif where < 0.8 and isinstance(ev.get("details"), dict):
            ev["details"][rng.choice(TYPED)] = rng.choice(WEIRD)
        elif isinstance(ev.get("source"), dict):
            ev["source"][rng.choice(["app", "instance", "host"])] = rng.choice(WEIRD)
    return json.dumps(ev)


def test_the_page_refuses_what_python_refuses_and_accepts_the_rest(tmp_path):
    rng = random.Random(15)
    cases = [(text, False) for text, _ in BAD if text != "\xff" and len(text) < 300000]
    cases += [(mutated(rng), False) for _ in range(3000)]
    cases += [(json.dumps({"app": "a", "pid": rng.choice(WEIRD), "heartbeat_interval": rng.choice(WEIRD),
                           "host": rng.choice(WEIRD)}), True) for _ in range(300)]
    page = page_verdicts(cases, tmp_path)
    crashes = [(text, verdict) for (text, _), verdict in zip(cases, page, strict=True) if verdict and "CRASH" in verdict]
    assert not crashes, crashes[:5]
    differ = [(text, python_verdict(text, reg), verdict) for (text, reg), verdict in zip(cases, page, strict=True)
              if (python_verdict(text, reg) is None) != (verdict is None)]
    assert not differ, differ[:10]
    assert 0.2 < sum(v is None for v in page) / len(page) < 0.8, sum(v is None for v in page)   # both sides tried
