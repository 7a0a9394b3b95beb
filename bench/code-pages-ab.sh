#!/usr/bin/env bash
# What releasing the code pages (src/memory.rs) costs in the steady state: page faults and
# throughput, OUTRIGGER_CODE_PAGES=keep against =unmap (or any two modes: MODES="keep drop"),
# same binary, alternating which goes first in each round.
#
#   bench/code-pages-ab.sh [ROUNDS] [SECONDS]     (default 3 rounds, 5 s per load)
#   OUTRIGGER_BIN=path bench/code-pages-ab.sh
#
# Per round and mode: a fresh Outrigger (`runtime.worker_threads: 1`, one listener; its app
# nginx, 12-byte body) on CPU 1, the load from CPU 0. 3 s after it is ready (the release runs
# 2 s after start): `wrk -t1 -c32` for SECONDS, then 5 s idle (the trimmer's 2 quiet seconds:
# it unmaps again), then `h2load -c32 -m1` for SECONDS. For each load: req/s, and the minor
# and major page faults the process took during it (/proc/PID/stat fields 10 and 12), also
# per 1000 requests. Needs: nginx wrk h2load taskset curl.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
rounds=${1:-3}; secs=${2:-5}
read -r -a modes <<< "${MODES:-keep unmap}"
need nginx wrk h2load taskset curl
build_release
read -r UP OUT < <(free_ports 2)

start nginx -c "$(nginx_upstream $UP)"; wait_port $UP
outrigger_config 127.0.0.1:$UP 127.0.0.1:$OUT

faults() { awk '{print $10, $12}' "/proc/$1/stat"; }
# "minflt majflt" before, after, requests → "min maj (min/1k maj/1k)"
delta() {
  local b=($1) a=($2) n=$3
  awk -v m=$((a[0] - b[0])) -v j=$((a[1] - b[1])) -v n="$n" \
    'BEGIN {printf "%d / %d (%.2f / %.3f per 1k)", m, j, n ? m * 1000 / n : 0, n ? j * 1000 / n : 0}'
}
echo "OUTRIGGER_CODE_PAGES A/B, $(bin_label), ${secs}s loads, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| round | mode | HTTP/1.1 req/s | faults minor / major | h2c req/s | faults minor / major |"
echo "|---|---|---:|---|---:|---|"
for round in $(seq "$rounds"); do
  order=("${modes[@]}"); (( round % 2 )) || order=("${modes[1]}" "${modes[0]}")
  for mode in "${order[@]}"; do
    OUTRIGGER_CODE_PAGES=$mode taskset -c 1 "$bin" run -c "$dir/config/outrigger.yaml" & p=$!; pids+=("$p")
    wait_http "http://127.0.0.1:$OUT/"; sleep 3
    f0=$(faults $p)
    taskset -c 0 wrk -t1 -c32 -d"${secs}s" "http://127.0.0.1:$OUT/" > "$dir/wrk.out"
    f1=$(faults $p)
    sleep 5
    f2=$(faults $p)
    taskset -c 0 h2load -c32 -m1 -D"$secs" "http://127.0.0.1:$OUT/" > "$dir/h2.out" || true
    f3=$(faults $p)
    h1_n=$(awk '/requests in/ {print $1}' "$dir/wrk.out")
    h1_rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$dir/wrk.out")
    h2_n=$(awk '/^requests:/ {print $8}' "$dir/h2.out")
    h2_rps=$(awk '/finished in/ { for (i = 1; i <= NF; i++) if ($(i+1) ~ /^req\/s/) { r = $i; gsub(",", "", r); printf "%.0f", r } }' "$dir/h2.out")
    echo "| $round | $mode | $h1_rps | $(delta "$f0" "$f1" "$h1_n") | $h2_rps | $(delta "$f2" "$f3" "$h2_n") |"
    kill $p; wait $p 2>/dev/null || true
  done
done
echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
