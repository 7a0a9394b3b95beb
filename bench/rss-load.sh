#!/usr/bin/env bash
# Outrigger's resident memory idle, under HTTP/1.1 load, under h2c load and after the load,
# split into VmRSS, anonymous memory (RssAnon) and file pages (RssFile, mostly the binary's code).
#
#   bench/rss-load.sh [RUNS]          (default 2; a fresh Outrigger per run)
#   OUTRIGGER_BIN=path GLIBC_TUNABLES=glibc.malloc.tcache_count=0 bench/rss-load.sh
#   OUTRIGGER_CODE_PAGES=keep bench/rss-load.sh   (start-up's code pages kept: src/memory.rs)
#   SMAPS=1 bench/rss-load.sh         (also: the resident file pages per mapping, to stderr)
#   HTTP2_SERVER=hyper bench/rss-load.sh   (hyper's HTTP/2 server for the h2c load; default outrigger, our own)
#   HEAPTRACK=40000 bench/rss-load.sh (where the h2c allocations come from, see below)
#
# One Outrigger (`runtime.worker_threads: 1`, one listener) and its app (nginx, 12-byte body)
# on CPU 1, the load from CPU 0. Per run: /proc/PID/status idle; `wrk -t1 -c32` for 4 s, read
# at 3 s; `h2load -c32 -m1` for 4 s, read at 3 s; then after the load, once the trimmer
# (main.rs: 1 s samples, 2 quiet seconds) has run: at least 4 s, then until VmRSS stops
# falling (the seconds are printed); the major page faults of the run (code read back from disk
# after src/memory.rs released it). The figures of docs/BENCHMARKS.md "Where the memory goes".
#
# GLIBC_TUNABLES (read by glibc at exec) is given to Outrigger only, not to nginx or the
# generators. `OUTRIGGER_BIN=path` measures that binary (e.g. a proxy-only build) instead of
# building.
#
# HEAPTRACK=N: instead, Outrigger runs under heaptrack, serves N h2c requests (h2load -c32 -m1
# -n N) and heaptrack_print's summary (the call sites with the most allocation calls, the peak
# of live heap) goes to stdout; divide the call counts by N for a request's share.
# Needs: nginx wrk h2load taskset curl (heaptrack for HEAPTRACK=N).
set -euo pipefail
tunables=${GLIBC_TUNABLES:-}; unset GLIBC_TUNABLES
. "$(dirname "$0")/lib.sh"
runs=${1:-2}
need nginx wrk h2load taskset curl
[ -z "${HEAPTRACK:-}" ] || need heaptrack heaptrack_print
build_release
read -r UP OUT < <(free_ports 2)

start nginx -c "$(nginx_upstream $UP)"; wait_port $UP
outrigger_config 127.0.0.1:$UP 127.0.0.1:$OUT

if [ -n "${HEAPTRACK:-}" ]; then
  taskset -c 1 env ${tunables:+GLIBC_TUNABLES=$tunables} \
    heaptrack -o "$dir/ht" "$bin" run -c "$dir/config/outrigger.yaml" > "$dir/heaptrack.log" 2>&1 &
  ht=$!; pids+=("$ht")
  wait_http "http://127.0.0.1:$OUT/"
  taskset -c 0 h2load -c32 -m1 -n "$HEAPTRACK" "http://127.0.0.1:$OUT/" | grep '^requests:' >&2
  # heaptrack runs Outrigger as a child (next to its interpreter): stop Outrigger only, and
  # heaptrack finishes its file
  for c in $(cat /proc/$ht/task/*/children); do
    [ "$(readlink -f /proc/$c/exe)" = "$(readlink -f "$bin")" ] && kill -TERM "$c"
  done
  wait $ht || true
  heaptrack_print "$dir"/ht.*zst | sed -n '1,/^MOST TEMPORARY ALLOCATIONS/p'
  heaptrack_print "$dir"/ht.*zst | grep -A3 '^total runtime\|^calls to allocation\|^peak heap memory'
  exit 0
fi

# PID → "VmRSS anon file" in MiB
mem() { awk '$1 == "VmRSS:" {r = $2} $1 == "RssAnon:" {a = $2} $1 == "RssFile:" {f = $2}
             END {printf "%.1f %.1f %.1f", r / 1024, a / 1024, f / 1024}' "/proc/$1/status"; }
# PID LABEL → to stderr, with SMAPS=1: Rss (anonymous part) per file mapping, in KiB
smaps() {
  [ -n "${SMAPS:-}" ] || return 0
  awk -v label="$2" '
    /^[0-9a-f]+-[0-9a-f]+ / { key = $2 " " ($6 == "" ? "[anon]" : $6); n = split(key, parts, "/"); key = $2 " " parts[n]; next }
    $1 == "Rss:" { rss[key] += $2 } $1 == "Anonymous:" { anon[key] += $2 }
    END { printf "%s:", label; for (k in rss) if (rss[k] > 0 && k !~ /\[anon\]|\[heap\]|\[stack\]/) printf "  %s %d (%d)", k, rss[k], anon[k]; print "" }' \
    "/proc/$1/smaps" >&2
}
sl() { echo "${1// / / }"; }
rss() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status"; }

echo "Outrigger RSS, MiB as VmRSS / anonymous / file pages; $(basename "$bin") ($(du -h "$bin" | cut -f1)), GLIBC_TUNABLES=${tunables:-(none)}, OUTRIGGER_CODE_PAGES=${OUTRIGGER_CODE_PAGES:-(default)}, $(bin_label)"
echo
echo "| run | idle | under HTTP/1.1 load (req/s) | under h2c load (req/s) | after the load (s) | major faults |"
echo "|---|---|---|---|---|---:|"
for run in $(seq "$runs"); do
  taskset -c 1 env ${tunables:+GLIBC_TUNABLES=$tunables} "$bin" run -c "$dir/config/outrigger.yaml" & p=$!; pids+=("$p")
  wait_http "http://127.0.0.1:$OUT/"
  idle=$(mem $p); smaps $p idle
  taskset -c 0 wrk -t1 -c32 -d4s "http://127.0.0.1:$OUT/" > "$dir/wrk.out" & w=$!
  sleep 3; h1=$(mem $p); smaps $p h1; wait $w
  taskset -c 0 h2load -c32 -m1 -D4 "http://127.0.0.1:$OUT/" > "$dir/h2.out" & w=$!
  sleep 3; h2=$(mem $p); smaps $p h2c; wait $w || true
  sleep 4; after=4
  for _ in $(seq 10); do prev=$(rss $p); sleep 1; after=$((after + 1)); (( $(rss $p) < prev )) || break; done
  h1_rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$dir/wrk.out")
  h2_rps=$(awk '/finished in/ { for (i = 1; i <= NF; i++) if ($(i+1) ~ /^req\/s/) { r = $i; gsub(",", "", r); printf "%.0f", r } }' "$dir/h2.out")
  majflt=$(awk '{print $12}' "/proc/$p/stat")
  echo "| $run | $(sl "$idle") | $(sl "$h1") ($h1_rps) | $(sl "$h2") ($h2_rps) | $(sl "$(mem $p)") ($after) | $majflt |"
  kill $p; wait $p 2>/dev/null || true
done
echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
