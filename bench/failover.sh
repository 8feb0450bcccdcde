#!/usr/bin/env bash
# Failover, Quiver vs NATS JetStream: how long killing the leader stops acknowledged produce on
# a replicated partition (Quiver, 3 brokers) / an R3 stream (NATS, 3 servers). Issue 17's
# target: p50 < 1 s, p99 < 3 s over 20 kills.
#
#   bench/failover.sh                        # 20 kills per system
#   KILLS=5 SYSTEMS=quiver bench/failover.sh
#   TARGET=rolling SIGNAL=TERM KILLS=9 SYSTEMS=quiver bench/failover.sh   # rolling restart
#
# TARGET=rolling stops node 1, 2, 3, 1, ... in turn instead of the leader, and SIGNAL=TERM stops
# it gracefully instead of with SIGKILL: together a rolling restart (each node started again and
# back in sync before the next one stops), issue 18's "unavailability < 5 s" per step.
#
# Per system, one after the other, a fresh three-node cluster (bench/cluster.sh) with one
# replicated partition / R3 stream, then per kill:
#   1. wait until all three replicas are in sync (Quiver: the leader's `quiver cluster status
#      --json` lists three in_sync; NATS: the leader's /jsz shows both other replicas current);
#   2. start a producer that publishes one message at a time, each waiting for its ack, for
#      RUN_S seconds: Quiver `quiver bench --one-at-a-time --acks all --duration`, NATS
#      `nats-bench --one-at-a-time --retry --duration` (R3: a PubAck means the stream's raft
#      group committed the message);
#   3. after WARM_S seconds look up the leader (Quiver: `quiver cluster status --json`, the
#      partition's `leader`; NATS: the stream's leader on the /jsz monitoring endpoint) and kill
#      it with SIGKILL;
#   4. the producer keeps going until RUN_S has passed and its last message is acknowledged;
#      then the killed node is started again (same data dir and ports).
#
# What is measured, and how precisely: with one message at a time, the message in flight when
# the leader dies waits until the cluster acknowledges it, so the run's longest produce->ack
# latency is the time from the kill to the first acknowledged produce after it, overstated by
# at most the time between that message's send and the kill: less than one round trip (about
# 1 ms here; each run's p50 is printed beside it). Both bench clients time it with a monotonic
# clock in microseconds. Resending is the client's own business:
#   * Quiver's producer resends by itself (after a lost connection or a NotLeader answer, with
#     a 50 ms pause doubling up to 1 s), as any application using the client would;
#   * async-nats does not resend a publish, so `nats-bench --retry` does: after an error at once
#     (5 ms pause), and after NATS_ACK_TIMEOUT_MS (100) without a PubAck. A resend only reaches
#     the new leader once the previous attempt has given up, so NATS's figure is overstated by up
#     to NATS_ACK_TIMEOUT_MS. 100 ms is far shorter than the client libraries' default ack
#     timeout (5 s in the Go client), i.e. in NATS's favour.
# The producer connects to the brokers in the order given (Quiver: broker 1 first; async-nats
# picks a server at random), so some kills also take the producer's own connection away; the
# per-kill lines say which node was killed.
#
# Durability: Quiver's topic uses QUIVER_DURABILITY (interval: fsync every 1000 ms, as NATS's
# default file store does not fsync each message either).
#
# Environment: KILLS (20), SYSTEMS ("quiver nats"), WARM_S (2), RUN_S (4), NATS_ACK_TIMEOUT_MS
# (100), QUIVER_DURABILITY (interval), MESSAGE_SIZE (1024), QUIVER_BIN_DIR (target/release),
# NATS_SERVER, NATS_BENCH (a nats-bench binary with --retry, instead of building
# bench/nats-bench), RUN_TIMEOUT (seconds per producer run, 120), CLUSTER_READY_TIMEOUT_S (60:
# how long a restarted node may take to be back in sync), RESULTS_DIR (keep the raw reports).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
KILLS="${KILLS:-20}"
SYSTEMS="${SYSTEMS:-quiver nats}"
WARM_S="${WARM_S:-2}"
RUN_S="${RUN_S:-4}"
NATS_ACK_TIMEOUT_MS="${NATS_ACK_TIMEOUT_MS:-100}"
QUIVER_DURABILITY="${QUIVER_DURABILITY:-interval}"
MESSAGE_SIZE="${MESSAGE_SIZE:-1024}"
QUIVER_BIN_DIR="${QUIVER_BIN_DIR:-$ROOT/target/release}"
RUN_TIMEOUT="${RUN_TIMEOUT:-120}"
TARGET="${TARGET:-leader}"
SIGNAL="${SIGNAL:-KILL}"
NATS_BENCH_DIR="$HERE/nats-bench"
TOPIC=failover

