#!/usr/bin/env bash
# Proxy throughput and latency: direct vs Outrigger vs HAProxy vs nginx, in one run.
#
#   bench/proxy.sh [SECONDS]      (default 10 s per measurement)
#
# The upstream is nginx answering a 12-byte body (one worker). Each proxy gets one worker
# thread and keeps connections to the upstream alive. CPU pinning: the load generator on CPU 0,
# the proxy and the upstream on CPU 1 (a sidecar shares its pod with the app). HTTP/1.1: wrk,
# 1 thread, 32 connections. HTTP/2 (h2c prior knowledge): h2load, 32 connections, 1 stream each
# (the rate from a run without h2load's per-request log, p50/p99 from a second run with it);
# proxies forward over HTTP/1.1.
# The unix-socket path: a second Outrigger, the same config but listening on a unix socket and
# reaching the upstream (app) at a unix socket, measured with h2load over the unix socket
# (`--base-uri=unix:PATH`; `--h1` for HTTP/1.1) next to the same h2load over 127.0.0.1 to the
# first Outrigger: both hops over UDS vs both over TCP, same generator. RSS is read from /proc
# after each proxy's runs (Outrigger's split into anonymous memory and the binary's file pages).
# The ceiling row, HTTP/1.1 only: HAProxy in `mode tcp` (a byte relay: each client connection
# gets its own upstream connection, bytes copied both ways, no HTTP parsing). It makes the same
# four system calls per request as an HTTP proxy, so its rate bounds what any cut in an HTTP
# proxy's user-space work could reach on this machine; "relay/HAProxy" is that bound's ratio.
# Then bench/proxy-instructions.sh: callgrind instructions per request for Outrigger, HAProxy
# and nginx, and Outrigger's heap allocations per request on its three paths (INSTRUCTIONS=0
# skips it; ALLOC_BIN=path gives it an alloc-count build).
# `OUTRIGGER_BIN=path` measures that binary instead of building (also for the instructions part).
# `HTTP2_SERVER=hyper|outrigger` picks Outrigger's HTTP/2 server (`http2_server`; default
# outrigger, our own, as the listener's default), for the instructions part too.
# Needs: nginx haproxy wrk h2load valgrind curl (Debian: nginx haproxy wrk nghttp2-client valgrind curl).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
secs=${1:-10}
need nginx haproxy wrk h2load taskset curl
build_release

read -r UP UP_H2 NGX NGX_H2 HAP HAP_H2 OUT REL < <(free_ports 8)

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
frontend relay
  mode tcp
  bind 127.0.0.1:$REL
  default_backend r
backend r
  mode tcp
  server s1 127.0.0.1:$UP
EOF
outrigger_config 127.0.0.1:$UP 127.0.0.1:$OUT
outrigger_config "unix:$dir/up.sock" "unix:$dir/in.sock" outrigger-uds

