// The UI's one way to call the server: fetch with the key from sessionStorage, JSON helpers, and an SSE reader
// for streamed chat completions. Errors throw ApiError with the HTTP status, the server's message and
// Retry-After (seconds) when the server sent one.

const KEY = "qwen3-local.key";

export class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function errorFrom(response) {
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    message = body?.error?.message ?? body?.detail ?? message;
    if (typeof message !== "string") message = JSON.stringify(message);
  } catch {
    // not JSON: keep the status text
  }
  const header = response.headers.get("retry-after");
  const retryAfter = header !== null && !Number.isNaN(Number(header)) ? Number(header) : null;
  return new ApiError(response.status, message, retryAfter);
}

export const api = {
  key() {
    return sessionStorage.getItem(KEY);
  },
  setKey(key) {
    if (key) sessionStorage.setItem(KEY, key);
    else sessionStorage.removeItem(KEY);
  },
  headers(extra = {}, key = this.key()) {
    return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
  },
  async request(path, { method = "GET", body, signal, key } = {}) {
    const init = { method, signal, headers: this.headers(body === undefined ? {} : { "Content-Type": "application/json" }, key ?? this.key()) };
    if (body !== undefined) init.body = JSON.stringify(body);
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, `The server cannot be reached (${error.message}).`);
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  },
  async get(path, options = {}) {
    return (await this.request(path, options)).json();
  },
  async post(path, body, options = {}) {
    return (await this.request(path, { ...options, method: "POST", body })).json();
  },
  // Yields each `data:` payload of a server-sent event stream, parsed, until [DONE] or the stream ends.
  async *sse(path, body, { signal } = {}) {
    const response = await this.request(path, { method: "POST", body, signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = event
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(500, parsed.error.message ?? JSON.stringify(parsed.error));
        yield parsed;
      }
    }
  },
};
