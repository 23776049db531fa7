#!/usr/bin/env bash
# Set up (if needed) and run the server. Default arguments: the embedded demo
# (SQLite in ./data, built-in MQTT broker on 127.0.0.1:1883, HTTP on :3000, thermostat agent).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ $# -eq 0 ]; then set -- --demo; fi
exec .venv/bin/parley serve "$@"
