#!/usr/bin/env bash
# Quiver vs NATS JetStream, side by side, on this machine.
#
#   bench/compare.sh                      # 500,000 x 1 KiB messages per run, 3 runs per system
#   MESSAGES=100000 RUNS=5 bench/compare.sh
#   SCENARIOS=replicated bench/compare.sh # three-node clusters instead (bench/compare-r3.sh)
#   SCENARIOS=all bench/compare.sh        # the replicated scenarios first, then these
#
# What it does:
#   * installs nats-server with apt-get if it is missing, and starts it on loopback with
#     JetStream and file storage in a temp dir;
#   * builds bench/nats-bench (release; a standalone package, not part of the workspace) and
#     the Quiver release binaries if they are missing;
#   * starts a fresh quiverd on a free loopback port with its own temp data dir;
#   * runs each scenario RUNS times per system, Quiver and NATS alternating, and prints a
#     Markdown table: median and range (min-max) per system and the ratio of the medians.
#
# Scenarios (1 producer, 1 partition / 1 stream, MESSAGE_SIZE-byte messages):
#   (a)  produce only, MESSAGES messages, pipelined
#   (a') the same, Quiver with --durability always (fsync before ack) vs the same NATS runs;
#        QUIVER_ALWAYS=0 skips it
#   (b)  1 producer + 1 consumer reading every message, MESSAGES messages
#   (c)  one at a time (each publish waits for its ack), OAT_MESSAGES messages
#   (d)  consume only: 1 consumer reads CONSUME_MESSAGES messages that a producer wrote before
#        (the topic / stream is filled once per system, not timed)
#
# Durability, honestly: Quiver runs with --durability interval (the log is fsynced every
# 1000 ms; acks do not wait for it). NATS JetStream acks once the message is in the stream's
# file store, unsynced; its file store fsyncs in the background every 2 minutes (the default
# sync_interval; nats-server 2.9 cannot change it, 2.10+ has `jetstream { sync_interval }` and
# `sync_interval: always`). Neither waits for the disk in (a), (b), (c); (a') shows what the
# disk costs Quiver.
#
# Environment: SCENARIOS (single: the scenarios below, one broker / one server; replicated:
# bench/compare-r3.sh, which reads its own environment; all: both), MESSAGES (500000),
# OAT_MESSAGES (5000), CONSUME_MESSAGES (2000000), MESSAGE_SIZE (1024), RUNS (3),
# WARMUP (1: one short unrecorded run per system first), QUIVER_ALWAYS (1),
# NATS_ACK_POLICY (explicit | all | none, see nats-bench --help), NATS_MAX_INFLIGHT (4096: unacked
# messages per producer, for both systems),
# RESULTS_DIR (keep the raw JSON reports there), QUIVER_BIN_DIR (target/release),
# NATS_SERVER (path of nats-server), NATS_BENCH (a nats-bench binary to use instead of
# building bench/nats-bench), RUN_TIMEOUT (seconds per bench run, 900),
# QUIVERD_CONFIG (a quiverd config file to start the broker with, e.g. one holding
# `direct_writes = true`; none by default).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
SCENARIOS="${SCENARIOS:-single}"
case "$SCENARIOS" in
    single) ;;
    replicated) exec "$HERE/compare-r3.sh" ;;
    # The replicated runs first, each script with its own servers, one set running at a time.
    all) "$HERE/compare-r3.sh"; echo ;;
    *) printf 'compare.sh: SCENARIOS=%s: expected single, replicated or all\n' "$SCENARIOS" >&2; exit 2 ;;
esac
MESSAGES="${MESSAGES:-500000}"
OAT_MESSAGES="${OAT_MESSAGES:-5000}"
CONSUME_MESSAGES="${CONSUME_MESSAGES:-2000000}"
MESSAGE_SIZE="${MESSAGE_SIZE:-1024}"
RUNS="${RUNS:-3}"
WARMUP="${WARMUP:-1}"
QUIVER_ALWAYS="${QUIVER_ALWAYS:-1}"
NATS_ACK_POLICY="${NATS_ACK_POLICY:-explicit}"
NATS_MAX_INFLIGHT="${NATS_MAX_INFLIGHT:-4096}"
QUIVER_BIN_DIR="${QUIVER_BIN_DIR:-$ROOT/target/release}"
RUN_TIMEOUT="${RUN_TIMEOUT:-900}"
NATS_BENCH_DIR="$HERE/nats-bench"

