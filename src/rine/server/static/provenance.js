// What a file declares about its origin (rine.provenance), in words, beside the detector's
// score. Built with textContent only: every string here comes from the uploaded file.
"use strict";

const SOURCE_TYPE_WORDS = {
  trainedAlgorithmicMedia: "made by a generative AI model",
  compositeWithTrainedAlgorithmicMedia: "edited with a generative AI model",
  algorithmicMedia: "made by an algorithm (not from a camera)",
  compositeSynthetic: "a composite including synthetic elements",
  digitalCapture: "captured by a camera",
  computationalCapture: "captured by a camera with computational processing (e.g. a phone)",
  negativeFilm: "scanned from a film negative",
  positiveFilm: "scanned from film",
  print: "scanned from a print",
};

function sourceTypeWords(term) {
  return SOURCE_TYPE_WORDS[term] ? `${SOURCE_TYPE_WORDS[term]} (${term})` : term;
}

function line(parent, tag, text, cls) {
  const el = document.createElement(tag);
  el.textContent = text;
  if (cls) el.className = cls;
  parent.appendChild(el);
  return el;
}

// container: an element to fill; r: a /v1/detect result with `provenance` and `decision`;
// clientSide: the page scores in the browser and uploads nothing. Returns whether it showed
// anything (a server started with --no-provenance sends no `provenance` field).
function renderProvenance(container, r, clientSide) {
  container.replaceChildren();
  if (!clientSide && r.provenance === undefined) return false;
  if (clientSide) {
    line(container, "p", "Content Credentials (C2PA) and other metadata are checked only in the server mode: in this mode nothing is uploaded, and the browser does not verify signatures.", "prov-note");
    return true;
  }
  const p = r.provenance;
  if (!p) {
    line(container, "p", "What the file declares about its origin could not be read.", "prov-note");
    return true;
  }
  if (!p.digital_source_type) {
    line(container, "p", "The file declares nothing about its origin. That proves nothing: most platforms and editors remove this information.", "prov-none");
  } else {
    const verified = p.verified ? "verified" : "not verified";
    line(container, "p", `The file declares it was ${sourceTypeWords(p.digital_source_type)}: ${verified}.`, p.verified ? "prov-verified" : "prov-declared");
  }
  if (p.reason) line(container, "p", p.reason, "prov-reason");
  if (r.decision && r.decision.basis) line(container, "p", `Decision: ${r.decision.decision || "none"} (basis: ${r.decision.basis}).`, "prov-decision");
  const params = (p.signals || []).filter((s) => s.parameters);
  if (params.length) {
    const details = document.createElement("details");
    line(details, "summary", "Generator parameters found in the file");
    const dl = document.createElement("dl");
    for (const s of params) {
      for (const [k, v] of Object.entries(s.parameters)) {
        line(dl, "dt", k);
        line(dl, "dd", String(v));
      }
    }
    details.appendChild(dl);
    container.appendChild(details);
  }
  return true;
}
