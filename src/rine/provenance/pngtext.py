"""PNG text chunks (tEXt, zTXt, iTXt; PNG spec 11.3.4) -> signals: generator parameters written
by A1111/Forge/Fooocus, ComfyUI, InvokeAI, NovelAI and others (see `catalogue.PNG_TEXT`).

Compressed chunks are inflated with a cap (`max_text_bytes` each, `max_total_text_bytes` per
file), so a compression bomb costs at most the cap; invalid UTF-8 and JSON that does not parse
become signals with an error.
"""

from __future__ import annotations

import json
import re
import zlib

from .catalogue import PNG_TEXT, PngTextSignature
from .types import ProvenanceLimits, Signal, cap

XMP_KEY = "XML:com.adobe.xmp"


class TextError(ValueError):
    pass


def inflate(blob: bytes, limit: int) -> bytes:
    """zlib-inflate at most `limit` bytes; raises TextError past it or on corrupt data."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(blob, limit + 1)
    except zlib.error as e:
        raise TextError(f"corrupt compressed text ({e})") from e
    if len(out) > limit:
        raise TextError(f"inflates to more than {limit} bytes (a compression bomb?); not read")
    return out


def decode_chunk(kind: bytes, body: bytes, limit: int) -> tuple[str, str]:
    """(key, text) of one text chunk. Raises TextError with a reason (key still set in `.key`)."""
    key_raw, sep, rest = body.partition(b"\x00")
    key = key_raw[:79].decode("latin-1")
    if not sep or not key_raw:
        raise TextError("no keyword")
    try:
        if kind == b"tEXt":
            return key, _capped(rest, limit).decode("latin-1")
        if kind == b"zTXt":
            return key, inflate(rest[1:], limit).decode("latin-1")
        # iTXt: compression flag, method, language\0, translated keyword\0, UTF-8 text
        if len(rest) < 2:
            raise TextError("iTXt header truncated")
        flag, text = rest[0], rest[2:].split(b"\x00", 2)
        if len(text) < 3:
            raise TextError("iTXt header truncated")
        raw = inflate(text[2], limit) if flag else _capped(text[2], limit)
        try:
            return key, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            err = TextError(f"invalid UTF-8 at byte {e.start}")
            err.text = raw.decode("utf-8", "replace")  # type: ignore[attr-defined]
            raise err from None
    except TextError as e:
        e.key = key  # type: ignore[attr-defined]
        raise


def _capped(raw: bytes, limit: int) -> bytes:
    if len(raw) > limit:
        raise TextError(f"text of {len(raw)} bytes is over the {limit}-byte cap; not read")
    return raw


_A1111_FIELD = re.compile(r"\s*([A-Za-z][\w .-]{0,40}):\s*(\"(?:\\.|[^\"])*\"|[^,]*)(?:,|$)")


def a1111_parameters(text: str, limit: int) -> dict:
    """The infotext's last line ("Steps: 20, Sampler: ..., Seed: ...") as a dict, plus the
    prompt; values capped. A1111's format: prompt, optional "Negative prompt:", settings line."""
    lines = text.strip().split("\n")
    params: dict = {}
    last = lines[-1] if len(lines) > 1 or "Steps:" in lines[-1] else ""
    for m in _A1111_FIELD.finditer(last[:8192]):
        if len(params) >= 40:
            break
        params[m.group(1).strip()] = cap(m.group(2).strip().strip('"'), limit)
    body = lines[:-1] if params else lines
    negative = [i for i, line in enumerate(body) if line.startswith("Negative prompt:")]
    prompt = "\n".join(body[: negative[0]] if negative else body)
    out = {"prompt": cap(prompt, limit)}
    if negative:
        out["negative_prompt"] = cap("\n".join(body[negative[0] :])[len("Negative prompt:") :].strip(), limit)
    out.update(params)
    return out


def comfy_parameters(graph: dict, limit: int) -> dict:
    """Model files and sampler settings of a ComfyUI prompt graph (node id -> class_type, inputs)."""
    out: dict = {}
    nodes = [n for n in list(graph.values())[:500] if isinstance(n, dict)]
    for node in nodes:
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        for name in ("ckpt_name", "unet_name", "lora_name", "seed", "steps", "cfg", "sampler_name"):
            value = inputs.get(name)
            if isinstance(value, str | int | float) and name not in out:
                out[name] = cap(value, limit)
    out["nodes"] = len(graph)
    return out


def _marked(marker: str | None, texts: dict[str, str]) -> bool:
    if marker is None:
        return True
    key, _, needle = marker.partition("=")
    return key in texts and needle in texts[key]


def _match(key: str, text: str, texts: dict[str, str]) -> PngTextSignature | None:
    for sig in PNG_TEXT:
        if sig.key == key and _marked(sig.marker, texts) and (not sig.contains or sig.contains in text):
            return sig
    return None


def read(chunks: list[tuple[bytes, bytes]], limits: ProvenanceLimits) -> tuple[list[Signal], list[str]]:
    """Signals for the text chunks, and the XMP packets found in iTXt `XML:com.adobe.xmp`."""
    signals: list[Signal] = []
    xmp: list[str] = []
    decoded: list[tuple[str, str, str | None]] = []  # key, text, error
    total = 0
    for kind, body in chunks:
        budget = min(limits.max_text_bytes, limits.max_total_text_bytes - total)
        if budget <= 0:
            signals.append(Signal("png-text", f"png:{kind.decode()}", error="text chunks over the per-file cap; the rest was not read"))
            break
        try:
            key, text = decode_chunk(kind, body, budget)
            decoded.append((key, text, None))
            total += len(text)
        except TextError as e:
            key = getattr(e, "key", "?")
            why = str(e) + (" (the per-file cap on text is reached)" if budget < limits.max_text_bytes else "")
            decoded.append((key, getattr(e, "text", ""), why))
    texts = {k: t for k, t, e in decoded if e is None}
    for key, text, error in decoded:
        if key == XMP_KEY:
            if error:
                signals.append(Signal("xmp", "png:iTXt:XML:com.adobe.xmp", error=error))
            else:
                xmp.append(text)
            continue
        signals.append(_signal(key, text, error, texts, limits))
    return signals, xmp


def _signal(key: str, text: str, error: str | None, texts: dict[str, str], limits: ProvenanceLimits) -> Signal:
    where = f"png:{cap(key, 80)}"
    value = cap(text, limits.max_value_chars)
    sig = _match(key, text, texts)
    if sig is None:
        return Signal("png-text", where, value=value, error=error)
    signal = Signal("png-text", where, value=value, generator=sig.generator, error=error)
    if error:
        return signal  # a generator's key whose value cannot be read: shown, declares nothing
    parsed = None
    if sig.json:
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError) as e:
            signal.error = f"not JSON ({cap(e, 80)}); {sig.generator} writes JSON here"
            return signal
    signal.source_type = "trainedAlgorithmicMedia"
    if sig.key == "parameters" and parsed is None:
        signal.parameters = a1111_parameters(text, limits.max_value_chars)
    elif sig.key == "prompt" and isinstance(parsed, dict):
        signal.parameters = comfy_parameters(parsed, limits.max_value_chars)
    elif isinstance(parsed, dict):
        signal.parameters = {str(k)[:40]: cap(v, limits.max_value_chars) for k, v in list(parsed.items())[:40]
                             if isinstance(v, str | int | float | bool)}
    return signal
