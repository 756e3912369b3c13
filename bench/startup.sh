#!/usr/bin/env bash
# Start-up time and idle memory of Trow on a data directory, optionally
# seeded first with many repositories.
#
# Start-up time is from launching the process to the first `GET /v2/` that
# answers 200 (polled every millisecond over a bash /dev/tcp socket, without a
# process per attempt). Idle RSS is read from /proc one
# second later, split into anonymous memory and file-backed pages (the
# mapped parts of the binary and shared libraries).
#
# Usage: bench/startup.sh [--bin PATH] [--data-dir DIR] [--seed-repos N]
#                         [--runs N]
#   --bin         trow binary (default target/<host tuple>/release/trow)
#   --data-dir    data directory to start on (default: a fresh temporary one,
#                 removed at exit)
#   --seed-repos  first push N repositories with one manifest each (and one
#                 repository with 100 tags) through the API with trow-bench's
#                 catalog workload, then stop the server
#   --runs        start-ups to time (default 5)
# Environment: BENCH_TARGET_DIR (cargo target dir holding <host tuple>/release/trow-bench,
# default target/).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Binaries are under target/<host tuple>/ (see .cargo/config.toml).
HOST=$(rustc -vV | sed -n 's/^host: //p')
BIN=$ROOT/target/$HOST/release/trow
DATA=""
SEED=0
RUNS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN=${2:?}; shift ;;
    --data-dir) DATA=${2:?}; shift ;;
    --seed-repos) SEED=${2:?}; shift ;;
    --runs) RUNS=${2:?}; shift ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "startup.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
BENCH=${BENCH_TARGET_DIR:-$ROOT/target}/$HOST/release/trow-bench

CLEAN=""
if [ -z "$DATA" ]; then
  DATA=$(mktemp -d /tmp/trow-startup.XXXXXX)
  CLEAN=$DATA
fi
PID=""
# A descriptor that never has data: `read -t` on it pauses for 1 ms between
# polls without starting a process (a busy loop would take a core from the
# server on a small machine).
exec {PAUSE}< <(exec sleep 100000)
PAUSE_PID=$!
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  kill "$PAUSE_PID" 2>/dev/null || true
  if [ -n "$CLEAN" ]; then rm -rf "$CLEAN"; fi
}
trap cleanup EXIT
pause() { read -r -t 0.001 -u "$PAUSE" _ || true; }

free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$(( 20000 + RANDOM % 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  return 1
}

# 0 when GET /v2/ answers 200.
ready() {
  local port=$1 line
  exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
  printf 'GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  IFS= read -r line <&3 || true
  exec 3<&- 3>&-
  [[ $line == "HTTP/1."?" 200"* ]]
}

start() {
  local port=$1
  TROW_LOG_LEVEL=error "$BIN" --bind "127.0.0.1:$port" --data-dir "$DATA" >/dev/null 2>&1 &
  PID=$!
}

stop() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=""
}

if [ "$SEED" -gt 0 ]; then
  [ -x "$BENCH" ] || { echo "startup.sh: no trow-bench at $BENCH" >&2; exit 1; }
  port=$(free_port)
  start "$port"
  until ready "$port" 2>/dev/null; do sleep 0.05; done
  "$BENCH" run --url "http://127.0.0.1:$port" --workload catalog --repos "$SEED" \
    --tags 100 --catalog-iterations 1 --prefix startup/ >&2
  stop
fi

repos=$(sqlite3 "$DATA/trow.db" 'SELECT COUNT(*) FROM repos' 2>/dev/null || echo "?")
echo "data dir $DATA: $repos repositories"
echo "run | start-up to ready (ms) | idle RSS (MiB) | anonymous (MiB) | file-backed (MiB)"
for i in $(seq 1 "$RUNS"); do
  port=$(free_port)
  sync
  t0=$(date +%s%N)
  start "$port"
  until ready "$port" 2>/dev/null; do
    kill -0 "$PID" 2>/dev/null || { echo "startup.sh: trow exited" >&2; exit 1; }
    pause
  done
  t1=$(date +%s%N)
  sleep 1
  read -r rss anon file < <(awk '/^VmRSS:/ {r=$2} /^RssAnon:/ {a=$2} /^RssFile:/ {f=$2}
    END {printf "%.1f %.1f %.1f\n", r/1024, a/1024, f/1024}' "/proc/$PID/status")
  echo "$i | $(( (t1 - t0) / 1000000 )) | $rss | $anon | $file"
  stop
done
