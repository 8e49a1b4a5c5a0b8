// The index status view: counts, model, last update, indexed folders (offline ones marked),
// skipped files with their reasons, as GET /api/status reports them.

import { bytes, count, date, h } from "./format.js";

/** The status answer flattened to the counts shown (GET /api/status nests them per kind). */
function flatCounts(s) {
  const img = s && typeof s.images === "object" && s.images ? s.images : {};
  const cap = s && typeof s.captions === "object" && s.captions ? s.captions : {};
  const pick = (...vals) => vals.find((v) => typeof v === "number") ?? null;
  return {
    images: pick(img.ok, s?.images_indexed, s?.images),
    captions: pick(cap.count, s?.captions),
    missing: pick(img.missing, s?.images_missing),
    skipped: pick(img.skipped, s?.images_skipped),
    distinct: pick(img.distinct, s?.image_vectors),
    bytes: pick(img.bytes, s?.indexed_bytes),
  };
}

const COUNTS = [
  ["images", "Photos"],
  ["captions", "Captions"],
  ["missing", "Missing (kept, hidden)"],
  ["skipped", "Skipped"],
  ["distinct", "Distinct photos"],
];

/** Photo and caption counts of a status answer (null when it does not say). */
export function indexCounts(s) {
  const c = flatCounts(s);
  return { images: c.images, captions: c.captions };
}

function table(caption, head, rows) {
  return h("table", {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));
}

export function renderStatus(body, s) {
  const c = flatCounts(s);
  const parts = [];
  parts.push(h("dl", { class: "counts", "aria-label": "Counts" }, COUNTS.filter(([k]) => typeof c[k] === "number").map(([k, label]) =>
    h("div", { class: "count" }, h("dt", {}, label), h("dd", {}, count(c[k]))))));

  const model = typeof s.model === "object" && s.model
    ? [s.model.name, s.model.pretrained, s.model.checkpoint].filter(Boolean).join(" · ")
    : [s.model, s.pretrained, s.checkpoint].filter(Boolean).join(" · ");
  const facts = [
    ["Model", model],
    ["Last update", s.updated || s.last_update ? date(s.updated || s.last_update) : "never"],
    ["Catalog", s.catalog],
    ["Vector index", s.index_factory],
    ["Photos’ size", c.bytes != null ? bytes(c.bytes) : null],
  ].filter(([, v]) => v != null && v !== "");
  parts.push(h("dl", { class: "facts" }, facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])));

  const folders = s.roots || s.folders || [];
  parts.push(h("h2", {}, "Indexed folders"));
  parts.push(folders.length
    ? table("Indexed folders", ["Folder", "Files", "Missing", "State"], folders.map((f) => {
        const path = typeof f === "string" ? f : f.path;
        const offline = typeof f === "object" && (f.offline === true || (typeof f.offline === "string" && f.offline) || f.online === false);
        return [h("code", {}, path), f.files != null ? count(f.files) : f.count != null ? count(f.count) : "",
          f.missing != null ? count(f.missing) : "",
          offline ? h("strong", { class: "offline" }, `offline${typeof f.offline === "string" ? ` (${f.offline})` : ""}`) : "online"];
      }))
    : h("p", { class: "muted" }, "No folder indexed yet. Run `loupe index FOLDER`."));

  const skipped = s.skipped_files || (Array.isArray(s.skipped) ? s.skipped : []);
  const reasons = s.skip_reasons || [];
  parts.push(h("h2", {}, "Skipped files"));
  if (!skipped.length && !reasons.length) parts.push(h("p", { class: "muted" }, "None: every file was readable."));
  if (reasons.length) {
    parts.push(table("Skip reasons", ["Reason", "Files"], reasons.map((r) => Array.isArray(r) ? [r[0] || "", count(r[1])] : [r.reason || "", count(r.count)])));
  }
  if (skipped.length) {
    parts.push(table("Skipped files", ["File", "Reason"], skipped.map((f) => [h("code", {}, f.path), f.reason || ""])));
    const total = c.skipped ?? skipped.length;
    if (total > skipped.length) parts.push(h("p", { class: "muted" }, `The first ${count(skipped.length)} of ${count(total)}; \`loupe info --skipped\` lists all.`));
  }
  body.replaceChildren(...parts);
}
