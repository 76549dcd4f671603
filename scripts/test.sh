#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite (what CI runs). Everything the tests
# read is in the repository (tests/fixtures/): a clone with nothing beside it is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# The package under test is this checkout's (an editable install or PYTHONPATH elsewhere
# would test other code and pass).
python - <<'PY'
import pathlib, sys
import rine
here = pathlib.Path("src").resolve()
if here not in pathlib.Path(rine.__file__).resolve().parents:
    sys.exit(f"scripts/test.sh: rine imports from {rine.__file__}, not from {here}: "
             "unset PYTHONPATH or reinstall with pip install -e .")
PY
# The linter first: seconds, and a lint error fails the run as a test would.
ruff check src tests benchmarks
python -m pytest -q "$@"
