#!/usr/bin/env bash
# apifilter demo: the XDP filter in front of a server, told as a story.
#
# Run it with `cargo xtask demo` (as root), which builds apifilter and sets APIFILTER to the
# binary. It builds two network namespaces joined by a veth pair and sends traffic only between
# them, from the benchmarking range 198.18.0.0/15 and the documentation range 2001:db8::/32:
#
#   afdemo-gw  (the protected server)              afdemo-net  (the internet)
#   afd0  198.18.0.1/24  2001:db8::1/64  <--veth-->  afd1  198.18.0.2/24   2001:db8::2/64
#         XDP filter + UDP server on :9000                 clients: 198.18.0.10   (legitimate)
#                                                                   198.18.0.66   (abusive)
#                                                                   198.18.0.200  (abusive range)
#                                                                   2001:db8::66  (abusive, IPv6)
#
# apifilter runs with its own pin dir and state dir, so it never touches a real instance, and a
# trap removes everything it created (namespaces, pins, state) however the script ends.
set -euo pipefail

if [[ ${EUID} -ne 0 ]]; then
    echo "demo.sh needs root: it builds network namespaces and attaches XDP programs" >&2
    exit 1
fi
if [[ -z ${APIFILTER:-} || ! -x ${APIFILTER} ]]; then
    echo "demo.sh: set APIFILTER to the apifilter binary (\`cargo xtask demo\` does this)" >&2
    exit 1
fi
for tool in ip nsenter python3 timeout curl openssl bc; do
    command -v "$tool" >/dev/null || { echo "demo.sh: $tool is missing (run \`cargo xtask setup\`)" >&2; exit 1; }
done

GW=afdemo-gw
NET=afdemo-net
PIN_DIR=/sys/fs/bpf/apifilter-demo
STATE_DIR=/tmp/apifilter-demo
# Never inherit a real instance's locations: the demo passes its own as flags.
unset APIFILTER_PIN_DIR APIFILTER_STATE_DIR

SERVER4=198.18.0.1
SERVER6=2001:db8::1
GOOD=198.18.0.10
BAD=198.18.0.66
BAD_RANGE=198.18.0.200
BAD6=2001:db8::66
ATTACKER=198.18.0.77
GW_MAC=02:af:de:00:00:01
NET_MAC=02:af:de:00:00:02

# apifilter runs inside the gateway namespace through nsenter, which switches only the network
# namespace. (`ip netns exec` would also remount /sys, hiding the pins under /sys/fs/bpf.)
AF=(nsenter "--net=/run/netns/$GW" "$APIFILTER" --pin-dir "$PIN_DIR" --state-dir "$STATE_DIR")

if [[ -t 1 ]]; then BOLD=$'\e[1m' DIM=$'\e[2m' RESET=$'\e[0m'; else BOLD='' DIM='' RESET=''; fi
heading() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$RESET"; }
say() { printf '   %s\n' "$@"; }
# Show an apifilter command, then run it.
af() {
    printf '%s   $ apifilter %s%s\n' "$DIM" "$*" "$RESET"
    "${AF[@]}" "$@"
}

