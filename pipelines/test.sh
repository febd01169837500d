#!/usr/bin/env bash
# Install sirf_fbsem (CPU torch) into ./.venv and run the test suite.
# Usage: bash pipelines/test.sh [pytest args]
# Where this machine's python imports SIRF (sirf.STIR: a local SIRF build on its path, or the
# SIRF Docker image), the venv sees that SIRF too and the with-SIRF tests run; elsewhere they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-ci.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
SIRF_DIRS=$("$PY" - <<'PYEOF' 2>/dev/null || true
import os, sirf, sirf.STIR
dirs = [os.path.dirname(os.path.dirname(sirf.__file__))]
try:
    import stir
    dirs.append(os.path.dirname(stir.__file__))
except ImportError:
    pass
print("\n".join(dict.fromkeys(dirs)))
PYEOF
)
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -n "$SIRF_DIRS" ]; then
  echo "$SIRF_DIRS" > "$SITE/sirf_host.pth"
  .venv/bin/python -m pip install -q --disable-pip-version-check deprecation
  echo "SIRF found ($(echo "$SIRF_DIRS" | head -1)): the with-SIRF tests run"
else
  rm -f "$SITE/sirf_host.pth"
fi
exec .venv/bin/python -m pytest -ra "$@"
