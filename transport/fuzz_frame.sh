#!/usr/bin/env bash
# Builds the frame/handshake decoder fuzz target (transport/frame_fuzzer.cc) with clang's
# libFuzzer and AddressSanitizer, outside Bazel, and runs it.
#
#   transport/fuzz_frame.sh SECONDS [libFuzzer flags...]     (tools/fuzz-frame calls this)
#
# Work files (build, corpus, crash reproducers) go to $TETHER_FUZZ_DIR, by default
# /tmp/tether-fuzz-frame (under Bazel: $TEST_TMPDIR). Exits non-zero if the fuzzer finds a crash,
# a leak or an invariant violation; the reproducer is left in the work directory.
set -euo pipefail

duration="${1:-60}"
shift || true
if ! [[ "$duration" =~ ^[0-9]+$ ]] || [ "$duration" -lt 1 ]; then
  echo "usage: $0 SECONDS [libFuzzer flags...]" >&2
  exit 2
fi

if [ -n "${TEST_SRCDIR:-}" ]; then
  root="$TEST_SRCDIR/tether"
  work="${TETHER_FUZZ_DIR:-$TEST_TMPDIR/fuzz-frame}"
else
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  work="${TETHER_FUZZ_DIR:-/tmp/tether-fuzz-frame}"
fi
mkdir -p "$work/gen/core" "$work/corpus" "$work/artifacts"

CXX="${CXX_FUZZ:-clang++}"
if ! command -v "$CXX" >/dev/null; then
  echo "fuzz-frame: $CXX not found (install clang and libclang-rt-14-dev: tools/setup)" >&2
  exit 1
fi

srcs=(transport/frame_fuzzer.cc transport/frame.cc transport/auth.cc core/message.cc
      core/buffer.cc)
bin="$work/frame_fuzzer"
rebuild=0
[ -x "$bin" ] || rebuild=1
for f in "${srcs[@]}" transport/frame.h transport/auth.h transport/little_endian.h core/message.h core/buffer.h \
         core/envelope.proto; do
  [ "$root/$f" -nt "$bin" ] && rebuild=1
done
if [ "$rebuild" = 1 ]; then
  echo "fuzz-frame: building $bin" >&2
  (cd "$root" && protoc --proto_path=. --cpp_out="$work/gen" core/envelope.proto)
  abs_srcs=()
  for f in "${srcs[@]}"; do abs_srcs+=("$root/$f"); done
  "$CXX" -std=c++17 -O1 -g -fsanitize=fuzzer,address -fno-omit-frame-pointer \
    -I"$root" -I"$work/gen" "${abs_srcs[@]}" "$work/gen/core/envelope.pb.cc" \
    -o "$bin.tmp" -lprotobuf -lcrypto -labsl_status -labsl_statusor -labsl_strings \
    -labsl_str_format_internal -labsl_int128 -labsl_cord -labsl_cord_internal \
    -labsl_cordz_info -labsl_cordz_functions -labsl_cordz_handle -labsl_throw_delegate \
    -labsl_raw_logging_internal -labsl_strings_internal -labsl_base -labsl_spinlock_wait \
    -labsl_synchronization -labsl_time -labsl_time_zone -labsl_stacktrace -labsl_symbolize \
    -labsl_debugging_internal -labsl_demangle_internal -labsl_malloc_internal \
    -labsl_graphcycles_internal -labsl_exponential_biased -lpthread
  mv "$bin.tmp" "$bin"
fi

# Seeds: a valid frame (type TEST_CALL, payload "hi", one 3-byte buffer), two frames back to
# back, an empty-envelope frame, and a handshake-sized record.
frame='TTHR\x01\x00\x00\x00\x0a\x00\x00\x00\x01\x00\x00\x00\x08\x0d\x3a\x02hi\x42\x02\x08\x03abc'
printf "\x00$frame" >"$work/corpus/seed_one"
printf "\x83$frame$frame" >"$work/corpus/seed_two"
printf '\x05TTHR\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' >"$work/corpus/seed_empty"
printf '\x01TTHS\x01\x00\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00' >"$work/corpus/seed_hs"
head -c 64 /dev/zero >>"$work/corpus/seed_hs"

echo "fuzz-frame: running for ${duration}s (corpus $work/corpus)" >&2
cd "$work/artifacts"
exec "$bin" -max_total_time="$duration" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
  "$@" "$work/corpus"
