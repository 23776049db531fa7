#!/usr/bin/env bash
# Create ./.venv (Python 3.11+) and install Parley with its test tools. Idempotent: an
# existing .venv is checked (its Python, pip, Parley installed from this checkout) and
# rebuilt when it is wrong. The interpreter: $PYTHON if set, else python3 if it is 3.11+,
# else python3.13, python3.12 or python3.11, e.g. PYTHON=/usr/bin/python3.12 ./scripts/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd -P)
stamp=.venv/.parley-installed
log=.venv/pip-install.log

say() { echo "setup: $*" >&2; }
die() { echo "setup: $*" >&2; exit 1; }

# One setup at a time per checkout (serve.sh and test.sh started together, several shells).
if command -v flock >/dev/null 2>&1; then
  lock="${TMPDIR:-/tmp}/parley-setup-$(printf '%s' "$root" | cksum | cut -d' ' -f1).lock"
  if ! { exec 9>>"$lock"; } 2>/dev/null; then
    : # no writable temp dir: go on without the lock
  elif ! flock -n 9; then
    say "waiting for another setup of this checkout to finish"
    flock 9
  fi
fi

# probe CMD: sets p_ver (e.g. 3.11.7), p_new (1 if >= 3.11), p_base (real sys.base_prefix);
# fails if CMD does not run.
probe() {
  local out
  out=$("$1" -I -c 'import os, platform, sys
print(platform.python_version()); print(int(sys.version_info >= (3, 11))); print(os.path.realpath(sys.base_prefix))' \
    2>/dev/null) || return 1
  { read -r p_ver; read -r p_new; read -r p_base; } <<<"$out"
  [ -n "${p_base:-}" ]
}

# Sets PY to an interpreter that is 3.11+ (and py_desc to describe it), or stops with what
# was found and what to install.
choose_python() {
  if [ -n "${PYTHON:-}" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON: no such command; point it at Python 3.11 or newer, or unset it"
    probe "$PYTHON" || die "PYTHON=$PYTHON does not run ($("$PYTHON" -c pass 2>&1 | head -n 1)); point it at Python 3.11 or newer, or unset it"
    [ "$p_new" = 1 ] || die "PYTHON=$PYTHON is Python $p_ver; Parley needs 3.11 or newer: point PYTHON at one, or unset it to let setup look"
    PY=$PYTHON; py_desc="PYTHON=$PYTHON (Python $p_ver)"; py_minor=${p_ver%.*}; return
  fi
  local cand found="" absent=""
  for cand in python3 python3.13 python3.12 python3.11; do
    if ! command -v "$cand" >/dev/null 2>&1; then absent="${absent:+$absent, }$cand"; continue; fi
    if ! probe "$cand"; then found="$found; $cand ($(command -v "$cand")) does not run"; continue; fi
    if [ "$p_new" = 1 ]; then PY=$cand; py_desc="$cand (Python $p_ver)"; py_minor=${p_ver%.*}; return; fi
    found="$found; $cand is Python $p_ver ($(command -v "$cand"))"
  done
  [ -z "$absent" ] || found="$found; not on PATH: $absent"
  echo "setup: Parley needs Python 3.11 or newer, and none was found: ${found#; }." >&2
  die "Install one (Debian/Ubuntu: sudo apt install python3.11 python3.11-venv; macOS: brew install python@3.12) and run this again, or name one: PYTHON=/path/to/python3.11 in front of the command."
}

# Prints "ok", "install <why>" or "rebuild <why>" for the existing .venv.
venv_state() {
  [ -e .venv ] || [ -L .venv ] || { echo "create"; return; }
  [ -e .venv/bin/python ] || [ -L .venv/bin/python ] || { echo "rebuild it is incomplete (no bin/python)"; return; }
  local out
  out=$(.venv/bin/python -I -c '
import importlib.metadata as md, importlib.util, json, os, platform, sys
from urllib.parse import unquote, urlsplit
root, want_base = sys.argv[1:3]
def done(state):
    print(state)
    sys.exit()
base = os.path.realpath(sys.base_prefix)
if sys.version_info < (3, 11):
    done(f"rebuild it has Python {platform.python_version()} and Parley needs 3.11 or newer")
if want_base and base != want_base:
    done(f"rebuild it was made from another Python ({platform.python_version()} in {base})")
if importlib.util.find_spec("pip") is None:
    done("rebuild it has no pip (an interrupted first run, or made without ensurepip)")
try:
    dist = md.distribution("parley")
except md.PackageNotFoundError:
    done("install")
try:
    info = json.loads(dist.read_text("direct_url.json") or "{}")
except ValueError:
    info = {}
url = info.get("url", "")
src = unquote(urlsplit(url).path) if url.startswith("file:") else ""
if src and os.path.realpath(src) != root:
    done(f"rebuild it has Parley installed from {src}, not from this checkout")
if not (info.get("dir_info") or {}).get("editable"):
    done("install")
done("ok")
' "$root" "$want_base" 2>/dev/null) || out=""
  echo "${out:-rebuild its Python does not run (was the interpreter it was made from removed?)}"
}

# PYTHON, when set, is checked every time: the .venv must be made from it.
PY="" want_base=""
if [ -n "${PYTHON:-}" ]; then choose_python; want_base=$p_base; fi
state=$(venv_state)
case "$state" in
  create|rebuild*)
    [ -n "$PY" ] || choose_python
    if ! "$PY" -I -c 'import venv, ensurepip' >/dev/null 2>&1; then
      die "$py_desc cannot make a virtual environment with pip: its venv/ensurepip module is missing. Install it (Debian/Ubuntu: sudo apt install python$py_minor-venv) and run this again."
    fi
    if [ "$state" = create ]; then
      say "creating .venv with $py_desc"
    else
      say "rebuilding .venv with $py_desc: ${state#rebuild }"
      rm -rf .venv
    fi
    if ! out=$("$PY" -m venv .venv 2>&1) || ! .venv/bin/python -I -c 'import pip' >/dev/null 2>&1; then
      [ -z "$out" ] || printf '%s\n' "$out" | tail -n 15 | sed 's/^/  /' >&2
      rm -rf .venv
      die "$py_desc could not make .venv with pip (Debian/Ubuntu: sudo apt install python$py_minor-venv)"
    fi
    fresh=1
    ;;
  install|ok) fresh=0 ;;
  *) die "unexpected state: $state" ;;
