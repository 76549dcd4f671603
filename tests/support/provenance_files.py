"""Files with provenance, built here: a throwaway CA (`cryptography`), C2PA manifests signed
with c2pa-python, PNG text chunks as generators write them, XMP in JPEG and PNG, and the SDXL
invisible watermark. Nothing is downloaded; every file is made from numbers in this module.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
# diffusers' SDXL message (pipelines/stable_diffusion_xl/watermark.py)
SDXL_BITS = [int(b) for b in bin(0b101100111110110010010000011110111011000110011110)[2:]]


def texture(size: int = 320, seed: int = 0) -> np.ndarray:
    """A natural-looking RGB texture, uint8 [size, size, 3]: smooth gradients plus noise, so
    the dwtDct watermark has coefficients to sit on (flat images lose it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - x), np.sin(3 * x * y + 1)], -1)
    img = 128 + 70 * base + rng.normal(0, 18, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------- a throwaway CA
@dataclass
class Authority:
    root_pem: bytes
    sign_cert: bytes  # leaf + root, PEM
    private_key: bytes  # leaf key, PEM PKCS#8


def make_authority(name: str = "Rine Test Root") -> Authority:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Rine Tests")])
    root = (
        x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
        .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} Signer"),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Rine Tests")])
    leaf = (
        x509.CertificateBuilder().subject_name(leaf_name).issuer_name(root_name)
        .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    root_pem = root.public_bytes(pem)
    key = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return Authority(root_pem=root_pem, sign_cert=leaf.public_bytes(pem) + root_pem, private_key=key)


def sign(data: bytes, mime: str, authority: Authority, source_type: str,
         generator: str = "RineTest/1.0", actions: list[dict] | None = None) -> bytes:
    """`data` with a C2PA manifest whose `c2pa.created` action declares `source_type` (a short
    IPTC term), signed by `authority`'s leaf."""
    import c2pa

    manifest = {
        "claim_generator_info": [{"name": generator.split("/")[0], "version": generator.partition("/")[2] or "1"}],
        "title": "test image",
        "format": mime,
        "assertions": [{"label": "c2pa.actions", "data": {"actions": actions or [
            {"action": "c2pa.created", "digitalSourceType": IPTC + source_type}]}}],
    }
    info = c2pa.C2paSignerInfo(alg=b"es256", sign_cert=authority.sign_cert,
                               private_key=authority.private_key, ta_url=None)
    signer = c2pa.Signer.from_info(info)
    builder = c2pa.Builder(json.dumps(manifest))
    out = io.BytesIO()
    builder.sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()


# ---------------------------------------------------------------------------- PNG text chunks
def png_with_text(array: np.ndarray, chunks: list[tuple[str, str, str]]) -> bytes:
    """PNG with text chunks: (`tEXt`|`zTXt`|`iTXt`, key, value)."""
    info = PngImagePlugin.PngInfo()
    for kind, key, value in chunks:
        if kind == "tEXt":
            info.add_text(key, value)
        elif kind == "zTXt":
            info.add_text(key, value, zip=True)
        else:
            info.add_itxt(key, value, zip=False)
    return encode(array, "PNG", pnginfo=info)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    import struct

    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def insert_png_chunks(png: bytes, chunks: list[bytes]) -> bytes:
    """Raw chunks put right after IHDR (so hostile ones need no Pillow cooperation)."""
    end_ihdr = 8 + 4 + 4 + 13 + 4
    return png[:end_ihdr] + b"".join(chunks) + png[end_ihdr:]


A1111_PARAMETERS = (
    "a lighthouse at dusk, oil painting\nNegative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: v1.7.0"
)
COMFY_PROMPT = json.dumps({
    "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "cfg": 8.0}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
})


# ---------------------------------------------------------------------------- XMP
def xmp_packet(source_type: str | None = "trainedAlgorithmicMedia", creator_tool: str | None = None) -> str:
    props = ""
    if source_type:
        props += f' Iptc4xmpExt:DigitalSourceType="{IPTC}{source_type}"'
    if creator_tool:
        props += f' xmp:CreatorTool="{creator_tool}"'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
        f' xmlns:xmp="http://ns.adobe.com/xap/1.0/"{props}/>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )


def jpeg_with_xmp(array: np.ndarray, xmp: str | bytes) -> bytes:
    """JPEG with an APP1 XMP segment (Pillow writes it from `xmp=`)."""
    return encode(array, "JPEG", quality=90, xmp=xmp.encode() if isinstance(xmp, str) else xmp)


def png_with_xmp(array: np.ndarray, xmp: str) -> bytes:
    return png_with_text(array, [("iTXt", "XML:com.adobe.xmp", xmp)])


# ---------------------------------------------------------------------------- watermark
def sdxl_watermarked(array: np.ndarray) -> np.ndarray:
    """`array` watermarked as diffusers' `StableDiffusionXLWatermarker` does it: imwatermark's
    dwtDct on the RGB float array (diffusers passes RGB where imwatermark expects BGR)."""
    from imwatermark import WatermarkEncoder

    enc = WatermarkEncoder()
    enc.set_watermark("bits", SDXL_BITS)
    out = enc.encode(array.astype(np.float32), "dwtDct")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def sd1_watermarked(array: np.ndarray) -> np.ndarray:
    """As the Stable Diffusion v1 scripts do it: BGR uint8, bytes `StableDiffusionV1`."""
    from imwatermark import WatermarkEncoder

    enc = WatermarkEncoder()
    enc.set_watermark("bytes", b"StableDiffusionV1")
    return enc.encode(np.ascontiguousarray(array[:, :, ::-1]), "dwtDct")[:, :, ::-1].copy()


# ---------------------------------------------------------------------------- fuzzing
def metadata_seeds() -> dict[str, bytes]:
    """Small files whose metadata the provenance readers parse: the fuzzer's starting points."""
    img = texture(40, seed=2)
    seeds = {
        "png-a1111-ztxt": png_with_text(img, [("zTXt", "parameters", A1111_PARAMETERS)]),
        "png-comfy-itxt": png_with_text(img, [("iTXt", "prompt", COMFY_PROMPT), ("tEXt", "Software", "NovelAI")]),
        "png-xmp": png_with_xmp(img, xmp_packet(creator_tool="NovelAI")),
        "jpeg-xmp": jpeg_with_xmp(img, xmp_packet()),
        "webp-xmp": encode(img, "WEBP", lossless=True, xmp=xmp_packet().encode()),
    }
    try:
        seeds["jpeg-c2pa"] = sign(encode(img, "JPEG", quality=80), "image/jpeg", make_authority(), "digitalCapture")
    except ImportError:
        pass
    return seeds


def fuzz_provenance(data: bytes, extra_memory: int) -> tuple[int, int]:
    """Read provenance in a (memory-capped) worker: (signals, errors). Anything raised is a finding."""
    from support.archives_jobs import _limit_memory

    try:
        _limit_memory(extra_memory)
    except OSError:
        pass
    from rine.provenance.reader import read_provenance
    from rine.provenance.types import ProvenanceLimits

    limits = ProvenanceLimits()
    p = read_provenance(data, limits=limits)
    record = p.to_dict()
    json.dumps(record)  # the record must serialise
    for s in p.signals:
        assert s.value is None or len(s.value) <= limits.max_value_chars, s.where
    return len(p.signals), sum(1 for s in p.signals if s.error)
