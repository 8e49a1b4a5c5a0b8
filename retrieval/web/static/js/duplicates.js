// The near-duplicate review view: one group at a time, its photos side by side with what differs
// (size, dimensions, date, format, sharpness), the suggested keeper preselected. Keyboard: N / P
// next / previous group, 1-9 pick the keeper, A accept (move the others aside), U undo every move.
// Nothing is deleted: the others go to the `.loupe-duplicates` folder, journalled, and Undo puts them back.

import * as api from "./api.js";
import { bytes, date, h } from "./format.js";

export class Duplicates {
  constructor(root) {
    this.root = root;
    this.groups = [];
    this.at = 0;
    this.keep = new Map(); // group id -> photo id picked
    this.active = false;
    document.addEventListener("keydown", (e) => this.key(e));
  }

  async show() {
    this.active = true;
    this.root.setAttribute("aria-busy", "true");
    try {
      const body = await api.duplicates();
      this.groups = body.groups;
      this.total = body.total;
      this.at = Math.min(this.at, Math.max(0, this.groups.length - 1));
      this.render();
    } catch (err) {
      this.root.replaceChildren(h("p", { class: "message", role: "alert" }, err.message));
    } finally {
      this.root.setAttribute("aria-busy", "false");
    }
  }

  hide() { this.active = false; }

  say(text) {
    const note = document.getElementById("dups-note");
    if (note) note.textContent = text;
  }

  render(note = "") {
    const g = this.groups[this.at];
    const bar = h("div", { class: "dups-bar", role: "toolbar", "aria-label": "Review" },
      h("button", { type: "button", onclick: () => this.move(-1), disabled: this.at <= 0 }, "Previous group"),
      h("button", { type: "button", onclick: () => this.move(1), disabled: this.at >= this.groups.length - 1 }, "Next group"),
      h("button", { type: "button", class: "primary", onclick: () => this.accept(), disabled: !g }, "Resolve group"),
      h("button", { type: "button", onclick: () => this.undo() }, "Undo moves"));
    const hint = h("p", { class: "hint" }, "Keys: N next group, P previous, 1–9 pick the photo to keep, A resolve (the others move to .loupe-duplicates; nothing is deleted), U undo.");
    const out = [bar, hint, h("p", { id: "dups-note", role: "status", "aria-live": "polite" }, note)];
    if (!g) {
      out.push(h("p", { class: "empty" }, "No near-duplicates left."));
      this.root.replaceChildren(...out);
      return;
    }
    const keepId = this.keep.get(g.id) ?? g.files.find((f) => f.path === g.keep)?.id;
    const label = `Group ${this.at + 1} of ${this.groups.length}: ${g.tier === "same" ? "same photo" : "similar shots"}`;
    const cards = g.files.map((f, i) => {
      const picked = f.id === keepId;
      const radio = h("input", { type: "radio", name: "keeper", value: String(f.id), checked: picked,
        "aria-label": `Keep ${f.path.split("/").pop()}`, onchange: () => { this.keep.set(g.id, f.id); this.render(); } });
      return h("li", { class: `dup-card${picked ? " keep" : ""}` },
        h("img", { src: f.thumb, alt: f.path.split("/").pop(), loading: "lazy" }),
        h("label", {}, radio, ` ${i + 1}. ${picked ? "Keep" : "Move aside"}`),
        h("dl", { class: "facts" },
          h("dt", {}, "Dimensions"), h("dd", {}, `${f.width} × ${f.height}${f.cropped ? " (cropped)" : ""}${f.upscaled ? " (upscaled)" : ""}`),
          h("dt", {}, "Size"), h("dd", {}, bytes(f.size)),
          h("dt", {}, "Date"), h("dd", {}, f.taken_at ? date(f.taken_at) : `${date(f.modified)} (modified)`),
          h("dt", {}, "Format"), h("dd", {}, f.format.toUpperCase() + (f.camera_metadata ? ", camera EXIF" : "")),
          h("dt", {}, "Sharpness"), h("dd", {}, String(Math.round(f.sharpness))),
          h("dt", {}, "Path"), h("dd", { class: "path" }, f.path)));
    });
    out.push(h("section", { class: "dup-group", "aria-label": label },
      h("h2", {}, label),
      h("p", {}, `Suggested keeper: ${g.keep.split("/").pop()} (${g.reason})`),
      h("ul", { class: "dup-cards", role: "radiogroup", "aria-label": "Photo to keep" }, ...cards)));
    this.root.replaceChildren(...out);
  }

  move(step) {
    this.at = Math.max(0, Math.min(this.groups.length - 1, this.at + step));
    this.render();
  }

  pick(n) {
    const g = this.groups[this.at];
    if (g && g.files[n]) { this.keep.set(g.id, g.files[n].id); this.render(); }
  }

  async accept() {
    const g = this.groups[this.at];
    if (!g) return;
    const keepId = this.keep.get(g.id) ?? g.files.find((f) => f.path === g.keep)?.id;
    try {
      const r = await api.resolveDuplicates(g.id, keepId);
      this.groups.splice(this.at, 1);
      this.at = Math.min(this.at, Math.max(0, this.groups.length - 1));
      this.render(`Moved ${r.moved.length} photos aside.`);
    } catch (err) {
      this.render(`Not resolved: ${err.message}`);
    }
  }

  async undo() {
    try {
      const r = await api.undoDuplicates();
      await this.show();
      this.say(`Put back ${r.restored.length} photos.`);
    } catch (err) {
      this.say(`Undo failed: ${err.message}`);
    }
  }

  key(e) {
    if (!this.active || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.target.closest && e.target.closest("input[type=search], input[type=text], textarea, select")) return;
    const k = e.key.toLowerCase();
    if (k === "n") this.move(1);
    else if (k === "p") this.move(-1);
    else if (k === "a") this.accept();
    else if (k === "u") this.undo();
    else if (/^[1-9]$/.test(k)) this.pick(Number(k) - 1);
    else return;
    e.preventDefault();
  }
}
