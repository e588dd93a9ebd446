#!/usr/bin/env bash
# `make test`'s pytest: the suite as two pytest processes at once (tests/conftest.py, --stream). "cluster"
# (Ray, stacks, servers, the browser) streams its output here; "solo" (the in-process unit tests) fills
# the CPU the cluster tests leave idle while they wait on process starts and polls, and its output is
# printed when it ends. Exits non-zero when either stream failed. Arguments go to both pytest processes;
# ADAPTERFAB_JUNIT_DIR=DIR writes DIR/solo.xml and DIR/cluster.xml.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
logs=$(mktemp -d "${TMPDIR:-/tmp}/adapterfab-test.XXXXXX")
junit() { if [ -n "${ADAPTERFAB_JUNIT_DIR:-}" ]; then echo "--junitxml=$ADAPTERFAB_JUNIT_DIR/$1.xml"; fi; }

"$PY" -m pytest -q tests --stream solo $(junit solo) "$@" > "$logs/solo.log" 2>&1 &
solo=$!
"$PY" -m pytest -q tests --stream cluster $(junit cluster) "$@" &
cluster=$!
trap 'kill -INT $solo $cluster 2>/dev/null; wait; exit 130' INT TERM

wait $solo
solo_rc=$?
printf '\n==== the solo stream (tests/unit in-process) ended with exit %s; its output:\n' "$solo_rc"
cat "$logs/solo.log"
printf '==== end of the solo stream; the cluster stream goes on\n'
wait $cluster
cluster_rc=$?
rm -rf "$logs"
echo "make test: solo stream exit $solo_rc, cluster stream exit $cluster_rc"
[ "$solo_rc" -eq 0 ] && [ "$cluster_rc" -eq 0 ]
