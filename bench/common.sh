# Shared by bench/compare.sh and bench/scale.sh (sourced, not run): logging, stopping processes,
# free loopback ports, and the cleanup both register at exit. A script sets WORK and
# CLEANUP_PIDS (the names of the variables holding the pids to stop) before calling
# `trap_cleanup`.

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
