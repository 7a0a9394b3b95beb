#!/usr/bin/env bash
# Observability cost: proxy throughput with telemetry off vs on, same binary, in one run.
#
#   bench/telemetry.sh [ROUNDS] [SECONDS]      (default 4 rounds of 5 s)
#
# Three instances of the same build behind the same upstream, measured in rotating order so
# machine drift hits all alike:
#   off    metrics and trace-context propagation only (they cannot be turned off)
#   on     + access log (JSON, to a file) + span export (OTLP/HTTP) at the default 1% sampling
#   full   + access log + span export of every request (sample: 1)
# The OTLP collector is the upstream nginx (it answers POST /v1/traces with 200), so the
# exporter does its real work: JSON encoding and an HTTP POST per batch.
# Upstream: nginx (one worker) answering 12 bytes; wrk -t1 -c32 on CPU 0, the rest on CPU 1.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
rounds=${1:-4}; secs=${2:-5}
need nginx wrk taskset curl bc
build_release
read -r UP OFF ON FULL < <(free_ports 4)
base() { printf 'admin: { address: 127.0.0.1:%s }\napp: { address: 127.0.0.1:%s }\nlisteners:\n  - name: in\n    address: 127.0.0.1:%s\n' "$(( $1 + 100 ))" "$UP" "$1"; }
base $OFF > "$dir/off.yaml"
{ base $ON; printf 'telemetry:\n  access_log: { to: %s/on.log }\n  tracing: { otlp: http://127.0.0.1:%s }\n' "$dir" "$UP"; } > "$dir/on.yaml"
{ base $FULL; printf 'telemetry:\n  access_log: { to: %s/full.log }\n  tracing: { sample: 1, otlp: http://127.0.0.1:%s }\n' "$dir" "$UP"; } > "$dir/full.yaml"
start nginx -c "$(nginx_upstream $UP 'location /v1/traces { return 200 "{}"; }
           location / { return 200 "hello world\n"; }' 'client_body_buffer_size 1m;')"
for v in off on full; do
  start "$bin" run -c "$dir/$v.yaml" 2>"$dir/$v.err" >/dev/null
done
for port in $OFF $ON $FULL; do wait_http "http://127.0.0.1:$port/"; done
declare -A sum=([off]=0 [on]=0 [full]=0) port=([off]=$OFF [on]=$ON [full]=$FULL)
run() { taskset -c 0 wrk -t1 -c32 -d"${secs}s" "http://127.0.0.1:$1/" | awk '/Requests\/sec/ {print $2}'; }
orders=("off on full" "full on off" "on full off" "off full on")
for r in $(seq "$rounds"); do
  line="round $r:"
  for v in ${orders[$(( (r - 1) % 4 ))]}; do
    x=$(run "${port[$v]}"); sum[$v]=$(echo "${sum[$v]} + $x" | bc); line="$line $v $x"
  done
  echo "$line req/s"
done
echo "on/off:   $(echo "scale=3; ${sum[on]} / ${sum[off]}" | bc)×   (access log + 1% of requests exported)"
echo "full/off: $(echo "scale=3; ${sum[full]} / ${sum[off]}" | bc)×   (access log + every request exported)"
echo "access log lines: on $(wc -l < "$dir/on.log"), full $(wc -l < "$dir/full.log")"
# A run that dropped spans measured a cheaper exporter than it claims: say so.
for v in on full; do
  m=$(curl -s "http://127.0.0.1:$(( ${port[$v]} + 100 ))/metrics")
  exported=$(awk '/^outrigger_spans_exported_total/ {print $2}' <<<"$m")
  dropped=$(awk '/^outrigger_spans_dropped_total/ {s += $2} END {print s + 0}' <<<"$m")
  echo "$v: spans exported $exported, dropped $dropped"
  grep -q "cannot export spans" "$dir/$v.err" && { echo "$v: span export failed:"; tail -3 "$dir/$v.err"; }
done
exit 0
