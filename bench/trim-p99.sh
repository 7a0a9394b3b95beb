#!/usr/bin/env bash
# p99 under h2c load with the malloc trimmer on vs off (same binary, same run), and optionally a
# third binary (e.g. one with the earlier once-a-second trimmer), alternating runs.
#
#   bench/trim-p99.sh BINARY [OTHER_BINARY] [ROUNDS] [SECONDS]     (default 2 rounds of 10 s)
#
# Upstream: nginx (one worker) answering 12 bytes; h2load -c32 -m1 (h2c prior knowledge) on
# CPU 0, the rest on CPU 1. Latency percentiles from h2load's per-request log; RSS at the end.
set -euo pipefail
bin=$1; other=${2:-}; rounds=${3:-2}; secs=${4:-10}
dir=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
UP=18481; ON=18491; OFF=18492; OTHER=18493
cat > "$dir/up.conf" <<CONF
worker_processes 1; daemon off; pid $dir/up.pid; error_log /dev/null crit;
events { worker_connections 8192; }
http { access_log off;
  server { listen 127.0.0.1:$UP; keepalive_requests 1000000;
           location / { return 200 "hello world\n"; } } }
CONF
for port in $ON $OFF $OTHER; do
  printf 'admin: { address: 127.0.0.1:0 }\napp: { address: 127.0.0.1:%s }\nlisteners:\n  - name: in\n    address: 127.0.0.1:%s\n' "$UP" "$port" > "$dir/$port.yaml"
done
taskset -c 1 nginx -c "$dir/up.conf" & pids+=($!)
taskset -c 1 "$bin" run -c "$dir/$ON.yaml" 2>/dev/null & pids+=($!); declare -A pid; pid[$ON]=$!
OUTRIGGER_MALLOC_TRIM=off taskset -c 1 "$bin" run -c "$dir/$OFF.yaml" 2>/dev/null & pids+=($!); pid[$OFF]=$!
ports=($ON $OFF)
if [ -n "$other" ]; then
  taskset -c 1 "$other" run -c "$dir/$OTHER.yaml" 2>/dev/null & pids+=($!); pid[$OTHER]=$!
  ports+=($OTHER)
fi
for port in "${ports[@]}"; do
  for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done
name() { case $1 in $ON) echo "trimmer on ";; $OFF) echo "trimmer off";; *) echo "other      ";; esac; }
run() {
  local log=$dir/log; rm -f "$log"
  taskset -c 0 h2load -c32 -m1 -D"$secs" --log-file="$log" "http://127.0.0.1:$1/" >"$dir/out"
  local rps; rps=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' "$dir/out")
  # The log's third column is the response time in microseconds.
  sort -n -k3 "$log" | awk -v rps="$rps" '{t[NR]=$3} END {
    printf "%s req/s  p50 %.0f us  p99 %.0f us  p99.9 %.0f us  max %.0f us\n", rps,
      t[int(NR*0.5)], t[int(NR*0.99)], t[int(NR*0.999)], t[NR] }'
}
for r in $(seq "$rounds"); do
  order=("${ports[@]}")
  if (( r % 2 == 0 )); then order=($(printf '%s\n' "${ports[@]}" | tac)); fi
  for port in "${order[@]}"; do echo "round $r: $(name "$port") $(run "$port")"; done
done
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' "/proc/$1/status"; }
sleep 5
for port in "${ports[@]}"; do echo "RSS 5 s after the runs: $(name "$port") $(rss "${pid[$port]}")"; done
