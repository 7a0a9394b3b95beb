#!/usr/bin/env bash
# App<->sidecar over unix sockets vs loopback TCP, both hops: client -> Outrigger (a unix
# listener vs 127.0.0.1) -> app (nginx on a unix socket vs 127.0.0.1). The generator is h2load
# (`--base-uri=unix:PATH` reaches a unix socket; `--h1` for HTTP/1.1), 32 keep-alive
# connections, one request in flight on each, the same generator for both paths. Alternating
# TCP/unix rounds (ABBA); the load on CPU 0, the proxy and nginx on CPU 1.
#
# Next to it, the same h2load straight to nginx over TCP and over its unix socket: what the
# socket family alone gives one hop with no proxy in between (the ceiling for the ratio), and
# bench/uds-load.rs (a thread-per-connection std-only generator, the first version of this
# script's) against h2load on the same path, to show what that generator capped.
#
#   bench/uds.sh [ROUNDS] [SECONDS]      (default 4 rounds of 5 s)
#   H2C=1 bench/uds.sh                   (h2c instead of HTTP/1.1 from the client; the
#                                        generator check with uds-load is HTTP/1.1 only and
#                                        left out)
#
# `OUTRIGGER_BIN=path` measures that binary instead of building.
# Needs: nginx h2load taskset curl, and rustc unless H2C=1.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
rounds=${1:-4}; secs=${2:-5}
proto=h1; [ -n "${H2C:-}" ] && proto=h2
need nginx h2load taskset curl
[ $proto = h2 ] || need rustc
build_release
[ $proto = h2 ] || rustc --edition 2024 -O bench/uds-load.rs -o "$dir/uds-load"
read -r UP UP_H2 TCP < <(free_ports 3)
cat > "$dir/up.conf" <<CONF
worker_processes 1; daemon off; pid $dir/up.pid; error_log /dev/null crit;
events { worker_connections 8192; }
http { access_log off;
  server { listen 127.0.0.1:$UP; listen unix:$dir/app.sock; keepalive_requests 1000000;
           location / { return 200 "hello world\n"; } }
  # h2c listeners for the direct line under H2C=1 (Outrigger talks HTTP/1.1 to the app)
  server { listen 127.0.0.1:$UP_H2 http2; listen unix:$dir/app-h2.sock http2; keepalive_requests 1000000;
           location / { return 200 "hello world\n"; } } }
CONF
printf 'admin: { address: 127.0.0.1:0 }\nruntime: { worker_threads: 1 }\nlog: { level: warn }\napp: { address: 127.0.0.1:%s }\nlisteners:\n  - name: in\n    address: 127.0.0.1:%s\n' $UP $TCP > "$dir/tcp.yaml"
printf 'admin: { address: 127.0.0.1:0 }\nruntime: { worker_threads: 1 }\nlog: { level: warn }\napp: { address: "unix:%s/app.sock" }\nlisteners:\n  - name: in\n    address: "unix:%s/in.sock"\n' "$dir" "$dir" > "$dir/uds.yaml"
start nginx -c "$dir/up.conf"
start "$bin" run -c "$dir/tcp.yaml"; tcp_pid=$!
start "$bin" run -c "$dir/uds.yaml"; uds_pid=$!
wait_port $UP; wait_http "http://127.0.0.1:$TCP/"
wait_http_unix "$dir/in.sock"

# ADDRESS (127.0.0.1:PORT or unix:PATH) → "req/s mean_ms succeeded"
load() { h2load_rate $proto "$1" "$secs"; }
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }   # user, system (USER_HZ = 100)
# PID ADDRESS → "req/s mean_ms user_us/req sys_us/req": the proxy's own CPU per request (from
# /proc/PID/stat), which the machine's other load does not change the way it changes req/s.
measure() {
  local a b r; a=$(ticks "$1"); r=$(load "$2") || exit 1; b=$(ticks "$1")
  echo "$a $b $r" | awk '{ n = $7; printf "%s %.3f %.1f %.1f\n", $5, $6, ($3 - $1) * 10000 / n, ($4 - $2) * 10000 / n }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo "$([ $proto = h2 ] && echo h2c || echo HTTP/1.1) from the client, h2load -c32 -m1, ${secs}s per measurement, $(git rev-parse --short HEAD 2>/dev/null)"
if [ $proto = h2 ]; then dt=$(load 127.0.0.1:$UP_H2); du=$(load "unix:$dir/app-h2.sock")
else dt=$(load 127.0.0.1:$UP); du=$(load "unix:$dir/app.sock"); fi
echo "direct to nginx (one hop, no proxy): TCP ${dt%% *}, unix ${du%% *} req/s: $(ratio "${du%% *}" "${dt%% *}")×"
if [ $proto = h1 ]; then
  echo "generator check, through Outrigger over unix: h2load $(load "unix:$dir/in.sock" | awk '{print $1}'), uds-load $(taskset -c 0 "$dir/uds-load" "unix:$dir/in.sock" 32 "$secs" | awk '{print $1}') req/s"
fi
sum_t=0; sum_u=0; cpu_t=0; cpu_u=0
for r in $(seq "$rounds"); do
  if (( r % 2 )); then t=$(measure $tcp_pid 127.0.0.1:$TCP); u=$(measure $uds_pid "unix:$dir/in.sock")
  else u=$(measure $uds_pid "unix:$dir/in.sock"); t=$(measure $tcp_pid 127.0.0.1:$TCP); fi
  echo "round $r: TCP $t, unix $u   (req/s mean_ms, Outrigger's user and system CPU µs per request)"
  read -r tr _ tus tsy <<< "$t"; read -r ur _ uus usy <<< "$u"
  sum_t=$((sum_t + tr)); sum_u=$((sum_u + ur))
  cpu_t=$(awk -v s="$cpu_t" -v a="$tus" -v b="$tsy" 'BEGIN { print s + a + b }')
  cpu_u=$(awk -v s="$cpu_u" -v a="$uus" -v b="$usy" 'BEGIN { print s + a + b }')
done
echo "unix/TCP through Outrigger, both hops: $(ratio $sum_u $sum_t)× req/s; Outrigger's CPU per request TCP/unix $(ratio "$cpu_t" "$cpu_u")×   (load average $(cut -d' ' -f1-3 /proc/loadavg))"
