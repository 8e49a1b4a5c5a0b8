// The page's whole state lives in the URL: query text, image terms and every filter.
// Reload, back/forward, bookmarks and shared links all go through fromURL().

export const DEFAULTS = Object.freeze({
  q: "",
  images: [],          // image terms: "upload:ID", "photo:ID", optionally "-..." (subtract) or "W:..." (weight)
  target: "images",
  folder: "",
  after: "",
  before: "",
  date_field: "auto",
  min_score: "",
  sort: "relevance",
  collapse: true,
  view: "search",
});

const CHOICES = {
  target: ["images", "captions"],
  date_field: ["auto", "taken", "modified"],
  sort: ["relevance", "newest", "oldest"],
  view: ["search", "status", "duplicates"],
};

const IMAGE_TERM = /^-?(?:\d+(?:\.\d+)?:)?(?:upload|photo|moment):[\w.-]+$/;

/** Read a state from a query string; unknown or malformed values fall back to defaults,
 *  except dates and the score, which are kept as typed so that validate() can say what is wrong. */
export function fromURL(search) {
  const p = new URLSearchParams(search);
  const s = { ...DEFAULTS, images: [] };
  s.q = p.get("q") ?? "";
  s.images = p.getAll("img").filter((t) => IMAGE_TERM.test(t));
  for (const key of ["target", "date_field", "sort", "view"]) {
    const v = p.get(key);
    if (v && CHOICES[key].includes(v)) s[key] = v;
  }
  s.folder = p.get("folder") ?? "";
  s.after = p.get("after") ?? "";
  s.before = p.get("before") ?? "";
  s.min_score = p.get("min_score") ?? "";
  s.collapse = p.get("collapse") !== "0";
  return s;
}

/** The query string of a state: only what differs from the defaults, in a stable order. */
export function toURL(s) {
  const p = new URLSearchParams();
  if (s.view !== "search") p.set("view", s.view);
  if (s.q) p.set("q", s.q);
  for (const t of s.images) p.append("img", t);
  if (s.target !== DEFAULTS.target) p.set("target", s.target);
  if (s.folder) p.set("folder", s.folder);
  if (s.after) p.set("after", s.after);
  if (s.before) p.set("before", s.before);
  if (s.date_field !== DEFAULTS.date_field) p.set("date_field", s.date_field);
  if (s.min_score !== "") p.set("min_score", s.min_score);
  if (s.sort !== DEFAULTS.sort) p.set("sort", s.sort);
  if (!s.collapse) p.set("collapse", "0");
  const qs = p.toString();
  return qs ? `?${qs}` : location.pathname;
}

/** Split an image term into its sign and the term the query grammar reads. */
export function imageTerm(t) {
  const negative = t.startsWith("-");
  const term = negative ? t.slice(1) : t;
  const m = term.match(/^(?:(\d+(?:\.\d+)?):)?(upload|photo|moment):(.+)$/);
  return { negative, term, weight: m?.[1] ?? "", kind: m?.[2] ?? "", id: m?.[3] ?? "" };
}

/** The text query plus the image chips, in the CLI grammar: `upload:ID + a dog - photo:7`.
 *  The typed text is kept as typed (so its own quotes, weights and operators mean what they
 *  mean in `loupe search`); it joins the images with `+` unless it starts with an operator. */
export function composeQuery(text, images) {
  text = text.trim();
  const terms = images.map(imageTerm);
  let q = terms.filter((t) => !t.negative).map((t) => t.term).join(" + ");
  if (text) q = q ? (/^[+-]\s/.test(text) ? `${q} ${text}` : `${q} + ${text}`) : text;
  for (const t of terms.filter((t) => t.negative)) q = q ? `${q} - ${t.term}` : `- ${t.term}`;
  return q;
}

/** True when the state asks for a date-ordered browse rather than a ranked search. */
export function isBrowse(s) {
  return !composeQuery(s.q, s.images);
}

function realDate(v) {
  const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(v);
  if (!m) return false;
  const d = new Date(Date.UTC(+m[1], +m[2] - 1, +m[3]));
  return d.getUTCFullYear() === +m[1] && d.getUTCMonth() === +m[2] - 1 && d.getUTCDate() === +m[3];
}

/** Problems the server would reject, said before asking it: {field: message}. */
export function validate(s) {
  const errors = {};
  const photos = s.target === "images";  // folder and dates filter photos only
  for (const key of photos ? ["after", "before"] : []) {
    if (s[key] && !realDate(s[key])) errors[key] = `“${s[key]}” is not a date (use YYYY-MM-DD)`;
  }
  if (photos && !errors.after && !errors.before && s.after && s.before && s.after > s.before) {
    errors.before = `“before” (${s.before}) is earlier than “after” (${s.after}): no photo can match`;
  }
  if (s.min_score !== "" && !Number.isFinite(Number(s.min_score))) {
    errors.min_score = `minimum score “${s.min_score}” is not a number`;
  }
  return errors;
}

/** The JSON body of POST /api/search for one page of this state. */
export function searchBody(s, offset, limit) {
  const q = composeQuery(s.q, s.images);
  const photos = s.target === "images";  // captions have no folder, date or duplicates
  return {
    q,
    target: s.target,
    offset,
    limit,
    min_score: s.min_score === "" ? null : Number(s.min_score),
    folder: (photos && s.folder) || null,
    after: (photos && s.after) || null,
    before: (photos && s.before) || null,
    date_field: s.date_field,
    // an empty query ranks nothing: browse the photos by date, newest first unless asked otherwise
    sort: !photos ? "relevance" : !q && s.sort === "relevance" ? "newest" : s.sort,
    collapse: s.collapse,
  };
}
