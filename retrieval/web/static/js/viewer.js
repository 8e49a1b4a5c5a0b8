// The photo dialog: large preview, facts, actions. Left/right step through the results;
// Esc (or ×) closes it and gives focus back to the photo it was showing.

import * as api from "./api.js";
import { bytes, clock, date, h, score } from "./format.js";

export class Viewer {
  constructor({ getItem, count, onSimilar, onClosed, onNeedMore }) {
    this.dialog = document.getElementById("viewer");
    this.img = document.getElementById("viewer-img");
    this.video = document.getElementById("viewer-video");
    this.moments = document.getElementById("viewer-moments");
    this.title = document.getElementById("viewer-title");
    this.facts = document.getElementById("viewer-facts");
    this.note = document.getElementById("viewer-note");
    this.capSection = document.getElementById("viewer-captions");
    this.exif = document.getElementById("viewer-exif");
    this.marks = document.getElementById("viewer-marks");
    this.textSection = document.getElementById("viewer-text");
    this.img.addEventListener("load", () => this.#placeMarks());
    window.addEventListener("resize", () => this.#placeMarks());
    this.btnCaptions = document.getElementById("act-captions");
    this.linkOpen = document.getElementById("act-open");
    this.getItem = getItem;
    this.count = count;
    this.onClosed = onClosed;
    this.onNeedMore = onNeedMore;
    this.index = -1;
    this.hasCaptions = false;
    this.token = 0;

    document.getElementById("viewer-close").addEventListener("click", () => this.close());
    document.getElementById("viewer-prev").addEventListener("click", () => this.step(-1));
    document.getElementById("viewer-next").addEventListener("click", () => this.step(+1));
    document.getElementById("act-similar").addEventListener("click", () => {
      const item = this.item();
      this.close();
      onSimilar(item);
    });
    this.btnCaptions.addEventListener("click", () => this.showCaptions());
    document.getElementById("act-copy").addEventListener("click", () => this.copyPath());
    this.dialog.addEventListener("close", () => { this.video.pause(); this.onClosed(this.index); });
    this.dialog.addEventListener("keydown", (e) => {
      if (e.target.closest("input, textarea, select")) return;
      if (e.key === "ArrowRight") { this.step(+1); e.preventDefault(); }
      else if (e.key === "ArrowLeft") { this.step(-1); e.preventDefault(); }
    });
    // a click on the backdrop (outside the dialog's box) closes it, as in every photo app
    this.dialog.addEventListener("click", (e) => {
      if (e.target !== this.dialog) return;
      const r = this.dialog.getBoundingClientRect();
      if (e.clientX < r.left || e.clientX > r.right || e.clientY < r.top || e.clientY > r.bottom) this.close();
    });
  }

  item() {
    return this.getItem(this.index);
  }

  get isOpen() {
    return this.dialog.open;
  }

  open(index) {
    this.index = index;
    this.#render();
    if (!this.dialog.open) this.dialog.showModal();
    document.getElementById("viewer-close").focus();
  }

  close() {
    if (this.dialog.open) this.dialog.close();
  }

  step(dir) {
    const next = this.index + dir;
    if (next < 0) return;
    if (next >= this.count() - 2) this.onNeedMore();
    if (next >= this.count()) return;
    this.index = next;
    this.#render();
  }

  #render() {
    const r = this.item();
    if (!r) return;
    const token = ++this.token;
    this.title.textContent = r.name;
    this.img.alt = r.name;
    this.img.width = Number(r.width) || 0;
    this.img.height = Number(r.height) || 0;
    const isVideo = r.kind === "video";
    this.img.hidden = isVideo;
    this.video.hidden = !isVideo;
    this.#showMoments(isVideo ? r : null);
    if (isVideo) {                                // a video moment: the video, playing from the moment's time
      this.video.poster = r.thumb;
      this.playFrom(r, r.time);
    } else {
      this.video.pause();
      this.video.removeAttribute("src");
      this.img.src = r.thumb;                     // the cached thumbnail at once, the preview when it arrives
      const big = new Image();
      big.onload = () => { if (token === this.token) this.img.src = big.src; };
      big.src = r.preview;
    }
    this.linkOpen.href = r.preview;
    this.note.textContent = "";
    this.capSection.hidden = true;
    this.capSection.querySelector("ol").replaceChildren();
    this.btnCaptions.hidden = !this.hasCaptions;
    this.exif.hidden = true;
    this.#drawMarks(r);
    this.#showText(r, null);
    document.getElementById("viewer-prev").disabled = this.index === 0;
    document.getElementById("viewer-next").disabled = this.index >= this.count() - 1;
    this.#facts(r, null);
    api.photo(r.id).then((d) => { if (token === this.token) { this.#facts(r, d); this.#showText(r, d); } }).catch(() => {});
  }

  // The words a text search matched, as boxes over the photo (box corners are fractions of its size).
  #drawMarks(r) {
    const lines = (r.text_match && Array.isArray(r.text_match.lines)) ? r.text_match.lines : [];
    const marks = [];
    for (const line of lines) {
      if (!Array.isArray(line.box) || line.box.length !== 4) continue;
      const xs = line.box.map((p) => Number(p[0])), ys = line.box.map((p) => Number(p[1]));
      const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
      if (![x0, x1, y0, y1].every(Number.isFinite)) continue;
      const m = h("div", { class: "text-mark", role: "listitem", "aria-label": String(line.text), title: String(line.text) });
      m.style.left = `${Math.max(0, x0) * 100}%`;
      m.style.top = `${Math.max(0, y0) * 100}%`;
      m.style.width = `${Math.max(0, x1 - x0) * 100}%`;
      m.style.height = `${Math.max(0, y1 - y0) * 100}%`;
      marks.push(m);
    }
    this.marks.replaceChildren(...marks);
    this.marks.hidden = marks.length === 0;
    this.#placeMarks();
  }

  // The layer of marks covers exactly the picture inside the <img> (object-fit: contain letterboxes it).
  #placeMarks() {
    if (this.marks.hidden) return;
    const img = this.img;
    const w = img.clientWidth, hgt = img.clientHeight;
    const nw = img.naturalWidth || Number(img.width) || w, nh = img.naturalHeight || Number(img.height) || hgt;
    if (!w || !hgt || !nw || !nh) return;
    const scale = Math.min(w / nw, hgt / nh);
    const cw = nw * scale, ch = nh * scale;
    Object.assign(this.marks.style, {
      left: `${img.offsetLeft + (w - cw) / 2}px`, top: `${img.offsetTop + (hgt - ch) / 2}px`, width: `${cw}px`, height: `${ch}px`,
    });
  }

  // The photo's recognised text, line by line; the lines the search matched are marked.
  #showText(r, detail) {
    const matched = new Set(((r.text_match && r.text_match.lines) || []).map((l) => l.text));
    const lines = detail && Array.isArray(detail.text) ? detail.text : (r.text_match ? r.text_match.lines : []);
    const ol = this.textSection.querySelector("ol");
    ol.replaceChildren(...lines.map((l) => h("li", {}, matched.has(l.text) ? h("mark", {}, String(l.text)) : String(l.text))));
    this.textSection.hidden = lines.length === 0;
  }

  /** Play the video of `r` from `time` seconds (the src names the time too: #t=, a media fragment). */
  playFrom(r, time) {
    const v = this.video;
    const src = `${String(r.video || r.preview).split("#")[0]}#t=${Number(time).toFixed(3)}`;
    v.setAttribute("aria-label", `Video ${r.name}, from ${clock(time)}`);
    v.dataset.from = String(time);
    const seek = () => {
      if (Math.abs(v.currentTime - time) > 0.25) v.currentTime = time;
      v.play().catch(() => {});                   // a browser may refuse to start sound: the controls are there
    };
    if (v.getAttribute("src") && v.getAttribute("src").split("#")[0] === src.split("#")[0] && v.readyState >= 1) seek();
    else {
      v.addEventListener("loadedmetadata", seek, { once: true });
      v.src = src;
    }
  }

  #showMoments(r) {
    const list = r && Array.isArray(r.moments) ? r.moments : [];
    const ol = this.moments.querySelector("ol");
    ol.replaceChildren(...list.map((m) => h("li", {}, h("button", {
      type: "button", "aria-label": `Play from ${clock(m.time)}`, onclick: () => this.playFrom(r, m.time),
    }, `${clock(m.start)}–${clock(m.end)}`), " ", h("span", { class: "score" }, score(m.score)))));
    this.moments.hidden = !list.length;
  }

