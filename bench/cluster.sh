# Three-node clusters on loopback for bench/compare-r3.sh and bench/failover.sh (sourced after
# common.sh, not run): three quiverd sharing a development CA, and three nats-server with
# JetStream and cluster routes. Every node has its own data dir under WORK and its own free
# ports, kept across a restart, so a node can be killed and started again as it was.
#
# The script sets WORK, QUIVERD, QUIVER and NATS_SERVER, lists QPID_1..3 and NPID_1..3 in
# CLEANUP_PIDS, then calls quiver_cluster_start / nats_cluster_start.
#
# Sets: QBROKERS (host:port,...), QCA, QCLI (the quiver CLI for the cluster), QPORT_n, QPID_n;
#       NATS_URLS (nats://...,...), NPORT_n, NHTTP_n (monitoring), NPID_n.

CLUSTER_READY_TIMEOUT_S="${CLUSTER_READY_TIMEOUT_S:-60}"
QPID_1="" QPID_2="" QPID_3=""
NPID_1="" NPID_2="" NPID_3=""

# pid_of SYSTEM N: the pid of node N (empty when it is not running).
pid_of() {
    local var
    case "$1" in
        quiver) var="QPID_$2" ;;
        nats) var="NPID_$2" ;;
        *) die "pid_of: unknown system $1" ;;
    esac
    printf '%s' "${!var}"
}

# kill_node SYSTEM N [SIGNAL]: SIGKILL (or SIGNAL, e.g. TERM for a graceful stop), then reap it.
kill_node() {
    local pid
    pid="$(pid_of "$1" "$2")"
    [[ -n "$pid" ]] || return 0
    kill -"${3:-KILL}" "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    printf -v "$([[ $1 == quiver ]] && echo QPID || echo NPID)_$2" '%s' ""
}

# wait_until WHAT CMD...: runs CMD every 0.2 s until it succeeds, for CLUSTER_READY_TIMEOUT_S.
# CMD keeps quiet about failed attempts itself (so a `die` in it is still heard).
wait_until() {
    local what="$1"; shift
    local deadline=$((SECONDS + CLUSTER_READY_TIMEOUT_S))
    until "$@" >/dev/null; do
        ((SECONDS < deadline)) || die "timed out after ${CLUSTER_READY_TIMEOUT_S} s waiting for $what"
        sleep 0.2
    done
}

# ---- Quiver ----------------------------------------------------------------------------

quiver_cluster_start() {
    local n port peers=() addrs=()
    for n in 1 2 3; do
        port="$(free_port udp)"
        printf -v "QPORT_$n" '%s' "$port"
        peers+=("$n@127.0.0.1:$port")
        addrs+=("127.0.0.1:$port")
    done
    QPEERS="$(IFS=,; echo "${peers[*]}")"
    QBROKERS="$(IFS=,; echo "${addrs[*]}")"
    QCA="$WORK/quiver-ca/ca.pem"
    QCLI=("$QUIVER" --broker "$QBROKERS" --ca "$QCA")
    for n in 1 2 3; do quiver_node_start "$n"; done
    for n in 1 2 3; do wait_until "quiverd $n to see all three brokers" quiver_sees_all "$n"; done
}

# quiver_node_start N: broker N on its port and data dir (again, after a kill).
quiver_node_start() {
    local n="$1" port_var="QPORT_$1"
    "$QUIVERD" --node-id "$n" --listen "127.0.0.1:${!port_var}" --data-dir "$WORK/quiver$n" \
        --peers "$QPEERS" --dev-ca "$WORK/quiver-ca" >>"$WORK/quiverd$n.log" 2>&1 &
    printf -v "QPID_$n" '%s' "$!"
}

# quiver_status N: `quiver cluster status --json` as broker N sees it.
quiver_status() {
    local port_var="QPORT_$1"
    "$QUIVER" --broker "127.0.0.1:${!port_var}" --ca "$QCA" cluster status --json
}

quiver_sees_all() {
    local pid
    pid="$(pid_of quiver "$1")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || die "quiverd $1 exited (log: $WORK/quiverd$1.log)"
    [[ -f "$QCA" ]] || return 1
    quiver_status "$1" 2>/dev/null | python3 -c '
import json, sys
b = json.loads(sys.stdin.read() or "{}").get("brokers", [])
sys.exit(0 if len(b) == 3 and all(x["up"] for x in b) else 1)'
}

# quiver_leader TOPIC: the node id leading partition 0 of TOPIC (nothing when unknown).
quiver_leader() {
    "${QCLI[@]}" cluster status --json 2>/dev/null | python3 -c '
import json, sys
for p in json.loads(sys.stdin.read() or "{}").get("partitions", []):
    if p["topic"] == sys.argv[1] and p["partition"] == 0 and p["leader"] is not None:
        print(p["leader"])' "$1"
}

# quiver_in_sync TOPIC: partition 0 of TOPIC has a leader that counts all three replicas in
# sync (only the leader knows: it answers for itself).
quiver_in_sync() {
    local leader
    leader="$(quiver_leader "$1")"
    [[ -n "$leader" ]] || return 1
    quiver_status "$leader" 2>/dev/null | python3 -c '
import json, sys
d = json.loads(sys.stdin.read() or "{}")
ok = [p for p in d.get("partitions", []) if p["topic"] == sys.argv[1] and p["partition"] == 0
      and p["leader"] == int(sys.argv[2]) and len(p["in_sync"]) == 3]
sys.exit(0 if ok and all(b["up"] for b in d.get("brokers", [])) else 1)' "$1" "$leader"
}

# ---- NATS ------------------------------------------------------------------------------