WORK=''
PIDS=()
remove_leftovers() {
    ip netns del "$GW" 2>/dev/null || true
    ip netns del "$NET" 2>/dev/null || true
    rm -rf "$PIN_DIR" "$STATE_DIR"
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    heading "Cleaning up"
    if ((${#PIDS[@]})); then
        kill "${PIDS[@]}" 2>/dev/null
        wait "${PIDS[@]}" 2>/dev/null
    fi
    if [[ -e /run/netns/$GW ]]; then
        "${AF[@]}" detach --all >/dev/null 2>&1
    fi
    remove_leftovers
    [[ -n $WORK ]] && rm -rf "$WORK"
    if ((rc == 0)); then
        say "removed the namespaces, $PIN_DIR and $STATE_DIR"
    elif ((rc == 130 || rc == 143)); then
        say "interrupted; removed the namespaces, $PIN_DIR and $STATE_DIR"
    else
        say "the demo FAILED (exit status $rc); removed the namespaces, $PIN_DIR and $STATE_DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

remove_leftovers # from an earlier run that was killed hard
WORK=$(mktemp -d /tmp/apifilter-demo-work.XXXXXX)

# A small UDP toolkit: a server that counts datagrams per source (queried over a control socket on
# the gateway's loopback, which the filter never sees), and a sender paced to a packet rate.
cat >"$WORK/udp.py" <<'PY'
import json, select, socket, sys, time

DATA_PORT, CTL_PORT = 9000, 9001

def serve():
    data = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    data.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 and IPv6 on one socket
    data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    data.bind(("::", DATA_PORT))
    data.setblocking(False)
    ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ctl.bind(("127.0.0.1", CTL_PORT))
    counts = {}
    while True:
        ready, _, _ = select.select([data, ctl], [], [])
        while True:  # drain the data socket before answering a query
            try:
                _, addr = data.recvfrom(2048)
            except BlockingIOError:
                break
            src = addr[0].removeprefix("::ffff:")
            counts[src] = counts.get(src, 0) + 1
        if ctl in ready:
            request, peer = ctl.recvfrom(2048)
            words = request.decode().split()
            if words[0] == "reset":
                counts.clear()
                reply = "ok"
            elif words[0] == "count":
                reply = str(counts.get(words[1], 0))
            else:
                reply = json.dumps(counts)
            ctl.sendto(reply.encode(), peer)

def ctl(*words):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(" ".join(words).encode(), ("127.0.0.1", CTL_PORT))
    print(s.recv(65536).decode())

def send(src, dst, count, pps):
    count, interval = int(count), 1.0 / float(pps)
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((src, 0))  # the client address this traffic claims to come from
    start = time.monotonic()
    for i in range(count):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            s.sendto(b"apifilter demo %d" % i, (dst, DATA_PORT))
        except OSError:
            pass  # a full queue: the datagram is simply lost, like on a real link

{"serve": serve, "ctl": ctl, "send": send}[sys.argv[1]](*sys.argv[2:])
PY

server() { ip netns exec "$GW" python3 "$WORK/udp.py" ctl "$@"; }
# send_from SRC COUNT [PPS]: COUNT datagrams from client SRC to the server; print how many arrived.
send_from() {
    local src=$1 count=$2 pps=${3:-500} dst=$SERVER4 got
    [[ $src == *:* ]] && dst=$SERVER6
    server reset >/dev/null
    ip netns exec "$NET" python3 "$WORK/udp.py" send "$src" "$dst" "$count" "$pps"
    sleep 0.3 # let the last datagrams land
    got=$(server count "$src")
    printf '   %-14s sent %5d   received %5d\n' "$src" "$count" "$got"
}

echo "${BOLD}apifilter demo${RESET}: an XDP filter protecting a server, in two network namespaces"
say "binary:    $APIFILTER" "pin dir:   $PIN_DIR" "state dir: $STATE_DIR"

heading "1. Build the network: $GW (the protected server) <-> $NET (the internet)"
ip netns add "$GW"
ip netns add "$NET"
ip link add afd0 address "$GW_MAC" netns "$GW" type veth peer name afd1 address "$NET_MAC" netns "$NET"
ip -n "$GW" addr add "$SERVER4/24" dev afd0
ip -n "$GW" addr add "$SERVER6/64" dev afd0 nodad
ip -n "$NET" addr add 198.18.0.2/24 dev afd1
ip -n "$NET" addr add 2001:db8::2/64 dev afd1 nodad
for client in "$GOOD" "$BAD" "$BAD_RANGE" "$ATTACKER"; do ip -n "$NET" addr add "$client/24" dev afd1; done
ip -n "$NET" addr add "$BAD6/64" dev afd1 nodad
for ns in "$GW" "$NET"; do ip -n "$ns" link set lo up; done
ip -n "$GW" link set afd0 up
ip -n "$NET" link set afd1 up
# Static neighbour entries: ARP and NDP then never depend on which client the filter lets through.
ip -n "$NET" neigh replace "$SERVER4" lladdr "$GW_MAC" dev afd1 nud permanent
ip -n "$NET" neigh replace "$SERVER6" lladdr "$GW_MAC" dev afd1 nud permanent
for client in 198.18.0.2 "$GOOD" "$BAD" "$BAD_RANGE" "$ATTACKER" 2001:db8::2 "$BAD6"; do
    ip -n "$GW" neigh replace "$client" lladdr "$NET_MAC" dev afd0 nud permanent
done
say "veth afd0 ($SERVER4, $SERVER6) <-> afd1 (clients $GOOD, $BAD, $BAD_RANGE, $BAD6)"

heading "2. Start the daemon: apifilter run --config demo.toml"
cat >"$WORK/demo-feed.txt" <<EOF
# demo-feed: sources our detection flagged (empty for now)
EOF
write_config() { # write_config [EXTRA TOML]
    cat >"$WORK/demo.toml" <<EOF
# The daemon attaches the filter, restores state and runs the feed, counters and metrics.
interfaces = ["afd0"]

[[feed]]
name = "demo-feed"
url = "file://$WORK/demo-feed.txt"   # re-read within 2 s of a change

[logging]
counters_interval = "1s"     # kernel counters to the log every second (default 10 s)
drop_events_interval = "2s"  # top dropped sources, from the kernel's sampled drop events

[metrics]
listen = "127.0.0.1:9477"    # Prometheus, on the gateway's loopback

# The TLS inspection proxy in front of the API on 127.0.0.1:8080. Offenders are banned in the
# kernel blocklist (owner "proxy").
[[proxy]]
listen = "$SERVER4:8443"
upstream = "http://127.0.0.1:8080"
access_log = "$WORK/access.log"
[proxy.tls]
certs = [{ cert = "$WORK/api.pem", key = "$WORK/api.key" }]
[proxy.violations]
threshold = 100              # an attack scores 50: the second one bans
ban_ttl = "10m"
${1:-}
EOF
}
# A certificate for the proxy, and a tiny JSON API behind it on the gateway's loopback.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=api.demo.test" -addext "subjectAltName=DNS:api.demo.test,IP:$SERVER4" \
    -keyout "$WORK/api.key" -out "$WORK/api.pem" 2>/dev/null
cat >"$WORK/api.py" <<'PY'
import http.server, json
class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"items": [{"id": 1, "name": "widget"}], "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), Api).serve_forever()
PY
ip netns exec "$GW" python3 "$WORK/api.py" &
PIDS+=("$!")
write_config
sed 's/^/   | /' "$WORK/demo.toml"
af check-config --config "$WORK/demo.toml"
printf '%s   $ apifilter --log-format json run --config demo.toml &%s\n' "$DIM" "$RESET"
"${AF[@]}" --log-format json run --config "$WORK/demo.toml" 2>"$WORK/daemon.log" &
DAEMON=$!
PIDS+=("$DAEMON")
# show_log PATTERN: the daemon's log lines matching PATTERN since the last call, made readable.
LOG_SEEN=0
show_log() {
    python3 - "$WORK/daemon.log" "$LOG_SEEN" "$1" <<'PY'
import json, re, sys
path, seen, pattern = sys.argv[1], int(sys.argv[2]), re.compile(sys.argv[3])
for line in open(path).read().splitlines()[seen:]:
    try:
        rec = json.loads(line)
    except ValueError:
        continue
    fields = rec.get("fields", {})
    msg = fields.pop("message", "")
    if not pattern.search(msg):
        continue
    rest = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"   {rec.get('level', ''):5} {msg:<30} {rest}")
PY
    LOG_SEEN=$(wc -l <"$WORK/daemon.log")
}
wait_log() { # wait_log PATTERN: wait up to 20 s for a daemon log line
    for _ in $(seq 200); do
        if grep -q "$1" "$WORK/daemon.log"; then return 0; fi
        kill -0 "$DAEMON" 2>/dev/null || { cat "$WORK/daemon.log" >&2; return 1; }
        sleep 0.1
    done
    cat "$WORK/daemon.log" >&2
    return 1
}
wait_log "filter attached and state restored"
show_log "attached|restored|metrics"
af status

heading "3. Start a UDP server on port 9000 in $GW; it counts datagrams per source"
ip netns exec "$GW" python3 "$WORK/udp.py" serve &
PIDS+=("$!")
for _ in $(seq 50); do
    if server ping >/dev/null 2>&1; then break; fi
    sleep 0.1
done
server ping >/dev/null # fails the demo if the server never came up
say "listening on [::]:9000 (IPv4 and IPv6)"

heading "4. No rules yet: every client gets through"
for client in "$GOOD" "$BAD" "$BAD_RANGE" "$BAD6"; do send_from "$client" 50; done

heading "5. The sample feed gets entries; the daemon applies them as a diff"
cat >"$WORK/demo-feed.txt" <<EOF
# demo-feed: sources our detection flagged
$BAD            # a single abusive host
198.18.0.192/26        # a whole abusive range (covers $BAD_RANGE)
$BAD6           # an IPv6 host
EOF
sed 's/^/   | /' "$WORK/demo-feed.txt"
for _ in $(seq 100); do
    if "${AF[@]}" list --blocked | grep -q "$BAD6"; then break; fi
    sleep 0.1
done
show_log "feed"
af list

heading "6. Same traffic again: the blocked sources are dropped in XDP, before the kernel's stack"
for client in "$GOOD" "$BAD" "$BAD_RANGE" "$BAD6"; do send_from "$client" 50; done

heading "7. Add a rate limit to the config and reload it (SIGHUP): 100 packets/s, burst 20 per source"
write_config $'\n[ratelimit]\npps = 100\nburst = 20'
af check-config --config "$WORK/demo.toml"
kill -HUP "$DAEMON"
wait_log "config reloaded"
show_log "reload"
af ratelimit show
say "flood from $GOOD: 2000 packets/s for 2 s; expect about 20 + 2 x 100 = 220 through"
send_from "$GOOD" 4000 2000

heading "8. The daemon streams the kernel's counters, and the sources it drops, to its log"
say "sending 300 packets/s from $GOOD (rate limited) and from $BAD (blocked) for 3 s ..."
show_log "^$" # skip what came before
ip netns exec "$NET" python3 "$WORK/udp.py" send "$GOOD" "$SERVER4" 900 300 &
sender_pid=$!
ip netns exec "$NET" python3 "$WORK/udp.py" send "$BAD" "$SERVER4" 900 300
wait "$sender_pid"
sleep 2.2
show_log "counters|dropped source|jumped"
say "the same counters for Prometheus:"
printf '%s   $ curl -s http://127.0.0.1:9477/metrics | grep kernel_packets%s\n' "$DIM" "$RESET"
nsenter "--net=/run/netns/$GW" curl -s http://127.0.0.1:9477/metrics |
    grep '^apifilter_kernel_packets_total{iface="afd0"' | grep -v ' 0$' | sed 's/^/   /'

heading "9. A temporary ban from the CLI, next to the running daemon: block $GOOD for 5 s"
af block "$GOOD" --ttl 5s --comment "demo"
af list --blocked
send_from "$GOOD" 20 50
say "waiting 6 s; the kernel lifts it on its own (its expiry is on the boot-time clock) ..."
sleep 6
send_from "$GOOD" 20 50

heading "10. Monitor mode: nothing is dropped, but what would have been is counted"
af mode monitor
send_from "$BAD" 50
af stats
af mode enforce

heading "11. Restart the daemon: SIGTERM leaves the filter attached and enforcing"
kill -TERM "$DAEMON"
wait "$DAEMON" || true
show_log "stopping"
say "no daemon runs now:"
send_from "$BAD" 50
send_from "$GOOD" 20 50
printf '%s   $ apifilter --log-format json run --config demo.toml &%s\n' "$DIM" "$RESET"
"${AF[@]}" --log-format json run --config "$WORK/demo.toml" 2>>"$WORK/daemon.log" &
DAEMON=$!
PIDS+=("$DAEMON")
for _ in $(seq 200); do
    if [[ $(grep -c "filter attached and state restored" "$WORK/daemon.log") -ge 2 ]]; then break; fi
    sleep 0.1
done
show_log "attached|restored"

heading "12. An attack through the TLS proxy ends in a kernel ban"
# https_from SRC URL: one request from client SRC through the proxy; prints the status.
https_from() {
    ip netns exec "$NET" curl -s -o /dev/null -w '%{http_code}' --max-time 3 \
        --interface "$1" --cacert "$WORK/api.pem" --resolve "api.demo.test:8443:$SERVER4" \
        "https://api.demo.test:8443$2" || true
}
say "a legitimate request from $GOOD:"
printf '   GET /api/items?q=blue+widgets               -> %s\n' "$(https_from "$GOOD" '/api/items?q=blue+widgets')"
say "an attacker at $ATTACKER probes the API with SQL injection and path traversal:"
printf "   GET /api/items?q=1'+OR+'1'='1               -> %s\n" "$(https_from "$ATTACKER" "/api/items?q=1'+OR+'1'='1")"
printf '   GET /api/items?file=../../../etc/passwd      -> %s\n' "$(https_from "$ATTACKER" '/api/items?file=..%2f..%2f..%2fetc%2fpasswd')"
for _ in $(seq 50); do
    if "${AF[@]}" list --blocked | grep -q "$ATTACKER"; then break; fi
    sleep 0.1
done
show_log "ban|attack"
af list --blocked
say "the attacker's next connection: its SYNs are dropped by XDP before the kernel sees them"
start=$(date +%s.%N)
code=$(https_from "$ATTACKER" '/api/items')
printf '   GET /api/items from %s -> %s (no answer: timed out after %.1f s)\n' "$ATTACKER" "${code:-000}" "$(echo "$(date +%s.%N) - $start" | bc)"
printf '   GET /api/items from %s    -> %s\n' "$GOOD" "$(https_from "$GOOD" '/api/items')"
say "the proxy's access log, one JSON line per request:"
tail -n 4 "$WORK/access.log" | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print("   ", {k: r.get(k) for k in ("client", "method", "path", "status", "checks", "latency_ms") if k in r} or r)
'

heading "Done"
