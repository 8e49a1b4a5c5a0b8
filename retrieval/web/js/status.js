// The index status view: counts, model, last update, indexed folders (offline ones marked),
// skipped files with their reasons, as GET /api/status reports them.

import { bytes, count, date, h } from "./format.js";

const COUNTS = [
  ["images_indexed", "Photos"],
  ["captions", "Captions"],
  ["images_missing", "Missing (kept, hidden)"],
  ["images_skipped", "Skipped"],
  ["image_vectors", "Image vectors"],
  ["text_vectors", "Caption vectors"],
];

/** Photo and caption counts of a status answer (null when it does not say). */
export function indexCounts(s) {
  const c = s && typeof s.counts === "object" && s.counts ? { ...s, ...s.counts } : s || {};
  const num = (...keys) => { for (const k of keys) if (typeof c[k] === "number") return c[k]; return null; };
  return { images: num("images_indexed", "images"), captions: num("captions", "text_vectors") };
}

function table(caption, head, rows) {
  return h("table", {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));
}

export function renderStatus(body, s) {
  const c = s && typeof s.counts === "object" && s.counts ? { ...s, ...s.counts } : s;
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
    ["Photos’ size", typeof c.indexed_bytes === "number" ? bytes(c.indexed_bytes) : null],
  ].filter(([, v]) => v != null && v !== "");
  parts.push(h("dl", { class: "facts" }, facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])));

  const folders = s.roots || s.folders || [];
  parts.push(h("h2", {}, "Indexed folders"));
  parts.push(folders.length
    ? table("Indexed folders", ["Folder", "Files", "Missing", "State"], folders.map((f) => {
        const path = typeof f === "string" ? f : f.path;
        const offline = typeof f === "object" && (f.offline === true || (typeof f.offline === "string" && f.offline) || f.online === false);
        return [h("code", {}, path), f.files != null ? count(f.files) : f.count != null ? count(f.count) : "",
          f.missing ? count(f.missing) : "",
          offline ? h("strong", { class: "offline" }, `offline${typeof f.offline === "string" ? ` (${f.offline})` : ""}`) : "online"];
      }))
    : h("p", { class: "muted" }, "No folder indexed yet. Run `loupe index FOLDER`."));

  const skipped = s.skipped_files || [];
  const reasons = s.skip_reasons || [];
  parts.push(h("h2", {}, "Skipped files"));
  if (!skipped.length && !reasons.length) parts.push(h("p", { class: "muted" }, "None: every file was readable."));
  if (reasons.length) {
    parts.push(table("Skip reasons", ["Reason", "Files"], reasons.map((r) => Array.isArray(r) ? [r[0] || "", count(r[1])] : [r.reason || "", count(r.count)])));
  }
  if (skipped.length) {
    parts.push(table("Skipped files", ["File", "Reason"], skipped.map((f) => [h("code", {}, f.path), f.reason || ""])));
    const total = typeof c.images_skipped === "number" ? c.images_skipped : skipped.length;
    if (total > skipped.length) parts.push(h("p", { class: "muted" }, `The first ${count(skipped.length)} of ${count(total)}; \`loupe info --skipped\` lists all.`));
  }
  body.replaceChildren(...parts);
}
