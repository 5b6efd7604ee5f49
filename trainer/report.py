"""The run report: one self-contained HTML page (charts and thumbnails inlined as data: URIs, no external
resource: the hub dashboard's Models page shows it as it is), the charts also as PNG files, and the numbers
behind every chart in figures.json.

Sections: data (tables), cross-validation, learning curves, held-out evaluation with the gate's verdict in
words, per-class precision / recall / F1, the confusion matrix, the misclassified held-out images,
calibration (reliability diagram, ECE of int8 and float), the sampling threshold (the sweep's curve with
the chosen point and what it means for uplink volume), size (raw vs gzip) and latency (runtime and
machine named), pruning, warnings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainer import report_html as h
from trainer import report_plots as plots

STAGE_NAMES = {"float": "float", "pruned_float": "pruned (float)", "int8": "int8",
               "pruned_int8": "pruned int8 (deployed)"}
MAX_THUMBNAILS = 60
RULE_ORDER = ("confidence", "margin", "entropy")
DEPLOYED = "pruned_int8"


def _load(p: Path) -> Any:
    return json.loads(p.read_text("utf-8")) if p.is_file() else None


def gather(rundir: Path) -> Dict[str, Any]:
    return {
        "config": _load(rundir / "config.json"),
        "cleaning": _load(rundir / "ingest" / "cleaning.json"),
        "history": _load(rundir / "train" / "history.json"),
        "cv": _load(rundir / "train" / "cv.json"),
        "train_metrics": _load(rundir / "train" / "metrics.json"),
        "optimize": _load(rundir / "optimize" / "optimize.json"),
        "evaluate": _load(rundir / "evaluate" / "evaluate.json"),
    }


def _configured_threshold(data: Dict[str, Any]) -> Optional[float]:
    value = ((data.get("config") or {}).get("gate") or {}).get("default_threshold")
    return None if value is None else float(value)


def _machine_text(m: Dict[str, Any]) -> str:
    return f"{m.get('cpu', '?')} ({m.get('arch', '?')}, {m.get('cores', '?')} cores, {m.get('system', '?')})"


def _runtime_text(lat: Dict[str, Any]) -> str:
    v = lat.get("runtime_version")
    return f"{lat.get('runtime', '?')}{' ' + v if v else ''}, {lat.get('threads', 1)} thread" \
        f"{'s' if lat.get('threads', 1) != 1 else ''}"


def figures(data: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers behind every chart and table."""
    from trainer.threshold import resolve

    figs: Dict[str, Any] = {}
    if data["history"]:
        figs["learning_curves"] = data["history"]
    cv = data["cv"]
    if cv and cv.get("folds"):
        figs["fold_accuracy"] = {"fold": [int(f["fold"]) + 1 for f in cv["folds"]],
                                 "accuracy": [f["accuracy"] for f in cv["folds"]],
                                 "macro_f1": [f["macro_f1"] for f in cv["folds"]],
                                 "mean": cv["accuracy"]["mean"], "std": cv["accuracy"]["std"]}
    ev = data["evaluate"]
    if ev:
        st = {k: ev["stages"][k] for k in STAGE_NAMES if k in ev["stages"]}  # pipeline order, not the JSON's
        figs["confusion_matrix"] = {"labels": ev["class_names"], "matrix": st[DEPLOYED]["confusion"]}
        if "per_class" in st[DEPLOYED]:
            figs["per_class"] = dict(st[DEPLOYED]["per_class"], labels=ev["class_names"])
        figs["size"] = {"models": [STAGE_NAMES[k] for k in st], "raw_bytes": [v["bytes"] for v in st.values()],
                        "gzip_bytes": [v["gzip_bytes"] for v in st.values()]}
        lat = st[DEPLOYED]["latency"]
        figs["latency"] = {"models": [STAGE_NAMES[k] for k in st],
                           "median_ms": [v["latency"]["median_ms"] for v in st.values()],
                           "runtime": _runtime_text(lat), "machine": _machine_text(ev.get("machine") or {})}
        if "threshold" in ev:
            t = ev["threshold"]
            figs["threshold"] = {"n": t["n"], "n_errors": t["n_errors"], "target": t["target"],
                                 "chosen": t["chosen"], "in_bundle": resolve(t, _configured_threshold(data)),
                                 "rules": {k: {"points": t["rules"][k]["points"], "chosen": t["rules"][k]["chosen"]}
                                           for k in RULE_ORDER if k in t["rules"]}}
        if "calibration" in ev:
            figs["calibration"] = {k: ev["calibration"][k] for k in ("int8", "float") if k in ev["calibration"]}
    return figs


