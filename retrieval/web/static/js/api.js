// The JSON API of `loupe serve`. Every failure becomes an ApiError whose message is the
// server's own words ({"error": "..."}), or a plain sentence when the server could not answer.

export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

async function request(url, options = {}) {
  let resp;
  try {
    resp = await fetch(url, { credentials: "same-origin", ...options });
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
export const thumbURL = (id) => `/api/thumb/${encodeURIComponent(id)}`;
