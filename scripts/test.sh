#!/usr/bin/env bash
# Set up (if needed) and run the tests (arguments go to pytest). Uses a private Mosquitto if
# the binary exists (else the built-in broker) and fresh PostgreSQL databases, created through
# the admin URL PARLEY_TEST_PG_ADMIN_URL [postgresql://postgres@127.0.0.1:5432/postgres], if
# that server is reachable (else those suites are reported as NOT RUN at the end).
# PARLEY_REQUIRE_SERVICES=1 turns a missing service into a failure (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
