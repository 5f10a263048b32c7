#!/usr/bin/env bash
# Long fuzzing runs (issue 10): each target for SECONDS (default 600).
#
#   bench/fuzz.sh [--seconds N] [TARGET...]
#
# With cargo-fuzz and a nightly toolchain installed (`cargo +nightly fuzz`
# works), runs `cargo fuzz run <target> -- -max_total_time=N` per target in
# fuzz/ (libFuzzer, coverage-guided; corpora in fuzz/corpus/, crashes in
# fuzz/artifacts/). Otherwise, or with SOMNA_FUZZ_ENGINE=builtin, runs the
# stable-Rust mutation fuzzer, `fuzz-long` from fuzz/targets, which prints
# one JSON summary per target:
#
#   {"target":"oci_layer","iterations":...,"seconds":...,"crashes":0,"execs_per_sec":...}
#
# and saves crashing inputs in fuzz/targets/regressions/<target>/, where
# `cargo test -p somna-fuzz` replays them. A libFuzzer crash is turned
# into a regression the same way: copy it from fuzz/artifacts/<target>/.
# Targets write temporary trees under $TMPDIR; run as root, so that the
# layer target can apply ownership and device nodes.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

seconds=600
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=${2:?--seconds needs a value}; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=(oci_layer manifest image_config guest_request controlplane_validation)
[ "${#targets[@]}" -gt 0 ] || targets=("${all[@]}")

engine=${SOMNA_FUZZ_ENGINE:-auto}
if [ "$engine" = auto ]; then
  if cargo +nightly fuzz --version >/dev/null 2>&1; then engine=libfuzzer; else engine=builtin; fi
fi

case "$engine" in
  libfuzzer)
    status=0
    for t in "${targets[@]}"; do
      echo "==> cargo fuzz run $t (${seconds}s)" >&2
      (cd fuzz && cargo +nightly fuzz run "$t" -- -max_total_time="$seconds") || status=1
    done
    exit "$status"
    ;;
  builtin)
    exec cargo run --release --locked -q -p somna-fuzz --bin fuzz-long -- \
      --seconds "$seconds" "${targets[@]}"
    ;;
  *) echo "fuzz.sh: SOMNA_FUZZ_ENGINE must be auto, libfuzzer or builtin" >&2; exit 2 ;;
esac
