#!/usr/bin/env bash
# System calls and context switches per proxied request: Outrigger, HAProxy and nginx, the same
# load, the same upstream (bench/proxy.sh's set-up: one worker each, the proxy and the nginx
# upstream pinned to CPU 1, the generator to CPU 0).
#
#   bench/syscalls.sh [REQUESTS] [h1|h2]     (default 20000 requests, HTTP/1.1)
#
# A fixed number of requests (h2load -n, 32 connections, one request in flight each, --h1 for
# HTTP/1.1; the connections are opened inside the count, which is why it is large) while
# `perf stat` counts every `syscalls:sys_enter_*` tracepoint of the proxy's process (all its
# threads), plus the voluntary and involuntary context switches of each of its threads read
# from /proc/PID/task/*/status before and after. Prints per request: every system call type
# seen (even once in the run), the total, the context switches, and which threads ran. Entry
# tracepoints see calls, not results: a read that returns EAGAIN counts as a read (EAGAIN reads
# show only as more reads than the requests need). System time is estimated by the kernel from
# 1/CLK_TCK ticks (utime/stime), the total CPU time (schedstat) is exact. TCP segments are the
# whole machine's (/proc/net/snmp): every hop of the load, and whatever else runs meanwhile.
# Counts do not depend on the machine's speed the way req/s does, but batching does (a slower
# proxy finds more ready sockets per epoll_wait): read them next to each other, same run.
# `OUTRIGGER_BIN=path` measures that binary instead of building. Needs perf with tracepoints.
# `HTTP2_SERVER=hyper|outrigger` picks Outrigger's HTTP/2 server (`http2_server`; default
# outrigger, our own): what the h2 runs measure. `WORKERS=N` gives it N worker threads (default 1).
# `PROXIES="outrigger"` measures only those of outrigger, haproxy and nginx. `PROFILE=1` adds,
# per proxy, a fourth run under `perf record -e cpu-clock -F 4999` (no call graphs: the release
# build has no frame pointers and no debug info) and prints its CPU per request under perf and
# the symbols with ≥ 1 % of the samples (`perf report --no-children --sort dso,symbol`).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
n=${1:-20000}
proto=${2:-h1}
need nginx haproxy h2load taskset curl perf
build_release

read -r UP NGX HAP OUT < <(free_ports 4)
upconf=$(nginx_upstream $UP)
cat > "$dir/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $dir/ngx.pid; error_log stderr error;
events { worker_connections 8192; }
http { access_log off;
  upstream app { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NGX http2; keepalive_requests 1000000;
           location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
# nginx 1.22 has no h2c and HTTP/1.1 on one port: the h1 run uses a plain listener.
[ "$proto" = h1 ] && sed -i "s/ http2;/;/" "$dir/nginx.conf"
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
  bind 127.0.0.1:$HAP $([ "$proto" = h2 ] && echo "proto h2")
  default_backend b
backend b
  server s1 127.0.0.1:$UP
EOF
outrigger_config 127.0.0.1:$UP 127.0.0.1:$OUT

start nginx -c "$upconf"; up_pid=$!; wait_port $UP
start nginx -c "$dir/nginx.conf"; ngx_pid=$!; wait_port $NGX
start haproxy -f "$dir/haproxy.cfg"; hap_pid=$!; wait_port $HAP
start "$bin" run -c "$dir/config/outrigger.yaml"; out_pid=$!; wait_port $OUT
sleep 0.5
# Experiments: BATCH="outrigger haproxy" puts those processes' threads under SCHED_BATCH.
for b in ${BATCH:-}; do
  case $b in outrigger) chrt -a -b -p 0 $out_pid ;; haproxy) chrt -a -b -p 0 $hap_pid ;; esac >/dev/null
done
ngx_worker=$(cat /proc/$ngx_pid/task/*/children | awk '{print $1}')
up_worker=$(cat /proc/$up_pid/task/*/children | awk '{print $1}')

# PID → "ns_on_cpu utime_ticks stime_ticks" of the whole process
cpu() { echo "$(awk '{s += $1} END {print s}' /proc/$1/task/*/schedstat) $(awk '{print $14, $15}' /proc/$1/stat)"; }
# TCP segments sent by the whole machine (every hop: generator, proxy, upstream; loopback)
segs() { awk '$1 == "Tcp:" && $12 ~ /^[0-9]+$/ {print $12}' /proc/net/snmp; }
# PID → "tid name voluntary nonvoluntary" per thread
switches() {
  for t in /proc/$1/task/*; do
    awk -v tid="${t##*/}" '$1 == "Name:" {n = $2} $1 == "voluntary_ctxt_switches:" {v = $2}
      $1 == "nonvoluntary_ctxt_switches:" {i = $2} END {print tid, n, v, i}' "$t/status" 2>/dev/null || true
  done
}

