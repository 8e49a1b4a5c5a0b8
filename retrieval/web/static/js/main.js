// loupe's page: wires the search box, image chips, filters, results, viewer and status view
// to the URL (the single source of truth) and to the JSON API of `loupe serve`.

import * as api from "./api.js";
import { clock, count, h } from "./format.js";
import { Grid, renderCaptions } from "./grid.js";
import { indexCounts, renderStatus } from "./status.js";
import { DEFAULTS, composeQuery, fromURL, imageTerm, isBrowse, searchBody, toURL, validate } from "./state.js";
import { Viewer } from "./viewer.js";
import { Duplicates } from "./duplicates.js";

const PAGE = 60;
const $ = (id) => document.getElementById(id);
const els = {
  form: $("search-form"), q: $("q"), chips: $("chips"), file: $("file"), filters: $("filters"),
  folder: $("folder"), after: $("after"), before: $("before"), dateField: $("date_field"),
  minScore: $("min_score"), minRange: $("min_score_range"), sort: $("sort"), collapse: $("collapse"),
  dateError: $("date-error"), summary: $("summary"), message: $("message"), empty: $("empty"),
  results: $("results"), grid: $("grid"), captions: $("captions"), sentinel: $("sentinel"), more: $("more"),
  searchView: $("search-view"), statusView: $("status-view"), statusBody: $("status-body"),
  dropzone: $("dropzone"), targetSet: $("target-set"),
};

let S = fromURL(location.search);
const uploadPreviews = new Map();    // upload id -> object URL of the dropped file (this tab only)
const photoNames = new Map();        // photo id -> file name, for "photo:ID" chips
const momentNames = new Map();       // moment id -> {name, thumb, time}, for "moment:ID" chips (a video's moment)
let index = { images: null, captions: null };
const run = { gen: 0, ctrl: null, offset: 0, hasMore: false, loading: false, shown: 0, submitted: false };

// ---- state and URL -----------------------------------------------------------------------

function currentURL() {
  return location.search || location.pathname;
}

/** Make `next` the page's state: a new history entry when it differs from the URL. */
function commit(next, { push = true } = {}) {
  S = next;
  const url = toURL(S);
  if (url !== currentURL()) history[push ? "pushState" : "replaceState"](null, "", url);
  apply();
}

function fromControls() {
  const fd = new FormData(els.filters);
  return {
    ...S,
    q: els.q.value.trim(),
    target: fd.get("target") || "images",
    folder: els.folder.value,
    after: els.after.value || (els.after.validity.badInput ? S.after : ""),
    before: els.before.value || (els.before.validity.badInput ? S.before : ""),
    date_field: els.dateField.value,
    min_score: els.minScore.value.trim(),
    sort: els.sort.value,
    collapse: els.collapse.checked,
    view: "search",
  };
}

function toControls() {
  els.q.value = S.q;
  for (const r of els.filters.elements.target) r.checked = r.value === S.target;
  ensureFolderOption(S.folder);
  els.folder.value = S.folder;
  els.after.value = S.after;           // an invalid date cannot show in a date input; validate() names it
  els.before.value = S.before;
  els.dateField.value = S.date_field;
  els.minScore.value = S.min_score;
  els.minRange.value = S.min_score === "" ? "0" : S.min_score;
  els.sort.value = S.sort;
  els.collapse.checked = S.collapse;
  els.filters.classList.toggle("captions-mode", S.target === "captions");
  const active = activeFilters();
  $("clear-filters").hidden = !active.length && S.sort === DEFAULTS.sort && S.collapse && S.date_field === DEFAULTS.date_field;
  $("filters-toggle").textContent = active.length ? `Filters (${active.length})` : "Filters";
  renderChips();
}

const dups = new Duplicates($("dups-body"));