# shellcheck source=bench/common.sh
source "$HERE/common.sh"

command -v python3 >/dev/null || die "python3 is needed to read the JSON reports"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/quiver-compare.XXXXXX")"
NATS_PID=""
QUIVERD_PID=""
BENCH_PID=""
CLEANUP_PIDS=(BENCH_PID QUIVERD_PID NATS_PID)
trap_cleanup

# ---- nats-server and the builds --------------------------------------------------------
find_nats_server
ensure_nats_bench "$NATS_BENCH_DIR"
snapshot_quiver_bins

# ---- servers ---------------------------------------------------------------------------
NATS_PORT="$(free_port tcp)"
mkdir -p "$WORK/nats" "$WORK/quiver" "$WORK/results"
"$NATS_SERVER" -js -sd "$WORK/nats" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
NATS_URL="nats://127.0.0.1:$NATS_PORT"
for _ in $(seq 100); do
    grep -q "Server is ready" "$WORK/nats.log" 2>/dev/null && break
    kill -0 "$NATS_PID" 2>/dev/null || { cat "$WORK/nats.log" >&2; die "nats-server exited"; }
    sleep 0.1
done
grep -q "Server is ready" "$WORK/nats.log" || die "nats-server did not start (log: $WORK/nats.log)"

QUIVER_PORT="$(free_port udp)"
QUIVERD_ARGS=()
if [[ -n "${QUIVERD_CONFIG:-}" ]]; then
    [[ -f "$QUIVERD_CONFIG" ]] || die "QUIVERD_CONFIG: no file $QUIVERD_CONFIG"
    QUIVERD_ARGS=(--config "$QUIVERD_CONFIG")
fi
"$QUIVERD" --data-dir "$WORK/quiver" --listen "127.0.0.1:$QUIVER_PORT" ${QUIVERD_ARGS[@]+"${QUIVERD_ARGS[@]}"} >"$WORK/quiverd.log" 2>&1 &
QUIVERD_PID=$!
QCLI=("$QUIVER" --broker "127.0.0.1:$QUIVER_PORT" --ca "$WORK/quiver/tls/ca.pem")
ready=""
for _ in $(seq 100); do
    kill -0 "$QUIVERD_PID" 2>/dev/null || { cat "$WORK/quiverd.log" >&2; die "quiverd exited"; }
    if [[ -f "$WORK/quiver/tls/ca.pem" ]] && "${QCLI[@]}" topic list >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.2
done
[[ -n "$ready" ]] || die "quiverd did not come up (log: $WORK/quiverd.log)"

# ---- the machine -----------------------------------------------------------------------
cpu_model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
mem_total="$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
quiver_rev="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || quiver_rev="$quiver_rev (+ uncommitted changes)"
async_nats_ver="$(awk '/^name = "async-nats"/ {getline; gsub(/"/, "", $3); print $3}' "$NATS_BENCH_DIR/Cargo.lock" 2>/dev/null || true)"
case "$NATS_ACK_POLICY" in
    none) nats_consumer="ordered pull consumer (no acks)" ;;
    *) nats_consumer="pull consumer, ack policy \`$NATS_ACK_POLICY\`, each message acked with its own ack message, not awaited (Quiver's \`msg.ack()\` is local; acks travel as ranges)" ;;
esac
cat <<EOF
# Quiver vs NATS JetStream

- Machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, $mem_total RAM, Linux $(uname -r)
- Quiver: $quiver_rev, quiverd on 127.0.0.1:$QUIVER_PORT (QUIC), data in a temp dir, \`--durability interval\` (fsync every 1000 ms)$([[ -n "${QUIVERD_CONFIG:-}" ]] && printf '; broker config: %s' "$(grep -v '^[[:space:]]*#' "$QUIVERD_CONFIG" | grep . | tr '\n' ' ' | sed 's/ $//')")
- NATS: $("$NATS_SERVER" --version 2>&1 | head -1) with JetStream, file storage in a temp dir, 127.0.0.1:$NATS_PORT (TCP, no TLS); client async-nats ${async_nats_ver:-?}; default file store sync (background fsync every 2 min)
- Workload: 1 producer, 1 partition / 1 stream, $MESSAGE_SIZE-byte messages; $MESSAGES messages in (a), (a'), (b), $OAT_MESSAGES in (c); $RUNS runs per system, alternating
- Producers: up to $NATS_MAX_INFLIGHT unacknowledged messages each (NATS: PubAcks in flight); NATS consumer: $nats_consumer
- Each client runs on a thread of its own with a single-threaded runtime, in both bench clients
- Clients and servers share the same $(nproc) CPUs; load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg) (anything else busy on the machine skews the figures)

EOF

# ---- runs ------------------------------------------------------------------------------
# add_cpu OUT PID "USER SYS": adds the server's CPU seconds since that reading to the report.
# System time is where this VM's expensive fresh memory shows (see BENCHMARKS.md, Machine).
add_cpu() {
    local after
    after="$(cpu_ticks "$2")" || exit 1
    python3 - "$1" "$(getconf CLK_TCK)" $3 $after <<'PY'
import json, sys
path, hz, u0, s0, u1, s1 = sys.argv[1], *map(int, sys.argv[2:])
report = json.load(open(path))
report["server_cpu"] = {"user_s": (u1 - u0) / hz, "sys_s": (s1 - s0) / hz}
json.dump(report, open(path, "w"), indent=1)
PY
}

# run_quiver OUT ARGS...: one `quiver bench --json` run; the JSON report goes to OUT. A run on
# a fresh topic deletes it at its end (quiver bench); one given --topic keeps it.
run_quiver() {
    local out="$1"; shift
    local args=("$@")
    local cpu
    cpu="$(cpu_ticks "$QUIVERD_PID")" || exit 1
    timeout "$RUN_TIMEOUT" "${QCLI[@]}" bench --json --message-size "$MESSAGE_SIZE" \
        --max-inflight "$NATS_MAX_INFLIGHT" --broker-pid "$QUIVERD_PID" "${args[@]}" >"$out.raw" 2>"$out.err" &
    bench_wait || { cat "$out.err" >&2; die "quiver bench $* failed"; }
    python3 - "$out.raw" "$out" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
report = json.loads(text[text.index("{"):])
json.dump(report, open(sys.argv[2], "w"), indent=1)
PY
    add_cpu "$out" "$QUIVERD_PID" "$cpu"
}

# run_nats OUT ARGS...: one nats-bench run (it deletes its stream at the end).
run_nats() {
    local out="$1"; shift
    local cpu
    cpu="$(cpu_ticks "$NATS_PID")" || exit 1
    timeout "$RUN_TIMEOUT" "$NATS_BENCH" --json --url "$NATS_URL" --message-size "$MESSAGE_SIZE" \
        --broker-pid "$NATS_PID" --ack-policy "$NATS_ACK_POLICY" --max-inflight "$NATS_MAX_INFLIGHT" \
        --durability-label "nats-default (background fsync every 2 min)" "$@" >"$out" 2>"$out.err" &
    bench_wait || { cat "$out.err" >&2; die "nats-bench $* failed"; }
    add_cpu "$out" "$NATS_PID" "$cpu"
}

summary() {
    python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = f"produce {r['produce']['mb_per_sec']:.1f} MB/s, p50 {r['produce_latency']['p50_us']:.0f} us"
if r.get("consume"):
    s += f"; consume {r['consume']['mb_per_sec']:.1f} MB/s"
if r.get("end_to_end_latency"):
    s += f", e2e p50 {r['end_to_end_latency']['p50_us']:.0f} us"
if r.get("server_cpu"):
    c = r["server_cpu"]
    s += f"; server CPU {c['user_s']:.2f} s user + {c['sys_s']:.2f} s sys"
if r.get("producer_path"):
    s += f"; {r['producer_path']['mtu']}-byte packets, {r['producer_path']['lost_packets']} lost"
print(s)
PY
}

# scenario NAME SYSTEM ARGS...: one run of SYSTEM (quiver, quiver-always, nats) for scenario NAME.
declare -A run_no=()
scenario() {
    local name="$1" system="$2"; shift 2
    local key="$name/$system"
    local n=$(( ${run_no[$key]:-0} + 1 ))
    run_no[$key]=$n
    mkdir -p "$WORK/results/$name/$system"
    local out="$WORK/results/$name/$system/$n.json"
    case "$system" in
        quiver) run_quiver "$out" --durability interval "$@" ;;
        quiver-always) run_quiver "$out" --durability always "$@" ;;
        nats) run_nats "$out" "$@" ;;
    esac
    log "  ($name) $system run $n/$RUNS: $(summary "$out")"
}

if [[ "$WARMUP" == 1 ]]; then
    log "warm-up runs (not recorded) ..."
    run_quiver "$WORK/warmup-quiver.json" --durability interval --consumers 1 --messages 20000
    run_nats "$WORK/warmup-nats.json" --consumers 1 --messages 20000
fi

log "scenario (a): produce only, $MESSAGES messages"
for _ in $(seq "$RUNS"); do
    scenario a quiver --consumers 0 --messages "$MESSAGES"
    [[ "$QUIVER_ALWAYS" == 1 ]] && scenario a quiver-always --consumers 0 --messages "$MESSAGES"
    scenario a nats --consumers 0 --messages "$MESSAGES"
done
log "scenario (b): 1 producer + 1 consumer, $MESSAGES messages"
for _ in $(seq "$RUNS"); do
    scenario b quiver --consumers 1 --messages "$MESSAGES"
    scenario b nats --consumers 1 --messages "$MESSAGES"
done
log "scenario (c): one at a time, $OAT_MESSAGES messages"
for _ in $(seq "$RUNS"); do
    scenario c quiver --consumers 0 --messages "$OAT_MESSAGES" --one-at-a-time
    scenario c nats --consumers 0 --messages "$OAT_MESSAGES" --one-at-a-time
done

log "scenario (d): consume only, $CONSUME_MESSAGES messages written before"
run_quiver "$WORK/fill-quiver.json" --durability interval --topic consume-only --consumers 0 --messages "$CONSUME_MESSAGES"
run_nats "$WORK/fill-nats.json" --stream consumeonly --consumers 0 --messages "$CONSUME_MESSAGES"
for _ in $(seq "$RUNS"); do
    scenario d quiver --topic consume-only --producers 0 --consumers 1
    scenario d nats --stream consumeonly --producers 0 --consumers 1
done

# ---- the table -------------------------------------------------------------------------
python3 - "$WORK/results" "$MESSAGES" "$OAT_MESSAGES" <<'PY'
import json, os, statistics, sys

root, messages, oat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def load(scenario, system):
    d = os.path.join(root, scenario, system)
    if not os.path.isdir(d):
        return []
    files = sorted((f for f in os.listdir(d) if f.endswith(".json")), key=lambda f: int(f.split(".")[0]))
    return [json.load(open(os.path.join(d, f))) for f in files]

def get(report, path):
    v = report
    for k in path:
        if not isinstance(v, dict) or v.get(k) is None:
            return None
        v = v[k]
    return float(v)

FIG = {
    "produce MB/s": (("produce", "mb_per_sec"), 1.0, "{:.1f}"),
    "consume MB/s": (("consume", "mb_per_sec"), 1.0, "{:.1f}"),
    "produce msgs/s": (("produce", "msgs_per_sec"), 1.0, "{:.0f}"),
    "consume msgs/s": (("consume", "msgs_per_sec"), 1.0, "{:.0f}"),
    "produce->ack p50 µs": (("produce_latency", "p50_us"), 1.0, "{:.0f}"),
    "produce->ack p99 µs": (("produce_latency", "p99_us"), 1.0, "{:.0f}"),
    "e2e p50 µs": (("end_to_end_latency", "p50_us"), 1.0, "{:.0f}"),
    "e2e p99 µs": (("end_to_end_latency", "p99_us"), 1.0, "{:.0f}"),
    "one-at-a-time p50 µs": (("produce_latency", "p50_us"), 1.0, "{:.0f}"),
    "one-at-a-time p99 µs": (("produce_latency", "p99_us"), 1.0, "{:.0f}"),
    "server peak RSS MiB": (("broker_memory", "peak_kib"), 1 / 1024, "{:.0f}"),
    "server CPU s (user)": (("server_cpu", "user_s"), 1.0, "{:.2f}"),
    "server CPU s (sys)": (("server_cpu", "sys_s"), 1.0, "{:.2f}"),
}

def cell(reports, figure):
    path, scale, fmt = FIG[figure]
    vals = [v * scale for v in (get(r, path) for r in reports) if v is not None]
    if not vals:
        return None, "–", "–"
    med = statistics.median(vals)
    return med, fmt.format(med), f"{fmt.format(min(vals))}–{fmt.format(max(vals))}"

rows = [
    ("(a) produce only", "a", "quiver", ["produce MB/s", "produce->ack p50 µs", "produce->ack p99 µs", "server peak RSS MiB", "server CPU s (user)", "server CPU s (sys)"]),
    ("(a') produce only, Quiver fsync always", "a", "quiver-always", ["produce MB/s", "produce->ack p50 µs", "produce->ack p99 µs", "server CPU s (user)", "server CPU s (sys)"]),
    ("(b) 1 producer + 1 consumer", "b", "quiver", ["produce MB/s", "consume MB/s", "produce->ack p50 µs", "produce->ack p99 µs", "e2e p50 µs", "e2e p99 µs", "server peak RSS MiB", "server CPU s (user)", "server CPU s (sys)"]),
    ("(c) one at a time", "c", "quiver", ["produce msgs/s", "one-at-a-time p50 µs", "one-at-a-time p99 µs"]),
    ("(d) consume only", "d", "quiver", ["consume MB/s", "consume msgs/s", "server CPU s (user)", "server CPU s (sys)"]),
]

print("| Scenario | Figure | Quiver median | Quiver range | NATS median | NATS range | Quiver/NATS |")
print("|---|---|---:|---:|---:|---:|---:|")
for title, sc, qsys, figures in rows:
    q, n = load(sc, qsys), load(sc, "nats")
    if not q or not n:
        continue
    msgs = q[0]['consume']['messages'] if sc == "d" else q[0]['produce']['messages']
    title = f"{title} ({len(q)}+{len(n)} runs, {msgs} msgs)"
    for i, fig in enumerate(figures):
        qm, qmed, qrange = cell(q, fig)
        nm, nmed, nrange = cell(n, fig)
        ratio = f"{qm / nm:.2f}" if qm is not None and nm else "–"
        print(f"| {title if i == 0 else ''} | {fig} | {qmed} | {qrange} | {nmed} | {nrange} | {ratio} |")
print()
print("Ratio = Quiver median / NATS median: above 1 is better for MB/s and msgs/s, worse for latency and memory.")
print("e2e = publish -> deliver (timestamp in the payload). Pipelined produce->ack latency mostly measures")
print("how deep each client queues (NATS: a fixed number of PubAcks in flight; Quiver: its producer's batching),")
print("so compare it with the throughput beside it; one-at-a-time latency is the round trip itself.")
print("Server peak RSS is sampled from /proc during each run of a long-lived server (it carries over between runs).")
print("Server CPU: seconds of user and system time the server process used during each run (/proc; NATS's includes")
print("deleting its stream at the end of each run, Quiver's topic is deleted after the reading); on a VM that")
print("makes fresh memory expensive, system time is where it shows (BENCHMARKS.md, Machine).")
PY
