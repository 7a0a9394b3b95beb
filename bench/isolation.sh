#!/usr/bin/env bash
# Module isolation (issue 19, item 8): does heavy bridge JSON work delay the proxy's requests?
# One sidecar with an inbound listener (to nginx) and the bridge (embedded in-memory state
# store). The proxy's latency is measured by wrk alone, then while 32 clients loop over 4 MiB
# bulk-get answers from the bridge (16 keys × 256 KiB JSON values each). Reports proxied p50/p99
# for each binary given, and the bulk-gets done meanwhile. Loopback only, bounded in time.
#
#   bench/isolation.sh BINARY [BINARY…]     (SECONDS=10 per measurement, CLIENTS=32)
#   ARENAS="1 default" bench/isolation.sh BINARY [BINARY…]
#                      each binary once per value, as OUTRIGGER_MALLOC_ARENA_MAX (main.rs,
#                      one_malloc_arena): an A/B of glibc's arena limit with the same binary;
#                      give the binary several times for several rounds
set -euo pipefail
bins=(); for b in "$@"; do bins+=("$(realpath "$b")"); done
. "$(dirname "$0")/lib.sh"
secs=${SECONDS_EACH:-10}; clients=${CLIENTS:-32}
need nginx wrk python3 curl taskset
read -r UP < <(free_ports 1)
BENCH_CPU=0-1 start nginx -c "$(nginx_upstream $UP "location / { return 200 \"ok\\n\"; }")"

latency() {  # url → "p50 p99" in ms (wrk, 1 thread, 8 connections)
  wrk -t1 -c8 -d"${secs}s" --latency "$1" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    $1=="50%" {p50=ms($2)} $1=="99%" {p99=ms($2)} END {printf "%.2f %.2f", p50, p99}'
}

for bin in "${bins[@]}"; do
for arena in ${ARENAS:-unset}; do
  if [ "$arena" = unset ]; then unset OUTRIGGER_MALLOC_ARENA_MAX; else export OUTRIGGER_MALLOC_ARENA_MAX=$arena; fi
  cat > "$dir/c.yaml" <<YAML
admin: { address: 127.0.0.1:0 }
app: { address: 127.0.0.1:$UP, probe: { enabled: false } }
listeners:
  - { name: public, address: 127.0.0.1:0 }
bridge: { address: 127.0.0.1:0, grpc_address: 127.0.0.1:0 }
YAML
  rm -f "$dir/l.json"
  "$bin" run -c "$dir/c.yaml" --listeners-file "$dir/l.json" 2>"$dir/err" & spid=$!
  for _ in $(seq 1 500); do [ -s "$dir/l.json" ] && break; sleep 0.01; done
  read -r proxy bridge < <(python3 -c "import json;l=json.load(open('$dir/l.json'));print(l['listeners']['public'],l['bridge'])")
  # 16 keys × 256 KiB JSON strings: one bulk get answers 4 MiB.
  python3 - "$bridge" <<'PY'
import json, sys, urllib.request
for i in range(16):
    item = [{"key": f"k{i}", "value": "v" * (256 * 1024)}]
    req = urllib.request.Request(f"http://{sys.argv[1]}/v1.0/state/statestore", data=json.dumps(item).encode(), method="POST", headers={"content-type": "application/json"})
    urllib.request.urlopen(req).read()
PY
  quiet=$(latency "http://$proxy/")
  python3 - "$bridge" "$clients" "$((secs + 2))" > "$dir/load" <<'PY' &
import http.client, json, sys, threading, time
addr, clients, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
host, port = addr.split(":")
body = json.dumps({"keys": [f"k{i}" for i in range(16)]})
done = [0]; end = time.time() + secs
def loop():
    c = http.client.HTTPConnection(host, int(port))
    while time.time() < end:
        c.request("POST", "/v1.0/state/statestore/bulk", body, {"content-type": "application/json"})
        r = c.getresponse(); n = len(r.read())
        assert r.status == 200 and n > 4_000_000, (r.status, n)
        done[0] += 1
ts = [threading.Thread(target=loop) for _ in range(clients)]
[t.start() for t in ts]; [t.join() for t in ts]
print(done[0])
PY
  lpid=$!
  sleep 1
  loaded=$(latency "http://$proxy/")
  wait "$lpid"
  rss=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$spid/status")
  # glibc's arenas other than the main one: anonymous rw mappings at 64 MiB boundaries.
  arenas=$(python3 -c "import sys
n = 0
for l in open('/proc/$spid/maps'):
    f = l.split(); s = int(f[0].split('-')[0], 16)
    n += len(f) == 5 and f[1] == 'rw-p' and s % (64 << 20) == 0
print(n)")
  kill "$spid"; wait "$spid" 2>/dev/null || true
  printf '%s, OUTRIGGER_MALLOC_ARENA_MAX=%s, load average %s\n  proxied p50/p99 quiet: %s ms\n  proxied p50/p99 while %s clients bulk-get 4 MiB: %s ms (%s bulk gets in %ss)\n  peak RSS %s MiB, malloc arenas besides the main one: %s\n' \
    "$bin" "${OUTRIGGER_MALLOC_ARENA_MAX:-(unset)}" "$(cut -d' ' -f1-3 /proc/loadavg)" "$quiet" "$clients" "$loaded" "$(cat "$dir/load")" "$((secs + 2))" "$rss" "$arenas"
done
done
