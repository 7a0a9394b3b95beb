#!/usr/bin/env bash
# Request-body throughput: POSTs of 64 KiB and 1 MiB through direct, Outrigger, HAProxy and
# nginx, in one run.
#
#   bench/upload.sh [SECONDS]      (default 10 s per measurement)
#
# The upstream is nginx answering a 12-byte body to any request (one worker; it reads and drops
# the request body). Each proxy gets one worker thread and keeps connections to the upstream
# alive; nginx streams the body (`proxy_request_buffering off`, as Outrigger, HAProxy and
# hyper do) instead of spooling it first. CPU pinning as in bench/proxy.sh: the load generator
# on CPU 0, the proxy and the upstream on CPU 1. wrk, 1 thread, 16 connections, a Lua script
# that sends the body with every request. A 64 KiB body is read whole before it goes up on
# Outrigger's fast path; a 1 MiB body streams (full duplex).
# `OUTRIGGER_BIN=path` measures that binary instead of building.
# Needs: nginx haproxy wrk curl (Debian: nginx haproxy wrk curl).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
secs=${1:-10}
need nginx haproxy wrk taskset curl
build_release

read -r UP NGX HAP OUT < <(free_ports 4)

start nginx -c "$(nginx_upstream $UP 'location / { return 200 "hello world\n"; }' 'client_max_body_size 0;')"
wait_port $UP
cat > "$dir/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $dir/ngx.pid; error_log stderr error;
events { worker_connections 8192; }
http { access_log off; client_max_body_size 0;
  upstream app { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NGX; keepalive_requests 1000000;
           location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
                        proxy_request_buffering off; } } }
CONF
cat > "$dir/haproxy.cfg" <<CONF
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
  default_backend b
backend b
  server s1 127.0.0.1:$UP
CONF
outrigger_config 127.0.0.1:$UP 127.0.0.1:$OUT
start nginx -c "$dir/nginx.conf"; wait_port $NGX
start haproxy -f "$dir/haproxy.cfg"; wait_port $HAP
start "$bin" run -c "$dir/config/outrigger.yaml"; wait_port $OUT

for size in 65536 1048576; do
  cat > "$dir/post.$size.lua" <<LUA
wrk.method = "POST"
wrk.body = string.rep("x", $size)
wrk.headers["Content-Type"] = "application/octet-stream"
LUA
done

# PORT SIZE → "rps p50_ms p99_ms [ERR]"
post() {
  taskset -c 0 wrk -t1 -c16 -d1s -s "$dir/post.$2.lua" "http://127.0.0.1:$1/" >/dev/null   # warm up pools
  taskset -c 0 wrk -t1 -c16 -d"${secs}s" --latency -s "$dir/post.$2.lua" "http://127.0.0.1:$1/" > "$dir/wrk.out"
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    /Non-2xx|Socket errors/ { errs = errs " " $0 }
    END { printf "%.0f %.3f %.3f%s\n", rps, p50, p99, (errs ? " ERR" : "")
          if (errs) print "wrk:" errs > "/dev/stderr" }' "$dir/wrk.out"
}

declare -A R
for size in 65536 1048576; do
  for target in direct:$UP outrigger:$OUT haproxy:$HAP nginx:$NGX; do
    IFS=: read -r name port <<< "$target"
    R[$name.$size]=$(post "$port" "$size")
    echo "$name $size: ${R[$name.$size]}" >&2
  done
done

field() { echo "${R[$1]}" | awk -v f="$2" '{print $f}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mibs() { awk -v r="$1" -v s="$2" 'BEGIN { printf "%.0f", r * s / 1048576 }'; }

echo
echo "## Upload benchmark — $(date -u +%Y-%m-%d), ${secs}s per run, $(nproc) cores, $(bin_label)"
echo
for size in 65536 1048576; do
  echo "### POST $((size / 1024)) KiB (wrk, 16 connections)"
  echo
  echo "| target | req/s | MiB/s | p50 ms | p99 ms |"
  echo "|---|---:|---:|---:|---:|"
  for name in direct outrigger haproxy nginx; do
    echo "| $name | $(field $name.$size 1) | $(mibs "$(field $name.$size 1)" $size) | $(field $name.$size 2) | $(field $name.$size 3) |$(field $name.$size 4)"
  done
  o=$(field outrigger.$size 1)
  echo
  echo "Outrigger/HAProxy: **$(ratio "$o" "$(field haproxy.$size 1)")×**, Outrigger/nginx: **$(ratio "$o" "$(field nginx.$size 1)")×**, Outrigger/direct: $(ratio "$o" "$(field direct.$size 1)")×"
  echo
done
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
