# bench/lib.sh: the start every bench script shares. Source it after `set -euo pipefail`:
#
#   . "$(dirname "$0")/lib.sh"
#
# It moves to the checkout's root and gives:
#   need TOOL...            exit 1 naming every missing tool
#   build_release           sets $bin: $OUTRIGGER_BIN if set, else `cargo build --release` and
#                           target/release/outrigger
#   bin_label               names what $bin is, for a report's header: the checkout's commit
#                           ("+changes" when the tree differs from it), or, with OUTRIGGER_BIN,
#                           that path and its modification time (the binary's commit is unknown);
#                           then what outrigger_config takes from the environment (worker_threads,
#                           http2_server), so a value left set in the shell shows in the report
#   $dir, $pids             a scratch folder, and the pids to kill; both cleaned up on exit
#   nginx_upstream PORT [LOCATIONS] [HTTP]
#                           writes $dir/up.$PORT.conf (nginx, one worker, no access log,
#                           keep-alive without limit) and prints its path; LOCATIONS replaces
#                           the default `location / { return 200 "hello world\n"; }`, HTTP adds
#                           directives to the http block
#   outrigger_config APP LISTEN [NAME]
#                           writes $dir/config/NAME.yaml (NAME default `outrigger`): the config of
#                           the Outrigger the proxy benches run, one worker (`runtime.worker_threads:
#                           ${WORKERS:-1}`), warn logs, the admin API on a free port, its app at
#                           APP and one listener `public` at LISTEN (each 127.0.0.1:PORT or
#                           unix:PATH) with `http2_server: ${HTTP2_SERVER:-outrigger}`. A folder of its
#                           own: Outrigger watches its config's folder, and a generator's log
#                           written beside it (h2load --log-file) cost the watcher's thread CPU
#                           and memory under load (docs/BENCHMARKS.md, "RSS under load, the
#                           growth measured")
#   start CMD...            runs CMD in the background, pinned to $BENCH_CPU (default 1), and
#                           adds its pid to $pids ($! is its pid)
#   wait_port PORT          until 127.0.0.1:PORT accepts a connection (10 s at most)
#   wait_file FILE          until FILE is not empty (e.g. a --listeners-file; 5 s at most)
#   wait_http URL           until URL answers 2xx (10 s at most)
#   wait_http_unix SOCKET   until http://localhost/ over the unix socket SOCKET answers 2xx
#                           (10 s at most)
# Every wait exits the script with a message when it runs out.
#   h2load_rate h1|h2 ADDRESS SECONDS
#                           h2load (32 connections, one request in flight each) over HTTP/1.1
#                           or h2c to ADDRESS (127.0.0.1:PORT or unix:PATH); prints "req/s
#                           mean_ms succeeded"; returns 1 with a message when no request
#                           succeeded. Set H2LOAD_WARMUP=1 for a 1 s run first.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

need() {
  local missing=() packages=()
  for tool in "$@"; do
    command -v "$tool" >/dev/null && continue
    missing+=("$tool")
    case $tool in   # the Debian package that has the tool
      h2load) packages+=(nghttp2-client) ;;
      taskset | prlimit) packages+=(util-linux) ;;
      pgrep | ps) packages+=(procps) ;;
      redis-cli | redis-server | redis-benchmark) packages+=(redis-tools redis-server) ;;
      heaptrack_print) packages+=(heaptrack) ;;
      *) packages+=("$tool") ;;   # nginx haproxy wrk valgrind curl python3 rustc bc heaptrack
    esac
  done
  if ((${#missing[@]})); then
    echo "missing: ${missing[*]} (Debian: apt-get install $(printf '%s\n' "${packages[@]}" | sort -u | paste -sd' '))" >&2
    exit 1
  fi
}

build_release() {
  if [ -n "${OUTRIGGER_BIN:-}" ]; then
    bin=$OUTRIGGER_BIN
  else
    cargo build --release -q
    bin=$PWD/target/release/outrigger
  fi
}

bin_label() {
  local what
  if [ -n "${OUTRIGGER_BIN:-}" ]; then
    what="binary $OUTRIGGER_BIN (built $(date -u -r "$OUTRIGGER_BIN" '+%Y-%m-%d %H:%M UTC'))"
  else
    what="checkout $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo +changes)"
  fi
  echo "$what, worker_threads: ${WORKERS:-1}, http2_server: ${HTTP2_SERVER:-outrigger}"
}

dir=$(mktemp -d); pids=()
bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap bench_cleanup EXIT

nginx_upstream() {
  local port=$1 locations=${2:-'location / { return 200 "hello world\n"; }'} http=${3:-}
  local conf="$dir/up.$port.conf"
  cat > "$conf" <<CONF
worker_processes 1; daemon off; pid $dir/up.$port.pid; error_log /dev/null crit;
events { worker_connections 8192; }
http { access_log off; $http
  server { listen 127.0.0.1:$port; keepalive_requests 1000000;
           $locations } }
CONF
  echo "$conf"
}

outrigger_config() {
  mkdir -p "$dir/config"
  cat > "$dir/config/${3:-outrigger}.yaml" <<YAML
admin: { address: 127.0.0.1:0 }
runtime: { worker_threads: ${WORKERS:-1} }
log: { level: warn }
app: { address: "$1" }
listeners:
  - name: public
    address: "$2"
    http2_server: ${HTTP2_SERVER:-outrigger}
YAML
}

start() {
  taskset -c "${BENCH_CPU:-1}" "$@" &
  pids+=($!)
}

# free_ports N: N distinct loopback ports free right now, on one line (all bound at once, then
# released), so that two benches, or a bench and the test suite, never collide on fixed ports.
free_ports() {
  python3 -c 'import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"
}

wait_port() {
  for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 never opened" >&2; exit 1
}

wait_file() {
  for _ in $(seq 1 500); do [ -s "$1" ] && return 0; sleep 0.01; done
  echo "$1 was never written" >&2; exit 1
}

wait_http() {
  for _ in $(seq 1 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "$1 never answered" >&2; exit 1
}

wait_http_unix() {
  for _ in $(seq 1 100); do curl -sf -o /dev/null --unix-socket "$1" http://localhost/ && return 0; sleep 0.1; done
  echo "unix socket $1 never answered" >&2; exit 1
}

h2load_rate() { # h1|h2 ADDRESS SECONDS → "req/s mean_ms succeeded"
  local proto=() base out="$dir/h2load_rate.out"
  [ "$1" = h1 ] && proto=(--h1)
  case $2 in unix:*) base=(-B "$2" http://localhost/) ;; *) base=("http://$2/") ;; esac
  if [ -n "${H2LOAD_WARMUP:-}" ]; then
    taskset -c 0 h2load "${proto[@]}" -c32 -m1 -D1 "${base[@]}" >/dev/null 2>&1 || true
  fi
  taskset -c 0 h2load "${proto[@]}" -c32 -m1 -D"$3" "${base[@]}" > "$out" 2>&1 || true
  # No per-request log (--log-file): it costs h2load a fifth of its rate, and the generator is
  # near its limit here; the mean latency is h2load's own.
  local r; r=$(awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /finished in/ { for (i = 1; i <= NF; i++) if ($(i+1) ~ /^req\/s/) { rps = $i; gsub(",", "", rps) } }
    /^time for request:/ { mean = ms($6) }
    /^requests:/ { ok = $8 }
    END { printf "%.0f %.3f %d\n", rps, mean, ok }' "$out")
  if [ "${r##* }" = 0 ]; then
    echo "h2load $1 to $2: no request succeeded:" >&2; tail -5 "$out" >&2; return 1
  fi
  echo "$r"
}
