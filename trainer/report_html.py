"""HTML pieces of the report: tables, the confusion matrix, thumbnails, the gate's verdict in words.

Everything is inline (images as ``data:`` URIs, one ``<style>`` block): the report is one file that a
browser, a mail client or the hub dashboard shows as it is, with no external resource.
"""

from __future__ import annotations

import base64
import html
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1060px;margin:1.5em auto;
  padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.15em}
h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.4em 0 .8em} td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:.6em 1em;border-radius:6px;font-size:1.05em;margin:.6em 0}
.pass{background:#e6f4ea;border:1px solid #8c8} .info{background:#eef4fb;border:1px solid #9bd}
.fail{background:#fdecea;border:1px solid #d88}
.warn{background:#fff8e1;border:1px solid #e5c46b;padding:.4em .8em;border-radius:6px;margin:.4em 0}
.note{color:#555;font-size:.92em}
.scroll{overflow-x:auto;max-width:100%}
table.cm td{text-align:center;min-width:2.2em;font-variant-numeric:tabular-nums;font-size:13px}
table.cm th{font-size:12px;text-align:center}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}
.thumb{border:1px solid #ccc;border-radius:4px;padding:4px;text-align:center;font-size:12px;width:92px}
.thumb img{width:84px;height:84px;image-rendering:pixelated;display:block;margin:0 auto 2px}
img.chart{max-width:100%;height:auto}
"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def table(rows: Sequence[Sequence[Any]], head: Sequence[str], numeric: Sequence[int] = ()) -> str:
    """A plain table; columns listed in ``numeric`` are right-aligned."""
    h = f"<tr>{''.join(f'<th>{esc(x)}</th>' for x in head)}</tr>" if head else ""
    body = []
    for r in rows:
        cells = "".join(f"<td class='num'>{esc(x)}</td>" if i in numeric else f"<td>{esc(x)}</td>"
                        for i, x in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return f"<div class='scroll'><table>{h}{''.join(body)}</table></div>"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def chart(png: bytes, alt: str) -> str:
    return f"<img class='chart' src='{data_uri(png)}' alt='{esc(alt)}'>"


def pct(x: Optional[float], digits: int = 1) -> str:
    return "n/a" if x is None else f"{100.0 * x:.{digits}f} %"


def interval(ci: Optional[Sequence[float]]) -> str:
    return "n/a" if not ci else f"{100.0 * ci[0]:.0f}-{100.0 * ci[1]:.0f} %"


def gate_verdict(g: Dict[str, Any]) -> str:
    """"int8 is 0.4 points better than float" and whether that passes, in one sentence."""
    drop = float(g["drop_points"])
    if abs(drop) < 1e-9:
        rel = "int8 is exactly as accurate as float"
    elif drop < 0:
        rel = f"int8 is {-drop:.1f} points better than float"
    else:
        rel = f"int8 is {drop:.1f} points worse than float"
    accs = f"({100 * g['int8_accuracy']:.1f} % vs {100 * g['float_accuracy']:.1f} % on held-out)"
    allowed = f"at most {float(g['max_drop_points']):g} points worse is allowed"
    outcome = "the gate passed: the bundle may be packaged" if g["passed"] else \
        "the gate refused: packaging is refused until the int8 model is closer to the float one"
    return f"{rel} {accs}; {allowed}, so {outcome}."


def calibration_verdict(r: Dict[str, Any], loose: float = 0.05) -> str:
    """What the int8 model's calibration means for a confidence threshold, in one sentence."""
    ece, conf, acc = r.get("ece"), r.get("mean_confidence"), r.get("accuracy")
    if ece is None or conf is None or acc is None:
        return "No held-out images: nothing to say about calibration."
    claim = f"the int8 model is right {100 * acc:.0f} % of the time while its top score averages {100 * conf:.0f} %"
    if ece <= loose:
        return f"Well calibrated (ECE {ece:.3f}): {claim}; its confidence can be read as a probability."
    if acc > conf:
        return (f"Underconfident (ECE {ece:.3f}): {claim}. Its scores understate it, so a threshold that "
                "sounds low already sends the frames it is really unsure of; read the threshold through the "
                "sweep below, not as a probability.")
    return (f"Overconfident (ECE {ece:.3f}): {claim}. Some of its mistakes come with high scores that no "
            "low threshold catches; the sweep below shows how high the threshold must go.")


def _luminance(rgb: Sequence[float]) -> float:
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


def cell_colors(share: float) -> tuple:
    """(background, text) for a confusion-matrix cell holding ``share`` of its row: white to deep blue, and
    black or white text, whichever contrasts more with the background (every number stays readable)."""
    s = min(1.0, max(0.0, share))
    lo, hi = np.array([1.0, 1.0, 1.0]), np.array([0.03, 0.19, 0.42])
    rgb = lo + (hi - lo) * s
    bg = "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb)
    text = "#ffffff" if _luminance(rgb) < 0.45 else "#000000"
    return bg, text


def confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """The matrix as a table: rows = true class, columns = predicted, shaded by the share of the row."""
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{esc(lab)}</th>" for lab in labels) + \
        "<th>images</th></tr>"
    rows = []
    for lab, row in zip(labels, matrix):
        total = sum(row)
        cells = []
        for v in row:
            bg, fg = cell_colors(v / total if total else 0.0)
            cells.append(f"<td style='background:{bg};color:{fg}'>{int(v)}</td>")
        rows.append(f"<tr><th>{esc(lab)}</th>{''.join(cells)}<td class='num'>{total}</td></tr>")
    return f"<div class='scroll'><table class='cm'>{head}{''.join(rows)}</table></div>"


def png_thumbnail(pixels: np.ndarray, color_order: str) -> bytes:
    """A stored training image (model input size, model colour order) as PNG bytes."""
    import cv2

    img = np.asarray(pixels)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and color_order == "rgb":
        img = img[:, :, ::-1]  # cv2 writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:  # pragma: no cover - cv2 encodes any uint8 image
        raise ValueError("cannot encode a thumbnail")
    return bytes(buf)


def thumbnails(items: List[Dict[str, Any]]) -> str:
    """Cards with the image, the true and the predicted class and the model's top score."""
    cards = []
    for it in items:
        cards.append(
            f"<div class='thumb'><img src='{data_uri(it['png'])}' alt='held-out image {it['index']}'>"
            f"true <b>{esc(it['true'])}</b><br>predicted <b>{esc(it['predicted'])}</b><br>"
            f"<span class='note'>score {it['score']:.2f}</span></div>")
    return f"<div class='thumbs'>{''.join(cards)}</div>"


def warning(text: str) -> str:
    return f"<div class='warn'><b>warning:</b> {esc(text)}</div>"
