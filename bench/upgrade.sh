#!/usr/bin/env bash
# Hot restart under load: failed requests while Outrigger is replaced three times, by a hot
# restart (`run --upgrade`) and by a plain stop-and-start, in one run; and how long each
# hand-over takes (from starting the new process to the old one's exit).
#
#   bench/upgrade.sh [SECONDS]      (default 9 s of load per case; replacements at 1/4, 2/4, 3/4)
#
# The upstream is nginx (one worker) answering a 12-byte body; wrk: 1 thread, 32 keep-alive
# connections. Needs: nginx wrk (Debian: nginx wrk).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
secs=${1:-9}
need nginx wrk curl
build_release
# The upgraded process is not our child: find it by its config path.
trap 'pkill -f "$dir/outrigger.yaml" 2>/dev/null || true; bench_cleanup' EXIT

read -r UP LISTEN ADMIN < <(free_ports 3)
cat > "$dir/upstream.conf" <<EOF
worker_processes 1; daemon off; pid $dir/up.pid; error_log stderr error;
events { worker_connections 8192; }
http { access_log off;
  server { listen 127.0.0.1:$UP; keepalive_requests 1000000;
           location / { return 200 "hello world\n"; } } }
EOF
nginx -c "$dir/upstream.conf" -p "$dir" & pids+=($!)
cat > "$dir/outrigger.yaml" <<EOF
admin: { address: 127.0.0.1:$ADMIN }
app: { address: 127.0.0.1:$UP }
listeners: [{ name: in, address: 127.0.0.1:$LISTEN }]
runtime: { shutdown_grace: 10s, upgrade_socket: $dir/upgrade.sock }
EOF
until curl -sf "http://127.0.0.1:$UP/" >/dev/null; do sleep 0.05; done

# Sets $started (not `$(start)`: a command substitution would wait for the child's output).
start() { "$bin" run -c "$dir/outrigger.yaml" "$@" >>"$dir/out.log" 2>&1 & started=$!; }
wait_gone() { while kill -0 "$1" 2>/dev/null; do sleep 0.005; done; }
ms() { date +%s%3N; }

run_case() { # $1: upgrade | restart
  local mode=$1 pid t0 new handovers=()
  start; pid=$started
  until curl -sf "http://127.0.0.1:$LISTEN/" >/dev/null; do sleep 0.02; done
  wrk -t1 -c32 -d"${secs}s" "http://127.0.0.1:$LISTEN/" >"$dir/wrk-$mode.txt" 2>&1 &
  local wrk_pid=$!
  for i in 1 2 3; do
    sleep "$(echo "$secs / 4" | bc -l)"
    t0=$(ms)
    if [ "$mode" = upgrade ]; then
      start --upgrade; new=$started
      wait_gone "$pid"
    else
      kill -TERM "$pid"; wait_gone "$pid"
      start; new=$started
      until curl -s -o /dev/null "http://127.0.0.1:$LISTEN/"; do sleep 0.001; done
    fi
    handovers+=($(( $(ms) - t0 )))
    pid=$new
  done
  wait "$wrk_pid" || true
  kill -TERM "$pid"; wait_gone "$pid"
  local total errors non2xx
  total=$(awk '/requests in/ {print $1}' "$dir/wrk-$mode.txt")
  errors=$(awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}' "$dir/wrk-$mode.txt")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$dir/wrk-$mode.txt")
  printf "%-8s requests %8s  socket errors %5s  non-2xx %5s  replacement ms: %s\n" \
    "$mode" "$total" "${errors:-0}" "${non2xx:-0}" "${handovers[*]}"
}

echo "Outrigger replaced 3 times during ${secs} s of wrk -t1 -c32 (keep-alive), $(git rev-parse --short HEAD)"
run_case upgrade
run_case restart
