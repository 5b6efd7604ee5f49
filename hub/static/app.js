// Kestrel hub dashboard: helpers every page uses (no framework, no build step).
"use strict";
(function () {
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  let toastTimer = null;

  function toast(text, isError) {
    const el = document.getElementById("toast");
    if (!el) return;
    el.textContent = text;
    el.classList.toggle("error", !!isError);
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.hidden = true; }, isError ? 6000 : 2500);
  }

  // JSON API call with the session's CSRF token; resolves to the parsed body, rejects with the hub's one-line reason.
  async function api(method, url, body) {
    const opts = { method, credentials: "same-origin", headers: { "Accept": "application/json" } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    if (method !== "GET") opts.headers["X-CSRF-Token"] = csrf();
    let resp;
    try {
      resp = await fetch(url, opts);
    } catch (e) {
      throw new Error("the hub did not answer (" + e.message + ")");
    }
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      const reason = (data && data.detail) || (resp.status + " " + resp.statusText);
      const err = new Error(reason);
      err.status = resp.status;
      throw err;
    }
    return data;
  }

  // a message to show after a reload (a page that changed something reloads to show the new state)
  function toastAfterReload(text) {
    try { sessionStorage.setItem("kestrel-toast", text); } catch (e) { /* private mode: no message */ }
    window.location.reload();
  }
  document.addEventListener("DOMContentLoaded", () => {
    let text = null;
    try { text = sessionStorage.getItem("kestrel-toast"); sessionStorage.removeItem("kestrel-toast"); } catch (e) { }
    if (text) toast(text);
  });

  window.kestrel = { api, toast, csrf, toastAfterReload };
})();
