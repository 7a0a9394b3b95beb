#!/usr/bin/env bash
# User-space instructions per proxied keep-alive HTTP/1.1 request, counted by valgrind
# (callgrind) for Outrigger, HAProxy and nginx in one run, and Outrigger's heap allocations per
# request (a bench build with a counting global allocator) on its three paths.
#
#   bench/proxy-instructions.sh [N]      (default 4000 requests)
#   ALLOCS_ONLY=1 ALLOC_BIN=target/debug/outrigger bench/proxy-instructions.sh 20000
#
# Each proxy runs under callgrind twice, serving N/2 and then 3N/2 keep-alive GETs over 4
# connections (python's http.client, 4 threads); the difference of the two totals over N is one
# request's work without start-up and shutdown. Same upstream for all (nginx, 12-byte body,
# not under valgrind), each proxy one worker with keep-alive to it; nginx runs with
# `master_process off` so that its one process is the worker.
#
# Allocations: `cargo build --features alloc-count` (a debug build: allocations hardly depend on
# the optimisation level; one exception, tokio boxes a spawned future larger than 2 KiB in debug
# builds but 16 KiB in release, which touches the h2c count) counts every heap allocation in
# `outrigger_heap_allocations_total` (`src/counting_alloc.rs`). After a warm-up, the counter is read, N/2 requests sent on 4 new
# connections, read again, 3N/2 requests on 4 new connections, read again: the difference of
# the two steps over N is one request's allocations in steady state (the connections' set-up
# and the `/metrics` scrapes cancel out). Three kinds of request: a keep-alive GET (the HTTP/1
# fast path), a POST with a 5-byte body (hyper's HTTP/1 server and the raw upstream exchange
# until 8a23d7b; since then the fast path takes small bodies itself), and an h2c GET (h2load, the listener's HTTP/2 server, see HTTP2_SERVER);
# then a keep-alive GET and an h2c GET of `/index.html`, which nginx answers chunked (the
# same 12 bytes through `sub_filter`, which drops the length: one 12-byte chunk and the last
# chunk): the fast path passes the chunks on as they came, the h2c path decodes them
# (`RawBody`, src/proxy/cluster/raw_exchange.rs). `/index.html`, not a path of its own: it is
# in HPACK's static table, as `/` is, so h2load sends it as one index; any other path comes
# as a Huffman-coded literal in every request (h2load does not index `:path`), and decoding
# that costs allocations of its own, which the last row counts: an h2c GET of `/hello`
# (answered as `/`, fixed length).
# `OUTRIGGER_BIN=path` uses that binary for the callgrind part instead of building;
# `ALLOCS_ONLY=1` skips the callgrind part; `PROXIES="outrigger"` counts only those proxies;
# `CG_METHOD=POST` makes the callgrind load POSTs with a 5-byte body (Outrigger: hyper's HTTP/1
# server instead of the fast path before 8a23d7b); `CG_PROTO=h2` makes it h2c GETs (h2load, 4 connections, one
# stream in flight each; Outrigger: its HTTP/2 server (HTTP2_SERVER), HAProxy `bind … proto h2`; nginx is
# left out: 1.22 has no h2c next to HTTP/1.1 on one port), with the same start-up subtraction.
# `HTTP2_SERVER=hyper|outrigger` picks Outrigger's HTTP/2 server (`http2_server`; default
# outrigger, our own, as the listener's default): the h2c figures (CG_PROTO=h2, and the h2c allocations) are its.
# `CG_PATH=/hello` makes the callgrind load ask that path (h2c: not in HPACK's static table, so
# h2load sends it as a Huffman-coded literal in every request; `/` is one index).
# `CG_KEEP=DIR` keeps each callgrind output as DIR/cg.PROXY.REQUESTS (for
# `callgrind_annotate --inclusive=no DIR/cg.outrigger.6000`, say).
# Needs: nginx python3 curl h2load; valgrind and haproxy unless ALLOCS_ONLY=1; cargo unless
# ALLOC_BIN is given.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
n=${1:-4000}
need nginx python3 curl h2load
[ -n "${ALLOCS_ONLY:-}" ] || need valgrind haproxy
[ -n "${ALLOC_BIN:-}" ] || need cargo
[ -n "${ALLOCS_ONLY:-}" ] || build_release
read -r UP P ADMIN < <(free_ports 3)

