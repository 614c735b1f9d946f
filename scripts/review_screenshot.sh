#!/usr/bin/env bash
# Regenerates docs/review-label-studio.png, the README's picture of the review loop: a short
# `ciae demo` labels synthetic images, `ciae review push` sends the least confident ones to a
# Label Studio server (started as the tests start it), and headless Chromium photographs one of
# them in the labeling page with its pre-annotations. ~5-8 minutes on 2 cores. Options go to
# scripts/review_screenshot.py (--help).
#
# Installs, once:
#  - the project's .venv (scripts/bootstrap.sh) and the Label Studio server's .ls-venv
#    (scripts/label_studio.sh), as the tests do;
#  - Chromium from Debian (apt-get install chromium -> /usr/bin/chromium) when it is missing;
#  - Playwright, pinned, into a small venv of its own, .shot-venv (~170 MB), used only to drive
#    the browser. Not in .venv: a screenshot tool is no dependency of the project or its tests.
#    Not in .ls-venv: that is the server's environment, pinned to what Label Studio wants, and
#    tests/label_studio_server.py reuses a migrated database kept beside it per server version.
#    Playwright's wheel carries its driver; its own browser download (`playwright install`) is
#    never run: it drives Debian's Chromium (executable_path).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
playwright_version=${PLAYWRIGHT_VERSION:-1.63.0}
shot_venv=$root/.shot-venv
py=${PYTHON:-python3}

bash "$root/scripts/bootstrap.sh"
bash "$root/scripts/label_studio.sh"

if [ ! -x /usr/bin/chromium ]; then
  echo "[review_screenshot] no /usr/bin/chromium: installing Debian's chromium (apt-get, needs root; ~300 MB)" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "[review_screenshot] not root: run 'sudo apt-get install -y chromium' first" >&2
    exit 1
  fi
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >&2
fi

if ! "$shot_venv/bin/python" -c \
    "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '$playwright_version')" 2>/dev/null; then
  echo "[review_screenshot] installing playwright==$playwright_version into $shot_venv" >&2
  "$py" -m venv "$shot_venv"
  "$shot_venv/bin/python" -m pip install -q "playwright==$playwright_version" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi

cd "$root"
exec "$root/.venv/bin/python" "$root/scripts/review_screenshot.py" \
  --chromium /usr/bin/chromium --shot-python "$shot_venv/bin/python" "$@"