# PID: "VmRSS RssAnon" (KiB) every 0.5 s while PID lives
sample_rss() { while [ -e "/proc/$1" ] && sleep 0.5; do awk '$1 == "VmRSS:" {r = $2} $1 == "RssAnon:" {a = $2} END {print r, a}' "/proc/$1/status" 2>/dev/null; done; }
# FIELD PID... → the sum of FIELD (KiB) in the processes' /proc/PID/status (0 if none is alive)
rss_kib() {
  local k=$1 files=(); shift
  for p in "$@"; do [ -e "/proc/$p/status" ] && files+=("/proc/$p/status"); done
  ((${#files[@]})) || { echo 0; return; }
  awk -v k="$k:" '$1 == k {s += $2} END {print s + 0}' "${files[@]}"
}

start nginx -c "$dir/upstream.conf"; wait_port $UP
start nginx -c "$dir/nginx.conf"; ngx_pid=$!; wait_port $NGX
start haproxy -f "$dir/haproxy.cfg"; hap_pid=$!; wait_port $HAP
start "$bin" run -c "$dir/config/outrigger.yaml"; out_pid=$!; wait_port $OUT
start "$bin" run -c "$dir/config/outrigger-uds.yaml"; wait_http_unix "$dir/in.sock"

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
# h2load → "rps p50_ms p99_ms": the rate from a run without a per-request log (the log costs
# h2load a fifth of its rate, and at these rates the generator's own cost shows in the
# figure), the percentiles from a second run with one (`--log-file`).
h2() {
  local rps; rps=$(H2LOAD_WARMUP=1 h2load_rate h2 "127.0.0.1:$1" "$secs") || true
  rps=${rps%% *}
  taskset -c 0 h2load -c32 -m1 -D"$secs" --log-file="$dir/h2.log" "http://127.0.0.1:$1/" > "$dir/h2.out" 2>&1
  local ok; ok=$(awk '/^status codes:/ { print $3 }' "$dir/h2.out")
  sort -n -k3 "$dir/h2.log" | awk -v rps="$rps" -v ok="$ok" '
    { d[NR] = $3 }
    END { printf "%.0f %.3f %.3f (%s 2xx)\n", rps, d[int(NR * 0.5)] / 1000, d[int(NR * 0.99)] / 1000, ok }'
}

# h2load over HTTP/1.1 or h2c to ADDRESS (127.0.0.1:PORT or unix:PATH) → "rps mean_ms"
h2l() { local r; r=$(H2LOAD_WARMUP=1 h2load_rate "$1" "$2" "$secs") || return 1; echo "${r% *}"; }

declare -A R
for target in direct:$UP:$UP_H2 outrigger:$OUT:$OUT haproxy:$HAP:$HAP_H2 nginx:$NGX:$NGX_H2 relay:$REL:-; do
  IFS=: read -r name p1 p2 <<< "$target"
  # Outrigger's resident set under load: sampled every 0.5 s during its runs (the peak is kept).
  [ "$name" = outrigger ] && { sample_rss $out_pid > "$dir/rss.samples" & sampler=$!; pids+=("$sampler"); }
  R[$name.h1]=$(h1 "$p1")
  if [ "$p2" = - ]; then R[$name.h2]="- - -"; else R[$name.h2]=$(h2 "$p2"); fi
  [ "$name" = outrigger ] && { kill $sampler; wait $sampler 2>/dev/null || true; }
  echo "$name  h1: ${R[$name.h1]}   h2c: ${R[$name.h2]}" >&2
done
# Both hops over TCP vs both over unix sockets, the same generator (h2load), alternating order.
for proto in h1 h2; do
  R[tcp.$proto]=$(h2l $proto 127.0.0.1:$OUT)
  R[uds.$proto]=$(h2l $proto "unix:$dir/in.sock")
  t2=$(h2l $proto 127.0.0.1:$OUT)
  R[tcp.$proto]="$(echo "${R[tcp.$proto]} $t2" | awk '{printf "%.0f %.3f", ($1 + $3) / 2, ($2 + $4) / 2}')"
  echo "$proto over h2load  TCP: ${R[tcp.$proto]}   unix: ${R[uds.$proto]}" >&2
done
R[outrigger.peak]=$(sort -n "$dir/rss.samples" | tail -1)
# The trimmer (main.rs) samples every second and hands back what the load left once the
# process has been quiet for 2 s, at most every 10 s: wait 5 s, then until RSS stops falling.
sleep 5; after=0
for _ in $(seq 10); do
  prev=$(rss_kib VmRSS $out_pid); sleep 1; after=$((after + 1))
  (( $(rss_kib VmRSS $out_pid) < prev )) || break
done
R[outrigger.after]=$((5 + after))
R[outrigger.rss]=$(rss_kib VmRSS $out_pid)
R[outrigger.anon]=$(rss_kib RssAnon $out_pid)
R[outrigger.file]=$(rss_kib RssFile $out_pid)
R[haproxy.rss]=$(rss_kib VmRSS $hap_pid)
# nginx's worker is a child of the master started above (its title is "nginx: worker process")
R[nginx.rss]=$(rss_kib VmRSS $ngx_pid $(cat /proc/$ngx_pid/task/*/children 2>/dev/null))

field() { echo "${R[$1]}" | awk -v f="$2" '{print $f}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

echo
echo "## Proxy benchmark — $(date -u +%Y-%m-%d), ${secs}s per run, $(nproc) cores, $(bin_label)"
echo
for proto in h1 h2; do
  label=$([ $proto = h1 ] && echo "HTTP/1.1 (wrk, 32 connections)" || echo "HTTP/2 h2c (h2load, 32 connections)")
  echo "### $label"
  echo
  echo "| target | req/s | p50 ms | p99 ms | p50 added vs direct ms |"
  echo "|---|---:|---:|---:|---:|"
  for name in direct outrigger haproxy nginx $([ $proto = h1 ] && echo relay); do
    echo "| $([ $name = relay ] && echo "relay (HAProxy \`mode tcp\`: the ceiling)" || echo $name) | $(field $name.$proto 1) | $(field $name.$proto 2) | $(field $name.$proto 3) | $(added "$(field $name.$proto 2)" "$(field direct.$proto 2)") |"
  done
  o=$(field outrigger.$proto 1)
  echo
  echo "Outrigger/HAProxy throughput: **$(ratio "$o" "$(field haproxy.$proto 1)")×**, Outrigger/nginx: **$(ratio "$o" "$(field nginx.$proto 1)")×**"
  [ $proto = h1 ] && { echo; echo "Ceiling: relay/HAProxy **$(ratio "$(field relay.h1 1)" "$(field haproxy.h1 1)")×** (the most a cut in user-space work could give), Outrigger/relay $(ratio "$o" "$(field relay.h1 1)")×"; }
  echo
done
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
echo "Outrigger RSS under load (peak of 0.5 s samples during its runs): $(mib "$(echo "${R[outrigger.peak]}" | cut -d' ' -f1)") MiB, of which $(mib "$(echo "${R[outrigger.peak]}" | cut -d' ' -f2)") MiB anonymous"
echo
echo "RSS ${R[outrigger.after]} s after the runs (once it stopped falling): Outrigger $(mib "${R[outrigger.rss]}") MiB ($(mib "${R[outrigger.anon]}") anonymous, $(mib "${R[outrigger.file]}") the binary's file pages), HAProxy $(awk -v k="${R[haproxy.rss]}" 'BEGIN{printf "%.1f", k/1024}') MiB, nginx (master + worker) $(awk -v k="${R[nginx.rss]}" 'BEGIN{printf "%.1f", k/1024}') MiB"
echo
echo "### App<->sidecar over unix sockets vs loopback TCP (both hops, h2load, 32 connections)"
echo
echo "| path | HTTP/1.1 req/s | mean ms | h2c req/s | mean ms |"
echo "|---|---:|---:|---:|---:|"
echo "| TCP 127.0.0.1 (mean of the runs before and after unix) | $(field tcp.h1 1) | $(field tcp.h1 2) | $(field tcp.h2 1) | $(field tcp.h2 2) |"
echo "| unix socket | $(field uds.h1 1) | $(field uds.h1 2) | $(field uds.h2 1) | $(field uds.h2 2) |"
echo
echo "unix/TCP: HTTP/1.1 **$(ratio "$(field uds.h1 1)" "$(field tcp.h1 1)")×**, h2c **$(ratio "$(field uds.h2 1)" "$(field tcp.h2 1)")×**"
echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "${INSTRUCTIONS:-1}" != 0 ]; then
  bench_cleanup; pids=()
  echo
  OUTRIGGER_BIN=$bin bench/proxy-instructions.sh "${N:-4000}"
fi
