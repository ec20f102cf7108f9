#!/bin/bash
# Re-measure the README's runtime figures (issue 17): the quick main job and the test suite, each with the
# README's own command, under /usr/bin/time -v (wall, user+sys CPU, peak RSS) and the load average at start.
# Usage (from anywhere; takes ~2 min + the suite):  bash scripts/measure_readme.sh [OUTDIR] [quick|suite|all]
# Run it on an otherwise idle machine (load average < 0.5); it says so when the machine is not idle.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/tmp/measure_readme}
WHAT=${2:-all}
cd "$REPO" || exit 1
mkdir -p "$OUT"

header() {
  echo "== $1: $(date -Is) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
       "$(awk '/MemTotal/{printf "%.0f GiB", $2/2^20}' /proc/meminfo)), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
  read -r l1 l5 l15 _ < /proc/loadavg
  echo "   load average at start: $l1 $l5 $l15$(awk -v l="$l1" 'BEGIN{if (l > 0.5) print "  (NOT idle: wall-clock figures are inflated)"}')"
}

summary() {  # $1: the /usr/bin/time -v file
  awk -F': ' '/Elapsed \(wall clock\)/{w=$2} /User time/{u=$2} /System time/{s=$2} /Maximum resident/{r=$2}
              /Exit status/{e=$2}
              END{printf "   wall %s | user %.1f s + sys %.1f s = CPU %.1f s | peak RSS %.2f GB | exit %s\n", w, u, s, u+s, r/1e6, e}' "$1"
}

if [ "$WHAT" = quick ] || [ "$WHAT" = all ]; then
  header "quick main job: .venv/bin/gessl-train --quick --out $OUT/quick (README, The main job)"
  rm -rf "$OUT/quick"
  /usr/bin/time -v -o "$OUT/quick.time" .venv/bin/gessl-train --quick --out "$OUT/quick" \
      > "$OUT/quick.stdout" 2> "$OUT/quick.stderr"
  summary "$OUT/quick.time"
  read -r l1 _ < /proc/loadavg; echo "   load average at end: $l1"
  cat "$OUT/quick.stdout"
  .venv/bin/python - "$OUT/quick/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"   metrics.json: {m['steps']} steps in {m['train_seconds']:.1f} s of training ({m['steps_per_second']:.3f} steps/s, "
      f"{m['train_seconds'] / m['steps']:.2f} s per step, {m['train_cpu_seconds']:.1f} CPU s), evaluations "
      f"{m['eval_seconds']:.1f} s, run {m['wall_clock_seconds']:.1f} s wall / {m['cpu_seconds']:.1f} CPU s in-process, "
      f"threads {m['device']['threads']}")
PY
fi

if [ "$WHAT" = suite ] || [ "$WHAT" = all ]; then
  header "test suite: .venv/bin/python -m pytest -q (README, Start here)"
  /usr/bin/time -v -o "$OUT/suite.time" .venv/bin/python -m pytest -q -p no:randomly --durations=40 \
      > "$OUT/suite.out" 2>&1
  summary "$OUT/suite.time"
  read -r l1 _ < /proc/loadavg; echo "   load average at end: $l1"
  grep -E "passed|failed" "$OUT/suite.out" | tail -1
  echo "   slowest tests: $OUT/suite.out"
fi