load() {
  local p=(); [ "$proto" = h1 ] && p=(--h1)
  taskset -c 0 h2load "${p[@]}" -c32 -m1 -n"$n" "http://127.0.0.1:$1/" > "$dir/h2load.out" 2>&1
  awk '/^requests:/ { if ($8 != '"$n"') print "  (h2load: " $0 ")" }' "$dir/h2load.out" >&2
}

for target in outrigger:$out_pid:$OUT haproxy:$hap_pid:$HAP nginx:$ngx_worker:$NGX; do
  IFS=: read -r name pid port <<< "$target"
  [[ " ${PROXIES:-outrigger haproxy nginx} " == *" $name "* ]] || continue
  load "$port"   # warm up: the upstream pools, the first-touch pages
  # CPU time and context switches without perf (its tracepoints cost system time)
  switches "$pid" > "$dir/before"
  s0=$(segs); c0=$(cpu "$pid"); u0=$(cpu "$up_worker")
  load "$port"
  c1=$(cpu "$pid"); u1=$(cpu "$up_worker"); s1=$(segs)
  switches "$pid" > "$dir/after"
  rate=$(awk '/^finished in/ {print $4}' "$dir/h2load.out")
  perf stat -x, -e 'syscalls:sys_enter_*' -p "$pid" -o "$dir/perf.$name" &
  perf_pid=$!
  perf stat -x, -e 'syscalls:sys_enter_*' -p "$up_worker" -o "$dir/perf.up" &
  perf_up=$!
  sleep 0.3
  load "$port"
  kill -INT $perf_pid $perf_up; wait $perf_pid $perf_up 2>/dev/null || true
  echo "### $name ($proto, $n requests, 32 connections; Outrigger: $(bin_label))"
  echo
  echo "| per request | |"
  echo "|---|---:|"
  awk -F, -v n="$n" '$3 ~ /^syscalls:sys_enter_/ && $1 + 0 > 0 {
      s = $3; sub("syscalls:sys_enter_", "", s); c[s] = $1; t += $1 }
    END { for (s in c) printf "| %s | %.3f |\n", s, c[s] / n | "sort -t\"|\" -k3 -rn";
          close("sort -t\"|\" -k3 -rn"); printf "| **all system calls** | **%.2f** |\n", t / n }' "$dir/perf.$name"
  join "$dir/before" "$dir/after" | awk -v n="$n" '
    { v = $6 - $3; i = $7 - $4; tv += v; ti += i
      if (v + i > 0) printf "| switches, thread %s (%s) | %.3f voluntary, %.3f involuntary |\n", $1, $2, v / n, i / n }
    END { printf "| **context switches** | **%.3f voluntary, %.3f involuntary** |\n", tv / n, ti / n }'
  echo "$c0 $c1" | awk -v n="$n" -v hz="$(getconf CLK_TCK)" '{printf "| CPU per request | %.2f µs (user %.2f, system %.2f: ticks of 1/%d s) |\n", ($4 - $1) / n / 1000, ($5 - $2) / hz / n * 1e6, ($6 - $3) / hz / n * 1e6, hz}'
  echo "$u0 $u1" | awk -v n="$n" '{printf "| the upstream nginx'"'"'s CPU per request meanwhile | %.2f µs |\n", ($4 - $1) / n / 1000}'
  awk -F, -v n="$n" '$3 ~ /^syscalls:sys_enter_/ && $1 + 0 > 0 { s = $3; sub("syscalls:sys_enter_", "", s); l = l sprintf(" %s %.2f", s, $1 / n); t += $1 }
    END { printf "| the upstream nginx'"'"'s system calls per request | %.2f:%s |\n", t / n, l }' "$dir/perf.up"
  echo "$s0 $s1" | awk -v n="$n" '{printf "| TCP segments per request, all hops (/proc/net/snmp OutSegs, machine-wide) | %.2f |\n", ($2 - $1) / n}'
  echo "| req/s (h2load, no perf) | $rate |"
  echo
  if [ -n "${PROFILE:-}" ]; then
    perf record -q -e cpu-clock -F 4999 -p "$pid" -o "$dir/prof.data" 2>/dev/null &
    prof_pid=$!
    sleep 0.3
    p0=$(cpu "$pid"); load "$port"; p1=$(cpu "$pid")
    kill -INT $prof_pid; wait $prof_pid 2>/dev/null || true
    echo "$p0 $p1" | awk -v n="$n" '{printf "%s: CPU per request under perf record: %.2f µs; symbols, share of all samples:\n\n", "'"$name"'", ($4 - $1) / n / 1000}'
    perf report -i "$dir/prof.data" --no-children --sort dso,symbol --stdio --percent-limit 1 2>/dev/null |
      awk '/^ +[0-9.]+%/ {sub(/[ -]+$/, ""); print "    " $0}'
    echo
  fi
done
echo "Load average: $(cut -d' ' -f1-3 /proc/loadavg)"
