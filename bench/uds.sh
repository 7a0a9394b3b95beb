#!/usr/bin/env bash
# App<->sidecar over unix sockets vs loopback TCP, both hops: client -> Outrigger (a unix
# listener vs 127.0.0.1) -> app (nginx on a unix socket vs 127.0.0.1), measured with
# bench/uds-load.rs (HTTP/1.1 keep-alive, 32 connections; wrk and h2load have no unix-socket
# mode). Its TCP figure is checked against wrk's on the direct path (the generator must not be
# the bottleneck). Alternating TCP/unix rounds (ABBA); the load on CPU 0, the proxy and nginx
# on CPU 1.
#
#   bench/uds.sh [ROUNDS] [SECONDS]      (default 4 rounds of 5 s)
#
# `OUTRIGGER_BIN=path` measures that binary instead of target/release/outrigger.
# Needs: nginx wrk rustc taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-4}; secs=${2:-5}
bin=${OUTRIGGER_BIN:-$PWD/target/release/outrigger}
dir=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
rustc --edition 2024 -O bench/uds-load.rs -o "$dir/uds-load"
UP=18781; TCP=18791
cat > "$dir/up.conf" <<CONF
worker_processes 1; daemon off; pid $dir/up.pid; error_log /dev/null crit;
events { worker_connections 8192; }
http { access_log off;
  server { listen 127.0.0.1:$UP; listen unix:$dir/app.sock; keepalive_requests 1000000;
           location / { return 200 "hello world\n"; } } }
CONF
printf 'admin: { address: 127.0.0.1:0 }\nruntime: { worker_threads: 1 }\nlog: { level: warn }\napp: { address: 127.0.0.1:%s }\nlisteners:\n  - name: in\n    address: 127.0.0.1:%s\n' $UP $TCP > "$dir/tcp.yaml"
printf 'admin: { address: 127.0.0.1:0 }\nruntime: { worker_threads: 1 }\nlog: { level: warn }\napp: { address: "unix:%s/app.sock" }\nlisteners:\n  - name: in\n    address: "unix:%s/in.sock"\n' "$dir" "$dir" > "$dir/uds.yaml"
taskset -c 1 nginx -c "$dir/up.conf" & pids+=($!)
taskset -c 1 "$bin" run -c "$dir/tcp.yaml" 2>/dev/null & pids+=($!)
taskset -c 1 "$bin" run -c "$dir/uds.yaml" 2>/dev/null & pids+=($!)
for _ in $(seq 100); do [ -S "$dir/in.sock" ] && [ -S "$dir/app.sock" ] && curl -sf -o /dev/null "http://127.0.0.1:$TCP/" && break; sleep 0.1; done
load() { taskset -c 0 "$dir/uds-load" "$1" 32 "$secs"; }
echo "direct, TCP: wrk $(taskset -c 0 wrk -t1 -c32 -d"${secs}s" "http://127.0.0.1:$UP/" | awk '/Requests\/sec/ {print $2}') req/s, uds-load $(load 127.0.0.1:$UP | awk '{print $1}') req/s"
echo "through Outrigger, TCP: wrk $(taskset -c 0 wrk -t1 -c32 -d"${secs}s" "http://127.0.0.1:$TCP/" | awk '/Requests\/sec/ {print $2}') req/s, uds-load $(load 127.0.0.1:$TCP | awk '{print $1}') req/s"
sum_t=0; sum_u=0
for r in $(seq "$rounds"); do
  if (( r % 2 )); then t=$(load 127.0.0.1:$TCP); u=$(load "unix:$dir/in.sock"); else u=$(load "unix:$dir/in.sock"); t=$(load 127.0.0.1:$TCP); fi
  echo "round $r: TCP $t, unix $u   (req/s p50_ms p99_ms)"
  sum_t=$(echo "$sum_t + ${t%% *}" | bc); sum_u=$(echo "$sum_u + ${u%% *}" | bc)
done
echo "unix/TCP through Outrigger, both hops: $(echo "scale=2; $sum_u / $sum_t" | bc)×"
