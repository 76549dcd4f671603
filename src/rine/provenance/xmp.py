"""XMP packets -> signals: the IPTC `Iptc4xmpExt:DigitalSourceType` (what several generators,
Google's and Meta's among them, write) and the `xmp:CreatorTool`.

XMP is untrusted XML: it is parsed with defusedxml (no entities, no DTDs, no external
references), and the walk stops past `max_xml_depth` levels or `max_xml_elements` elements.
"""

from __future__ import annotations

import io

from .catalogue import software_generator
from .types import ProvenanceLimits, Signal, cap, short_source_type

NS_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
NS_XMP = "http://ns.adobe.com/xap/1.0/"
NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
WANTED = {
    f"{{{NS_IPTC_EXT}}}DigitalSourceType": "Iptc4xmpExt:DigitalSourceType",
    f"{{{NS_XMP}}}CreatorTool": "xmp:CreatorTool",
}


class XmpError(ValueError):
    pass


def properties(packet: bytes | str, limits: ProvenanceLimits) -> dict[str, str]:
    """The wanted properties of one packet, as attributes or as elements. Raises XmpError."""
    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import iterparse

    raw = packet.encode("utf-8", "replace") if isinstance(packet, str) else packet
    if len(raw) > limits.max_xmp_bytes:
        raise XmpError(f"packet of {len(raw)} bytes is over the {limits.max_xmp_bytes}-byte cap; not read")
    found: dict[str, str] = {}
    depth = elements = 0
    try:
        for event, elem in iterparse(io.BytesIO(raw), events=("start", "end"), forbid_dtd=True):
            if event == "end":
                depth -= 1
                if elem.tag in WANTED and (elem.text or "").strip():
                    found.setdefault(WANTED[elem.tag], elem.text.strip())
                continue
            depth += 1
            elements += 1
            if depth > limits.max_xml_depth:
                raise XmpError(f"nested deeper than {limits.max_xml_depth} levels; not read further")
            if elements > limits.max_xml_elements:
                raise XmpError(f"more than {limits.max_xml_elements} elements; not read further")
            for name, value in elem.attrib.items():
                if name in WANTED:
                    found.setdefault(WANTED[name], value)
                elif name == f"{{{NS_RDF}}}resource" and elem.tag in WANTED:
                    found.setdefault(WANTED[elem.tag], value)
    except DefusedXmlException as e:
        raise XmpError(f"refused: {type(e).__name__} (entities or DTDs in XMP)") from e
    except SyntaxError as e:  # ParseError
        if found:
            return found  # trailing junk after the packet (padding, a cut file): keep what was read
        raise XmpError(f"not well-formed XML ({cap(e, 100)})") from e
    return found


def read(packets: list[tuple[str, bytes | str]], limits: ProvenanceLimits) -> list[Signal]:
    signals: list[Signal] = []
    for where, packet in packets:
        try:
            found = properties(packet, limits)
        except XmpError as e:
            signals.append(Signal("xmp", where, error=str(e)))
            continue
        if not found:
            signals.append(Signal("xmp", where, value="XMP without a source type or creator tool"))
        tool = found.get("xmp:CreatorTool")
        if "Iptc4xmpExt:DigitalSourceType" in found:
            value = found["Iptc4xmpExt:DigitalSourceType"]
            term = short_source_type(value)
            signals.append(Signal(
                "xmp", f"xmp:Iptc4xmpExt:DigitalSourceType@{where}", value=cap(value, limits.max_value_chars),
                source_type=term, generator=software_generator(tool) or cap(tool, 80),
                error=None if term else "not an IPTC digital source type term",
            ))
        if tool:
            gen = software_generator(tool)
            signals.append(Signal("xmp", f"xmp:CreatorTool@{where}", value=cap(tool, limits.max_value_chars),
                                  generator=gen, source_type="trainedAlgorithmicMedia" if gen else None))
    return signals
