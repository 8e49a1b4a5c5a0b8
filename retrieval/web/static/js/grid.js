// The results: a justified grid of thumbnails (or a list of captions), appended page by page.
// Each tile reserves its box from the photo's width and height before the thumbnail arrives,
// so nothing jumps; arrow keys move a roving focus through the tiles.

import { clock, h, score } from "./format.js";

const EAGER = 18; // tiles of the first page loaded eagerly: about the first screenful
const MAX_INLINE = 24; // the server's bound on thumbnails carried inline by a search

export class Grid {
  constructor(list, { onOpen, onNeedMore }) {
    this.list = list;
    this.items = [];
    this.ids = new Set();
    this.active = 0;
    this.onOpen = onOpen;
    this.onNeedMore = onNeedMore;
    list.addEventListener("keydown", (e) => this.#key(e));
    list.addEventListener("click", (e) => {
      const a = e.target.closest("a.tile-link");
      if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return; // new-tab clicks keep the link
      e.preventDefault();
      this.open(Number(a.dataset.index));
    });
    list.addEventListener("focusin", (e) => {
      const a = e.target.closest("a.tile-link");
      if (a) this.#setActive(Number(a.dataset.index), false);
    });
  }

  clear() {
    this.items = [];
    this.ids.clear();
    this.active = 0;
    this.list.replaceChildren();
  }

  /** Append one page; results already shown (same id) are skipped. Returns the new tiles. */
  append(results) {
    const frag = document.createDocumentFragment();
    const added = [];
    for (const r of results) {
      if (this.ids.has(r.id)) continue;
      this.ids.add(r.id);
      const index = this.items.length;
      this.items.push(r);
      const w = Number(r.width) > 0 ? Number(r.width) : 4;
      const hgt = Number(r.height) > 0 ? Number(r.height) : 3;
      // the first screenful loads at once (lazy loading waits a frame to see what is visible)
      const img = h("img", {
        src: r.thumb_data || r.thumb, alt: r.name, width: String(w), height: String(hgt),
        loading: index < EAGER ? "eager" : "lazy", fetchpriority: index < 8 ? "high" : null,
        decoding: "async", draggable: "false",
      });
      const dups = Array.isArray(r.duplicates) ? r.duplicates.length : Number(r.duplicates) || 0;
      const extra = dups ? h("span", { class: "badge", "aria-hidden": "true", title: `${dups + 1} identical files` }, `×${dups + 1}`) : null;
      const isVideo = r.kind === "video";
      if (isVideo) img.alt = `${r.name}, video at ${clock(r.time)}`;
      const when = isVideo ? h("span", { class: "badge video", "aria-hidden": "true" }, `▶ ${clock(r.time)}`) : null;
      const li = h("li", { class: "tile", style: { "--ar": (w / hgt).toFixed(4) } },
        h("a", {
          class: "tile-link", href: r.preview, "data-index": String(index), tabindex: index === 0 && !this.list.querySelector("[tabindex='0']") ? "0" : "-1",
          title: `${r.name}${r.kind === "video" ? ` · at ${clock(r.time)}` : ""}${r.score != null ? ` · score ${score(r.score)}` : ""}`,
        }, img, extra, when));
      frag.append(li);
      added.push(li);
    }
    this.list.append(frag);
    return added;
  }

  /** How many tiles the first row may hold: each is at least `--row-h` x 3/4 wide (a portrait
   * photo). The search sends their thumbnails inline. Reads no layout: it runs before the request. */
  firstRowGuess() {
    const rowH = parseFloat(getComputedStyle(document.documentElement).getPropertyValue("--row-h")) || 200;
    return Math.max(1, Math.min(MAX_INLINE, Math.ceil(window.innerWidth / (rowH * 0.75))));
  }

  links() {
    return this.list.querySelectorAll("a.tile-link");
  }

  focus(index) {
    const link = this.links()[index];
    if (!link) return;
    this.#setActive(index, true);
  }

  open(index) {
    this.#setActive(index, false);
    this.onOpen(index);
  }

  /** The images of the first visual row (for the "first thumbnails painted" mark). */
  firstRowImages() {
    const tiles = [...this.list.children];
    if (!tiles.length) return [];
    const top = tiles[0].offsetTop;
    return tiles.filter((t) => t.offsetTop === top).map((t) => t.querySelector("img"));
  }

  #setActive(index, focus) {
    const links = this.links();
    if (!links[index]) return;
    links[this.active]?.setAttribute("tabindex", "-1");
    this.active = index;
    links[index].setAttribute("tabindex", "0");
    if (focus) {
      links[index].focus({ preventScroll: true });
      links[index].scrollIntoView({ block: "nearest" });
    }
  }

  #key(e) {
    const link = e.target.closest("a.tile-link");
    if (!link || e.altKey || e.ctrlKey || e.metaKey) return;
    const i = Number(link.dataset.index);
    let next = null;
    switch (e.key) {
      case "ArrowRight": next = i + 1; break;
      case "ArrowLeft": next = i - 1; break;
      case "ArrowDown": next = this.#vertical(i, +1); break;
      case "ArrowUp": next = this.#vertical(i, -1); break;
      case "Home": next = 0; break;
      case "End": next = this.items.length - 1; break;
      case " ": this.open(i); e.preventDefault(); return;
      default: return;
    }
    e.preventDefault();
    if (next == null) return;
    if (next >= this.items.length - 1) this.onNeedMore();
    next = Math.max(0, Math.min(this.items.length - 1, next));
    this.focus(next);
  }

  /** The tile in the row above or below whose centre is closest horizontally. */
  #vertical(i, dir) {
    const tiles = this.list.children;
    const here = tiles[i].getBoundingClientRect();
    const cx = here.left + here.width / 2;
    let rowTop = null;
    let best = null;
    let bestDist = Infinity;
    for (let j = i + dir; j >= 0 && j < tiles.length; j += dir) {
      const r = tiles[j].getBoundingClientRect();
      if (Math.abs(r.top - here.top) < 2) continue;          // same row
      if (rowTop === null) rowTop = r.top;
      else if (Math.abs(r.top - rowTop) >= 2) break;          // past the adjacent row
      const d = Math.abs(r.left + r.width / 2 - cx);
      if (d < bestDist) { bestDist = d; best = j; }
    }
    return best ?? (dir > 0 ? tiles.length - 1 : 0);
  }
}

export function renderCaptions(list, results, offset) {
  const frag = document.createDocumentFragment();
  results.forEach((r, k) => {
    frag.append(h("li", { class: "caption", value: String(offset + k + 1) },
      h("p", { class: "caption-text" }, r.text),
      h("p", { class: "caption-meta" },
        h("span", { class: "score" }, score(r.score)),
        r.source ? h("span", { class: "source" }, r.source) : null)));
  });
  list.append(frag);
}
