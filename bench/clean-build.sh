#!/usr/bin/env bash
# Clean build time and test-suite wall time of one commit, from a fresh clone with an empty
# target directory (issue 18, point 8). Usage: bench/clean-build.sh COMMIT [WORKDIR]
# Prints two lines: "build_s N" (cargo test --workspace --locked --no-run) and
# "suite_s N" (cargo test --workspace --locked, the build already done). Run it on an idle
# machine, one commit after the other; the clone and its target directory are removed after.
set -euo pipefail
commit=${1:?usage: bench/clean-build.sh COMMIT [WORKDIR]}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${2:-/tmp/clean-build-$commit}
rm -rf "$work"
git clone -q "$repo" "$work"
cd "$work"
git checkout -q "$commit"
./ci-setup >/dev/null
export CARGO_TARGET_DIR="$work/target"
t0=$(date +%s.%N)
cargo test --workspace --locked --no-run >build.log 2>&1
t1=$(date +%s.%N)
status=0
PYPE_REQUIRE_ALL=1 cargo test --workspace --locked >suite.log 2>&1 || status=$?
t2=$(date +%s.%N)
printf 'commit %s\nbuild_s %.0f\nsuite_s %.0f\nsuite_exit %s\n' "$commit" \
  "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)" "$status"
grep -E '^test result' suite.log | awk '{p+=$4; f+=$6} END {print "passed", p, "failed", f}'
grep -E '^test .* FAILED$' suite.log || true
cp suite.log "/tmp/clean-build-$commit-suite.log" || true
cd /
rm -rf "$work"