def _charts(figs: Dict[str, Any]) -> Dict[str, bytes]:
    pngs: Dict[str, bytes] = {}
    if "learning_curves" in figs:
        pngs["learning_curves"] = plots.learning_curves(figs["learning_curves"])
    if "fold_accuracy" in figs:
        f = figs["fold_accuracy"]
        pngs["fold_accuracy"] = plots.fold_accuracy(f["accuracy"], f["macro_f1"], f["mean"], f["std"])
    if "size" in figs:
        s = figs["size"]
        pngs["size"] = plots.size_chart(s["models"], s["raw_bytes"], s["gzip_bytes"])
    if "latency" in figs:
        s = figs["latency"]
        pngs["latency"] = plots.latency_chart(s["models"], s["median_ms"], s["runtime"], s["machine"])
    if "threshold" in figs:
        t = figs["threshold"]
        b = t["in_bundle"]
        pngs["threshold"] = plots.threshold_chart(t["rules"]["confidence"]["points"], t["n"], t["n_errors"],
                                                  t["target"], t["chosen"], b["threshold"], b["source"], t["rules"])
    if "calibration" in figs:
        pngs["calibration"] = plots.reliability_chart(figs["calibration"])
    return pngs


# ---------------------------------------------------------------- sections

def _data_section(cl: Dict[str, Any]) -> List[str]:
    parts = ["<h2>Data</h2>"]
    split = cl.get("split") or {}
    per_test = split.get("test_per_class") or {}
    rows = [[name, n, n - per_test.get(name, 0), per_test.get(name, 0)] for name, n in cl["classes"].items()]
    rows.append(["all classes", cl["kept"], split.get("train", ""), split.get("test", "")])
    parts.append(h.table(rows, ["class", "images kept", "training", "held-out test"], numeric=(1, 2, 3)))
    groups = cl.get("near_duplicate_groups") or {}
    summary = [["files seen", cl["seen"]], ["kept", cl["kept"]], ["dropped", cl["seen"] - cl["kept"]]]
    if isinstance(groups, dict):
        summary += [["near-duplicate groups (a group never straddles a split)", groups.get("groups", "")],
                    ["images that are near duplicates of another kept image",
                     groups.get("images_in_shared_groups", "")]]
    sizes = cl.get("original_sizes") or {}
    if sizes:
        summary.append(["original sizes", ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items()))])
    parts.append(h.table(summary, [], numeric=(1,)))
    for source, man in (cl.get("manifests") or {}).items():
        parts.append(f"<p class='note'>hub export {h.esc(source)}: {h.esc(man.get('frames', '?'))} frames</p>")
    for w in cl.get("warnings", []):
        parts.append(h.warning(w))
    conflicts = cl.get("near_duplicate_label_conflicts") or []
    if conflicts:
        parts.append("<h3>Near duplicates under different classes (check these labels)</h3>" + h.table(
            [[c["group"], ", ".join(f"{f['path']} ({f['label']})" for f in c["files"])] for c in conflicts],
            ["group", "files"]))
    parts.append("<h3>Dropped</h3>")
    if not cl["dropped_by_reason"]:
        parts.append("<p>Nothing dropped: every file was a readable, large enough, unique image.</p>")
    else:
        parts.append(h.table(sorted(cl["dropped_by_reason"].items()), ["reason", "files"], numeric=(1,)))
        shown = cl["dropped"][:200]
        parts.append(h.table([[d["path"], d["label"], d["reason"], d["detail"]] for d in shown],
                             ["file", "class", "reason", "detail"]))
        if len(cl["dropped"]) > len(shown):
            parts.append(f"<p class='note'>first {len(shown)} of {len(cl['dropped'])} (all in "
                         "ingest/cleaning.json)</p>")
    return parts