esac

if [ "$state" = ok ] && [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ]; then
  exit 0
fi

# pip's own output (and setuptools' "Editable installation" notice) goes to $log; a line
# here says what is going on, with the seconds and pip's current step on a terminal.
started=$SECONDS
say "installing Parley and its dependencies into .venv (about a minute on a first run; pip's log: $log)"
ticker=""
if [ -t 2 ]; then
  ( while kill -0 $$ 2>/dev/null; do
      step=$(grep -E '^ *(Collecting|Downloading|Processing|Obtaining|Building|Installing|Preparing|Getting)' "$log" 2>/dev/null \
             | tail -n 1 | sed 's/^ *//' | cut -c1-70) || true
      printf '\r\033[K  %ds %s' $((SECONDS - started)) "$step" >&2
      sleep 1
    done ) &
  ticker=$!
  trap 'kill $ticker 2>/dev/null || true' EXIT
fi
pip_install() {
  if [ "$fresh" = 1 ]; then
    .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip || return
  fi
  .venv/bin/python -m pip install --disable-pip-version-check -e ".[test]"
}
rc=0
pip_install >"$log" 2>&1 || rc=$?
if [ -n "$ticker" ]; then
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  printf '\r\033[K' >&2
fi
if [ "$rc" -ne 0 ] && grep -q 'Operation cancelled by user' "$log"; then
  die "interrupted; run this again to finish the installation"
elif [ "$rc" -ne 0 ]; then
  tail -n 15 "$log" | sed 's/^/  /' >&2
  die "pip failed (exit $rc); the whole log is in $log. Fix the cause and run this again."
fi
grep -E '^ERROR' "$log" | sed 's/^/  /' >&2 || true  # e.g. dependency conflicts pip only reports
touch "$stamp"
say "installed in $((SECONDS - started)) s"
