#!/usr/bin/env bash
# TLS termination: Outrigger vs nginx with the same ECDSA P-256 certificate, in one run.
#
#   bench/tls.sh [SECONDS] [ROUNDS]      (default 8 s per measurement, 2 rounds, ABBA order)
#
# Both terminate HTTPS and forward plain HTTP/1.1 over keep-alive to the same upstream (nginx,
# one worker, 12-byte body); each runs one worker (Outrigger `worker_threads: 1`, nginx
# `worker_processes 1`). wrk -t1 -c32 on CPU 0; proxies and upstream share CPU 1.
#   keep-alive:  HTTPS requests/s on 32 long-lived TLS connections
#   handshakes:  `Connection: close` on every request, so each request is a new TCP connection
#                and a full TLS handshake (wrk does not resume sessions): new handshakes/s
# Needs: nginx wrk (Debian packages). The certificate comes from `outrigger certs`.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
secs=${1:-8}; rounds=${2:-2}
need nginx wrk taskset
build_release
read -r UP NGX OUT < <(free_ports 3)

"$bin" certs ca --out "$dir/ca" >/dev/null
"$bin" certs issue --ca "$dir/ca" --out "$dir" --name server --dns localhost --ip 127.0.0.1 --key ecdsa >/dev/null

cat > "$dir/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $dir/ngx.pid; error_log /dev/null crit;
events { worker_connections 8192; }
http { access_log off;
  upstream app { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NGX ssl; keepalive_requests 1000000;
           ssl_certificate $dir/server.crt; ssl_certificate_key $dir/server.key;
           ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;
           location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
cat > "$dir/outrigger.yaml" <<CONF
admin: { address: 127.0.0.1:0 }
runtime: { worker_threads: 1, watch_config: false }
log: { level: error }
app: { address: 127.0.0.1:$UP }
listeners:
  - name: public
    address: 127.0.0.1:$OUT
    tls: { cert: $dir/server.crt, key: $dir/server.key }
CONF

start nginx -c "$(nginx_upstream $UP)"; wait_port $UP
start nginx -c "$dir/nginx.conf"; wait_port $NGX
start "$bin" run -c "$dir/outrigger.yaml"; out_pid=$!; wait_port $OUT

# "rps errors"
run() {
  local port=$1; shift
  taskset -c 0 wrk -t1 -c32 -d"${secs}s" "$@" "https://127.0.0.1:$port/" > "$dir/wrk.out"
  awk '/Requests\/sec/ { rps = $2 } /Socket errors/ { e = $0 } /Non-2xx/ { e = e " " $0 }
       END { printf "%.0f%s\n", rps, (e ? " (" e ")" : "") }' "$dir/wrk.out"
}
declare -A S
for kind in keepalive handshakes; do S[o.$kind]=0; S[n.$kind]=0; done
for r in $(seq "$rounds"); do
  for kind in keepalive handshakes; do
    args=(); [ $kind = handshakes ] && args=(-H "Connection: close")
    # ABBA: a drift of the machine during the run does not favour either side.
    if (( r % 2 )); then o=$(run $OUT "${args[@]}"); n=$(run $NGX "${args[@]}");
    else n=$(run $NGX "${args[@]}"); o=$(run $OUT "${args[@]}"); fi
    echo "round $r $kind: outrigger $o, nginx $n" >&2
    S[o.$kind]=$(( ${S[o.$kind]} + ${o%% *} )); S[n.$kind]=$(( ${S[n.$kind]} + ${n%% *} ))
  done
done
rss=$(awk '/VmRSS/ {print $2}' /proc/$out_pid/status)

echo
echo "## TLS benchmark — $(date -u +%Y-%m-%d), ${secs}s × $rounds rounds, $(nproc) cores, $(git rev-parse --short HEAD 2>/dev/null), ECDSA P-256"
echo
echo "| measure | Outrigger | nginx | Outrigger/nginx |"
echo "|---|---:|---:|---:|"
for kind in keepalive handshakes; do
  label=$([ $kind = keepalive ] && echo "HTTPS keep-alive req/s" || echo "new TLS handshakes/s (Connection: close)")
  o=$(( ${S[o.$kind]} / rounds )); n=$(( ${S[n.$kind]} / rounds ))
  echo "| $label | $o | $n | **$(awk -v a="$o" -v b="$n" 'BEGIN { printf "%.2f", a / b }')×** |"
done
echo
echo "Outrigger RSS after the runs: $(awk -v k="$rss" 'BEGIN{printf "%.1f", k/1024}') MiB"