def _cv_section(cv: Dict[str, Any], pngs: Dict[str, bytes]) -> List[str]:
    if not cv or cv.get("skipped"):
        return ["<h2>Cross-validation</h2><p>skipped (train.folds &lt; 2)</p>"]
    rows = [[int(f["fold"]) + 1, f["train"], f["val"], f"{f['accuracy']:.4f}", f"{f['macro_f1']:.4f}"]
            for f in cv["folds"]]
    parts = [f"<h2>Cross-validation ({cv['k']}-fold, stratified, grouped)</h2>"
             f"<p>accuracy {cv['accuracy']['mean']:.4f} &plusmn; {cv['accuracy']['std']:.4f}; macro F1 "
             f"{cv['macro_f1']['mean']:.4f} &plusmn; {cv['macro_f1']['std']:.4f} (float models, {cv['epochs']} "
             "epochs each)</p>",
             h.table(rows, ["fold", "training images", "validation images", "accuracy", "macro F1"],
                     numeric=(0, 1, 2, 3, 4))]
    if "fold_accuracy" in pngs:
        parts.append(h.chart(pngs["fold_accuracy"], "per-fold accuracy and macro F1"))
    return parts


def _evaluation_section(ev: Dict[str, Any], pngs: Dict[str, bytes]) -> List[str]:
    st = {k: ev["stages"][k] for k in STAGE_NAMES if k in ev["stages"]}
    g = ev["gate"]
    rows = [[STAGE_NAMES[k], f"{100 * v['accuracy']:.1f} %", f"{v['macro_f1']:.3f}", f"{v['bytes']:,}",
             f"{v['gzip_bytes']:,}", f"{v['latency']['median_ms']:.3f}"] for k, v in st.items()]
    lat = st[DEPLOYED]["latency"]
    parts = ["<h2>Held-out evaluation</h2>",
             f"<p>{ev['n_test']} held-out images, every model run through the edge runtime the device uses; "
             f"one image is {g.get('points_per_test_image', 0):.2f} accuracy points.</p>",
             h.table(rows, ["model", "accuracy", "macro F1", "raw bytes", "gzip bytes",
                            f"ms per inference ({_runtime_text(lat)})"], numeric=(1, 2, 3, 4, 5)),
             f"<div class='verdict {'pass' if g['passed'] else 'fail'}'><b>Gate "
             f"{'passed' if g['passed'] else 'refused'}:</b> {h.esc(h.gate_verdict(g))}</div>"]
    names = ev["class_names"]
    pc = st[DEPLOYED].get("per_class")
    if pc:
        rows = [[names[i], f"{pc['precision'][i]:.3f}", f"{pc['recall'][i]:.3f}", f"{pc['f1'][i]:.3f}",
                 pc["support"][i]] for i in range(len(names))]
        parts += ["<h2>Per class (deployed int8 model, held-out)</h2>",
                  "<p class='note'>precision: of the images it called this class, the share that were; recall: "
                  "of this class's images, the share it found; F1: their harmonic mean.</p>",
                  h.table(rows, ["class", "precision", "recall", "F1", "held-out images"], numeric=(1, 2, 3, 4))]
    parts += ["<h2>Confusion matrix (deployed int8 model, held-out)</h2>",
              "<p class='note'>rows: true class; columns: predicted; shading: share of the row.</p>",
              h.confusion_matrix(st[DEPLOYED]["confusion"], names)]
    return parts


def _mistakes_section(ev: Dict[str, Any], rundir: Path, color_order: str) -> List[str]:
    if "mistakes" not in ev:  # evaluated by an older trainer
        return []
    wrong = ev["mistakes"]
    parts = [f"<h2>Misclassified held-out images ({len(wrong)})</h2>"]
    if not wrong:
        return parts + ["<p>The deployed model classifies every held-out image correctly.</p>"]
    from trainer.rundir import load_data

    ds, _tr, _te = load_data(rundir)
    names = ev["class_names"]
    shown = wrong[:MAX_THUMBNAILS]
    items = [{"png": h.png_thumbnail(ds.images[m["index"]], color_order), "index": m["index"],
              "true": names[m["true"]], "predicted": names[m["predicted"]], "score": m["score"]} for m in shown]
    parts.append("<p class='note'>most confident mistakes first; the image as the model sees it (its input "
                 "size).</p>" + h.thumbnails(items))
    if len(wrong) > len(shown):
        parts.append(f"<p class='note'>first {len(shown)} of {len(wrong)} (all in evaluate/evaluate.json)</p>")
    return parts


