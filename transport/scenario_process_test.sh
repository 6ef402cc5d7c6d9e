#!/usr/bin/env bash
# Runs every agent scenario that works over real processes (see scenario_process --list), one
# OS process per worker over TCP on loopback, on two seeds.
set -euo pipefail
bin="$TEST_SRCDIR/tether/transport/scenario_process"
"$bin" --list
exec "$bin" --all --seeds=2 --timeout_s=60