nats_cluster_start() {
    local n routes=() urls=()
    for n in 1 2 3; do
        printf -v "NPORT_$n" '%s' "$(free_port tcp)"
        printf -v "NROUTE_$n" '%s' "$(free_port tcp)"
        printf -v "NHTTP_$n" '%s' "$(free_port tcp)"
        local port_var="NPORT_$n" route_var="NROUTE_$n"
        routes+=("nats-route://127.0.0.1:${!route_var}")
        urls+=("nats://127.0.0.1:${!port_var}")
    done
    NATS_URLS="$(IFS=,; echo "${urls[*]}")"
    for n in 1 2 3; do
        local port_var="NPORT_$n" route_var="NROUTE_$n" http_var="NHTTP_$n"
        cat >"$WORK/nats$n.conf" <<EOF
server_name: n$n
listen: 127.0.0.1:${!port_var}
http: 127.0.0.1:${!http_var}
jetstream { store_dir: "$WORK/nats$n" }
cluster {
  name: bench
  listen: 127.0.0.1:${!route_var}
  routes: [$(IFS=,; echo "${routes[*]}")]
}
EOF
        nats_node_start "$n"
    done
    for n in 1 2 3; do wait_until "nats-server n$n to be healthy with a JetStream leader" nats_healthy "$n"; done
}

nats_node_start() {
    "$NATS_SERVER" -c "$WORK/nats$1.conf" >>"$WORK/nats$1.log" 2>&1 &
    printf -v "NPID_$1" '%s' "$!"
}

# nats_http N PATH: GET from server N's monitoring port.
nats_http() {
    local http_var="NHTTP_$1"
    python3 -c '
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "http://127.0.0.1:${!http_var}$2" 2>/dev/null
}

# nats_healthy N: /healthz is ok and the JetStream meta group has a leader.
nats_healthy() {
    local pid
    pid="$(pid_of nats "$1")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || die "nats-server n$1 exited (log: $WORK/nats$1.log)"
    nats_http "$1" /healthz | grep -q '"ok"' || return 1
    nats_http "$1" /jsz | python3 -c '
import json, sys
sys.exit(0 if json.loads(sys.stdin.read() or "{}").get("meta_cluster", {}).get("leader") else 1)'
}

# nats_stream_cluster N STREAM: the stream's `cluster` object as server N sees it (JSON).
nats_stream_cluster() {
    nats_http "$1" "/jsz?streams=true" | python3 -c '
import json, sys
d = json.loads(sys.stdin.read() or "{}")
for a in d.get("account_details") or []:
    for s in a.get("stream_detail") or []:
        if s["name"] == sys.argv[1]:
            print(json.dumps(s.get("cluster", {})))' "$2"
}

# nats_leader STREAM: the number of the server leading STREAM, asked of the running servers.
nats_leader() {
    local n leader
    for n in 1 2 3; do
        [[ -n "$(pid_of nats "$n")" ]] || continue
        leader="$(nats_stream_cluster "$n" "$1" 2>/dev/null | python3 -c '
import json, sys
l = json.loads(sys.stdin.read() or "{}").get("leader", "")
print(l[1:] if l.startswith("n") else "")')" || continue
        [[ -n "$leader" ]] && { echo "$leader"; return 0; }
    done
    return 1
}

# nats_in_sync STREAM: the leader sees both other replicas current.
nats_in_sync() {
    local leader
    leader="$(nats_leader "$1")" || return 1
    nats_stream_cluster "$leader" "$1" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read() or "{}").get("replicas") or []
sys.exit(0 if len(r) == 2 and all(x.get("current") for x in r) else 1)'
}

# ---- both ------------------------------------------------------------------------------

# cluster_pids SYSTEM: the three nodes' pids.
cluster_pids() {
    local n
    for n in 1 2 3; do printf '%s ' "$(pid_of "$1" "$n")"; done
}

# cpu_ticks_sum PIDS...: user and system clock ticks used so far, summed over the processes.
cpu_ticks_sum() {
    local pid u=0 s=0 t
    for pid in "$@"; do
        t="$(cpu_ticks "$pid")" || exit 1
        u=$((u + ${t% *}))
        s=$((s + ${t#* }))
    done
    echo "$u $s"
}

# rss_sampler_start OUT PIDS...: samples each process's RSS every 100 ms in the background
# until rss_sampler_stop (or RUN_TIMEOUT, or every process gone), then writes
# [{"pid", "start_kib", "peak_kib", "end_kib"}] to OUT. Sets SAMPLER_PID.
rss_sampler_start() {
    local out="$1"; shift
    python3 - "$out" "${RUN_TIMEOUT:-900}" "$@" <<'PY' &
import json, signal, sys, time
out, limit, pids = sys.argv[1], float(sys.argv[2]), [int(p) for p in sys.argv[3:]]
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
def rss(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
m = {p: {"pid": p, "start_kib": rss(p) or 0, "peak_kib": rss(p) or 0, "end_kib": rss(p) or 0} for p in pids}
end = time.monotonic() + limit
while not stop and time.monotonic() < end:
    alive = False
    for p in pids:
        r = rss(p)
        if r is not None:
            alive = True
            m[p]["peak_kib"] = max(m[p]["peak_kib"], r)
            m[p]["end_kib"] = r
    if not alive:
        break
    time.sleep(0.1)
json.dump([m[p] for p in pids], open(out, "w"))
PY
    SAMPLER_PID=$!
}

rss_sampler_stop() {
    [[ -n "${SAMPLER_PID:-}" ]] || return 0
    kill -TERM "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=""
}
