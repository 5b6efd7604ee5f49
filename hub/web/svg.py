"""Charts as inline SVG, drawn on the server: a time-line chart (lines with optional bands), grouped bars
and a heatmap (the confusion matrix). No script, no chart library; the page styles them (app.css).
Every text is escaped; numbers are formatted here."""

from __future__ import annotations

import html
import math
import time
from typing import List, Optional, Sequence, Tuple

from markupsafe import Markup

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")
W, H = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 14, 28

Series = Tuple[str, Sequence[Optional[float]]]


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(v: float, percent: bool) -> str:
    if percent:
        return f"{v * 100:.0f}%"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return float(m * exp)
    return float(10 * exp)  # pragma: no cover


def _time_label(ms: int, span_ms: int) -> str:
    fmt = "%H:%M" if span_ms <= 26 * 3600 * 1000 else "%m-%d %H:%M"
    return time.strftime(fmt, time.gmtime(ms / 1000))


def _frame(title: str, body: List[str], legend: Sequence[str]) -> Markup:
    items = "".join(f'<span class="key"><i class="swatch c{i % len(PALETTE)}"></i>{_e(name)}</span>'
                    for i, name in enumerate(legend))
    svg = (f'<svg viewBox="0 0 {W} {H}" class="chart" role="img" aria-label="{_e(title)}" '
           f'preserveAspectRatio="none">{"".join(body)}</svg>')
    return Markup(f'<figure class="chart-box"><figcaption>{_e(title)}</figcaption>{svg}'
                  f'<div class="legend">{items}</div></figure>')


def _axes(y_max: float, percent: bool, x_labels: Sequence[Tuple[float, str]], centred: bool = False) -> List[str]:
    out = []
    for k in range(5):
        v = y_max * k / 4
        y = TOP + (H - TOP - BOTTOM) * (1 - k / 4)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(v, percent)}</text>')
    for k, (x, label) in enumerate(x_labels):
        anchor = "middle" if centred or len(x_labels) < 2 else "start" if k == 0 else \
            "end" if k == len(x_labels) - 1 else "middle"
        out.append(f'<text class="tick" x="{x:.1f}" y="{H - 8}" text-anchor="{anchor}">{_e(label)}</text>')
    return out


