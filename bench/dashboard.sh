#!/usr/bin/env bash
# What the admin dashboard costs: two instances of the same build behind the same upstream,
# one nobody looks at (`quiet`), one whose GET /status is polled once a second as the open page
# does (`watched`: its history sampler runs).
#
#   bench/dashboard.sh [ROUNDS] [SECONDS]      (default 4 rounds of 5 s)
#
# 1. idle: CPU time (utime+stime from /proc) of each over 20 s without traffic, and RSS;
# 2. throughput: wrk -t1 -c32 against each in rotating order, the poller still running;
# 3. RSS of each after the runs (the watched one's ring holds the samples taken so far).
# Upstream: nginx (one worker) answering 12 bytes; wrk and the poller on CPU 0, the rest on CPU 1.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
rounds=${1:-4}; secs=${2:-5}
need nginx wrk taskset curl bc
build_release
read -r UP QUIET WATCHED < <(free_ports 3)
conf() { printf 'admin: { address: 127.0.0.1:%s }\nlisteners:\n  - name: egress\n    address: 127.0.0.1:%s\n    direction: outbound\n    routes:\n      - name: api\n        match: { path_prefix: / }\n        cluster: up\nclusters:\n  up:\n    endpoints: [127.0.0.1:%s]\n' "$(( $1 + 100 ))" "$1" "$UP"; }
conf $QUIET > "$dir/quiet.yaml"; conf $WATCHED > "$dir/watched.yaml"
start nginx -c "$(nginx_upstream $UP)"
declare -A pid port=([quiet]=$QUIET [watched]=$WATCHED)
for v in quiet watched; do
  start "$bin" run -c "$dir/$v.yaml" 2>"$dir/$v.err" >/dev/null; pid[$v]=$!
done
for p in $QUIET $WATCHED; do wait_http "http://127.0.0.1:$(( p + 100 ))/ready"; done
# Some traffic first, so the watched instance's /status has routes and latency to show.
for v in quiet watched; do taskset -c 0 wrk -t1 -c8 -d1s "http://127.0.0.1:${port[$v]}/" >/dev/null; done
taskset -c 0 bash -c "while :; do curl -s -o /dev/null http://127.0.0.1:$(( WATCHED + 100 ))/status; sleep 1; done" & pids+=($!)
sleep 2
tck=$(getconf CLK_TCK)
cpu() { awk -v t="$tck" '{print ($14 + $15) / t}' "/proc/$1/stat"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
declare -A c0
for v in quiet watched; do c0[$v]=$(cpu "${pid[$v]}"); done
echo "rss before (KiB): quiet $(rss "${pid[quiet]}"), watched $(rss "${pid[watched]}")"
sleep 20
for v in quiet watched; do
  used=$(echo "$(cpu "${pid[$v]}") - ${c0[$v]}" | bc -l)
  printf 'idle %-8s CPU %.2f ms per second (20 s, no traffic)\n' "$v" "$(echo "$used * 1000 / 20" | bc -l)"
done
declare -A sum=([quiet]=0 [watched]=0)
run() { taskset -c 0 wrk -t1 -c32 -d"${secs}s" "http://127.0.0.1:$1/" | awk '/Requests\/sec/ {print $2}'; }
orders=("quiet watched" "watched quiet")
for r in $(seq "$rounds"); do
  line="round $r:"
  for v in ${orders[$(( (r - 1) % 2 ))]}; do
    x=$(run "${port[$v]}"); sum[$v]=$(echo "${sum[$v]} + $x" | bc); line="$line $v $x"
  done
  echo "$line req/s"
done
echo "watched/quiet: $(echo "scale=3; ${sum[watched]} / ${sum[quiet]}" | bc)×"
echo "rss after (KiB): quiet $(rss "${pid[quiet]}"), watched $(rss "${pid[watched]}")"
echo "samples in the watched ring: $(curl -s "http://127.0.0.1:$(( WATCHED + 100 ))/status" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["history"]["t"]))')"
echo "/status size (bytes): $(curl -s "http://127.0.0.1:$(( WATCHED + 100 ))/status" | wc -c)"
t=0; for _ in $(seq 20); do x=$(curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:$(( WATCHED + 100 ))/status"); t=$(echo "$t + $x" | bc -l); done
printf '/status answer time: %.2f ms (mean of 20, curl time_total)\n' "$(echo "$t * 1000 / 20" | bc -l)"