cat > "$dir/up.conf" <<CONF
worker_processes 1; daemon off; pid $dir/up.pid; error_log /dev/null crit;
events { worker_connections 1024; }
http { access_log off;
  server { listen 127.0.0.1:$UP; keepalive_requests 1000000;
           location / { return 200 "hello world\n"; }
           location = /index.html { sub_filter_types *; sub_filter_once off; sub_filter hello hello;
                               return 200 "hello world\n"; } } }
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
    http2_server: ${HTTP2_SERVER:-outrigger}
CONF
nginx -c "$dir/up.conf" & pids+=($!)
wait_port $UP
# The chunked rows measure a chunked answer only if nginx still gives one.
curl -s -D- -o /dev/null "http://127.0.0.1:$UP/index.html" | grep -qi '^transfer-encoding: chunked' \
  || { echo "the upstream's /index.html is not chunked: the chunked rows would measure something else" >&2; exit 1; }

load() { # REQUESTS [METHOD [PATH]]: keep-alive requests over 4 connections (POST: a 5-byte body)
  python3 - "$P" "$1" "${2:-GET}" "${3:-/}" <<'PY'
import http.client, sys, threading
port, n, method, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
body = b"hello" if method == "POST" else None
def work():
    c = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(n // 4):
        c.request(method, path, body=body); r = c.getresponse(); r.read()
        assert r.status == 200, r.status
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
}
h2c() { local out; out=$(h2load -c4 -m1 -n "$1" "http://127.0.0.1:$P${2:-/}"); grep -q " $1 succeeded" <<< "$out" || { echo "h2load: not all $1 succeeded" >&2; exit 1; }; }
if [ "${CG_PROTO:-h1}" = h2 ]; then
  [ -n "${ALLOCS_ONLY:-}" ] || [ -n "${PROXIES:-}" ] || PROXIES="outrigger haproxy"
  sed -i 's/^  bind 127.0.0.1:\([0-9]*\)$/  bind 127.0.0.1:\1 proto h2/' "$dir/haproxy.cfg"
fi
curl_proto=(); [ "${CG_PROTO:-h1}" = h2 ] && curl_proto=(--http2-prior-knowledge)
wait_up() { for _ in $(seq 300); do curl -sf "${curl_proto[@]}" -o /dev/null "http://127.0.0.1:$P/" && return 0; sleep 0.2; done; echo "proxy never answered"; exit 1; }

count() { # PROXY REQUESTS → total instructions
  case $1 in
    outrigger) valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$bin" run -c "$dir/outrigger.yaml" 2>"$dir/err" >/dev/null & ;;
    haproxy) valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" haproxy -db -f "$dir/haproxy.cfg" 2>"$dir/err" >/dev/null & ;;
    nginx) valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" nginx -c "$dir/nginx.conf" 2>"$dir/err" >/dev/null & ;;
  esac
  local vg=$!
  wait_up
  if [ "${CG_PROTO:-h1}" = h2 ]; then h2c "$2" "${CG_PATH:-/}"; else load "$2" "${CG_METHOD:-GET}" "${CG_PATH:-/}"; fi
  kill -TERM $vg; wait $vg || true
  awk '/Collected :/ {print $4}' "$dir/err"
  if [ -n "${CG_KEEP:-}" ]; then mkdir -p "$CG_KEEP"; cp "$dir/cg.out" "$CG_KEEP/cg.$1.$2"; fi
}

