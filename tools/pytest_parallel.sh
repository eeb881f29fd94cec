#!/usr/bin/env bash
# Run the test suite in N pytest processes at once, each on every N-th test id.
#
# On a GPU most of the suite's time is Triton compiling new specialisations, which is CPU-bound:
# 16 processes on a 32-core host ran the whole suite in under 5 minutes (one process: over 10).
# Logs go to $LOGS (default /tmp/pytest_parallel); the exit status is the worst shard's.
#
#   N=16 LIMIT=300 tools/pytest_parallel.sh [PYTHON]
set -u
PY=${1:-python3}
N=${N:-8}
LIMIT=${LIMIT:-900}
LOGS=${LOGS:-/tmp/pytest_parallel}
mkdir -p "$LOGS"
# a module that fails to import must fail the run, not drop its tests from the shards
if ! "$PY" -m pytest --collect-only -q -p no:cacheprovider > "$LOGS/collect.log" 2>&1; then
  echo "collection failed ($LOGS/collect.log):"; grep -E '^(ERROR|E ) ' "$LOGS/collect.log" | head -20
  exit 1
fi
grep '::' "$LOGS/collect.log" > "$LOGS/ids.txt"
echo "$(wc -l < "$LOGS/ids.txt") tests in $N shards"
for i in $(seq 0 $((N - 1))); do
  awk -v n="$N" -v i="$i" 'NR % n == i' "$LOGS/ids.txt" > "$LOGS/shard_$i.txt"
  # ids can hold spaces (parametrize ids): one argument per line
  (timeout "$LIMIT" xargs -d '\n' -a "$LOGS/shard_$i.txt" "$PY" -m pytest -q -p no:cacheprovider \
    -rfE > "$LOGS/shard_$i.log" 2>&1; echo "exit $?" >> "$LOGS/shard_$i.log") &
done
wait
status=0
for i in $(seq 0 $((N - 1))); do
  echo "shard $i: $(grep -E '(passed|failed|error)' "$LOGS/shard_$i.log" | tail -1) ($(tail -1 "$LOGS/shard_$i.log"))"
  grep -E '^(FAILED|ERROR) ' "$LOGS/shard_$i.log"
  [ "$(tail -1 "$LOGS/shard_$i.log")" = "exit 0" ] || status=1
done
exit $status
