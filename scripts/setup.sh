#!/usr/bin/env bash
# Install rine and what it needs on a fresh machine.
#   bash scripts/setup.sh          # the package, for scoring images
#   bash scripts/setup.sh --dev    # + test, server and browser-test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

# torch is pinned to the CPU wheel this project is built against; installed first so
# that nothing later resolves a different (CUDA) build.
python -m pip install --quiet "torch==2.13.0"
# libjpeg-turbo's headers let pip build rine's optional crop-aware JPEG decoder
# (rine.data._jpeg_crop); without them rine installs and decodes with Pillow alone.
if [[ ! -e /usr/include/jpeglib.h ]] && command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjpeg62-turbo-dev >/dev/null) \
    || echo "setup: could not install libjpeg62-turbo-dev; JPEGs will be decoded whole by Pillow" >&2
fi
if [[ "${1:-}" == "--dev" ]]; then
  python -m pip install --quiet -e ".[dev]"
  # The reference for the watermark decoder's equality test. Without --no-deps it would pull
  # opencv-python (clobbering opencv-python-headless's cv2) and an unpinned torch.
  python -m pip install --quiet --no-deps "invisible-watermark==0.2.0"
  # Browser tests drive Debian's Chromium (Playwright's own browser download is not used).
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "setup: could not install chromium; browser tests will be skipped" >&2
  fi
  # In-browser scoring (rine serve --client-side) serves onnxruntime-web, fetched from npm.
  if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null) || true
  fi
  bash scripts/vendor_onnxruntime_web.sh \
    || echo "setup: could not fetch onnxruntime-web; the client-side browser test will be skipped" >&2
else
  python -m pip install --quiet -e .
fi