# shellcheck source=bench/common.sh
source "$HERE/common.sh"
# shellcheck source=bench/cluster.sh
source "$HERE/cluster.sh"

command -v python3 >/dev/null || die "python3 is needed to read the JSON reports"
python3 -c "import sys; sys.exit(0 if $WARM_S < $RUN_S else 1)" || die "WARM_S ($WARM_S) must be below RUN_S ($RUN_S)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/quiver-failover.XXXXXX")"
BENCH_PID=""
CLEANUP_PIDS=(BENCH_PID QPID_1 QPID_2 QPID_3 NPID_1 NPID_2 NPID_3)
trap_cleanup
mkdir -p "$WORK/results"

for system in $SYSTEMS; do
    case "$system" in
        quiver) snapshot_quiver_bins ;;
        nats)
            find_nats_server
            ensure_nats_bench "$NATS_BENCH_DIR"
            "$NATS_BENCH" --help | grep -q -- --retry || die "$NATS_BENCH has no --retry: rebuild bench/nats-bench"
            ;;
        *) die "SYSTEMS: unknown system $system (quiver, nats)" ;;
    esac
done

# producer_start SYSTEM OUT ARGS...: the one-at-a-time producer in the background (BENCH_PID).
producer_start() {
    local system="$1" out="$2"; shift 2
    case "$system" in
        quiver)
            timeout "$RUN_TIMEOUT" "${QCLI[@]}" bench --json --topic "$TOPIC" --message-size "$MESSAGE_SIZE" \
                --replicas 3 --durability "$QUIVER_DURABILITY" --acks all --one-at-a-time --consumers 0 "$@" \
                >"$out.raw" 2>"$out.err" &
            ;;
        nats)
            timeout "$RUN_TIMEOUT" "$NATS_BENCH" --json --url "$NATS_URLS" --stream "$TOPIC" --keep-stream \
                --replicas 3 --message-size "$MESSAGE_SIZE" --one-at-a-time --retry \
                --ack-timeout-ms "$NATS_ACK_TIMEOUT_MS" --consumers 0 "$@" >"$out.raw" 2>"$out.err" &
            ;;
    esac
    BENCH_PID=$!
}

# producer_wait OUT: waits for the producer; OUT gets its JSON report.
producer_wait() {
    local out="$1" rc=0
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=""
    if [[ "$rc" != 0 ]]; then
        cat "$out.err" >&2
        die "the producer failed (exit $rc; 124: it ran past RUN_TIMEOUT)"
    fi
    python3 - "$out.raw" "$out" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
json.dump(json.loads(text[text.index("{"):]), open(sys.argv[2], "w"), indent=1)
PY
}

kill_summary() {
    python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["produce_latency"]
s = f"stall {l['max_us'] / 1000:.1f} ms (round trip p50 {l['p50_us']:.0f} us, {r['produce']['messages']} msgs"
print(s + (f", {r['retries']} resends)" if r.get("retries") is not None else ")"))
PY
}

leader_of() {
    case "$1" in
        quiver) quiver_leader "$TOPIC" ;;
        nats) nats_leader "$TOPIC" ;;
    esac
}

in_sync() {
    case "$1" in
        quiver) quiver_in_sync "$TOPIC" ;;
        nats) nats_in_sync "$TOPIC" ;;
    esac
}

node_start() {
    case "$1" in
        quiver) quiver_node_start "$2" ;;
        nats) nats_node_start "$2" ;;
    esac
}

cluster_stop() {
    local n pid
    for n in 1 2 3; do
        pid="$(pid_of "$1" "$n")"
        stop_pid "$pid"
        printf -v "$([[ $1 == quiver ]] && echo QPID || echo NPID)_$n" '%s' ""
    done
}

