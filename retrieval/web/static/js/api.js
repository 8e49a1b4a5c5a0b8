// The JSON API of `loupe serve`. Every failure becomes an ApiError whose message is the
// server's own words ({"error": "..."}), or a plain sentence when the server could not answer.
//
// The access token: the printed URL carries it in the fragment (`/#token=...`, never sent to a
// server). It is kept in localStorage (this origin: this host and port only; never a cookie, which
// every service on the host would receive) and sent as `Authorization: Bearer`. Pictures come
// from URLs the server signed for a while (an <img> cannot send a header).

const TOKEN_KEY = "loupe-token";

function takeToken() {
  const hash = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  const given = hash.get("token");
  if (given) {
    try { localStorage.setItem(TOKEN_KEY, given); } catch { /* storage off: memory only */ }
    hash.delete("token");
    const rest = hash.toString();
    history.replaceState(history.state, "", window.location.pathname + window.location.search + (rest ? `#${rest}` : ""));
    return given;
  }
  try { return localStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
}

const token = takeToken();
const signedThumbs = new Map(); // photo id -> the signed thumbnail URL the server gave

function remember(body) {
  const rows = body && Array.isArray(body.results) ? body.results : body && body.thumb ? [body] : [];
  for (const r of rows) if (r && r.id != null && typeof r.thumb === "string") signedThumbs.set(String(r.id), r.thumb);
}

export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

async function request(url, options = {}) {
  let resp;
  try {
    const headers = { ...(options.headers || {}) };
    if (token) headers.Authorization = `Bearer ${token}`;
    resp = await fetch(url, { credentials: "omit", ...options, headers });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError("The loupe server does not answer. Is `loupe serve` still running?");
  }
  const type = resp.headers.get("content-type") || "";
  let body = null;
  if (type.includes("json")) {
    try { body = await resp.json(); } catch { body = null; }
  }
  if (!resp.ok) {
    const msg = body && typeof body.error === "string" ? body.error : `The server answered ${resp.status} ${resp.statusText}`.trim();
    throw new ApiError(msg, resp.status);
  }
  if (body === null) throw new ApiError(`The server sent no JSON for ${url}`, resp.status);
  remember(body);
  return body;
}

export function search(body, signal) {
  return request("/api/search", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
}

export function upload(file) {
  const type = file.type && file.type.startsWith("image/") ? file.type : "application/octet-stream";
  return request("/api/uploads", { method: "POST", headers: { "Content-Type": type }, body: file });
}

export const photo = (id) => request(`/api/photos/${encodeURIComponent(id)}`);
export const captions = (id, limit = 8) => request(`/api/photos/${encodeURIComponent(id)}/captions?limit=${limit}`);
export const status = () => request("/api/status");
export const folders = () => request("/api/folders");
export const previewURL = (id) => `/api/photo/${encodeURIComponent(id)}`;
export const thumbURL = (id) => signedThumbs.get(String(id)) || `/api/thumb/${encodeURIComponent(id)}`;
export const duplicates = (tier = "") => request(`/api/duplicates${tier ? `?tier=${encodeURIComponent(tier)}` : ""}`);
export const resolveDuplicates = (group, keep) => request("/api/duplicates/resolve", {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ group, keep }),
});
export const undoDuplicates = () => request("/api/duplicates/undo", { method: "POST" });