function apply() {
  toControls();
  const status = S.view === "status";
  const review = S.view === "duplicates";
  els.searchView.hidden = status || review;
  els.statusView.hidden = !status;
  $("dups-view").hidden = !review;
  for (const a of document.querySelectorAll("nav.views a")) {
    if (a.dataset.nav === S.view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const q = composeQuery(S.q, S.images);
  document.title = review ? "Duplicates · loupe" : status ? "Index status · loupe" : q ? `${q} · loupe` : "loupe";
  if (review) { resetResults(); dups.show(); return; }
  dups.hide();
  if (status) showStatus(); else runSearch();
}

// ---- search ------------------------------------------------------------------------------

function setBusy(busy) {
  els.results.setAttribute("aria-busy", String(busy));
  document.body.classList.toggle("loading", busy);
}

function showError(text) {
  els.message.hidden = !text;
  els.message.textContent = text || "";
}

function showFieldErrors(errors) {
  for (const [key, input] of [["after", els.after], ["before", els.before], ["min_score", els.minScore]]) {
    if (errors[key]) input.setAttribute("aria-invalid", "true"); else input.removeAttribute("aria-invalid");
  }
  const dateMsg = errors.after || errors.before;
  els.dateError.hidden = !dateMsg;
  els.dateError.textContent = dateMsg || "";
}

function resetResults() {
  run.gen++;
  run.ctrl?.abort();
  run.ctrl = new AbortController();
  run.offset = 0;
  run.hasMore = false;
  run.loading = false;
  run.shown = 0;
  grid.clear();
  els.captions.replaceChildren();
  els.empty.hidden = true;
  els.more.hidden = true;
  showError("");
}

function runSearch() {
  if (!run.submitted) markSubmit();
  run.submitted = false;
  resetResults();
  const captions = S.target === "captions";
  els.grid.hidden = captions;
  els.captions.hidden = !captions;
  const errors = validate(S);
  showFieldErrors(errors);
  if (Object.keys(errors).length) {
    els.summary.textContent = "";
    showError(`Cannot search: ${Object.values(errors).join("; ")}.`);
    return;
  }
  if (captions && isBrowse(S)) {
    els.summary.textContent = "";
    showEmpty("Type a sentence or add an image to search the captions.");
    return;
  }
  window.scrollTo(0, 0);
  els.summary.textContent = "Searching…";
  fetchPage(0);
}

async function fetchPage(offset) {
  const gen = run.gen;
  run.loading = true;
  setBusy(true);
  if (offset > 0) { els.more.hidden = false; els.more.textContent = "Loading more…"; }
  try {
    const body = searchBody(S, offset, PAGE);
    if (offset === 0 && S.target === "images") body.inline = grid.firstRowGuess();  // the first row comes with the answer
    const data = await api.search(body, run.ctrl.signal);
    if (gen !== run.gen) return;
    const results = data.results || [];
    if (S.target === "captions") {
      renderCaptions(els.captions, results, run.shown);
      run.shown += results.length;
    } else {
      grid.append(results);
      run.shown = grid.items.length;
      if (offset === 0 && results.length) whenFirstRowPainted(gen);
    }
    run.offset = (data.offset ?? offset) + results.length;
    run.hasMore = Boolean(data.has_more) && results.length > 0;
    summarize(data);
    if (!run.shown) showEmptyResults();
    els.more.hidden = !(run.shown && !run.hasMore && offset > 0) ;
    if (!els.more.hidden) els.more.textContent = `That’s all: ${count(run.shown)} ${S.target === "captions" ? "captions" : "photos"}.`;
  } catch (err) {
    if (err.name === "AbortError" || gen !== run.gen) return;
    els.summary.textContent = "";
    els.more.hidden = true;
    showError(err.message);
  } finally {
    if (gen === run.gen) {
      run.loading = false;
      setBusy(false);
      requestAnimationFrame(() => { if (gen === run.gen) maybeLoadMore(); });
    }
  }
}

function summarize(data) {
  const what = S.target === "captions" ? "captions" : "photos";
  const n = `${count(run.shown)}${run.hasMore ? "+" : ""}`;
  const took = data.took_ms != null ? ` · ${Math.round(data.took_ms)} ms` : "";
  if (!run.shown) { els.summary.textContent = `No ${what} match.`; return; }
  if (isBrowse(S)) {
    els.summary.textContent = `All photos, ${searchBody(S, 0, 1).sort === "oldest" ? "oldest" : "newest"} first · ${n}${took}`;
  } else {
    els.summary.textContent = `${n} ${what}${S.sort !== "relevance" ? `, ${S.sort} first` : ", best first"}${took}`;
  }
}

function activeFilters() {
  const names = [];
  const photos = S.target === "images";
  if (photos && S.folder) names.push("folder");
  if (photos && (S.after || S.before)) names.push("dates");
  if (S.min_score !== "") names.push("minimum score");
  return names;
}

function showEmpty(...children) {
  els.empty.replaceChildren(...children);
  els.empty.hidden = false;
}

function showEmptyResults() {
  if (index.images === 0) {
    showEmpty(h("h2", {}, "Nothing indexed yet"),
      h("p", {}, "Index a folder of photos, then search it here: ", h("code", {}, "loupe index ~/Pictures")));
    return;
  }
  const what = S.target === "captions" ? "captions" : "photos";
  const filters = activeFilters();
  showEmpty(h("h2", {}, `No ${what} match`),
    h("p", {}, filters.length
      ? `Nothing passes the ${filters.join(", ")} filter${filters.length > 1 ? "s" : ""}. `
      : "Try other words, or an image."),
    filters.length ? h("button", { type: "button", class: "link", onclick: clearFilters }, "Clear filters") : null);
}

function maybeLoadMore() {
  if (!run.hasMore || run.loading || S.view !== "search") return;
  const r = els.sentinel.getBoundingClientRect();
  if (r.top < window.innerHeight + 1200) fetchPage(run.offset);
}

function loadMoreNow() {
  if (run.hasMore && !run.loading) fetchPage(run.offset);
}

// "Enter pressed" -> "first row of thumbnails painted", for benchmarks/bench_page.py
function markSubmit() {
  performance.clearMarks("loupe:submit");
  performance.clearMarks("loupe:first-row");
  performance.clearMeasures("loupe:first-thumbnails");
  performance.mark("loupe:submit");
}

function whenFirstRowPainted(gen) {
  const imgs = grid.firstRowImages();
  Promise.all(imgs.map((img) => img.complete ? null : new Promise((resolve) => {
    img.addEventListener("load", resolve, { once: true });
    img.addEventListener("error", resolve, { once: true });
  }))).then(() => requestAnimationFrame(() => {
    if (gen !== run.gen) return;
    performance.mark("loupe:first-row");
    performance.measure("loupe:first-thumbnails", "loupe:submit", "loupe:first-row");
  }));
}

const grid = new Grid(els.grid, {
  onOpen: (i) => viewer.open(i),
  onNeedMore: loadMoreNow,
});

const viewer = new Viewer({
  getItem: (i) => grid.items[i],
  count: () => grid.items.length,
  onNeedMore: loadMoreNow,
  onClosed: (i) => grid.focus(i),
  onSimilar: (item) => {
    photoNames.set(String(item.id), item.name);
    run.submitted = true;
    markSubmit();
    const ref = item.kind === "video" && typeof item.ref === "string" && item.ref.startsWith("moment:") ? item.ref : `photo:${item.id}`;
    if (ref.startsWith("moment:")) momentNames.set(ref.slice(7), { name: item.name, thumb: item.thumb, time: item.time });
    commit({ ...S, q: "", images: [ref], target: "images", view: "search" });
  },
});

new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting)) maybeLoadMore();
}, { rootMargin: "0px 0px 1200px 0px" }).observe(els.sentinel);

