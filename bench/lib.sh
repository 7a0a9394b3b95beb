# bench/lib.sh: the start every bench script shares. Source it after `set -euo pipefail`:
#
#   . "$(dirname "$0")/lib.sh"
#
# It moves to the checkout's root and gives:
#   need TOOL...            exit 1 naming every missing tool
#   build_release           sets $bin: $OUTRIGGER_BIN if set, else `cargo build --release` and
#                           target/release/outrigger
#   $dir, $pids             a scratch folder, and the pids to kill; both cleaned up on exit
#   nginx_upstream PORT [LOCATIONS] [HTTP]
#                           writes $dir/up.$PORT.conf (nginx, one worker, no access log,
#                           keep-alive without limit) and prints its path; LOCATIONS replaces
#                           the default `location / { return 200 "hello world\n"; }`, HTTP adds
#                           directives to the http block
#   start CMD...            runs CMD in the background, pinned to $BENCH_CPU (default 1), and
#                           adds its pid to $pids ($! is its pid)
#   wait_port PORT          until 127.0.0.1:PORT accepts a connection (10 s at most)
#   wait_file FILE          until FILE is not empty (e.g. a --listeners-file; 5 s at most)
#   wait_http URL           until URL answers 2xx (10 s at most)
# Every wait exits the script with a message when it runs out.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if ((${#missing[@]})); then
    echo "missing: ${missing[*]} (Debian packages; e.g. apt-get install nginx wrk nghttp2-client)" >&2
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

start() {
  taskset -c "${BENCH_CPU:-1}" "$@" &
  pids+=($!)
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
