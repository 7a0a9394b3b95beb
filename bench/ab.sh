#!/usr/bin/env bash
# A/B throughput of two Outrigger binaries through the same inbound config, alternating runs so
# that machine noise hits both alike (this box varies ±15% between runs of bench/proxy.sh).
#
#   bench/ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [SECONDS]     (default 4 rounds of 5 s)
#
# e.g. git worktree add /tmp/old <rev> && (cd /tmp/old && cargo build --release) &&
#      bench/ab.sh /tmp/old/target/release/outrigger target/release/outrigger
# Upstream: nginx (one worker) answering 12 bytes; wrk -t1 -c32 on CPU 0, the rest on CPU 1.
# AB_H2=1: the same with h2load (h2c prior knowledge, 32 connections, 1 stream each) instead
# of wrk; the proxies still speak HTTP/1.1 to nginx. Each instance's RSS is printed at the end.
# AB_EXTRA_B: YAML appended to the second instance's config, to compare a feature on vs off
# with the same binary, e.g.
#   AB_EXTRA_B='telemetry: { access_log: { to: /tmp/access.log } }' \
#     bench/ab.sh target/release/outrigger target/release/outrigger
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); rounds=${3:-4}; secs=${4:-5}
. "$(dirname "$0")/lib.sh"
need nginx wrk h2load taskset curl bc
read -r UP A B < <(free_ports 3)
for v in a b; do
  port=$([ $v = a ] && echo $A || echo $B)
  printf 'admin: { address: 127.0.0.1:0 }\napp: { address: 127.0.0.1:%s }\nlisteners:\n  - name: in\n    address: 127.0.0.1:%s\n' "$UP" "$port" > "$dir/$v.yaml"
done
if [ -n "${AB_EXTRA_B:-}" ]; then printf '%s\n' "$AB_EXTRA_B" >> "$dir/b.yaml"; fi
start nginx -c "$(nginx_upstream $UP)"
start "$old" run -c "$dir/a.yaml" 2>/dev/null; pid_a=$!
start "$new" run -c "$dir/b.yaml" 2>/dev/null; pid_b=$!
for port in $A $B; do wait_http "http://127.0.0.1:$port/"; done
sum_a=0; sum_b=0
run() {
  if [ -n "${AB_H2:-}" ]; then
    taskset -c 0 h2load -c32 -m1 -D"$secs" "http://127.0.0.1:$1/" | awk '/^finished in/ {gsub(",", "", $4); print $4}'
  else
    taskset -c 0 wrk -t1 -c32 -d"${secs}s" "http://127.0.0.1:$1/" | awk '/Requests\/sec/ {print $2}'
  fi
}
for r in $(seq "$rounds"); do
  # ABBA order: a drift of the machine during the run does not favour either side.
  if (( r % 2 )); then a=$(run $A); b=$(run $B); else b=$(run $B); a=$(run $A); fi
  echo "round $r: old $a req/s, new $b req/s"
  sum_a=$(echo "$sum_a + $a" | bc); sum_b=$(echo "$sum_b + $b" | bc)
done
echo "new/old: $(echo "scale=3; $sum_b / $sum_a" | bc)×"
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' "/proc/$1/status"; }
echo "RSS after the runs: old $(rss $pid_a), new $(rss $pid_b)"
