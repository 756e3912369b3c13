#!/bin/bash
# CPU profile of Trow under one trow-bench workload: starts BIN on a fresh data
# directory, runs trow-bench with the given arguments, records
# `perf record -e cpu-clock -g` of the server for PROF_SECS (5) seconds after
# PROF_DELAY (4), and writes the top TOP (25) symbols to /tmp/prof-NAME.txt and
# the figures to /tmp/prof-NAME.bench. Needs linux-perf; TROW_BENCH names the
# trow-bench binary (default: target/<host>/release/trow-bench).
# Usage: bench/profile.sh BIN NAME --workload pull --pull-sizes 100MiB --concurrency 8 --duration 8
BIN=$1; NAME=$2; shift 2
W=$(mktemp -d /tmp/prof.XXXX); PORT=$((20000 + RANDOM % 30000))
TROW_LOG_LEVEL=error $BIN --bind 127.0.0.1:$PORT --data-dir $W/data > $W/log 2>&1 &
PID=$!
for i in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:$PORT/v2/ && break; sleep 0.2; done
"${TROW_BENCH:-$(dirname "$0")/../target/$(rustc -vV | sed -n "s/host: //p")/release/trow-bench}" run --url http://127.0.0.1:$PORT --server-pid $PID --json "$@" > $W/bench.jsonl 2>$W/bench.err &
BP=$!
sleep ${PROF_DELAY:-4}
perf record -e cpu-clock -g -p $PID -o $W/perf.data -- sleep ${PROF_SECS:-5} > /dev/null 2>&1
wait $BP
kill $PID; wait $PID 2>/dev/null
perf report -i $W/perf.data --no-children --sort symbol --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -${TOP:-25} > /tmp/prof-$NAME.txt
python3 -c "
import json,sys
for l in open('$W/bench.jsonl'):
    r=json.loads(l); print(r['case'], 'MiB/s', r.get('mib_per_s'), 'ops/s', r.get('ops_per_s'), 'cpu/GiB', r.get('server_cpu_s_per_gib'), 'ms/op', r.get('server_cpu_ms_per_op'), 'peak', r.get('server_peak_rss_mib'), 'err', r.get('errors'))
" > /tmp/prof-$NAME.bench
rm -rf $W
