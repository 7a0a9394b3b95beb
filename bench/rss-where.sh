#!/usr/bin/env bash
# Where Outrigger's resident memory goes under bench/proxy.sh's load, per mapping.
#
#   OUTRIGGER_BIN=path [HTTP2_SERVER=outrigger] bench/rss-where.sh
#   OLD_LAYOUT=1 bench/rss-where.sh   (bench/proxy.sh's files before lib.sh's outrigger_config:
#                                     the config in the scratch folder itself, and h2load's
#                                     per-request log beside it)
#   EXTRA_ENV=GLIBC_TUNABLES=glibc.malloc.arena_max=1 bench/rss-where.sh   (env for Outrigger)
#
# One Outrigger (lib.sh's outrigger_config: one worker, one listener) and its app (nginx,
# 12-byte body) on CPU 1, the load from CPU 0, in bench/proxy.sh's order for Outrigger: 4 s
# after readiness (the code pages are released at 2 s), wrk -t1 -c32 1 s then 5 s, h2load -c32
# -m1 1 s, 5 s, then 5 s with a per-request log (--log-file). VmRSS / RssAnon / RssFile sampled
# every 0.5 s (the peak is printed, as bench/proxy.sh's); after 4 s of each measured run, per
# mapping (permissions and file name; [anon] is every anonymous mapping but the heap and the
# main stack): resident KiB, of it anonymous, and Referenced (the pages touched since the
# /proc/PID/clear_refs written before that run: what the run really uses); the threads. At the
# end: the binary's resident file pages by page-cache folio size (bench/folios.py: pagemap and
# /proc/kpageflags, root only). Needs: nginx wrk h2load taskset curl python3.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need nginx wrk h2load taskset curl python3
build_release
read -r UP OUT < <(free_ports 2)
start nginx -c "$(nginx_upstream $UP)"; wait_port $UP
outrigger_config 127.0.0.1:$UP 127.0.0.1:$OUT
conf=$dir/config/outrigger.yaml; logdir=$dir/gen; mkdir -p "$logdir"
if [ -n "${OLD_LAYOUT:-}" ]; then cp "$conf" "$dir/outrigger.yaml"; conf=$dir/outrigger.yaml; logdir=$dir; fi
start env ${EXTRA_ENV:-} "$bin" run -c "$conf"; p=$!; wait_port $OUT

probe() { # LABEL
  awk -v label="$1" '
    /^[0-9a-f]+-[0-9a-f]+ / { path = $6; n = split(path, parts, "/"); key = $2 " " (path == "" ? "[anon]" : parts[n]); next }
    $1 == "Rss:" { rss[key] += $2 } $1 == "Anonymous:" { anon[key] += $2 } $1 == "Referenced:" { ref[key] += $2 }
    END { printf "%s, KiB resident / anonymous / referenced:\n", label
          for (k in rss) if (rss[k] > 0) printf "  %-36s %6d %6d %6d\n", k, rss[k], anon[k], ref[k] | "sort -k3 -rn"
          close("sort -k3 -rn") }' "/proc/$p/smaps"
  echo "  $(grep -E 'VmRSS|RssAnon|RssFile|Threads' "/proc/$p/status" | tr -s ' \t' ' ' | paste -sd' ')"
  echo "  threads, minor faults so far: $(for t in /proc/$p/task/*; do echo "$(cat $t/comm) $(sed 's/.*) //' $t/stat | cut -d' ' -f8)"; done | paste -sd,)"
}
# RUN_CMD...: clear the referenced bits, run in the background, probe after 4 s, wait
measured() { local label=$1; shift; echo 1 > "/proc/$p/clear_refs"; "$@" >/dev/null 2>&1 & local w=$!; sleep 4; probe "$label"; wait $w || true; }

sleep 4; probe "idle, 4 s after readiness"
while [ -e "/proc/$p" ] && sleep 0.5; do
  awk '$1 == "VmRSS:" {r = $2} $1 == "RssAnon:" {a = $2} $1 == "RssFile:" {f = $2} END {print r, a, f}' "/proc/$p/status" 2>/dev/null
done > "$dir/samples" & pids+=($!)
taskset -c 0 wrk -t1 -c32 -d1s "http://127.0.0.1:$OUT/" >/dev/null
measured "under HTTP/1.1 load (wrk)" taskset -c 0 wrk -t1 -c32 -d5s "http://127.0.0.1:$OUT/"
taskset -c 0 h2load -c32 -m1 -D1 "http://127.0.0.1:$OUT/" >/dev/null
measured "under h2c load (h2load)" taskset -c 0 h2load -c32 -m1 -D5 "http://127.0.0.1:$OUT/"
measured "under h2c load with h2load's per-request log in $([ "$logdir" = "$dir" ] && echo "the config's folder" || echo "another folder")" \
  taskset -c 0 h2load -c32 -m1 -D5 --log-file="$logdir/h2.log" "http://127.0.0.1:$OUT/"
echo "peak of the 0.5 s samples, KiB VmRSS / anonymous / file: $(sort -n "$dir/samples" | tail -1 | tr ' ' /)"
python3 bench/folios.py "$p" || true
echo "$(bin_label), load average $(cut -d' ' -f1-3 /proc/loadavg)"
