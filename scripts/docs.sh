#!/usr/bin/env bash
# Build the documentation site: generate the reference fragments from the code
# (scripts/gen_docs.py -> docs/_generated/, git-ignored), then `mkdocs build --strict`,
# which fails on a broken link, a missing page or a missing fragment.
#   bash scripts/docs.sh             # into site/
#   bash scripts/docs.sh /tmp/site   # into another directory
set -euo pipefail
SITE=$(realpath -m "${1:-$(dirname "$0")/../site}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import commlmo, mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null; then
  bash scripts/setup.sh
fi
"$PY" scripts/gen_docs.py
exec "$PY" -m mkdocs build --strict --site-dir "$SITE"
