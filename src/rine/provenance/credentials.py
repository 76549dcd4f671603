"""C2PA Content Credentials -> a signal, read and validated by c2pa-python (the Content
Authenticity Initiative's bindings to its Rust SDK).

Validation checks the claim signature, the hard binding (the data hash over exactly these
bytes) and, with trust anchors configured, that the signing certificate chains to one of
them. c2pa-python reports a state: `Trusted` (all of that), `Valid` (signature and hashes good,
signer not in the trust list) or `Invalid` (e.g. the file changed after signing). Only
`Trusted` counts as verified. Nothing is fetched: remote manifests and OCSP are off.
"""

from __future__ import annotations

import io
import json
import threading

from .types import GENERATED, ProvenanceLimits, Signal, TrustConfig, cap, short_source_type

MISSING = "c2pa: c2pa-python is not installed, so C2PA Content Credentials are not read (pip install c2pa-python)"
# One c2pa Context per thread and anchor set: building one costs ~2 ms, and c2pa-python does not
# document sharing one across threads (the detector decodes in threads).
_local = threading.local()

# failure codes -> words (C2PA 2.1 spec, 15.x "Validation"; c2pa-rs validation_status.rs)
_REASONS = {
    "signingCredential.untrusted": "its signer is not in your trust list",
    "signingCredential.expired": "its signing certificate had expired",
    "signingCredential.revoked": "its signing certificate is revoked",
    "signingCredential.invalid": "its signing certificate is invalid",
    "claimSignature.mismatch": "its signature does not match the claim",
    "claimSignature.outsideValidity": "it was signed outside the certificate's validity",
    "assertion.dataHash.mismatch": "the file was changed after signing (data hash mismatch)",
    "assertion.bmffHash.mismatch": "the file was changed after signing (hash mismatch)",
    "assertion.boxesHash.mismatch": "the file was changed after signing (hash mismatch)",
    "assertion.hashedURI.mismatch": "an assertion was changed after signing",
}


def available() -> bool:
    try:
        import c2pa  # noqa: F401
    except ImportError:
        return False
    return True


def _context(trust: TrustConfig):
    import c2pa

    contexts = _local.__dict__.setdefault("contexts", {})
    key = trust.anchors_pem
    if key not in contexts:
        verify = {"verify_trust": True, "remote_manifest_fetch": False, "ocsp_fetch": False}
        config: dict = {"verify": verify}
        if trust.configured:
            config["trust"] = {"trust_anchors": trust.anchors_pem}
        if len(contexts) > 8:  # anchors change rarely; do not grow without bound
            contexts.clear()
        contexts[key] = c2pa.Context.from_dict(config)
    return contexts[key]


def manifest_source_type(actions: list[dict]) -> str | None:
    """The manifest's declaration: a generative source type on any action wins (an edit with
    generative fill makes a capture composite), else the first action's term."""
    terms = [short_source_type(a.get("digitalSourceType")) for a in actions]
    terms = [t for t in terms if t]
    generative = [t for t in terms if t in GENERATED]
    return generative[0] if generative else (terms[0] if terms else None)


def read(data: bytes, mime: str, trust: TrustConfig, limits: ProvenanceLimits, expected: bool) -> Signal | None:
    """The active manifest as a signal; None when the file has no manifest. `expected`: the
    container walk found a C2PA/JUMBF box, so finding no manifest means a corrupt one."""
    import c2pa

    try:
        reader = c2pa.Reader(mime, io.BytesIO(data), context=_context(trust))
        state = str(reader.get_validation_state())
        store = json.loads(reader.json())
    except Exception as e:  # c2pa-python raises its own C2paError subclasses; all mean "unreadable"
        name = type(e).__name__
        if "ManifestNotFound" in name or "no JUMBF" in str(e):
            if not expected:
                return None
            return Signal("c2pa", "c2pa:manifest-store", error="a JUMBF box is present but holds no readable C2PA manifest (corrupt?)")
        return Signal("c2pa", "c2pa:manifest-store", error=f"unreadable C2PA data ({cap(e, 160)})")
    manifest = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
    actions = _actions(manifest, limits)
    info = manifest.get("signature_info") or {}
    signer = " / ".join(x for x in (info.get("common_name"), info.get("issuer")) if x) or None
    gens = manifest.get("claim_generator_info") or []
    claim_gen = manifest.get("claim_generator") or ", ".join(
        f"{g.get('name', '')} {g.get('version', '')}".strip() for g in gens[:3] if isinstance(g, dict))
    failures = _codes(store, "failure")
    term = manifest_source_type(actions)
    return Signal(
        "c2pa", "c2pa:active-manifest", value=cap(manifest.get("title") or store.get("active_manifest"), limits.max_value_chars),
        generator=cap(claim_gen, 120) or None, source_type=term, verified=state == "Trusted" and not failures,
        signer=cap(signer, 160), claim_generator=cap(claim_gen, 160) or None, actions=actions,
        validation_state=state, failed_codes=failures,
    )


def _actions(manifest: dict, limits: ProvenanceLimits) -> list[dict]:
    out: list[dict] = []
    for assertion in manifest.get("assertions") or []:
        if not isinstance(assertion, dict) or not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        for act in (assertion.get("data") or {}).get("actions") or []:
            if not isinstance(act, dict) or len(out) >= 32:
                continue
            agent = act.get("softwareAgent")
            agent = agent.get("name") if isinstance(agent, dict) else agent
            out.append({k: v for k, v in {
                "action": cap(act.get("action"), 80),
                "digitalSourceType": short_source_type(act.get("digitalSourceType")),
                "softwareAgent": cap(agent, limits.max_value_chars),
            }.items() if v})
    return out


def _codes(store: dict, kind: str) -> list[str]:
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    codes = [r.get("code") for r in results.get(kind) or [] if isinstance(r, dict)]
    if kind == "failure" and not results:  # older stores: only validation_status
        codes = [r.get("code") for r in store.get("validation_status") or [] if isinstance(r, dict)]
    return [c for c in codes if isinstance(c, str)][:32]


def why_not(signal: Signal, trust: TrustConfig) -> str:
    """In words, why a manifest is not verified (or that it is)."""
    who = f"signed by {signal.signer}" if signal.signer else "signed"
    if signal.error:
        return f"C2PA data present but unreadable: {signal.error}"
    if signal.verified:
        return f"verified: {who}, chaining to your trust anchors ({trust.source or 'configured'})"
    codes = signal.failed_codes or []
    bad = [c for c in codes if c != "signingCredential.untrusted"]
    if bad:
        words = [_REASONS.get(c, c) for c in bad]
        return f"not verified: {who}, but {'; '.join(dict.fromkeys(words))}"
    if not trust.configured:
        return f"not verified: {who}, not in your trust list (no trust anchors configured: --trust-anchors PEM)"
    return f"not verified: {who}, not in your trust list"
