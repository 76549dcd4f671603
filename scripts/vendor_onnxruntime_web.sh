#!/usr/bin/env bash
# Fetch onnxruntime-web (MIT licence, Microsoft) from the npm registry into the folder that
# `rine serve --client-side` serves it from; rine itself never loads anything from a CDN.
#   bash scripts/vendor_onnxruntime_web.sh
# Only the wasm backend's three files are kept (its ES module, the Emscripten loader and the
# .wasm); the tarball is checked against the sha256 pinned here before anything is unpacked.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="1.30.0"  # keep in step with ORT_WEB_VERSION in src/rine/server/client_side.py
SHA256="d2228df7e4616bc3348bf504ee888f3bec43789a273f0a63f3e68d203ce3bf71"
FILES=(ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm)
DEST="src/rine/server/vendor/onnxruntime-web"

if ! command -v npm >/dev/null 2>&1; then
  echo "vendor: npm is not installed (apt-get install npm); rine serve --client-side needs onnxruntime-web" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "onnxruntime-web@${VERSION}" >/dev/null)
tarball="$tmp/onnxruntime-web-${VERSION}.tgz"
echo "${SHA256}  ${tarball}" | sha256sum --check --quiet -
tar -xzf "$tarball" -C "$tmp" "${FILES[@]/#/package/dist/}" package/package.json
mkdir -p "$DEST"
for f in "${FILES[@]}"; do
  install -m 0644 "$tmp/package/dist/$f" "$DEST/$f"
done
cat > "$DEST/NOTICE.txt" <<NOTE
onnxruntime-web ${VERSION} from the npm registry (sha256 of the package: ${SHA256}).
Copyright (c) Microsoft Corporation. Licensed under the MIT License
(https://github.com/microsoft/onnxruntime/blob/main/LICENSE). Files: ${FILES[*]}.
NOTE
echo "vendor: onnxruntime-web ${VERSION} in ${DEST}"
