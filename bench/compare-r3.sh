#!/usr/bin/env bash
# Quiver vs NATS JetStream, replicated: three Quiver brokers against a three-server JetStream
# cluster, side by side on this machine (issue 17).
#
#   bench/compare-r3.sh                        # or: SCENARIOS=replicated bench/compare.sh
#   MESSAGES=100000 RUNS=5 bench/compare-r3.sh
#
# What it does:
#   * starts three quiverd (one process each, --node-id/--peers, a shared --dev-ca) and three
#     nats-server (JetStream, file storage, cluster routes), every node with its own temp data
#     dir and free ports on loopback (bench/cluster.sh); both clusters run for the whole script;
#   * runs each scenario RUNS times per system, Quiver and NATS alternating, and prints a
#     Markdown table: median and range (min-max) per system and the ratio of the medians.
#
# Scenarios (1 producer, 1 partition / 1 stream with 3 replicas, MESSAGE_SIZE-byte messages):
#   (r1)  produce only, MESSAGES messages, pipelined (up to NATS_MAX_INFLIGHT unacknowledged);
#   (r2)  one at a time (each publish waits for its ack), OAT_MESSAGES messages.
# Quiver: `quiver bench --replicas 3 --acks all`: a batch is acknowledged once a majority of the
# replicas stored it. NATS: an R3 stream (`nats-bench --replicas 3`): a PubAck comes once the
# stream's raft group committed the message, i.e. a majority stored it. The producer connects
# to the brokers in the order given (Quiver: broker 1 first; async-nats picks at random), and a
# broker that is not the leader forwards to it in both systems.
#
# Durability, honestly: Quiver runs with --durability interval (each replica fsyncs every
# 1000 ms; acks do not wait for it), as NATS's file store (background fsync every 2 minutes, the
# default). With QUIVER_ALWAYS=1 (default) each scenario also has a Quiver line with
# --durability always: every replica fsyncs before it counts as having stored the batch.
#
# Memory: every server's RSS is sampled every 100 ms during each run; the table shows the peak
# of the largest of the three and the three peaks summed, the log each server's peak.
# Server CPU: user and system seconds the three servers used during a run, summed.
#
# Environment: MESSAGES (200000), OAT_MESSAGES (5000), MESSAGE_SIZE (1024), RUNS (3), WARMUP
# (1: one short unrecorded run per system first), QUIVER_ALWAYS (1), NATS_MAX_INFLIGHT (4096:
# unacked messages per producer, both systems), RESULTS_DIR (keep the raw JSON reports there),
# QUIVER_BIN_DIR (target/release), NATS_SERVER (path of nats-server), NATS_BENCH (a nats-bench
# binary with --replicas, instead of building bench/nats-bench), RUN_TIMEOUT (seconds per
# bench run, 900), CLUSTER_READY_TIMEOUT_S (60).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
MESSAGES="${MESSAGES:-200000}"
OAT_MESSAGES="${OAT_MESSAGES:-5000}"
MESSAGE_SIZE="${MESSAGE_SIZE:-1024}"
RUNS="${RUNS:-3}"
WARMUP="${WARMUP:-1}"
QUIVER_ALWAYS="${QUIVER_ALWAYS:-1}"
NATS_MAX_INFLIGHT="${NATS_MAX_INFLIGHT:-4096}"
QUIVER_BIN_DIR="${QUIVER_BIN_DIR:-$ROOT/target/release}"
RUN_TIMEOUT="${RUN_TIMEOUT:-900}"
NATS_BENCH_DIR="$HERE/nats-bench"

# shellcheck source=bench/common.sh
source "$HERE/common.sh"
# shellcheck source=bench/cluster.sh
source "$HERE/cluster.sh"

command -v python3 >/dev/null || die "python3 is needed to read the JSON reports"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/quiver-compare-r3.XXXXXX")"
BENCH_PID=""
SAMPLER_PID=""
CLEANUP_PIDS=(BENCH_PID SAMPLER_PID QPID_1 QPID_2 QPID_3 NPID_1 NPID_2 NPID_3)
trap_cleanup

find_nats_server
ensure_nats_bench "$NATS_BENCH_DIR"
"$NATS_BENCH" --help | grep -q -- --replicas || die "$NATS_BENCH has no --replicas: rebuild bench/nats-bench"
snapshot_quiver_bins
mkdir -p "$WORK/results"

log "starting three quiverd and three nats-server ..."
quiver_cluster_start
nats_cluster_start

# ---- the machine -----------------------------------------------------------------------
cpu_model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
mem_total="$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
quiver_rev="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
git -C "$ROOT" diff --quiet HEAD 2>/dev/null || quiver_rev="$quiver_rev (+ uncommitted changes)"
async_nats_ver="$(awk '/^name = "async-nats"/ {getline; gsub(/"/, "", $3); print $3}' "$NATS_BENCH_DIR/Cargo.lock" 2>/dev/null || true)"
cat <<EOF
# Quiver vs NATS JetStream, three replicas

- Machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, $mem_total RAM, Linux $(uname -r)
- Quiver: $quiver_rev, three quiverd on $QBROKERS (QUIC, TLS from a shared development CA), data in temp dirs; topics \`--replicas 3\`, producer \`--acks all\` (a majority stored the batch); \`--durability interval\` (fsync every 1000 ms), and \`always\` where the row says so
- NATS: $("$NATS_SERVER" --version 2>&1 | head -1), three servers with JetStream in one cluster (routes on loopback), file storage in temp dirs, ${NATS_URLS//nats:\/\//} (TCP, no TLS); R3 streams (PubAck once the stream's raft group committed); client async-nats ${async_nats_ver:-?}; default file store sync (background fsync every 2 min)
- Workload: 1 producer, 1 partition / 1 stream of 3 replicas, $MESSAGE_SIZE-byte messages; $MESSAGES messages in (r1), $OAT_MESSAGES in (r2); $RUNS runs per system, alternating; up to $NATS_MAX_INFLIGHT unacknowledged messages per producer in (r1)
- Clients and all six servers share the same $(nproc) CPUs (both clusters run throughout; the idle one costs little); load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg)

EOF

# ---- runs ------------------------------------------------------------------------------
# finish_report OUT CPU_BEFORE CPU_AFTER MEM_FILE: adds the three servers' CPU time during the
# run and their memory (rss_sampler) to the report.
finish_report() {
    python3 - "$1" "$(getconf CLK_TCK)" "$2" "$3" "$4" <<'PY'
import json, sys
path, hz, before, after, mem = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
(u0, s0), (u1, s1) = map(int, before.split()), map(int, after.split())
report = json.load(open(path))
report["server_cpu"] = {"user_s": (u1 - u0) / hz, "sys_s": (s1 - s0) / hz, "servers": 3}
report["servers_memory"] = [dict(node=i + 1, **m) for i, m in enumerate(json.load(open(mem)))]
json.dump(report, open(path, "w"), indent=1)
PY
}

# measured SYSTEM OUT CMD...: runs the bench client CMD against SYSTEM's cluster (report on
# stdout, to OUT.raw), sampling the servers' memory and CPU; OUT gets the JSON report.
measured() {
    local system="$1" out="$2"; shift 2
    local pids cpu
    read -ra pids <<<"$(cluster_pids "$system")"
    cpu="$(cpu_ticks_sum "${pids[@]}")" || exit 1
    rss_sampler_start "$out.mem" "${pids[@]}"
    timeout "$RUN_TIMEOUT" "$@" >"$out.raw" 2>"$out.err" &
    if ! bench_wait; then
        rss_sampler_stop
        cat "$out.err" >&2
        die "$system bench failed: $*"
    fi
    rss_sampler_stop
    # quiver bench may print progress before its JSON.
    python3 - "$out.raw" "$out" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
json.dump(json.loads(text[text.index("{"):]), open(sys.argv[2], "w"), indent=1)
PY
    finish_report "$out" "$cpu" "$(cpu_ticks_sum "${pids[@]}")" "$out.mem"
}

# run_quiver OUT ARGS...: one `quiver bench` run on a fresh replicated topic (the bench deletes
# it at the end).
run_quiver() {
    local out="$1"; shift
    measured quiver "$out" "${QCLI[@]}" bench --json --message-size "$MESSAGE_SIZE" \
        --max-inflight "$NATS_MAX_INFLIGHT" --replicas 3 --acks all --consumers 0 "$@"
}

# run_nats OUT ARGS...: one nats-bench run on a fresh R3 stream (deleted at the end).
run_nats() {
    local out="$1"; shift
    measured nats "$out" "$NATS_BENCH" --json --url "$NATS_URLS" --replicas 3 \
        --message-size "$MESSAGE_SIZE" --max-inflight "$NATS_MAX_INFLIGHT" --consumers 0 \
        --durability-label "nats-default (background fsync every 2 min), R3" "$@"
}

summary() {
    python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["produce_latency"]
s = f"produce {r['produce']['mb_per_sec']:.1f} MB/s, p50 {l['p50_us']:.0f} us, p99 {l['p99_us']:.0f} us"
c = r["server_cpu"]
s += f"; servers CPU {c['user_s']:.2f} s user + {c['sys_s']:.2f} s sys"
s += "; peak RSS MiB " + " / ".join(f"{m['peak_kib'] / 1024:.0f}" for m in r["servers_memory"])
print(s)
PY
}

# scenario NAME SYSTEM ARGS...: one run of SYSTEM (quiver, quiver-always, nats) for NAME.
declare -A run_no=()
scenario() {
    local name="$1" system="$2"; shift 2
    local key="$name/$system"
    local n=$((${run_no[$key]:-0} + 1))
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
    run_quiver "$WORK/warmup-quiver.json" --durability interval --messages 20000
    run_nats "$WORK/warmup-nats.json" --messages 20000
fi

log "scenario (r1): produce only, 3 replicas, $MESSAGES messages"
for _ in $(seq "$RUNS"); do
    scenario r1 quiver --messages "$MESSAGES"
    [[ "$QUIVER_ALWAYS" == 1 ]] && scenario r1 quiver-always --messages "$MESSAGES"
    scenario r1 nats --messages "$MESSAGES"
done
log "scenario (r2): one at a time, 3 replicas, $OAT_MESSAGES messages"
for _ in $(seq "$RUNS"); do
    scenario r2 quiver --messages "$OAT_MESSAGES" --one-at-a-time
    [[ "$QUIVER_ALWAYS" == 1 ]] && scenario r2 quiver-always --messages "$OAT_MESSAGES" --one-at-a-time
    scenario r2 nats --messages "$OAT_MESSAGES" --one-at-a-time
done

# ---- the table -------------------------------------------------------------------------
python3 - "$WORK/results" <<'PY'
import json, os, statistics, sys

root = sys.argv[1]

def load(scenario, system):
    d = os.path.join(root, scenario, system)
    if not os.path.isdir(d):
        return []
    files = sorted((f for f in os.listdir(d) if f.endswith(".json")), key=lambda f: int(f.split(".")[0]))
    return [json.load(open(os.path.join(d, f))) for f in files]

def peaks(r):
    return [m["peak_kib"] / 1024 for m in r.get("servers_memory", [])]

FIG = {
    "produce MB/s": (lambda r: r["produce"]["mb_per_sec"], "{:.1f}"),
    "msgs/s": (lambda r: r["produce"]["msgs_per_sec"], "{:.0f}"),
    "produce->ack p50 µs": (lambda r: r["produce_latency"]["p50_us"], "{:.0f}"),
    "produce->ack p99 µs": (lambda r: r["produce_latency"]["p99_us"], "{:.0f}"),
    "round trip p50 µs": (lambda r: r["produce_latency"]["p50_us"], "{:.0f}"),
    "round trip p99 µs": (lambda r: r["produce_latency"]["p99_us"], "{:.0f}"),
    "peak RSS MiB, largest server": (lambda r: max(peaks(r)), "{:.0f}"),
    "peak RSS MiB, 3 servers summed": (lambda r: sum(peaks(r)), "{:.0f}"),
    "servers CPU s (user, 3 summed)": (lambda r: r["server_cpu"]["user_s"], "{:.2f}"),
    "servers CPU s (sys, 3 summed)": (lambda r: r["server_cpu"]["sys_s"], "{:.2f}"),
}

def cell(reports, figure):
    get, fmt = FIG[figure]
    vals = []
    for r in reports:
        try:
            vals.append(float(get(r)))
        except (KeyError, TypeError, ValueError):
            pass
    if not vals:
        return None, "–", "–"
    med = statistics.median(vals)
    return med, fmt.format(med), f"{fmt.format(min(vals))}–{fmt.format(max(vals))}"

MEM = ["peak RSS MiB, largest server", "peak RSS MiB, 3 servers summed",
       "servers CPU s (user, 3 summed)", "servers CPU s (sys, 3 summed)"]
rows = [
    ("(r1) produce only, acks all / R3", "r1", "quiver",
     ["produce MB/s", "produce->ack p50 µs", "produce->ack p99 µs"] + MEM),
    ("(r1') produce only, Quiver fsync **always**", "r1", "quiver-always",
     ["produce MB/s", "produce->ack p50 µs", "produce->ack p99 µs"] + MEM),
    ("(r2) one at a time, acks all / R3", "r2", "quiver",
     ["msgs/s", "round trip p50 µs", "round trip p99 µs"] + MEM),
    ("(r2') one at a time, Quiver fsync **always**", "r2", "quiver-always",
     ["msgs/s", "round trip p50 µs", "round trip p99 µs"] + MEM),
]

print("| Scenario | Figure | Quiver median | Quiver range | NATS R3 median | NATS R3 range | Quiver/NATS |")
print("|---|---|---:|---:|---:|---:|---:|")
for title, sc, qsys, figures in rows:
    q, n = load(sc, qsys), load(sc, "nats")
    if not q or not n:
        continue
    title = f"{title} ({len(q)}+{len(n)} runs, {q[0]['produce']['messages']} msgs)"
    for i, fig in enumerate(figures):
        qm, qmed, qrange = cell(q, fig)
        nm, nmed, nrange = cell(n, fig)
        ratio = f"{qm / nm:.2f}" if qm is not None and nm else "–"
        print(f"| {title if i == 0 else ''} | {fig} | {qmed} | {qrange} | {nmed} | {nrange} | {ratio} |")
print()
print("Ratio = Quiver median / NATS median: above 1 is better for MB/s and msgs/s, worse for latency and memory.")
print("The fsync-always rows are compared with the same NATS runs (NATS does not fsync before its PubAck).")
print("Peak RSS: sampled from /proc every 100 ms during each run, per server; servers run for the whole script,")
print("so memory carries over between runs. Server CPU: user and system seconds of the three servers during the run.")
PY
