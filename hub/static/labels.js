// Label queue: label with the keyboard (digits, a type-ahead over the class names, "unusable", "skip"), one
// frame at a time or every selected frame at once; undo the last label. Writes go to POST /api/labels.
"use strict";
(function () {
  const grid = document.getElementById("grid");
  const bar = document.getElementById("labelbar");
  if (!bar) return;
  const cards = grid ? Array.from(grid.querySelectorAll(".card")) : [];
  const canLabel = grid ? grid.dataset.canLabel === "1" : false;
  const classes = Array.from(bar.querySelectorAll(".cls[data-class]"))
    .map((b) => b.dataset.class).filter((c) => c !== "_unusable");
  const input = document.getElementById("typeahead");
  const list = document.getElementById("suggestions");
  const selcount = document.getElementById("selcount");
  const waiting = document.getElementById("waiting");
  const help = document.getElementById("help");
  const viewer = document.getElementById("viewer");
  const UNUSABLE = "_unusable";
  const selected = new Set();
  const undo = [];
  let focus = 0;
  let busy = false;
  let suggestions = [];
  let suggestion = 0;

  const say = (t, e) => window.kestrel.toast(t, e);
  const idOf = (i) => cards[i].dataset.frameId;
  const labelOf = (i) => cards[i].dataset.label || "";
  const shown = (label) => (label === UNUSABLE ? "unusable" : label);

  function setFocus(i, scroll) {
    if (!cards.length) return;
    focus = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach((c, k) => c.classList.toggle("focus", k === focus));
    cards[focus].focus({ preventScroll: true });
    if (scroll !== false) cards[focus].scrollIntoView({ block: "nearest" });
  }

  function renderSelection() {
    cards.forEach((c, k) => c.classList.toggle("selected", selected.has(k)));
    selcount.hidden = selected.size === 0;
    selcount.textContent = selected.size + " selected";
  }

  function toggle(i) {
    if (selected.has(i)) selected.delete(i); else selected.add(i);
    renderSelection();
  }

  function columns() {
    if (cards.length < 2) return 1;
    const top = cards[0].offsetTop;
    let n = 0;
    while (n < cards.length && cards[n].offsetTop === top) n += 1;
    return Math.max(1, n);
  }

  function nextOpen(after) {
    for (let k = after + 1; k < cards.length; k += 1) if (!labelOf(k)) return k;
    return Math.min(after + 1, cards.length - 1);
  }

  function show(i, label) {
    const c = cards[i];
    const before = c.dataset.label || "";
    c.dataset.label = label || "";
    c.querySelector(".tag").textContent = label ? shown(label) : "";
    c.classList.toggle("done", !!label);
    c.classList.remove("skipped");
    if (waiting) {
      const n = parseInt(waiting.textContent, 10);
      if (!isNaN(n)) waiting.textContent = String(Math.max(0, n + (before && !label ? 1 : 0) - (!before && label ? 1 : 0)));
    }
  }

  async function send(items) {
    const out = await window.kestrel.api("POST", "/api/labels", { items });
    const index = new Map(cards.map((c, k) => [c.dataset.frameId, k]));
    for (const it of out.items) {
      const k = index.get(it.frame_id);
      if (k !== undefined) show(k, it.label);
    }
    return out;
  }

  async function apply(label) {
    if (!cards.length || busy) return;
    if (!canLabel) { say("log in with a labeller token to label", true); return; }
    const targets = selected.size ? Array.from(selected).sort((a, b) => a - b) : [focus];
    busy = true;
    try {
      const out = await send(targets.map((k) => ({ frame_id: idOf(k), label: label })));
      undo.push(out.items.map((it) => ({ frame_id: it.frame_id, label: it.previous })));
      const what = label ? shown(label) : "no label";
      say(targets.length === 1 ? idOf(targets[0]) + ": " + what : targets.length + " frames: " + what);
      selected.clear();
      renderSelection();
      setFocus(nextOpen(targets[targets.length - 1]));
    } catch (e) {
      say(e.message, true);
    } finally {
      busy = false;
    }
  }

  async function undoLast() {
    if (busy) return;
    const items = undo.pop();
    if (!items) { say("nothing to undo"); return; }
    busy = true;
    try {
      await send(items);
      const first = cards.findIndex((c) => c.dataset.frameId === items[0].frame_id);
      if (first >= 0) setFocus(first);
      say("undone: " + items.length + (items.length === 1 ? " frame" : " frames"));
    } catch (e) {
      undo.push(items);
      say(e.message, true);
    } finally {
      busy = false;
    }
  }

  function skip() {
    if (!cards.length) return;
    cards[focus].classList.add("skipped");
    setFocus(focus + 1);
  }

  function openViewer(i) {
    if (!viewer || !cards[i]) return;
    document.getElementById("viewer-img").src = cards[i].dataset.image;
    viewer.showModal();
  }

  // ---- type-ahead over the class names ----
  function match(text) {
    const t = text.trim().toLowerCase();
    if (!t) return classes.slice();
    const starts = classes.filter((c) => c.toLowerCase().startsWith(t));
    return starts.concat(classes.filter((c) => !c.toLowerCase().startsWith(t) && c.toLowerCase().includes(t)));
  }

  function renderSuggestions() {
    suggestions = match(input.value);
    suggestion = Math.min(suggestion, Math.max(0, suggestions.length - 1));
    list.innerHTML = "";
    suggestions.forEach((c, k) => {
      const li = document.createElement("li");
      li.textContent = c;
      li.className = k === suggestion ? "on" : "";
      li.addEventListener("mousedown", (e) => { e.preventDefault(); pick(c); });
      list.appendChild(li);
    });
    list.hidden = suggestions.length === 0;
  }

  function closeTypeahead() {
    input.value = "";
    list.hidden = true;
    input.blur();
    setFocus(focus, false);
  }

  function pick(label) {
    closeTypeahead();
    if (label) apply(label);
  }

  if (input) {
    input.addEventListener("focus", () => { suggestion = 0; renderSuggestions(); });
    input.addEventListener("input", () => { suggestion = 0; renderSuggestions(); });
    input.addEventListener("blur", () => { list.hidden = true; });
    input.addEventListener("keydown", (e) => {
      if (e.key === "ArrowDown" || e.key === "ArrowUp") {
        e.preventDefault();
        suggestion = (suggestion + (e.key === "ArrowDown" ? 1 : -1) + suggestions.length) % Math.max(1, suggestions.length);
        renderSuggestions();
      } else if (e.key === "Enter") {
        e.preventDefault();
        const typed = input.value.trim();
        pick(suggestions.length && (typed === "" || suggestions[suggestion].toLowerCase().startsWith(typed.toLowerCase()))
          ? suggestions[suggestion] : typed);
      } else if (e.key === "Escape") {
        e.preventDefault();
        closeTypeahead();
      }
    });
  }

  // ---- keys on the grid ----
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) return;
    if (document.querySelector("dialog[open]")) return;
    if (e.altKey || (e.metaKey && e.key !== "z") || (e.ctrlKey && e.key !== "z")) return;
    const k = e.key;
    let handled = true;
    if (k === "ArrowRight" || k === "l") setFocus(focus + 1);
    else if (k === "ArrowLeft" || k === "h") setFocus(focus - 1);
    else if (k === "ArrowDown" || k === "j") setFocus(focus + columns());
    else if (k === "ArrowUp" || k === "k") setFocus(focus - columns());
    else if (/^[0-9]$/.test(k)) {
      const c = classes[(parseInt(k, 10) + 9) % 10];
      if (c) apply(c); else say("no class on key " + k, true);
    } else if (k === "u") apply(UNUSABLE);
    else if (k === "s") skip();
    else if (k === "z") undoLast();
    else if (k === "x" || k === " ") { if (cards.length) toggle(focus); }
    else if (k === "a") { cards.forEach((_, i) => selected.add(i)); renderSelection(); }
    else if (k === "Escape") { selected.clear(); renderSelection(); }
    else if (k === "Backspace" || k === "Delete") apply(null);
    else if (k === "/" || k === "t") { if (input && !input.disabled) input.focus(); }
    else if (k === "Enter") openViewer(focus);
    else if (k === "n") { const nx = document.getElementById("nextpage"); if (nx) window.location.href = nx.href; }
    else if (k === "?") { help.hidden = !help.hidden; }
    else handled = false;
    if (handled) e.preventDefault();
  });

  // ---- mouse ----
  cards.forEach((c, i) => {
    c.addEventListener("click", (e) => {
      if (e.shiftKey) {
        const [a, b] = [Math.min(focus, i), Math.max(focus, i)];
        for (let j = a; j <= b; j += 1) selected.add(j);
        renderSelection();
      } else if (e.ctrlKey || e.metaKey) {
        toggle(i);
      }
      setFocus(i, false);
    });
    c.addEventListener("dblclick", () => openViewer(i));
  });
  bar.querySelectorAll(".cls").forEach((b) => b.addEventListener("click", () => {
    if (b.dataset.action === "skip") skip();
    else if (b.dataset.action === "undo") undoLast();
    else apply(b.dataset.class);
  }));
  document.getElementById("helpbtn").addEventListener("click", () => { help.hidden = !help.hidden; });
  setFocus(Math.max(0, cards.findIndex((c) => !c.dataset.label)), false);
})();
