#!/usr/bin/env bash
# Set up (if needed) and run the tests. Uses a private Mosquitto if the binary exists
# (else the built-in broker) and a fresh PostgreSQL database if one is reachable on
# 127.0.0.1:5432 (else those suites are reported as NOT RUN at the end).
# PARLEY_REQUIRE_SERVICES=1 turns a missing service into a failure (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
