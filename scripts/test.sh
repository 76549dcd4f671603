#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# A missing ../shared fixture fails the run here instead of skipping the parity tests
# (tests/conftest.py reads this, as it reads CI).
export RINE_REQUIRE_SHARED=1
python -m pytest -q "$@"
