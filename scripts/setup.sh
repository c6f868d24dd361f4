#!/usr/bin/env bash
# Create .venv (labelloop with the train and dev extras) and, unless --no-label-studio,
# .venv-ls (Label Studio 1.23 in its own environment: it needs numpy 2, Triton's stub needs numpy 1).
# Idempotent: a second run only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

want_ls=1
extras="train,dev"
for arg in "$@"; do
  case "$arg" in
    --no-label-studio) want_ls=0 ;;
    --extras=*) extras="${arg#--extras=}" ;;
    *) echo "usage: scripts/setup.sh [--no-label-studio] [--extras=train,dev]" >&2; exit 2 ;;
  esac
done

pick_python() {
  for candidate in "${PYTHON:-}" python3.11 python3.12 python3.10 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))'; then
      echo "$candidate"; return 0
    fi
  done
  echo "labelloop needs Python 3.10-3.12 (set PYTHON=...)" >&2; return 1
}

py=$(pick_python)
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $py"
  "$py" -m venv .venv
fi
# uv resolves this dependency set in seconds where pip backtracks for minutes.
.venv/bin/python -m pip install -q --disable-pip-version-check "uv>=0.4"
echo "==> installing labelloop[$extras] into .venv"
VIRTUAL_ENV="$PWD/.venv" .venv/bin/uv pip install -q -e ".[$extras]"

if [ "$want_ls" = 1 ]; then
  if [ ! -x .venv-ls/bin/label-studio ]; then
    echo "==> installing Label Studio 1.23.2 into .venv-ls"
    "$py" -m venv .venv-ls
    .venv-ls/bin/python -m pip install -q --disable-pip-version-check "uv>=0.4"
    VIRTUAL_ENV="$PWD/.venv-ls" .venv-ls/bin/uv pip install -q "label-studio==1.23.2"
  fi
fi
echo "==> setup done"
