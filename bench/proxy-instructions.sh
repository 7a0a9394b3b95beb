#!/usr/bin/env bash
# User-space instructions per proxied keep-alive HTTP/1.1 request, counted by valgrind
# (callgrind) for Outrigger, HAProxy and nginx in one run, and Outrigger's heap allocations per
# request (a bench build with a counting global allocator).
#
#   bench/proxy-instructions.sh [N]      (default 4000 requests)
#
# Each proxy runs under callgrind twice, serving N/2 and then 3N/2 keep-alive GETs over 4
# connections (python's http.client, 4 threads); the difference of the two totals over N is one
# request's work without start-up and shutdown. Same upstream for all (nginx, 12-byte body,
# not under valgrind), each proxy one worker with keep-alive to it; nginx runs with
# `master_process off` so that its one process is the worker.
#
# Allocations: `cargo build --features alloc-count` (a debug build: allocations do not depend on
# the optimisation level) counts every heap allocation in `outrigger_heap_allocations_total`;
# the counter is read from the admin endpoint after a warm-up and again after N requests.
# `OUTRIGGER_BIN=path` uses that binary for the callgrind part instead of building.
# Needs: valgrind nginx haproxy python3 curl.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-4000}
for tool in valgrind nginx haproxy python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool"; exit 1; }
done
if [ -z "${OUTRIGGER_BIN:-}" ]; then cargo build --release -q; fi
bin=${OUTRIGGER_BIN:-$PWD/target/release/outrigger}
dir=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
UP=18681; P=18691; ADMIN=18692

cat > "$dir/up.conf" <<CONF
worker_processes 1; daemon off; pid $dir/up.pid; error_log /dev/null crit;
events { worker_connections 1024; }
http { access_log off;
  server { listen 127.0.0.1:$UP; keepalive_requests 1000000;
           location / { return 200 "hello world\n"; } } }
CONF
cat > "$dir/nginx.conf" <<CONF
worker_processes 1; daemon off; master_process off; pid $dir/ngx.pid; error_log /dev/null crit;
events { worker_connections 1024; }
http { access_log off;
  upstream app { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$P; keepalive_requests 1000000;
           location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
cat > "$dir/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 1000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:$P
  default_backend b
backend b
  server s1 127.0.0.1:$UP
CONF
cat > "$dir/outrigger.yaml" <<CONF
admin: { address: 127.0.0.1:$ADMIN }
runtime: { worker_threads: 1 }
log: { level: warn }
app: { address: 127.0.0.1:$UP }
listeners:
  - name: in
    address: 127.0.0.1:$P
CONF
nginx -c "$dir/up.conf" & pids+=($!)

load() { # REQUESTS: keep-alive GETs over 4 connections
  python3 - "$P" "$1" <<'PY'
import http.client, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
def work():
    c = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(n // 4):
        c.request("GET", "/"); r = c.getresponse(); r.read()
        assert r.status == 200, r.status
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
}
wait_up() { for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$P/" && return 0; sleep 0.2; done; echo "proxy never answered"; exit 1; }

count() { # PROXY REQUESTS → total instructions
  case $1 in
    outrigger) valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$bin" run -c "$dir/outrigger.yaml" 2>"$dir/err" >/dev/null & ;;
    haproxy) valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" haproxy -db -f "$dir/haproxy.cfg" 2>"$dir/err" >/dev/null & ;;
    nginx) valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" nginx -c "$dir/nginx.conf" 2>"$dir/err" >/dev/null & ;;
  esac
  local vg=$!
  wait_up
  load "$2"
  kill -TERM $vg; wait $vg || true
  awk '/Collected :/ {print $4}' "$dir/err"
}

declare -A per
for p in outrigger haproxy nginx; do
  a=$(count $p $((n / 2))); b=$(count $p $((3 * n / 2)))
  per[$p]=$(( (b - a) / n ))
  echo "$p: ${per[$p]} instructions per request" >&2
done

# Heap allocations per request: the counting build, warmed up, then N requests.
# `ALLOC_BIN=path` uses that (alloc-count) binary instead of building it.
if [ -z "${ALLOC_BIN:-}" ]; then cargo build -q --features alloc-count; fi
"${ALLOC_BIN:-$PWD/target/debug/outrigger}" run -c "$dir/outrigger.yaml" >/dev/null 2>"$dir/alloc.err" & pids+=($!)
wait_up
allocs() { curl -sf "http://127.0.0.1:$ADMIN/metrics" | awk '/^outrigger_heap_allocations_total / {print $2}'; }
load 400
a=$(allocs); load "$n"; b=$(allocs)
alloc_per=$(awk -v a="$a" -v b="$b" -v n="$n" 'BEGIN { printf "%.2f", (b - a) / n }')
echo "outrigger: $alloc_per heap allocations per request" >&2

echo
echo "### Instructions per proxied keep-alive HTTP/1.1 request (callgrind, $n requests, 4 connections)"
echo
echo "| proxy | instructions per request | vs nginx |"
echo "|---|---:|---:|"
for p in outrigger haproxy nginx; do
  echo "| $p | ${per[$p]} | $(awk -v a="${per[$p]}" -v b="${per[nginx]}" 'BEGIN { printf "%.2f", a / b }')× |"
done
echo
echo "Outrigger heap allocations per request (steady state, no header edits): **$alloc_per**"