def line_chart(title: str, xs: Sequence[int], series: Sequence[Series], percent: bool = False,
               y_max: Optional[float] = None, bands: Sequence[Tuple[int, Sequence[Optional[float]],
                                                                    Sequence[Optional[float]]]] = (),
               empty: str = "no data in this range yet") -> Markup:
    """Lines over time (None = a gap); ``bands``: (series index, low, high) shaded around a line."""
    values = [v for _, ys in series for v in ys if v is not None] + \
             [v for _, lo, hi in bands for v in list(lo) + list(hi) if v is not None]
    if not xs or not values:
        return Markup(f'<figure class="chart-box"><figcaption>{_e(title)}</figcaption>'
                      f'<p class="empty">{_e(empty)}</p></figure>')
    top = y_max if y_max is not None else _nice_max(max(values) * 1.05)
    x0, x1 = xs[0], xs[-1] if len(xs) > 1 else xs[0] + 1
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(i: int) -> float:
        return LEFT + pw * (xs[i] - x0) / max(1, x1 - x0)

    def py(v: float) -> float:
        return TOP + ph * (1 - min(v, top) / top)

    ticks = [(px(i), _time_label(xs[i], x1 - x0)) for i in sorted({0, len(xs) // 3, 2 * len(xs) // 3, len(xs) - 1})]
    body = _axes(top, percent, ticks)
    for idx, lo, hi in bands:
        runs: List[List[int]] = [[]]
        for i in range(len(xs)):
            if lo[i] is not None and hi[i] is not None:
                runs[-1].append(i)
            elif runs[-1]:
                runs.append([])
        for run in (r for r in runs if r):
            pts = [f"{px(i):.1f},{py(hi[i]):.1f}" for i in run]  # type: ignore[arg-type]
            pts += [f"{px(i):.1f},{py(lo[i]):.1f}" for i in reversed(run)]  # type: ignore[arg-type]
            body.append(f'<polygon class="band c{idx % len(PALETTE)}" points="{" ".join(pts)}"/>')
    for k, (_, ys) in enumerate(series):
        segs: List[List[str]] = [[]]
        for i, v in enumerate(ys):
            if v is None:
                if segs[-1]:
                    segs.append([])
                continue
            segs[-1].append(f"{px(i):.1f},{py(v):.1f}")
        for seg in (s for s in segs if s):
            if len(seg) == 1:
                x, y = seg[0].split(",")
                body.append(f'<circle class="dot c{k % len(PALETTE)}" cx="{x}" cy="{y}" r="2.5"/>')
            else:
                body.append(f'<polyline class="line c{k % len(PALETTE)}" points="{" ".join(seg)}"/>')
    return _frame(title, body, [name for name, _ in series])


def bar_chart(title: str, groups: Sequence[str], series: Sequence[Series], percent: bool = True,
              empty: str = "no data in this range yet") -> Markup:
    """Grouped bars: one group per x label, one bar per series in it."""
    values = [v for _, ys in series for v in ys if v is not None]
    if not groups or not values:
        return Markup(f'<figure class="chart-box"><figcaption>{_e(title)}</figcaption>'
                      f'<p class="empty">{_e(empty)}</p></figure>')
    top = _nice_max(max(values) * 1.05)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    gw = pw / len(groups)
    bw = gw * 0.8 / max(1, len(series))
    step = max(1, len(groups) // 10)
    body = _axes(top, percent, [(LEFT + gw * (i + 0.5), g) for i, g in enumerate(groups) if i % step == 0],
                 centred=True)
    for k, (_, ys) in enumerate(series):
        for i, v in enumerate(ys):
            if v is None or v <= 0:
                continue
            h = ph * min(v, top) / top
            x = LEFT + gw * i + gw * 0.1 + bw * k
            body.append(f'<rect class="bar c{k % len(PALETTE)}" x="{x:.1f}" y="{TOP + ph - h:.1f}" '
                        f'width="{bw:.1f}" height="{h:.1f}"><title>{_e(g_title(groups[i], v, percent))}</title></rect>')
    return _frame(title, body, [name for name, _ in series])


def g_title(group: str, v: float, percent: bool) -> str:
    return f"{group}: {_fmt(v, percent)}"


def heatmap(title: str, labels: Sequence[str], matrix: Sequence[Sequence[float]]) -> Markup:
    """A confusion matrix: rows = true class, columns = predicted; every cell carries its count."""
    n = len(labels)
    if not n or len(matrix) != n or any(len(r) != n for r in matrix):
        return Markup(f'<figure class="chart-box"><figcaption>{_e(title)}</figcaption>'
                      '<p class="empty">no confusion matrix in this model\'s report</p></figure>')
    cell = max(14, min(56, 400 // n))
    pad = 8 + 7 * min(14, max(len(str(lab)) for lab in labels))
    size = pad + cell * n + 8
    biggest = max(max(r) for r in matrix) or 1
    body = []
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        y = pad + i * cell
        body.append(f'<text class="tick" x="{pad - 4}" y="{y + cell / 2 + 4:.1f}" text-anchor="end">'
                    f'{_e(str(labels[i])[:14])}</text>')
        for j, v in enumerate(row):
            x = pad + j * cell
            level = min(9, int(9 * v / biggest + 0.999)) if v else 0
            cls = "diag" if i == j else "off"
            body.append(f'<rect class="cell {cls} l{level}" x="{x}" y="{y}" width="{cell}" height="{cell}">'
                        f'<title>true {_e(labels[i])}, predicted {_e(labels[j])}: {v:g} ({100 * v / total:.0f}% '
                        f'of {_e(labels[i])})</title></rect>')
            if cell >= 18:
                body.append(f'<text class="count{" light" if level >= 6 else ""}" x="{x + cell / 2:.1f}" '
                            f'y="{y + cell / 2 + 4:.1f}" text-anchor="middle">{v:g}</text>')
    for j, lab in enumerate(labels):
        cx = pad + j * cell + cell / 2
        body.append(f'<text class="tick" x="{cx:.1f}" y="{pad - 6}" text-anchor="start" '
                    f'transform="rotate(-45 {cx:.1f} {pad - 6})">{_e(str(lab)[:14])}</text>')
    svg = (f'<svg width="{size}" height="{size}" viewBox="0 0 {size} {size}" class="matrix" role="img" '
           f'aria-label="{_e(title)}">{"".join(body)}</svg>')
    return Markup(f'<figure class="chart-box matrix-box"><figcaption>{_e(title)}</figcaption>{svg}'
                  '<div class="legend">rows: true class, columns: predicted</div></figure>')
