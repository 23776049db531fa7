#!/usr/bin/env bash
# Set up (if needed) and run `parley serve --demo` plus any flags given here, e.g.
# `./scripts/serve.sh --mqtt-url mqtt://127.0.0.1:1883` for a broker of yours. Defaults:
# SQLite in ./data, built-in MQTT broker on 127.0.0.1:1883, HTTP on 127.0.0.1:3000, and the
# demo thermostat agent (always: for a server without it, run .venv/bin/parley serve).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
demo=--demo
for arg in "$@"; do
  if [ "$arg" = --demo ]; then demo=""; fi  # already given
done
exec .venv/bin/parley serve ${demo:+"$demo"} "$@"
