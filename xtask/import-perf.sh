#!/usr/bin/env bash
# Bulk-load timing for `apifilter import` (issue 5): a 1M-entry list (900k IPv4 hosts from
# 100.64.0.0/10 and 100k IPv4 prefixes, mostly /16 to /24, some nested) into a filter attached to a
# dummy veth, then two 10k deltas. Table contents only: nothing is ever sent to these addresses.
#
#   sudo xtask/import-perf.sh [path/to/apifilter]     (default: target/release/apifilter)
#
# Prints wall time, CPU time and peak RSS of each step (GNU time), then cleans up.
set -euo pipefail

AF=${1:-$(dirname "$0")/../target/release/apifilter}
AF=$(realpath "$AF")
PIN=/sys/fs/bpf/afperf
STATE=/tmp/afperf
WORK=$(mktemp -d /tmp/afperf-lists.XXXXXX)

cleanup() {
    "$AF" --pin-dir "$PIN" --state-dir "$STATE" detach --all >/dev/null 2>&1 || true
    ip link del afp0 2>/dev/null || true
    rm -rf "$STATE" "$WORK"
}
trap cleanup EXIT
cleanup
mkdir -p "$WORK"

python3 - "$WORK" <<'EOF'
import ipaddress, random, sys
work = sys.argv[1]
rng = random.Random(5)
ip = lambda n: str(ipaddress.IPv4Address(n))
host0 = int(ipaddress.IPv4Address("100.64.0.0"))
hosts = [ip(host0 + i) for i in range(900_000)]
# Prefixes: aligned, disjoint blocks walking up from 20.0.0.0, by length; then some /24s and /20s
# nested inside the /16s and /18s already listed.
mix = [(24, 70_000), (23, 10_000), (22, 8_000), (21, 5_000), (20, 3_500), (19, 1_000),
       (18, 600), (17, 500), (16, 400)]
prefixes, wide, cur = [], [], int(ipaddress.IPv4Address("20.0.0.0"))
for length, n in reversed(mix):
    size = 1 << (32 - length)
    cur = (cur + size - 1) // size * size
    for _ in range(n):
        prefixes.append(f"{ip(cur)}/{length}")
        if length <= 18:
            wide.append((cur, length))
        cur += size
nested = 100_000 - len(prefixes)
for i in range(nested):
    base, length = wide[i % len(wide)]
    inner = 24 if i % 2 else 20
    off = rng.randrange(1 << (inner - length)) << (32 - inner)
    p = f"{ip(base + off)}/{inner}"
    prefixes.append(p)
prefixes = list(dict.fromkeys(prefixes))
entries = hosts + prefixes
rng.shuffle(entries)
open(f"{work}/list.txt", "w").write("\n".join(entries) + "\n")
# The same list with 10k hosts swapped for 10k new ones: 10k adds, 10k releases.
new0 = int(ipaddress.IPv4Address("100.120.0.0"))
swapped = set(hosts[:10_000])
delta = [e for e in entries if e not in swapped] + [ip(new0 + i) for i in range(10_000)]
open(f"{work}/replace.txt", "w").write("\n".join(delta) + "\n")
# 10k hosts for a second source.
other0 = int(ipaddress.IPv4Address("100.121.0.0"))
open(f"{work}/delta.txt", "w").write("\n".join(ip(other0 + i) for i in range(10_000)) + "\n")
print(f"{len(entries)} entries: {len(hosts)} hosts, {len(prefixes)} prefixes", file=sys.stderr)
EOF

ip link add afp0 type veth peer name afp1
ip link set afp0 up
ip link set afp1 up
af() { "$AF" --pin-dir "$PIN" --state-dir "$STATE" "$@"; }
af attach afp0 --mode skb >/dev/null

measure() {
    local label=$1
    shift
    /usr/bin/time -f "$label: wall %e s, cpu %U user + %S sys, max RSS %M KiB" \
        "$AF" --pin-dir "$PIN" --state-dir "$STATE" "$@" >/dev/null
}
measure "import 1M" import "$WORK/list.txt" --source big
measure "10k delta, --replace" import "$WORK/replace.txt" --source big --replace
measure "10k delta, new source" import "$WORK/delta.txt" --source small
af status --json | python3 -c '
import json, sys
maps = json.load(sys.stdin)["maps"]
print("kernel:", ", ".join("%s %d" % (m["name"], m["entries"]) for m in maps if m["entries"]))'
