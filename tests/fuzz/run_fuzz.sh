#!/usr/bin/env bash
# Run the atheris fuzz harnesses for a bounded time each and report executions.
#
#   bash tests/fuzz/run_fuzz.sh [SECONDS_TOTAL] [WORKDIR]
#
# CI (tests/run_all.sh) runs `bash tests/fuzz/run_fuzz.sh 45`: 45 s of fuzzing
# over the three harnesses, about 75 s with their start-up.  The long run of docs/reliability.md:
#   bash tests/fuzz/run_fuzz.sh 3600 /tmp/sqllm-fuzz
# A fresh seed corpus is written by make_corpus.py from a tiny model saved by
# the current code; libFuzzer adds what it finds to WORKDIR/<harness>/, and a
# crash or hang is saved there as crash-*/timeout-* and fails the run.
# Without atheris, the plain-Python seeded mutator of _common.py runs instead.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
TOTAL=${1:-60}
WORK=${2:-$(mktemp -d -t sqllm-fuzz-XXXXXX)}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
"$PY" "$HERE/make_corpus.py" "$WORK/corpus" >/dev/null 2>&1
export SQLLM_FUZZ_CORPUS="$WORK/corpus"
export SQLLM_FUZZ_TMP="$WORK"  # the harnesses' scratch folders

# Share of the time per harness (percent): the loaders are slow per input.
declare -A SHARE=([fuzz_layers]=25 [fuzz_saved_folder]=45 [fuzz_upstream]=30)
declare -A CORPUS=([fuzz_layers]=layers [fuzz_saved_folder]=saved_folder [fuzz_upstream]=upstream)
have_atheris=$("$PY" -c "import atheris" 2>/dev/null && echo 1 || echo 0)
total_runs=0
status=0
for h in fuzz_layers fuzz_saved_folder fuzz_upstream; do
  secs=$(( TOTAL * SHARE[$h] / 100 )); [ "$secs" -ge 1 ] || secs=1
  dir="$WORK/${CORPUS[$h]}"
  mkdir -p "$dir"
  cp -n "$WORK/corpus/${CORPUS[$h]}"/* "$dir"/ 2>/dev/null || true
  log="$WORK/$h.log"
  if [ "$have_atheris" = 1 ]; then
    (cd "$WORK" && "$PY" "$HERE/$h.py" "$dir" -max_total_time="$secs" -timeout=30 \
        -max_len=40000 -len_control=0 -dict="$HERE/sqllm.dict" -rss_limit_mb=6144 \
        -artifact_prefix="$WORK/$h-" >"$log" 2>&1) || status=1
  else
    # No atheris: the seeded mutator, ~as many inputs as fit (rough rates).
    (cd "$WORK" && timeout $(( secs + 60 )) "$PY" "$HERE/$h.py" --fallback-iterations \
        $(( secs * 20 )) >"$log" 2>&1) || status=1
  fi
  runs=$(grep -Eo "Done [0-9]+ runs" "$log" | tail -1 | grep -Eo "[0-9]+" || echo 0)
  total_runs=$(( total_runs + runs ))
  printf "%-18s %8d executions in %4ds%s\n" "$h" "$runs" "$secs" \
    "$([ "$have_atheris" = 1 ] || echo ' (fallback mutator, no atheris)')"
done
echo "fuzz total: $total_runs executions; work dir $WORK"
if [ "$status" != 0 ]; then
  echo "FUZZ FINDING: see $WORK/*.log and $WORK/*-crash-* / *-timeout-*" >&2
  for f in "$WORK"/*.log; do grep -B5 -A40 -E "Uncaught Python exception|ERROR: libFuzzer|==ERROR" "$f" | head -80 || true; done >&2
fi
exit "$status"
