// Models page: deploy a version to a group or a device, roll a group or a device back; each after a confirmation.
"use strict";
(function () {
  const dialog = document.getElementById("confirm");
  const targets = document.getElementById("targets");
  if (!dialog || !targets) return;
  const groups = (targets.dataset.groups || "").split(",").filter(Boolean);
  const devices = (targets.dataset.devices || "").split(",").filter(Boolean);
  const selGroup = document.getElementById("target-group");
  const selDevice = document.getElementById("target-device");
  const title = document.getElementById("confirm-title");
  const text = document.getElementById("confirm-text");
  let pending = null;

  function fill(sel, values) {
    sel.innerHTML = "";
    for (const v of values) {
      const o = document.createElement("option");
      o.value = v; o.textContent = v;
      sel.appendChild(o);
    }
  }
  fill(selGroup, groups.length ? groups : ["default"]);
  fill(selDevice, devices);

  function target() {
    const kind = dialog.querySelector('input[name="kind"]:checked').value;
    return kind === "device" ? { device_id: selDevice.value } : { group: selGroup.value };
  }

  function describe() {
    if (!pending) return;
    const t = target();
    const where = t.device_id ? "device " + t.device_id : "group " + t.group;
    if (pending.action === "deploy") {
      text.textContent = "Deploy " + pending.model + " v" + pending.version + " to " + where +
        "? The hub publishes a retained desired state; the devices fetch the bundle, verify its signature, " +
        "self-test it, switch and watch it on trial.";
    } else {
      text.textContent = "Roll " + where + " back from its current " + pending.model + " version to its own " +
        "previous slot? The devices switch back without fetching anything.";
    }
  }

  function open(action, model, version) {
    pending = { action, model, version };
    title.textContent = action === "deploy" ? "Deploy " + model + " v" + version : "Roll back " + model;
    describe();
    dialog.showModal();
  }

  dialog.addEventListener("change", describe);
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "ok" || !pending) { pending = null; return; }
    const p = pending; pending = null;
    const t = target();
    if (!t.device_id && !t.group) { window.kestrel.toast("choose a group or a device", true); return; }
    try {
      const body = p.action === "deploy"
        ? Object.assign({ model_name: p.model, version: p.version }, t) : t;
      const out = await window.kestrel.api("POST", "/api/" + p.action, body);
      window.kestrel.toastAfterReload((p.action === "deploy" ? "deployed: " : "rollback announced: ") + out.topic +
        " (retained)");
    } catch (e) {
      window.kestrel.toast(e.message, true);
    }
  });

  document.querySelectorAll("button.deploy").forEach((b) => b.addEventListener("click", () =>
    open("deploy", b.dataset.model, parseInt(b.dataset.version, 10))));
  document.querySelectorAll("button.rollback").forEach((b) => b.addEventListener("click", () =>
    open("rollback", b.dataset.model, 0)));
})();