// ---- the search box, chips and uploads -----------------------------------------------------

els.form.addEventListener("submit", (e) => {
  e.preventDefault();
  run.submitted = true;
  markSubmit();
  const next = fromControls();
  if (toURL(next) === currentURL()) { S = next; apply(); } else commit(next);
});

function chipLabel(t) {
  if (t.kind === "upload") return "your image";
  if (t.kind === "moment") {
    const m = momentNames.get(t.id);
    return m ? `like ${m.name} at ${clock(m.time)}` : "like a video moment";
  }
  const name = photoNames.get(t.id);
  if (name === undefined) {
    photoNames.set(t.id, null);  // asked once
    api.photo(t.id).then((d) => { photoNames.set(t.id, d.name); renderChips(); }).catch(() => {});
  }
  return name ? `like ${name}` : `photo ${t.id}`;
}

function renderChips() {
  els.chips.replaceChildren(...S.images.map((raw, i) => {
    const t = imageTerm(raw);
    const src = t.kind === "upload" ? uploadPreviews.get(t.id) : t.kind === "moment" ? momentNames.get(t.id)?.thumb : api.thumbURL(t.id);
    const label = chipLabel(t);
    return h("li", { class: `chip${t.negative ? " negative" : ""}` },
      h("button", {
        type: "button", class: "chip-sign", "aria-label": t.negative ? `Add ${label} instead of subtracting it` : `Subtract ${label}`,
        title: t.negative ? "Subtracted: click to add" : "Added: click to subtract",
        onclick: () => commit({ ...fromControls(), images: S.images.map((x, j) => (j === i ? (t.negative ? t.term : `-${t.term}`) : x)) }),
      }, t.negative ? "−" : "+"),
      src ? h("img", { src, alt: label, class: "chip-img" }) : h("span", { class: "chip-img placeholder", "aria-hidden": "true" }, "▣"),
      h("span", { class: "chip-text" }, t.weight ? `${t.weight}× ${label}` : label),
      h("button", {
        type: "button", class: "chip-x", "aria-label": `Remove ${label}`,
        onclick: () => { commit({ ...fromControls(), images: S.images.filter((_, j) => j !== i) }); els.q.focus(); },
      }, "×"));
  }));
  els.chips.hidden = !S.images.length;
}

async function useImageFile(file) {
  if (!file) return;
  resetResults();
  els.summary.textContent = `Reading ${file.name || "the image"}…`;
  setBusy(true);
  try {
    const up = await api.upload(file);
    uploadPreviews.set(String(up.id), URL.createObjectURL(file));
    run.submitted = true;
    markSubmit();
    // a new image replaces the previous image terms (type `upload:ID` / `photo:ID` to combine several)
    commit({ ...fromControls(), images: [`upload:${up.id}`], view: "search" });
  } catch (err) {
    setBusy(false);
    els.summary.textContent = "";
    showError(`Cannot search with “${file.name || "that image"}”: ${err.message}`);
  }
}

