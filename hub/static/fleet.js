// Fleet page: refresh the table every [http] refresh_s without reloading the page.
"use strict";
(function () {
  const live = document.getElementById("live");
  const box = document.getElementById("fleet-live");
  if (!live || !box) return;
  const every = parseInt(live.dataset.refreshMs, 10) || 3000;
  let failures = 0;

  async function refresh() {
    try {
      const resp = await fetch("/fleet/rows", { credentials: "same-origin", headers: { "Accept": "text/html" } });
      if (resp.redirected || resp.status === 401) { window.location.href = "/login?next=/fleet"; return; }
      if (!resp.ok) throw new Error(resp.status);
      box.innerHTML = await resp.text();
      failures = 0;
      live.classList.remove("stale");
      live.textContent = "live";
    } catch (e) {
      failures += 1;
      if (failures > 1) { live.classList.add("stale"); live.textContent = "not updating (hub unreachable)"; }
    }
    setTimeout(refresh, every);
  }
  setTimeout(refresh, every);
})();