declare -A per
if [ -z "${ALLOCS_ONLY:-}" ]; then
  for p in ${PROXIES:-outrigger haproxy nginx}; do
    a=$(count $p $((n / 2))); b=$(count $p $((3 * n / 2)))
    per[$p]=$(( (b - a) / n ))
    echo "$p: ${per[$p]} instructions per request" >&2
  done
fi

# Heap allocations per request: the counting build, warmed up, then N/2 and 3N/2 requests.
# `ALLOC_BIN=path` uses that (alloc-count) binary instead of building it.
if [ -z "${ALLOC_BIN:-}" ]; then cargo build -q --features alloc-count; fi
"${ALLOC_BIN:-$PWD/target/debug/outrigger}" run -c "$dir/outrigger.yaml" >/dev/null 2>"$dir/alloc.err" & pids+=($!)
wait_up
allocs() { curl -sf "http://127.0.0.1:$ADMIN/metrics" | awk '/^outrigger_heap_allocations_total / {print $2}'; }
declare -A alloc
for kind in fast hyper h2c fast_chunked h2c_chunked h2c_literal; do
  case $kind in
    fast) send() { load "$1" GET; } ;;
    hyper) send() { load "$1" POST; } ;;
    h2c) send() { h2c "$1"; } ;;
    fast_chunked) send() { load "$1" GET /index.html; } ;;
    h2c_chunked) send() { h2c "$1" /index.html; } ;;
    h2c_literal) send() { h2c "$1" /hello; } ;;
  esac
  send 400
  a0=$(allocs); send $((n / 2)); a1=$(allocs); send $((3 * n / 2)); a2=$(allocs)
  alloc[$kind]=$(awk -v a0="$a0" -v a1="$a1" -v a2="$a2" -v n="$n" 'BEGIN { printf "%.2f", ((a2 - a1) - (a1 - a0)) / n }')
  echo "outrigger $kind: ${alloc[$kind]} heap allocations per request (steps $((a1 - a0)), $((a2 - a1)))" >&2
done

if [ -z "${ALLOCS_ONLY:-}" ]; then
  echo
  if [ "${CG_PROTO:-h1}" = h2 ]; then
  echo "### Instructions per proxied h2c GET ${CG_PATH:-/} (callgrind, $n requests, 4 connections, h2load -m1)"
else
  echo "### Instructions per proxied keep-alive HTTP/1.1 ${CG_METHOD:-GET} (callgrind, $n requests, 4 connections)"
fi
  echo
  echo "| proxy | instructions per request | vs nginx |"
  echo "|---|---:|---:|"
  for p in ${PROXIES:-outrigger haproxy nginx}; do
    vs=–; [ -n "${per[nginx]:-}" ] && vs=$(awk -v a="${per[$p]}" -v b="${per[nginx]}" 'BEGIN { printf "%.2f×", a / b }')
    echo "| $p | ${per[$p]} | $vs |"
  done
fi
echo
echo "### Outrigger heap allocations per request (steady state, $n requests, 4 connections, route without header edits)"
echo
echo "| request | path | allocations per request |"
echo "|---|---|---:|"
echo "| keep-alive GET, HTTP/1.1 | fast path | ${alloc[fast]} |"
echo "| keep-alive POST, 5-byte body, HTTP/1.1 | the fast path (small bodies, since 8a23d7b) | ${alloc[hyper]} |"
h2_server="hyper's HTTP/2 server"; [ "${HTTP2_SERVER:-outrigger}" = outrigger ] && h2_server="Outrigger's own HTTP/2 server"
echo "| GET, h2c (h2load) | $h2_server, raw upstream exchange | ${alloc[h2c]} |"
echo "| keep-alive GET, HTTP/1.1, chunked response | fast path (chunks passed on as they came) | ${alloc[fast_chunked]} |"
echo "| GET, h2c (h2load), chunked response | $h2_server, raw upstream exchange (chunks decoded) | ${alloc[h2c_chunked]} |"
echo "| GET, h2c (h2load), \`:path\` a Huffman-coded literal (\`/hello\`) | $h2_server, raw upstream exchange | ${alloc[h2c_literal]} |"