els.file.addEventListener("change", () => {
  const f = els.file.files[0];
  els.file.value = "";
  useImageFile(f);
});

document.addEventListener("paste", (e) => {
  const f = [...(e.clipboardData?.files || [])].find((x) => x.type.startsWith("image/"));
  if (!f) return;
  e.preventDefault();
  useImageFile(f);
});

let dragDepth = 0;
const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
document.addEventListener("dragenter", (e) => { if (hasFiles(e)) { dragDepth++; els.dropzone.hidden = false; } });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; els.dropzone.hidden = true; } });
document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
document.addEventListener("drop", (e) => {
  if (!hasFiles(e)) return;
  e.preventDefault();
  dragDepth = 0;
  els.dropzone.hidden = true;
  useImageFile(e.dataTransfer.files[0]);
});

// ---- filters -----------------------------------------------------------------------------

els.filters.addEventListener("submit", (e) => e.preventDefault());
els.filters.addEventListener("change", (e) => {
  if (e.target === els.minRange) els.minScore.value = els.minRange.value;
  commit(fromControls());
});
els.minRange.addEventListener("input", () => { els.minScore.value = els.minRange.value; });

function clearFilters() {
  const { folder, after, before, date_field, min_score, sort, collapse } = DEFAULTS;
  commit({ ...fromControls(), folder, after, before, date_field, min_score, sort, collapse });
}
$("clear-filters").addEventListener("click", clearFilters);
$("filters-toggle").addEventListener("click", (e) => {
  const open = els.filters.classList.toggle("open");
  e.currentTarget.setAttribute("aria-expanded", String(open));
});

function ensureFolderOption(path) {
  if (!path || [...els.folder.options].some((o) => o.value === path)) return;
  els.folder.append(h("option", { value: path }, path));
}

async function loadFolders() {
  try {
    const data = await api.folders();
    const list = Array.isArray(data) ? data : data.folders || [];
    for (const f of list) {
      const path = typeof f === "string" ? f : f.path;
      if (!path || [...els.folder.options].some((o) => o.value === path)) continue;
      const offline = typeof f === "object" && f.online === false;
      const n = typeof f === "object" && f.count != null ? ` (${count(f.count)})` : "";
      els.folder.append(h("option", { value: path }, `${path}${n}${offline ? " · offline" : ""}`));
    }
    els.folder.value = S.folder;
  } catch { /* the search itself reports a server that does not answer */ }
}

// ---- views, keyboard ---------------------------------------------------------------------

for (const a of document.querySelectorAll("[data-nav]")) {
  a.addEventListener("click", (e) => {
    if (e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
    e.preventDefault();
    if (a.classList.contains("brand")) commit({ ...DEFAULTS, images: [] });
    else commit({ ...S, view: a.dataset.nav });
  });
}

async function showStatus() {
  resetResults();
  els.statusBody.setAttribute("aria-busy", "true");
  try {
    const s = await api.status();
    noteIndex(s);
    renderStatus(els.statusBody, s);
  } catch (err) {
    els.statusBody.replaceChildren(h("p", { class: "message", role: "alert" }, err.message));
  } finally {
    els.statusBody.setAttribute("aria-busy", "false");
  }
}

function noteIndex(s) {
  index = indexCounts(s);
  const captions = index.captions !== 0;
  els.targetSet.hidden = !captions && S.target !== "captions";
  viewer.hasCaptions = captions;
  if (index.images === 0 && !run.shown && S.view === "search" && !run.loading) showEmptyResults();
}

document.addEventListener("keydown", (e) => {
  if (e.key !== "/" || e.ctrlKey || e.metaKey || e.altKey || viewer.isOpen) return;
  if (e.target.closest("input, textarea, select, [contenteditable]")) return;
  e.preventDefault();
  if (S.view !== "search") commit({ ...S, view: "search" });
  els.q.focus();
  els.q.select();
});

// from the search box, ArrowDown goes to the results (and the focused photo, when one was)
els.q.addEventListener("keydown", (e) => {
  if (e.key !== "ArrowDown" || !grid.items.length || S.target !== "images") return;
  e.preventDefault();
  grid.focus(grid.active);
});

window.addEventListener("popstate", () => {
  viewer.close();
  S = fromURL(location.search);
  apply();
});

// ---- start -------------------------------------------------------------------------------

history.replaceState(null, "", toURL(S));
apply();
loadFolders();
api.status().then(noteIndex).catch(() => {});
