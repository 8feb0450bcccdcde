# Shared by the bench scripts (sourced, not run): logging, stopping processes, free loopback
# ports, finding nats-server and nats-bench, the Quiver binaries, and the cleanup each script
# registers at exit. A script sets WORK and CLEANUP_PIDS (the names of the variables holding
# the pids to stop) before calling `trap_cleanup`.

log() { printf '%s\n' "$*" >&2; }
die() { log "${0##*/}: $*"; exit 1; }

# stop_pid PID: SIGTERM, up to 10 s to exit, then SIGKILL.
stop_pid() {
    local pid="$1"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}

# free_port [udp|tcp]: a free loopback port: bind port 0 and let the kernel choose.
free_port() {
    python3 - "${1:-udp}" <<'PY'
import socket, sys
kind = socket.SOCK_DGRAM if sys.argv[1] == "udp" else socket.SOCK_STREAM
s = socket.socket(socket.AF_INET, kind)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

rss_mib() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

# At exit: stop the processes, keep the raw reports when RESULTS_DIR is set, remove WORK.
bench_cleanup() {
    local rc=$? var
    for var in "${CLEANUP_PIDS[@]}"; do
        stop_pid "${!var}"
    done
    if [[ -n "${RESULTS_DIR:-}" && -d "$WORK/results" ]]; then
        mkdir -p "$RESULTS_DIR" && cp -r "$WORK/results/." "$RESULTS_DIR/" && log "raw reports kept in $RESULTS_DIR"
    fi
    rm -rf "$WORK"
    exit "$rc"
}

trap_cleanup() {
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Bench clients run in the background and are waited for, so a signal to the script is
# handled at once (bash defers traps while a foreground child runs) and cleanup ends them.
# Call right after starting the client with `&`; the script lists BENCH_PID in CLEANUP_PIDS.
bench_wait() {
    BENCH_PID=$!
    local rc=0
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=""
    return "$rc"
}

# CPU time (user and system clock ticks) a server process has used so far: fields 14 and 15
# of /proc/PID/stat, counted after the command name, which may hold spaces.
cpu_ticks() {
    [[ -r "/proc/$1/stat" ]] || die "server process $1 exited"
    sed 's/.*) //' "/proc/$1/stat" | awk '{print $12, $13}'
}

# find_nats_server: sets NATS_SERVER (given, on PATH, /usr/sbin, or installed with apt-get).
find_nats_server() {
    NATS_SERVER="${NATS_SERVER:-$(command -v nats-server || true)}"
    [[ -z "$NATS_SERVER" && -x /usr/sbin/nats-server ]] && NATS_SERVER=/usr/sbin/nats-server
    if [[ -z "$NATS_SERVER" ]]; then
        log "installing nats-server (Debian package) ..."
        local sudo=""
        [[ "$(id -u)" != 0 ]] && sudo="sudo"
        $sudo apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nats-server >&2
        NATS_SERVER="$(command -v nats-server || echo /usr/sbin/nats-server)"
    fi
    [[ -x "$NATS_SERVER" ]] || die "nats-server not found"
}

# ensure_nats_bench DIR: sets NATS_BENCH. A given NATS_BENCH (a binary built before) is used
# as it is; otherwise DIR (bench/nats-bench) is built in release into its own target dir.
ensure_nats_bench() {
    if [[ -n "${NATS_BENCH:-}" ]]; then
        [[ -x "$NATS_BENCH" ]] || die "NATS_BENCH: no executable $NATS_BENCH"
        return 0
    fi
    command -v cargo >/dev/null || die "cargo is needed to build nats-bench (or set NATS_BENCH)"
    log "building nats-bench (release) ..."
    cargo build --release --quiet --manifest-path "$1/Cargo.toml" --target-dir "$1/target" >&2
    NATS_BENCH="$1/target/release/nats-bench"
}

# snapshot_quiver_bins: copies quiverd and quiver from QUIVER_BIN_DIR (built there if missing)
# to WORK/bin and sets QUIVERD and QUIVER: a rebuild during the runs must not swap them.
snapshot_quiver_bins() {
    if [[ ! -x "$QUIVER_BIN_DIR/quiverd" || ! -x "$QUIVER_BIN_DIR/quiver" ]]; then
        log "building quiver release binaries ..."
        (cd "$ROOT" && cargo build --release --bins --quiet >&2)
        QUIVER_BIN_DIR="$ROOT/target/release"
    fi
    mkdir -p "$WORK/bin"
    cp "$QUIVER_BIN_DIR/quiverd" "$QUIVER_BIN_DIR/quiver" "$WORK/bin/"
    QUIVERD="$WORK/bin/quiverd"
    QUIVER="$WORK/bin/quiver"
}
