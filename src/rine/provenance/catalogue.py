"""Known generator signatures, as data. Each entry cites where the generator's own source or
documentation shows what it writes; a new generator is a new entry here, not new code.

A signature found is a declaration, not a proof: anyone can write a PNG text chunk, and any
editor can copy one onto a photograph. `reader.py` treats them as unverified.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PngTextSignature:
    """A PNG text key written by a generator. `json`: the value must parse as JSON.
    `marker`: another chunk that must be present to pick this generator, as `key` or
    `key=substring of its value`; `contains`: a substring of this chunk's value that picks it."""

    key: str
    generator: str
    source: str
    json: bool = False
    marker: str | None = None
    contains: str | None = None


# Order matters: the first entry that matches a key wins (specific entries before generic ones).
PNG_TEXT: tuple[PngTextSignature, ...] = (
    PngTextSignature("parameters", "Fooocus", json=True, marker="fooocus_scheme",
                     source="github.com/lllyasviel/Fooocus modules/meta_parser.py (pnginfo 'parameters', 'fooocus_scheme')"),
    PngTextSignature("parameters", "SwarmUI", json=True, contains="sui_image_params",
                     source="github.com/mcmonkeyprojects/SwarmUI docs/Features/Metadata (parameters JSON, sui_image_params)"),
    PngTextSignature("parameters", "Stable Diffusion WebUI Forge", contains="Version: f",
                     source="github.com/lllyasviel/stable-diffusion-webui-forge (A1111 infotext, version 'f...')"),
    PngTextSignature("parameters", "AUTOMATIC1111 Stable Diffusion WebUI",
                     source="github.com/AUTOMATIC1111/stable-diffusion-webui modules/images.py save_image_with_geninfo (pnginfo 'parameters')"),
    PngTextSignature("prompt", "ComfyUI", json=True,
                     source="github.com/comfyanonymous/ComfyUI nodes.py SaveImage (pnginfo 'prompt' and 'workflow', JSON)"),
    PngTextSignature("workflow", "ComfyUI", json=True,
                     source="github.com/comfyanonymous/ComfyUI nodes.py SaveImage (pnginfo 'prompt' and 'workflow', JSON)"),
    PngTextSignature("invokeai_metadata", "InvokeAI", json=True,
                     source="github.com/invoke-ai/InvokeAI invokeai/app/services/image_files (PNG 'invokeai_metadata', 'invokeai_graph')"),
    PngTextSignature("invokeai_graph", "InvokeAI", json=True,
                     source="github.com/invoke-ai/InvokeAI invokeai/app/services/image_files (PNG 'invokeai_metadata', 'invokeai_graph')"),
    PngTextSignature("sd-metadata", "InvokeAI (2.x)", json=True,
                     source="github.com/invoke-ai/InvokeAI v2 ldm/invoke/pngwriter.py ('Dream', 'sd-metadata')"),
    PngTextSignature("Dream", "InvokeAI (2.x)",
                     source="github.com/invoke-ai/InvokeAI v2 ldm/invoke/pngwriter.py ('Dream', 'sd-metadata')"),
    PngTextSignature("Software", "NovelAI", contains="NovelAI",
                     source="github.com/NovelAI/novelai-image-metadata (tEXt Software 'NovelAI', Source, Comment JSON)"),
    PngTextSignature("Comment", "NovelAI", json=True, marker="Software=NovelAI",
                     source="github.com/NovelAI/novelai-image-metadata (tEXt Software 'NovelAI', Source, Comment JSON)"),
)




@dataclass(frozen=True)
class SoftwareSignature:
    """An XMP `xmp:CreatorTool` / EXIF `Software` string (matched as a case-sensitive substring)."""

    contains: str
    generator: str
    source: str


SOFTWARE: tuple[SoftwareSignature, ...] = (
    SoftwareSignature("NovelAI", "NovelAI",
                      source="github.com/NovelAI/novelai-image-metadata (Software 'NovelAI')"),
)


@dataclass(frozen=True)
class WatermarkSignature:
    """An imwatermark dwtDct message: `bits` as the generator embeds them. `min_match` is the
    fraction of bits that must agree: decoding is not exact on every image (FACTS.md: 48/48 on
    lossless texture, 21-36/48 after JPEG q90, chance level is half; our tests' textures give
    38-48/48 watermarked and at most 32/48 without). At 41/48 a random image passes with
    probability ~3e-7; a short message needs a higher fraction for the same odds."""

    name: str
    generator: str
    bits: tuple[int, ...]
    source: str
    min_match: float = 0.85


def _bytes_bits(text: bytes) -> tuple[int, ...]:
    return tuple(int(b) for byte in text for b in f"{byte:08b}")


WATERMARKS: tuple[WatermarkSignature, ...] = (
    WatermarkSignature("sdxl", "Stable Diffusion XL (diffusers / Stability AI)",
                       tuple(int(b) for b in bin(0b101100111110110010010000011110111011000110011110)[2:]),
                       source="github.com/huggingface/diffusers src/diffusers/pipelines/stable_diffusion_xl/watermark.py "
                              "(from Stability-AI/generative-models scripts/demo/streamlit_helpers.py)"),
    WatermarkSignature("sd1", "Stable Diffusion 1.x (CompVis scripts)", _bytes_bits(b"StableDiffusionV1"),
                       source="github.com/CompVis/stable-diffusion scripts/txt2img.py (wm = 'StableDiffusionV1')"),
    WatermarkSignature("sd2", "Stable Diffusion 2.x (Stability AI scripts)", _bytes_bits(b"SDV2"),
                       source="github.com/Stability-AI/stablediffusion scripts/txt2img.py (wm = 'SDV2')",
                       min_match=0.97),  # 32 bits: >= 31 agree, ~8e-9 by chance
)


def software_generator(text: str | None) -> str | None:
    if not text:
        return None
    for sig in SOFTWARE:
        if sig.contains in text:
            return sig.generator
    return None
