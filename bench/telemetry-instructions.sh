#!/usr/bin/env bash
# Observability cost in CPU instructions per proxied request, counted by valgrind (callgrind):
# repeatable to a fraction of a percent whatever else the machine is doing, unlike req/s.
#
#   bench/telemetry-instructions.sh [N]      (default 4000)
#
# For each setting (off / on / full, as in bench/telemetry.sh) the sidecar runs under callgrind
# twice, serving N/2 and then 3N/2 keep-alive requests (4 connections); the difference of the
# two totals over N is the cost of one request without start-up and shutdown. Upstream: nginx.
# Needs: valgrind nginx python3.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
n=${1:-4000}
need valgrind nginx python3 curl taskset
build_release
read -r UP P < <(free_ports 2)
start nginx -c "$(nginx_upstream $UP 'location /v1/traces { return 200 "{}"; }
           location / { return 200 "hello world\n"; }')"
count() { # SETTING REQUESTS → instructions
  printf 'admin: { address: 127.0.0.1:0 }\nruntime: { worker_threads: 1 }\napp: { address: 127.0.0.1:%s }\nlisteners:\n  - name: in\n    address: 127.0.0.1:%s\n' $UP $P > "$dir/c.yaml"
  case $1 in
    on) printf 'telemetry:\n  access_log: { to: %s/access.log }\n  tracing: { otlp: http://127.0.0.1:%s }\n' "$dir" $UP >> "$dir/c.yaml" ;;
    full) printf 'telemetry:\n  access_log: { to: %s/access.log }\n  tracing: { sample: 1, otlp: http://127.0.0.1:%s }\n' "$dir" $UP >> "$dir/c.yaml" ;;
  esac
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$bin" run -c "$dir/c.yaml" 2>"$dir/err" >/dev/null &
  local vg=$!
  for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$P/" && break; sleep 0.2; done
  python3 - "$P" "$2" <<'PY'
import http.client, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
def work():
    c = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(n // 4):
        c.request("GET", "/"); c.getresponse().read()
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
  sleep 1.5  # one export period, so queued spans are sent inside the count
  kill -TERM $vg; wait $vg || true
  awk '/Collected :/ {print $4}' "$dir/err"
}
declare -A per
for s in off on full; do
  a=$(count $s $((n / 2))); b=$(count $s $((3 * n / 2)))
  per[$s]=$(( (b - a) / n ))
  echo "$s: ${per[$s]} instructions per request"
done
echo "on/off:   $(echo "scale=3; ${per[on]} / ${per[off]}" | bc)×   (access log + 1% of requests exported)"
echo "full/off: $(echo "scale=3; ${per[full]} / ${per[off]}" | bc)×   (access log + every request exported)"