def _calibration_section(ev: Dict[str, Any], pngs: Dict[str, bytes]) -> List[str]:
    cal = {k: ev["calibration"][k] for k in ("int8", "float") if k in (ev.get("calibration") or {})}
    if not cal:
        return []
    rows = [[name, "n/a" if r["ece"] is None else f"{r['ece']:.3f}", h.pct(r["mean_confidence"]),
             h.pct(r["accuracy"])] for name, r in cal.items()]
    return ["<h2>Calibration: does the confidence mean anything?</h2>",
            "<p>Held-out images binned by the model's top score; a calibrated model is right as often as it "
            "claims (the diagonal). The expected calibration error (ECE) is the average gap, weighted by the "
            "images per bin: the confidence threshold below is only as meaningful as this is small.</p>",
            h.table(rows, ["model", "ECE", "mean top score", "accuracy"], numeric=(1, 2, 3)),
            f"<p>{h.esc(h.calibration_verdict(cal['int8']))}</p>" if "int8" in cal else "",
            h.chart(pngs["calibration"], "reliability diagram of the int8 and float models")]


def _threshold_section(figs: Dict[str, Any], pngs: Dict[str, bytes]) -> List[str]:
    t = figs.get("threshold")
    if not t:
        return []
    b = t["in_bundle"]
    source = {"data": f"chosen from the held-out data: the lowest threshold whose frames hold at least "
                      f"{t['target']:.0%} of the int8 model's errors ([gate] errors_to_catch), i.e. the fewest "
                      "frames sent",
              "config": "set by [gate] default_threshold, which wins over the data's choice"
                        + (f" ({t['chosen']:.2f})" if t["chosen"] is not None else ""),
              "device default": "the device default: the model made no held-out errors, so there was nothing "
                                "to choose from"}[b["source"]]
    per1000 = 1000 * b["sent_share"]
    lo, hi = (b["sent_ci"] or (0.0, 0.0))
    ex = b["expected"]
    caught = (f"{b['caught']} of its {b['n_errors']} errors ({h.pct(b['caught_share'], 0)}). On new frames expect "
              f"about {h.pct(ex['caught_share'], 0)} of the errors caught (95 %: {h.interval(ex['caught_ci'])})"
              + ("; the held-out figure is optimistic because the threshold was placed just above the errors it "
                 "needed, while this estimate chooses it without each error in turn (leave-one-out)"
                 if b["source"] == "data" else "") if b["n_errors"] else "none of its errors (it made none)")
    parts = ["<h2>Sampling threshold</h2>",
             f"<div class='verdict info'>The bundle's default confidence threshold is <b>{b['threshold']:.2f}</b>, "
             f"{h.esc(source)}.</div>",
             f"<p>On the {b['n']} held-out images it sends {b['sent']} ({h.pct(b['sent_share'])}, 95 %: "
             f"{h.interval(b['sent_ci'])}) and among them {caught}. <b>Uplink volume:</b> on frames like these, "
             f"about {per1000:.0f} of every 1,000 a camera sees go to the hub (95 %: {1000 * lo:.0f}-"
             f"{1000 * hi:.0f}), before the device's rate limits and near-duplicate suppression; at 10 frames per "
             f"second that is about {per1000 * 0.6:.0f} a minute. A higher threshold sends more frames and catches "
             "more mistakes; a lower one the reverse. A device's own [sampler] confidence_threshold wins over the "
             "bundle's.</p>",
             h.chart(pngs["threshold"], "share of frames sent and of errors caught against the threshold")]
    rows = []
    for rule, r in t["rules"].items():  # (figures() put them in the device's order)
        ch = r["chosen"]
        if ch is None:
            rows.append([rule, "-", "-", "-", "-"])
        else:
            ex = ch.get("expected") or {}
            rows.append([rule, f"{ch['threshold']:.2f}" + ("" if ch["target_met"] else " (target not met)"),
                         f"{h.pct(ch['sent_share'])} ({h.interval(ch['sent_ci'])})",
                         f"{h.pct(ch['caught_share'])} ({ch['caught']} of {t['n_errors']})",
                         f"{h.pct(ex.get('caught_share'))} ({h.interval(ex.get('caught_ci'))})"])
    parts += [f"<p>Each of the device's rules at the setting that catches {t['target']:.0%} of the errors with "
              "the fewest frames (confidence: sent when the top score is below it; margin: when top-1 minus "
              "top-2 is below it; entropy: when the normalized entropy is above it). Only the confidence "
              "threshold travels in the bundle; the others are device settings ([sampler]).</p>",
              h.table(rows, ["rule", "threshold", "frames sent (95 %)", "errors caught on held-out",
                             "errors caught on new frames, expected (95 %)"])]
    return parts


