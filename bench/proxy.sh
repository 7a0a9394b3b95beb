#!/usr/bin/env bash
# Proxy throughput and latency: direct vs Outrigger vs HAProxy vs nginx, in one run.
#
#   bench/proxy.sh [SECONDS]      (default 10 s per measurement)
#
# The upstream is nginx answering a 12-byte body (one worker). Each proxy gets one worker
# thread and keeps connections to the upstream alive. CPU pinning: the load generator on CPU 0,
# the proxy and the upstream on CPU 1 (a sidecar shares its pod with the app). HTTP/1.1: wrk,
# 1 thread, 32 connections. HTTP/2 (h2c prior knowledge): h2load, 32 connections, 1 stream each;
# proxies forward over HTTP/1.1. RSS is read from /proc after each proxy's runs.
# The unix-socket path: a second Outrigger, the same config but reaching the upstream (app) at
# a unix socket instead of 127.0.0.1, both in this run: the app<->sidecar hop over UDS vs TCP.
# Then bench/proxy-instructions.sh: callgrind instructions per request for Outrigger, HAProxy
# and nginx, and Outrigger's heap allocations per request (INSTRUCTIONS=0 skips it).
# Needs: nginx haproxy wrk h2load valgrind (Debian: nginx haproxy wrk nghttp2-client valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
for tool in nginx haproxy wrk h2load taskset; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install nginx haproxy wrk nghttp2-client)"; exit 1; }
done
# `OUTRIGGER_BIN=path` measures that binary instead of building (also for the instructions part).
if [ -z "${OUTRIGGER_BIN:-}" ]; then cargo build --release -q; fi
bin=${OUTRIGGER_BIN:-$PWD/target/release/outrigger}
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

UP=18181; UP_H2=18182; NGX=18190; NGX_H2=18191; HAP=18200; HAP_H2=18201; OUT=18210; OUT_UDS=18211

cat > "$dir/upstream.conf" <<EOF
worker_processes 1; daemon off; pid $dir/up.pid; error_log stderr error;
events { worker_connections 8192; }
http { access_log off;
  server { listen 127.0.0.1:$UP; listen 127.0.0.1:$UP_H2 http2; listen unix:$dir/up.sock; keepalive_requests 1000000;
           location / { return 200 "hello world\n"; } } }
