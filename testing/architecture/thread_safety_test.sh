#!/usr/bin/env bash
# Clang's thread-safety analysis over core/ and transport/: every ABSL_GUARDED_BY,
# ABSL_EXCLUSIVE_LOCKS_REQUIRED and scoped lock there is checked (g++, which builds the tree,
# ignores the annotations). The files that include libtorch (rendezvous.cc) and the tests are left
# out. It first shows that the analysis is on, on a violation of its own.
set -euo pipefail

CXX="${TETHER_THREAD_SAFETY_CXX:-clang++-14}"
if ! command -v "$CXX" >/dev/null; then
  echo "FAIL: $CXX not found (tools/setup installs clang-14)" >&2
  exit 1
fi
cd "${TEST_SRCDIR:?}/tether"
FLAGS=(-fsyntax-only -std=c++17 -Wthread-safety -Werror=thread-safety -I.)

canary="${TEST_TMPDIR:-/tmp}/thread_safety_canary.cc"
cat >"$canary" <<'CC'
#include "absl/synchronization/mutex.h"
struct Canary {
  absl::Mutex mu;
  int n ABSL_GUARDED_BY(mu) = 0;
  void Bump() { ++n; }  // Not holding mu: the analysis must reject it.
};
CC
out="$("$CXX" "${FLAGS[@]}" "$canary" 2>&1)" && accepted=1 || accepted=0
if [ "$accepted" -eq 1 ] || ! grep -q "requires holding mutex" <<<"$out"; then
  echo "FAIL: $CXX did not reject a write without its mutex: the analysis is off" >&2
  echo "$out" >&2
  exit 1
fi

files=()
for f in core/*.cc transport/*.cc transport/faulty/*.cc transport/tracing/*.cc; do
  case "$f" in *_test.cc | *_fuzzer.cc | *.pb.cc) continue ;; esac
  if grep -qE '^#include [<"](torch|ATen|c10)/' "$f"; then continue; fi
  files+=("$f")
done
if [ "${#files[@]}" -lt 10 ]; then
  echo "FAIL: only ${#files[@]} sources found under $(pwd)" >&2
  exit 1
fi

failed=0
for f in "${files[@]}"; do
  if ! "$CXX" "${FLAGS[@]}" "$f"; then
    echo "FAIL: $f" >&2
    failed=1
  fi
done
[ "$failed" -eq 0 ] && echo "PASS: ${#files[@]} files clean under -Wthread-safety"
exit "$failed"