# One system: a fresh cluster, the replicated partition / stream (written to once, so it has
# a leader and data), then KILLS kills.
measure() {
    local system="$1" i leader out
    log "$system: starting three nodes ..."
    case "$system" in
        quiver) quiver_cluster_start ;;
        nats) nats_cluster_start ;;
    esac
    mkdir -p "$WORK/results/$system"
    producer_start "$system" "$WORK/results/$system/setup.json" --messages 1000
    producer_wait "$WORK/results/$system/setup.json"
    for i in $(seq "$KILLS"); do
        wait_until "$system: three replicas in sync" in_sync "$system"
        out="$WORK/results/$system/$i.json"
        producer_start "$system" "$out" --duration "$RUN_S"
        sleep "$WARM_S"
        case "$TARGET" in
            leader) leader="$(leader_of "$system")" || true ;;
            rolling) leader=$(( (i - 1) % 3 + 1 )) ;;
            *) die "TARGET: unknown target $TARGET (leader, rolling)" ;;
        esac
        [[ -n "$leader" ]] || die "$system: no leader found for $TOPIC"
        kill -0 "$BENCH_PID" 2>/dev/null || { cat "$out.err" >&2; die "$system: the producer ended before the kill (raise RUN_S)"; }
        kill_node "$system" "$leader" "$SIGNAL"
        producer_wait "$out"
        python3 - "$out" "$leader" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r["killed_node"] = int(sys.argv[2])
json.dump(r, open(sys.argv[1], "w"), indent=1)
PY
        log "  $system kill $i/$KILLS: node $leader; $(kill_summary "$out")"
        node_start "$system" "$leader"
    done
    wait_until "$system: three replicas in sync" in_sync "$system"
    cluster_stop "$system"
}

cat <<EOF
# $([[ $TARGET == rolling ]] && echo "Rolling restart: each node stopped (SIG$SIGNAL) in turn" || echo "Failover: leader killed (SIG$SIGNAL)") -> first acknowledged produce

- Machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM, Linux $(uname -r); load average before: $(cut -d' ' -f1-3 /proc/loadavg)
- Quiver: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), three quiverd, a topic of 1 partition with 3 replicas, \`--durability $QUIVER_DURABILITY\`, producer \`--acks all\`, one at a time
- NATS: ${NATS_SERVER:+$("$NATS_SERVER" --version 2>&1 | head -1), }three servers, an R3 file stream, producer one at a time, resending after $NATS_ACK_TIMEOUT_MS ms without a PubAck
- $KILLS kills per system, $MESSAGE_SIZE-byte messages; $([[ $TARGET == leader ]] && echo "the leader" || echo "node 1, 2, 3, ... in turn") stopped (SIG$SIGNAL) ${WARM_S} s into a ${RUN_S} s producer run, restarted after it

EOF

for system in $SYSTEMS; do
    measure "$system"
done

python3 - "$WORK/results" $SYSTEMS <<'PY'
import json, math, os, sys

root, systems = sys.argv[1], sys.argv[2:]

def pct(sorted_vals, q):
    # Nearest rank: with 20 samples p99 is the largest.
    return sorted_vals[max(0, math.ceil(q * len(sorted_vals)) - 1)]

print("| System | Kills | p50 ms | p99 ms | max ms | min ms | Stall per kill, ms (node killed) |")
print("|---|---:|---:|---:|---:|---:|---|")
for system in systems:
    d = os.path.join(root, system)
    runs = sorted((f for f in os.listdir(d) if f[0].isdigit() and f.endswith(".json")), key=lambda f: int(f.split(".")[0]))
    reports = [json.load(open(os.path.join(d, f))) for f in runs]
    stalls = [r["produce_latency"]["max_us"] / 1000 for r in reports]
    if not stalls:
        continue
    s = sorted(stalls)
    each = ", ".join(f"{v:.0f} ({r['killed_node']})" for v, r in zip(stalls, reports))
    print(f"| {system} | {len(s)} | {pct(s, 0.5):.0f} | {pct(s, 0.99):.0f} | {s[-1]:.0f} | {s[0]:.0f} | {each} |")
print()
print("Stall = the longest produce->ack latency of a one-at-a-time run in which the leader was killed: the time from")
print("the kill to the first acknowledged produce after it, plus less than one round trip. NATS's figure also includes")
print("up to one ack timeout (a resend reaches the new leader only after the previous attempt gave up).")
print("p99 is by nearest rank: with fewer than 100 kills it is the largest.")
PY