def _size_latency_section(figs: Dict[str, Any], pngs: Dict[str, bytes]) -> List[str]:
    if "size" not in figs:
        return []
    lat = figs["latency"]
    return ["<h2>Size and latency</h2>",
            "<p>Raw: the .tflite file as the device stores it; gzip: its compressed size, what a device downloads "
            "(pruning's zeros compress).</p>", h.chart(pngs["size"], "model size, raw and gzip"),
            f"<p>Latency: median of 30 single inferences on <b>{h.esc(lat['runtime'])}</b>, measured on "
            f"<b>{h.esc(lat['machine'])}</b>, the machine that trained the model, not a device: a Jetson's "
            "figures differ (run <code>make bench</code> on one).</p>",
            h.chart(pngs["latency"], "latency per model")]


def write_report(rundir: Path) -> Path:
    from proto.atomic import write_bytes, write_json

    out = rundir / "report"
    out.mkdir(parents=True, exist_ok=True)
    data = gather(rundir)
    figs = figures(data)
    write_json(out / "figures.json", figs)
    pngs = _charts(figs)
    for name, png in pngs.items():
        write_bytes(out / f"{name}.png", png)
    cfg = data["config"] or {}
    model = cfg.get("model") or {}
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>Kestrel training report: {h.esc(rundir.name)}</title><style>{h.STYLE}</style></head><body>",
             f"<h1>Kestrel training report</h1><p class='note'>run {h.esc(rundir)}; model "
             f"{h.esc((cfg.get('gate') or {}).get('model_name', '?'))}: {h.esc(model.get('arch', '?'))}, "
             f"{h.esc(model.get('input_size', '?'))}x{h.esc(model.get('input_size', '?'))} input</p>"]
    ev = data["evaluate"]
    if ev:
        g = ev["gate"]
        parts.append(f"<div class='verdict {'pass' if g['passed'] else 'fail'}'>{h.esc(h.gate_verdict(g))}</div>")
    if data["cleaning"]:
        parts += _data_section(data["cleaning"])
    parts += _cv_section(data["cv"], pngs)
    if "learning_curves" in pngs:
        parts += ["<h2>Learning curves</h2><p class='note'>final float model; held-out = the test split, "
                  "which no training step uses</p>", h.chart(pngs["learning_curves"], "learning curves")]
    if ev:
        parts += _evaluation_section(ev, pngs)
        parts += _mistakes_section(ev, rundir, model.get("color_order", "rgb"))
        parts += _calibration_section(ev, pngs)
        parts += _threshold_section(figs, pngs)
        parts += _size_latency_section(figs, pngs)
    op = data["optimize"]
    if op:
        from trainer.optimize import SCHEDULE_TEXT

        sched = {k: v for k, v in op.get("schedule", {}).items() if k not in ("explained", "pruned_layer_types")}
        parts += ["<h2>Pruning</h2><p>" + h.esc(SCHEDULE_TEXT) + "</p>",
                  h.table([[k, v] for k, v in sched.items()], ["schedule", "value"]),
                  f"<p>measured sparsity of the pruned kernels: {op['sparsity']['overall']:.3f}</p>"]
    warnings = (ev or {}).get("warnings", [])
    if warnings:
        parts += ["<h2>Warnings</h2>"] + [h.warning(w) for w in warnings]
    parts.append("</body></html>")
    write_bytes(out / "report.html", "\n".join(parts).encode("utf-8"))
    return out / "report.html"
