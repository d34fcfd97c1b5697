#!/usr/bin/env bash
# Prints the path of a working Python 3.12 interpreter: `python3.12` on PATH when it runs,
# else the newest 3.12 that pyenv has installed (pyenv shims fail when 3.12 is not the active version).
set -euo pipefail
if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  command -v python3.12
  exit 0
fi
root="${PYENV_ROOT:-$HOME/.pyenv}"
candidate=$(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -1 || true)
if [ -n "$candidate" ] && "$candidate" -c 'import sys' 2>/dev/null; then
  echo "$candidate"
  exit 0
fi
echo "error: Python 3.12 not found (neither python3.12 on PATH nor a pyenv 3.12.x under $root)" >&2
exit 1