EOF
cat > "$dir/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $dir/ngx.pid; error_log stderr error;
events { worker_connections 8192; }
http { access_log off;
  upstream app { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NGX; listen 127.0.0.1:$NGX_H2 http2; keepalive_requests 1000000;
           location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
cat > "$dir/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:$HAP
  bind 127.0.0.1:$HAP_H2 proto h2
  default_backend b
backend b
  server s1 127.0.0.1:$UP
EOF
cat > "$dir/outrigger.yaml" <<EOF
admin: { address: 127.0.0.1:0 }
runtime: { worker_threads: 1 }
log: { level: warn }
app: { address: 127.0.0.1:$UP }
listeners:
  - name: public
    address: 127.0.0.1:$OUT
EOF
sed -e "s|127.0.0.1:$UP|unix:$dir/up.sock|" -e "s|127.0.0.1:$OUT|127.0.0.1:$OUT_UDS|" "$dir/outrigger.yaml" > "$dir/outrigger-uds.yaml"

start() { taskset -c 1 "$@" & pids+=($!); }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened"; exit 1; }
rss_kib() { awk '/VmRSS/ {s += $2} END {print s}' "$@" 2>/dev/null; }

start nginx -c "$dir/upstream.conf"; wait_port $UP
start nginx -c "$dir/nginx.conf"; wait_port $NGX
start haproxy -f "$dir/haproxy.cfg"; hap_pid=$!; wait_port $HAP
start "$bin" run -c "$dir/outrigger.yaml"; out_pid=$!; wait_port $OUT
start "$bin" run -c "$dir/outrigger-uds.yaml"; wait_port $OUT_UDS

# wrk: prints "rps p50_ms p99_ms"
h1() {
  taskset -c 0 wrk -t1 -c32 -d1s "http://127.0.0.1:$1/" >/dev/null   # warm up pools
  taskset -c 0 wrk -t1 -c32 -d"${secs}s" --latency "http://127.0.0.1:$1/" > "$dir/wrk.out"
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    /Non-2xx|Socket errors/ { errs = errs " " $0 }
    END { printf "%.0f %.3f %.3f%s\n", rps, p50, p99, (errs ? " ERR" : "") }' "$dir/wrk.out"
}
# h2load: per-request log → "rps p50_ms p99_ms"
h2() {
  taskset -c 0 h2load -c32 -m1 -D1 "http://127.0.0.1:$1/" >/dev/null 2>&1 || true
  taskset -c 0 h2load -c32 -m1 -D"$secs" --log-file="$dir/h2.log" "http://127.0.0.1:$1/" > "$dir/h2.out" 2>&1
  local rps; rps=$(awk '/finished in/ { for (i = 1; i <= NF; i++) if ($(i+1) ~ /^req\/s/) print $i }' "$dir/h2.out" | tr -d ',')
  local ok; ok=$(awk '/^status codes:/ { print $3 }' "$dir/h2.out")
  sort -n -k3 "$dir/h2.log" | awk -v rps="$rps" -v ok="$ok" '
    { d[NR] = $3 }
    END { printf "%.0f %.3f %.3f (%s 2xx)\n", rps, d[int(NR * 0.5)] / 1000, d[int(NR * 0.99)] / 1000, ok }'
}

declare -A R
for target in direct:$UP:$UP_H2 outrigger:$OUT:$OUT haproxy:$HAP:$HAP_H2 nginx:$NGX:$NGX_H2; do
  IFS=: read -r name p1 p2 <<< "$target"
  R[$name.h1]=$(h1 "$p1")
  R[$name.h2]=$(h2 "$p2")
  echo "$name  h1: ${R[$name.h1]}   h2c: ${R[$name.h2]}" >&2
done
R[outrigger-uds.h1]=$(h1 $OUT_UDS)
R[outrigger-uds.h2]=$(h2 $OUT_UDS)
echo "outrigger-uds  h1: ${R[outrigger-uds.h1]}   h2c: ${R[outrigger-uds.h2]}" >&2
R[outrigger.rss]=$(rss_kib /proc/$out_pid/status)
R[haproxy.rss]=$(rss_kib /proc/$hap_pid/status)
ngx_pids=$(pgrep -f "nginx -c $dir/nginx.conf" || true)
R[nginx.rss]=$(rss_kib $(for p in $ngx_pids; do echo /proc/$p/status; done))

field() { echo "${R[$1]}" | awk -v f="$2" '{print $f}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

echo
echo "## Proxy benchmark — $(date -u +%Y-%m-%d), ${secs}s per run, $(nproc) cores, $(git rev-parse --short HEAD 2>/dev/null)"
echo
for proto in h1 h2; do
  label=$([ $proto = h1 ] && echo "HTTP/1.1 (wrk, 32 connections)" || echo "HTTP/2 h2c (h2load, 32 connections)")
  echo "### $label"
  echo
  echo "| target | req/s | p50 ms | p99 ms | p50 added vs direct ms |"
  echo "|---|---:|---:|---:|---:|"
  for name in direct outrigger haproxy nginx; do
    echo "| $name | $(field $name.$proto 1) | $(field $name.$proto 2) | $(field $name.$proto 3) | $(added "$(field $name.$proto 2)" "$(field direct.$proto 2)") |"
  done
  o=$(field outrigger.$proto 1)
  echo
  echo "Outrigger/HAProxy throughput: **$(ratio "$o" "$(field haproxy.$proto 1)")×**, Outrigger/nginx: **$(ratio "$o" "$(field nginx.$proto 1)")×**"
  echo
done
echo "RSS after the runs: Outrigger $(awk -v k="${R[outrigger.rss]}" 'BEGIN{printf "%.1f", k/1024}') MiB, HAProxy $(awk -v k="${R[haproxy.rss]}" 'BEGIN{printf "%.1f", k/1024}') MiB, nginx (master + worker) $(awk -v k="${R[nginx.rss]}" 'BEGIN{printf "%.1f", k/1024}') MiB"
echo
echo "### App<->sidecar over a unix socket vs loopback TCP (Outrigger to the upstream)"
echo
echo "| path | HTTP/1.1 req/s | h2c req/s |"
echo "|---|---:|---:|"
echo "| TCP 127.0.0.1 | $(field outrigger.h1 1) | $(field outrigger.h2 1) |"
echo "| unix socket | $(field outrigger-uds.h1 1) | $(field outrigger-uds.h2 1) |"
echo
echo "unix/TCP: HTTP/1.1 **$(ratio "$(field outrigger-uds.h1 1)" "$(field outrigger.h1 1)")×**, h2c **$(ratio "$(field outrigger-uds.h2 1)" "$(field outrigger.h2 1)")×**"
if [ "${INSTRUCTIONS:-1}" != 0 ]; then
  cleanup; trap - EXIT
  echo
  OUTRIGGER_BIN=$bin bench/proxy-instructions.sh "${N:-4000}"
fi
