#!/usr/bin/env bash
# One broker at scale: the figures of issue 16's "Scale on one broker", each on a fresh quiverd
# with its own temp data dir on a free loopback port.
#
#   bench/scale.sh                 # every scenario
#   bench/scale.sh partitions      # or any of: partitions memory latency restart
#
# Scenarios:
#   partitions  produce-only MB/s with 1 producer over 4, 100 and 400 partitions
#               (PARTITION_MESSAGES 1 KiB messages each run); the ratio 400/4 is the target
#   memory      MEMORY_PARTITIONS partitions (topics of at most 4,096), every one written
#               (MEMORY_MESSAGES_PER_PARTITION messages), then MEMORY_IDLE idle connections held
#               during a one-at-a-time run: the broker's RSS (peak and after)
#   latency     one-at-a-time p50/p99 (OAT_MESSAGES) with no idle connection, then with
#               LATENCY_IDLE idle connections
#   restart     RESTART_GIB GiB written over RESTART_PARTITIONS partitions, the broker
#               killed (SIGKILL) while a producer still writes, the page cache dropped when
#               this user may, then the time from starting quiverd to its first answer
#
# Environment: QUIVER_BIN_DIR (target/release), the counts above, RUN_TIMEOUT (900 s).
# Prints Markdown; raw bench JSON goes to RESULTS_DIR when set.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
QUIVER_BIN_DIR="${QUIVER_BIN_DIR:-$ROOT/target/release}"
PARTITION_MESSAGES="${PARTITION_MESSAGES:-1000000}"
MEMORY_PARTITIONS="${MEMORY_PARTITIONS:-10000}"
MEMORY_MESSAGES_PER_PARTITION="${MEMORY_MESSAGES_PER_PARTITION:-20}"
MEMORY_IDLE="${MEMORY_IDLE:-10000}"
OAT_MESSAGES="${OAT_MESSAGES:-5000}"
LATENCY_IDLE="${LATENCY_IDLE:-4000}"
RESTART_GIB="${RESTART_GIB:-10}"
RESTART_PARTITIONS="${RESTART_PARTITIONS:-4}"
RUN_TIMEOUT="${RUN_TIMEOUT:-900}"
SCENARIOS=("$@")
[[ ${#SCENARIOS[@]} -gt 0 ]] || SCENARIOS=(partitions memory latency restart)

# shellcheck source=bench/common.sh
source "$HERE/common.sh"
command -v python3 >/dev/null || die "python3 is needed to read the JSON reports"

if [[ ! -x "$QUIVER_BIN_DIR/quiverd" || ! -x "$QUIVER_BIN_DIR/quiver" ]]; then
    log "building quiver release binaries ..."
    (cd "$ROOT" && cargo build --release --bins --quiet >&2)
    QUIVER_BIN_DIR="$ROOT/target/release"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/quiver-scale.XXXXXX")"
mkdir -p "$WORK/bin" "$WORK/results"
cp "$QUIVER_BIN_DIR/quiverd" "$QUIVER_BIN_DIR/quiver" "$WORK/bin/"
QUIVERD="$WORK/bin/quiverd"
QUIVER="$WORK/bin/quiver"
QUIVERD_PID=""
BG_PID=""
CLEANUP_PIDS=(BG_PID QUIVERD_PID)
trap_cleanup

# start_broker DIR: a quiverd on a free port over DIR (kept: a restart reuses it).
start_broker() {
    local dir="$1"
    mkdir -p "$dir"
    [[ -n "${PORT:-}" ]] || PORT="$(free_port)"
    "$QUIVERD" --data-dir "$dir" --listen "127.0.0.1:$PORT" >>"$WORK/quiverd.log" 2>&1 &
    QUIVERD_PID=$!
    QCLI=("$QUIVER" --broker "127.0.0.1:$PORT" --ca "$dir/tls/ca.pem")
    for _ in $(seq 600); do
        kill -0 "$QUIVERD_PID" 2>/dev/null || { tail -20 "$WORK/quiverd.log" >&2; die "quiverd exited"; }
        if [[ -f "$dir/tls/ca.pem" ]] && "${QCLI[@]}" topic list >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    die "quiverd did not come up (log: $WORK/quiverd.log)"
}

fresh_broker() {
    stop_pid "$QUIVERD_PID"
    rm -rf "$WORK/data"
    PORT=""
    start_broker "$WORK/data"
}

# bench OUT ARGS...: one `quiver bench --json` run against the current broker.
bench() {
    local out="$WORK/results/$1.json"; shift
    timeout "$RUN_TIMEOUT" "${QCLI[@]}" bench --json --broker-pid "$QUIVERD_PID" "$@" >"$out.raw" 2>"$out.err" ||
        { cat "$out.err" >&2; die "quiver bench $* failed"; }
    python3 - "$out.raw" "$out" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
json.dump(json.loads(text[text.index("{"):]), open(sys.argv[2], "w"), indent=1)
PY
    printf '%s' "$out"
}

field() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); v=eval(sys.argv[2], {}, {"r": r}); print(round(v, 1) if isinstance(v, float) else v)' "$1" "$2"; }

cat <<EOF
# Quiver at scale on one broker

- Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM
- Quiver: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), release binaries; every scenario on a fresh broker (defaults, \`--durability interval\`)

EOF

for scenario in "${SCENARIOS[@]}"; do
    case "$scenario" in
    partitions)
        echo "## Produce across partitions (1 producer, $PARTITION_MESSAGES x 1 KiB, produce only)"
        echo
        echo "| partitions | MB/s | produce->ack p99 ms | broker peak RSS MiB |"
        echo "|---|---|---|---|"
        for n in 4 100 400; do
            fresh_broker
            out="$(bench "partitions-$n" --partitions "$n" --consumers 0 --messages "$PARTITION_MESSAGES")"
            echo "| $n | $(field "$out" 'r["produce"]["mb_per_sec"]') | $(field "$out" 'r["produce_latency"]["p99_us"]/1000') | $(field "$out" 'r["broker_memory"]["peak_kib"]/1024') |"
        done
        echo
        ;;
    memory)
        fresh_broker
        rss0="$(rss_mib "$QUIVERD_PID")"
        left="$MEMORY_PARTITIONS"; t=0
        while [[ "$left" -gt 0 ]]; do
            n=$(( left > 4096 ? 4096 : left ))
            "${QCLI[@]}" topic create "scale-$t" --partitions "$n" --durability interval >/dev/null
            bench "memory-fill-$t" --topic "scale-$t" --consumers 0 --messages $(( n * MEMORY_MESSAGES_PER_PARTITION )) >/dev/null
            left=$(( left - n )); t=$(( t + 1 ))
        done
        rss_written="$(rss_mib "$QUIVERD_PID")"
        out="$(bench memory-idle --topic scale-0 --consumers 0 --one-at-a-time --messages "$OAT_MESSAGES" --idle-connections "$MEMORY_IDLE")"
        echo "## $MEMORY_PARTITIONS partitions written and $MEMORY_IDLE idle connections"
        echo
        echo "| broker RSS MiB: started | every partition written | peak with idle connections | one at a time p50 / p99 µs then |"
        echo "|---|---|---|---|"
        echo "| $rss0 | $rss_written | $(field "$out" 'r["broker_memory"]["peak_kib"]/1024') | $(field "$out" 'r["produce_latency"]["p50_us"]') / $(field "$out" 'r["produce_latency"]["p99_us"]') |"
        echo
        ;;
    latency)
        fresh_broker
        "${QCLI[@]}" topic create oat --partitions 1 --durability interval >/dev/null
        echo "## One at a time with idle connections ($OAT_MESSAGES messages)"
        echo
        echo "| idle connections | p50 µs | p99 µs | broker peak RSS MiB |"
        echo "|---|---|---|---|"
        for idle in 0 "$LATENCY_IDLE" 0 "$LATENCY_IDLE"; do
            out="$(bench "latency-$idle-$RANDOM" --topic oat --consumers 0 --one-at-a-time --messages "$OAT_MESSAGES" --idle-connections "$idle")"
            echo "| $idle | $(field "$out" 'r["produce_latency"]["p50_us"]') | $(field "$out" 'r["produce_latency"]["p99_us"]') | $(field "$out" 'r["broker_memory"]["peak_kib"]/1024') |"
        done
        echo
        ;;
    restart)
        fresh_broker
        "${QCLI[@]}" topic create big --partitions "$RESTART_PARTITIONS" --durability interval >/dev/null
        messages=$(( RESTART_GIB * 1024 * 1024 ))
        # The producer keeps writing while the broker is killed: the worst case for recovery.
        "${QCLI[@]}" bench --topic big --consumers 0 --messages $(( messages + messages / 4 )) >"$WORK/restart-fill.log" 2>&1 &
        BG_PID=$!
        target=$(( RESTART_GIB * 1024 * 1024 * 1024 ))
        while [[ "$(du -sb "$WORK/data/topics/big" | cut -f1)" -lt "$target" ]]; do
            kill -0 "$BG_PID" 2>/dev/null || { cat "$WORK/restart-fill.log" >&2; die "the fill ended early"; }
            sleep 0.5
        done
        kill -9 "$QUIVERD_PID"; wait "$QUIVERD_PID" 2>/dev/null || true
        stop_pid "$BG_PID"; BG_PID=""
        size="$(du -sh "$WORK/data/topics/big" | cut -f1)"
        sync
        cache="warm page cache"
        if (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then cache="page cache dropped"; fi
        # Serving = the broker's "ready" log line (its endpoint is up); then one CLI request,
        # started only then (a CLI started before the endpoint exists waits for its connect
        # timeout, which would measure the CLI, not the broker).
        seen="$(wc -l <"$WORK/quiverd.log")"
        started="$(date +%s.%N)"
        "$QUIVERD" --data-dir "$WORK/data" --listen "127.0.0.1:$PORT" >>"$WORK/quiverd.log" 2>&1 &
        QUIVERD_PID=$!
        until tail -n +"$(( seen + 1 ))" "$WORK/quiverd.log" | grep -q "ready"; do
            kill -0 "$QUIVERD_PID" 2>/dev/null || { tail -20 "$WORK/quiverd.log" >&2; die "quiverd exited"; }
            sleep 0.005
        done
        ready="$(date +%s.%N)"
        "${QCLI[@]}" topic describe big >/dev/null || die "the restarted broker did not answer"
        answered="$(date +%s.%N)"
        echo "## Restart after kill -9"
        echo
        echo "| log | partitions | cache | start to serving s | first request (a new CLI process) s |"
        echo "|---|---|---|---|---|"
        echo "| $size | $RESTART_PARTITIONS | $cache | $(python3 -c "print(round($ready - $started, 3))") | $(python3 -c "print(round($answered - $ready, 3))") |"
        echo
        recovered="$(grep "recovered the partitions" "$WORK/quiverd.log" | tail -1 | grep -o 'elapsed_ms=[0-9]*' | cut -d= -f2)"
        echo "(of which recovering the partitions: ${recovered:-?} ms; serving = the broker's \"ready\" log line, its endpoint up)"
        echo
        ;;
    *) die "unknown scenario $scenario (partitions, memory, latency, restart)" ;;
    esac
done