  #facts(r, detail) {
    const d = { ...r, ...(detail || {}) };
    const rows = [
      ["Path", h("code", { class: "path" }, d.path)],
      ["Size", bytes(d.size)],
      ["Dimensions", d.width && d.height ? `${d.width} × ${d.height}` : ""],
      ["Date", d.date ? `${date(d.date)}${d.date_source ? ` (${d.date_source})` : ""}` : "unknown"],
      ["Score", score(r.score)],
      ["Moment", r.kind === "video" && r.end != null ? `${clock(r.start)}–${clock(r.end)} (frame at ${clock(r.time)})` : ""],
      ["Folder", d.folder],
    ];
    const dupPaths = Array.isArray(d.duplicate_paths) ? d.duplicate_paths : Array.isArray(d.duplicates) ? d.duplicates : null;
    if (dupPaths && dupPaths.length) {
      rows.push(["Identical files", h("ul", { class: "dups" }, dupPaths.map((p) => h("li", {}, h("code", {}, typeof p === "string" ? p : p.path ?? JSON.stringify(p)))))]);
    } else if (typeof d.duplicates === "number" && d.duplicates > 0) {
      rows.push(["Identical files", `${d.duplicates} more`]);
    }
    if (d.available === false && d.unavailable_reason) rows.push(["Unavailable", d.unavailable_reason]);
    if (d.content_hash) rows.push(["Content hash", h("code", {}, d.content_hash)]);
    this.facts.replaceChildren(...rows.filter(([, v]) => v !== "" && v != null).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    const exif = detail && detail.exif;
    const exifRows = exif && typeof exif === "object" ? Object.entries(exif).filter(([, v]) => v != null && v !== "") : [];
    if (exifRows.length) {
      this.exif.querySelector("dl").replaceChildren(...exifRows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))]));
      this.exif.hidden = false;
    }
  }

  async showCaptions() {
    const r = this.item();
    const token = this.token;
    const ol = this.capSection.querySelector("ol");
    this.capSection.hidden = false;
    this.capSection.setAttribute("aria-busy", "true");
    ol.replaceChildren(h("li", { class: "muted" }, "Looking for captions…"));
    try {
      const data = await api.captions(r.id, 8);
      if (token !== this.token) return;
      const list = Array.isArray(data) ? data : data.results || data.captions || [];
      ol.replaceChildren(...(list.length ? list.map((c) => h("li", {}, h("span", {}, c.text), " ", h("span", { class: "score" }, score(c.score)))) : [h("li", { class: "muted" }, "No captions.")]));
    } catch (err) {
      if (token !== this.token) return;
      ol.replaceChildren(h("li", { class: "error" }, err.message));
    } finally {
      this.capSection.setAttribute("aria-busy", "false");
    }
  }

  async copyPath() {
    const path = this.item().path;
    try {
      await navigator.clipboard.writeText(path);
    } catch {
      const ta = h("textarea", { class: "sr-only" }, path);
      this.dialog.append(ta);
      ta.select();
      const ok = document.execCommand("copy");
      ta.remove();
      if (!ok) { this.note.textContent = "Could not copy: select the path above instead."; return; }
    }
    this.note.textContent = "Path copied.";
  }
}
