// In-browser scoring (rine serve --client-side): the image is decoded, cropped and scored in
// this page with onnxruntime-web (wasm), downloaded from this server with the ONNX export;
// nothing is uploaded. app.js asks `rineClientSide.active()` before sending a file.
//
// Decoding and cropping are rine's (src/rine/data/images.py, preprocess.py), byte for byte:
//  * Pillow's convert("RGB"): no colour management, no EXIF rotation, alpha dropped without
//    compositing, grey replicated, palettes looked up, 16-bit samples cut to their high byte;
//  * PNG is decoded here (a canvas premultiplies alpha, which loses the colour of translucent
//    pixels); JPEG and the others by the browser with colour conversion off and the EXIF
//    orientation tag set to 1 first (createImageBitmap would otherwise rotate);
//  * centre crop of the un-resized image, zero-padded when smaller, corner at Python's
//    round((H - S) / 2) (halves to even), or ten-crop (torchvision's order);
//  * the decision from the MEAN logit of the views, as Detector.predict: app.js's
//    decideFromLogit with /v1/client-side's `calibration` and `threshold` (the server's
//    DecisionRule: calibrated probability, cut, "uncertain" band), so a record here is the
//    record /v1/detect gives for the same file.
"use strict";

(() => {
  const state = { info: null, session: null, loading: null, enabled: false };
  const $ = (sel) => document.querySelector(sel);

  // Python's round() of x / 2 for an integer x: halves go to the even neighbour.
  function halfRoundedEven(x) {
    if (x % 2 === 0) return x / 2;
    const lo = (x - 1) / 2;
    return lo % 2 === 0 ? lo : lo + 1;
  }

  // ------------------------------------------------------------------ decoding
  function isPNG(b) {
    return b.length > 8 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47;
  }

  function isJPEG(b) {
    return b.length > 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff;
  }

  async function inflate(chunks) {
    const stream = new Blob(chunks).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  // PNG -> { width, height, data (RGB), channels: 3 }, as Pillow's open + convert("RGB").
  async function decodePNG(bytes) {
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let pos = 8, ihdr = null, palette = null;
    const idat = [];
    while (pos + 8 <= bytes.length) {
      const len = dv.getUint32(pos);
      const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
      const data = bytes.subarray(pos + 8, pos + 8 + len);
      if (data.length !== len) throw new Error("corrupt or truncated image: PNG chunk cut short");
      if (type === "IHDR") {
        ihdr = { w: dv.getUint32(pos + 8), h: dv.getUint32(pos + 12), depth: data[8], ctype: data[9], interlace: data[12] };
      } else if (type === "PLTE") palette = data;
      else if (type === "IDAT") idat.push(data);
      else if (type === "IEND") break;
      pos += 12 + len;
    }
    if (!ihdr || !idat.length) throw new Error("corrupt or truncated image: no PNG header or data");
    const { w, h, depth, ctype } = ihdr;
    const channels = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 }[ctype];
    if (!channels) throw new Error("corrupt or truncated image: unknown PNG colour type");
    if (depth === 16 && ctype === 0) throw new Error("unsupported image mode 'I;16' (16-bit or float pixels); convert it to 8-bit RGB first");
    checkPixels(w, h);
    const raw = await inflate(idat);
    const bits = channels * depth, bpp = Math.max(1, bits >> 3);
    const out = new Uint8Array(w * h * 3);
    const passes = ihdr.interlace
      ? [[0, 0, 8, 8], [4, 0, 8, 8], [0, 4, 4, 8], [2, 0, 4, 4], [0, 2, 2, 4], [1, 0, 2, 2], [0, 1, 1, 2]]
      : [[0, 0, 1, 1]];
    let at = 0;
    for (const [x0, y0, dx, dy] of passes) {
      const pw = Math.ceil((w - x0) / dx), ph = Math.ceil((h - y0) / dy);
      if (pw <= 0 || ph <= 0) continue;
      const rowBytes = Math.ceil((pw * bits) / 8);
      let prev = new Uint8Array(rowBytes), cur = new Uint8Array(rowBytes);
      for (let r = 0; r < ph; r++) {
        if (at + 1 + rowBytes > raw.length) throw new Error("corrupt or truncated image: PNG data cut short");
        const filter = raw[at];
        cur.set(raw.subarray(at + 1, at + 1 + rowBytes));
        at += 1 + rowBytes;
        unfilter(filter, cur, prev, bpp);
        const y = y0 + r * dy;
        for (let c = 0; c < pw; c++) {
          const o = (y * w + x0 + c * dx) * 3;
          pixel(cur, c, depth, ctype, palette, out, o);
        }
        [prev, cur] = [cur, prev];
      }
    }
    return { width: w, height: h, data: out, channels: 3 };
  }

  function unfilter(type, cur, prev, bpp) {
    const n = cur.length;
    if (type === 0) return;
    for (let i = 0; i < n; i++) {
      const a = i >= bpp ? cur[i - bpp] : 0, b = prev[i], c = i >= bpp ? prev[i - bpp] : 0;
      let add;
      if (type === 1) add = a;
      else if (type === 2) add = b;
      else if (type === 3) add = (a + b) >> 1;
      else if (type === 4) {
        const p = a + b - c, pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
        add = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      } else throw new Error("corrupt or truncated image: bad PNG filter");
      cur[i] = (cur[i] + add) & 0xff;
    }
  }

  // One pixel of an unfiltered row -> RGB at out[o..o+2], as Pillow's unpackers + convert("RGB").
  function pixel(row, c, depth, ctype, palette, out, o) {
    if (depth < 8) {  // grey 1/2/4 bit (Pillow scales to 0..255) or palette indices
      const perByte = 8 / depth, shift = 8 - depth * (1 + (c % perByte));
      const v = (row[Math.floor(c / perByte)] >> shift) & ((1 << depth) - 1);
      if (ctype === 3) return lookup(palette, v, out, o);
      const g = (v * 255) / ((1 << depth) - 1);
      out[o] = out[o + 1] = out[o + 2] = g;
      return;
    }
    const step = depth === 16 ? 2 : 1;  // 16-bit: the high (first) byte, as Pillow's ;16B modes
    const channels = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 }[ctype];
    const i = c * channels * step;
    if (ctype === 3) return lookup(palette, row[i], out, o);
    if (ctype === 0 || ctype === 4) {
      out[o] = out[o + 1] = out[o + 2] = row[i];
    } else {  // RGB, RGBA: alpha dropped, not composited
      out[o] = row[i]; out[o + 1] = row[i + step]; out[o + 2] = row[i + 2 * step];
    }
  }

  function lookup(palette, index, out, o) {
    const p = 3 * index;
    const ok = palette && p + 2 < palette.length;  // Pillow's palette is zero beyond PLTE
    out[o] = ok ? palette[p] : 0; out[o + 1] = ok ? palette[p + 1] : 0; out[o + 2] = ok ? palette[p + 2] : 0;
  }

  // A copy of a JPEG whose EXIF orientation (if any) says 1: rine does not rotate images.
  function withoutOrientation(bytes) {
    const b = new Uint8Array(bytes);
    let pos = 2;
    while (pos + 4 <= b.length && b[pos] === 0xff) {
      const marker = b[pos + 1], len = (b[pos + 2] << 8) | b[pos + 3];
      if (marker === 0xda) break;  // start of scan: no more metadata
      const s = pos + 4;
      if (marker === 0xe1 && len > 16 && String.fromCharCode(...b.subarray(s, s + 4)) === "Exif") {
        const t = s + 6, le = b[t] === 0x49;
        const u16 = (i) => (le ? b[i] | (b[i + 1] << 8) : (b[i] << 8) | b[i + 1]);
        const u32 = (i) => (le ? (b[i] | (b[i + 1] << 8) | (b[i + 2] << 16)) + b[i + 3] * 2 ** 24
          : b[i] * 2 ** 24 + ((b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]));
        const ifd = t + u32(t + 4);
        const n = ifd + 2 <= b.length ? u16(ifd) : 0;
        for (let k = 0; k < n; k++) {
          const e = ifd + 2 + 12 * k;
          if (e + 12 > b.length) break;
          if (u16(e) === 0x0112) { b[e + 8] = le ? 1 : 0; b[e + 9] = le ? 0 : 1; }
        }
      }
      pos += 2 + len;
    }
    return b;
  }

  // Browser-decoded formats -> { width, height, data (RGBA), channels: 4 }. Exact for opaque
  // images; the colour of translucent pixels of WebP/GIF passes through premultiplied alpha.
  async function decodeWithBrowser(bytes) {
    const blob = new Blob([isJPEG(bytes) ? withoutOrientation(bytes) : bytes]);
    let bitmap;
    try {
      bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image" });
    } catch (e) {
      throw new Error("not an image this browser can decode; use the server to score it");
    }
    checkPixels(bitmap.width, bitmap.height);
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    const data = ctx.getImageData(0, 0, bitmap.width, bitmap.height, { colorSpace: "srgb" }).data;
    const out = { width: bitmap.width, height: bitmap.height, data, channels: 4 };
    bitmap.close();
    return out;
  }

  function checkPixels(w, h) {
    const limit = state.info && state.info.max_pixels;
    if (limit && w * h > limit) throw new Error(`too many pixels: ${w}x${h} = ${w * h} > limit ${limit}`);
  }

  async function decode(blob) {
    const bytes = new Uint8Array(await blob.arrayBuffer());
    if (!bytes.length) throw new Error("empty file");
    return isPNG(bytes) ? decodePNG(bytes) : decodeWithBrowser(bytes);
  }

  // ------------------------------------------------------------------ crops
  // uint8 views [V, S, S, 3] of a decoded image, as preprocess.crop_views ("center" or "ten").
  function cropViews(img, size, mode) {
    const { width: w, height: h } = img;
    const H = Math.max(h, size), W = Math.max(w, size);
    const padTop = (H - h) >> 1, padLeft = (W - w) >> 1;
    const centre = [halfRoundedEven(H - size), halfRoundedEven(W - size)];
    const corners = mode === "ten"
      ? [[0, 0], [0, W - size], [H - size, 0], [H - size, W - size], centre]
      : [centre];
    const windows = corners.map(([t, l]) => [t, l, false]);
    if (mode === "ten") for (const [t, l] of corners) windows.push([t, W - size - l, true]);
    const views = new Uint8Array(windows.length * size * size * 3);
    const ch = img.channels, src = img.data;
    windows.forEach(([top, left, mirror], v) => {
      const base = v * size * size * 3;
      for (let y = 0; y < size; y++) {
        const sy = top + y - padTop;
        if (sy < 0 || sy >= h) continue;  // zero padding
        for (let x = 0; x < size; x++) {
          const sx = left + x - padLeft;
          if (sx < 0 || sx >= w) continue;
          const s = (sy * w + sx) * ch, d = base + (y * size + (mirror ? size - 1 - x : x)) * 3;
          views[d] = src[s]; views[d + 1] = src[s + 1]; views[d + 2] = src[s + 2];
        }
      }
    });
    return { views, n: windows.length, size };
  }

  async function crops(blob, info = state.info) {
    return cropViews(await decode(blob), info.image_size, info.crop);
  }

  // ------------------------------------------------------------------ scoring
  function status(text) {
    const el = $("#client-side-status");
    if (el) el.textContent = text;
  }

  async function loadSession() {
    if (state.session) return state.session;
    if (!state.loading) {
      state.loading = (async () => {
        const info = state.info;
        status(`Downloading the model (${(info.model_bytes / 2 ** 20).toFixed(0)} MB) and ${info.runtime}\u2026`);
        const ort = await import(info.runtime_url + "ort.wasm.min.mjs");
        ort.env.wasm.wasmPaths = info.runtime_url;
        ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation; one is enough here
        ort.env.wasm.proxy = false;
        const res = await fetch(info.model_url, { headers: typeof apiHeaders === "function" ? apiHeaders() : {} });
        if (!res.ok) throw new Error(`the server answered HTTP ${res.status} for the model`);
        const model = new Uint8Array(await res.arrayBuffer());
        state.session = await ort.InferenceSession.create(model, { executionProviders: ["wasm"] });
        state.ort = ort;
        status("Images are scored in this browser: they are not uploaded.");
        return state.session;
      })().catch((e) => { state.loading = null; status("The in-browser model could not be loaded: " + e.message); throw e; });
    }
    return state.loading;
  }

  // One file -> the record /v1/detect would give (name, prob_fake, logit, verdict, ...).
  async function scoreFile(file) {
    const session = await loadSession();
    const info = state.info;
    let c;
    try {
      c = await crops(file);
    } catch (e) {
      return { name: file.name, status: 422, prob_fake: null, logit: null, is_fake: null, verdict: null,
        block_importance: null, error: e.message };
    }
    const input = new state.ort.Tensor("uint8", c.views, [c.n, c.size, c.size, 3]);
    const out = await session.run({ [info.input]: input }, ["logit", "block_contribution"]);
    const logits = out.logit.data, contrib = out.block_contribution.data;
    const blocks = contrib.length / c.n;
    let sum = 0;
    for (const v of logits) sum += v;
    // Ten-crop: the MEAN logit, calibrated after averaging (as the reference and the server:
    // never a mean of the views' calibrated probabilities).
    const logit = sum / c.n;
    const importance = Array.from({ length: blocks }, (_, b) => {
      let s = 0;
      for (let v = 0; v < c.n; v++) s += contrib[v * blocks + b];
      return s / c.n;
    });
    const d = decideFromLogit(logit, info.calibration, info.threshold);  // app.js, DecisionRule's twin
    const record = { name: file.name, status: 200, prob_fake: d.probFake, logit, is_fake: d.isFake,
      verdict: d.verdict, block_importance: importance, error: null, client_side: true };
    if (info.calibration) record.threshold = info.threshold;  // as /v1/detect: a calibration or an override
    return record;
  }

  async function score(file, card, show) {
    card.querySelector(".status").textContent = "Scoring in this browser\u2026";
    let record;
    try {
      record = await scoreFile(file);
    } catch (e) {
      record = { error: "in-browser scoring failed: " + e.message + " (untick \u201cscore in this browser\u201d to use the server)" };
    }
    show(card, record);
    const note = document.createElement("p");
    note.className = "client-note";
    note.textContent = "Scored in this browser: this image was not uploaded.";
    card.querySelector(".info").appendChild(note);
  }

  function addControls(info) {
    const box = document.createElement("div");
    box.id = "client-side";
    box.className = "client-side";
    const label = document.createElement("label");
    const toggle = document.createElement("input");
    toggle.type = "checkbox";
    toggle.id = "client-side-toggle";
    toggle.checked = true;
    label.append(toggle, " Score in this browser: images are not uploaded (downloads the model once, "
      + `${(info.model_bytes / 2 ** 20).toFixed(0)} MB). Untick to send them to the server instead.`);
    const note = document.createElement("p");
    note.id = "client-side-status";
    note.setAttribute("aria-live", "polite");
    box.append(label, note);
    $("#dropzone").after(box);
    const lede = $(".lede");
    const serverText = lede ? lede.textContent : "";
    const update = () => {
      state.enabled = toggle.checked;
      if (lede) lede.textContent = toggle.checked
        ? "Drop or choose images to score them with RINE, in this browser: nothing is uploaded."
        : serverText;
      status(toggle.checked ? "Images are scored in this browser: they are not uploaded." : "Images are sent to this server to be scored.");
      if (toggle.checked) loadSession().catch(() => {});
    };
    toggle.addEventListener("change", update);
    update();
  }

  async function init() {
    for (let attempt = 0; attempt < 900; attempt++) {
      try {
        const res = await fetch("/v1/client-side", { headers: typeof apiHeaders === "function" ? apiHeaders() : {} });
        if (res.ok) {
          const info = await res.json();
          if (!info.enabled) return;  // not started with --client-side
          state.info = info;
          addControls(info);
          return;
        }
        if (res.status !== 503) return;  // 401: no key yet
      } catch (e) { /* the server is restarting: try again */ }
      await new Promise((r) => setTimeout(r, 2000));  // the model is loading
    }
  }

  window.rineClientSide = {
    active: () => state.enabled && state.info !== null,
    score,
    crops: (blob, info) => crops(blob, info || state.info),
    ready: () => loadSession().then(() => true),
  };
  document.addEventListener("DOMContentLoaded", () => {
    init();
    // A server with an API key answers 401 until the key is entered: ask again then.
    const key = $("#api-key");
    if (key) key.addEventListener("change", () => { if (!state.info) init(); });
  });
})();
