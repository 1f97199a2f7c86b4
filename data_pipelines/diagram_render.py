"""Drawing the diagram structures of `data_pipelines.diagrams` with PIL, and PDF pages that show them.

`render(sample, size)` returns a size x size RGB picture of a flowchart, a circuit or captioned shapes. The
picture is drawn `SUPERSAMPLE` times larger and shrunk with a box filter, which antialiases lines and letters:
at 64-96 px a tiny VLM sees grey edges instead of jagged ones, and letters stay recognisable. Everything is
laid out in unit coordinates (0..1 of the side) and scaled, so one structure gives the same picture at any size.

Legibility at 64-96 px is the design constraint: at most 5 rows in a flowchart, at most 2 gate columns, big
fonts (Pillow's built-in scalable font, `ImageFont.load_default(size=...)`, Pillow >= 10.1), lines of about
2 % of the side, white background, black ink, saturated colours for shapes.

    flowchart  a main column (x = MAIN_X) from a rounded `start` box down to `end`; steps are boxes, decisions
               diamonds with the word inside; "yes" continues down, "no" leaves the diamond's right corner to a
               side step (x = SIDE_X) whose arrow comes back left above the next row and enters the next node's
               top right of the main arrow (never joining it, so it cannot be read as leaving the decision),
               or loops back up and left into an earlier step. Arrowheads (about 4 px at 96 px) mark every
               edge's end; "yes"/"no" are written beside them.
    circuit    inputs A-D as letters on the left, gate columns by level, outputs Y/Z on the right. Gates are
               their standard symbols: AND a flat back and a semicircular front; OR a concave back and a
               pointed front; XOR an OR with a second back curve; NAND/NOR/NOT with a bubble at the output;
               NOT a triangle. The instance name (G1 ...) is written above the gate (inside, an OR's concave
               back curve would cross it), in a band no wire may cross and the next gate up leaves free. Wires are
               orthogonal: along the source's height, down or up a channel just left of the gate, into the pin.
               A dot marks where a net branches. `layout_circuit` places the gates (heights from the mean of
               their sources, spread apart) and orders the channels to cross as few wires as possible; a layout
               where two nets' wires overlap, a wire's corner touches another net (it would look joined) or a
               wire runs through a gate is refused, retried with jitter, and finally the circuit is refused.
    shapes     filled shapes (no outline) on white: the centre pixel of each shape is its colour.

PDF documents (`document_page`, `write_pdf`): letter-shaped pages (850 x 1100 px, 100 dpi) with a title, the
diagram and a paragraph on how to read it (`paragraph`: never the caption or anything a question asks, so the
page's text alone answers none of them), saved by PIL as one multi-page PDF with fixed dates so that the same
pages give the same bytes.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from data_pipelines.diagrams import COLOURS

SUPERSAMPLE = 4
INK, PAPER = (0, 0, 0), (255, 255, 255)
LINE = 0.022  # line width, share of the side
MAIN_X, SIDE_X = 0.29, 0.8
REJOIN_DX = 0.1  # a side step's arrow back enters the next node this far right of the main column
BOX_W, SIDE_W, DIAMOND_W = 0.4, 0.3, 0.5
BOX_H, DIAMOND_H = 0.58, 0.72  # shares of the row pitch: the rest is room for arrows between rows
IN_X, WIRE_X0, OUT_X, WIRE_X1 = 0.05, 0.1, 0.95, 0.9  # circuit: input letters, wire starts, outputs
COL_X0, COL_X1 = 0.1, 0.85  # circuit gate columns: a channel for the wires in, then the gate
TEXT_STROKE = 0.003  # letters are drawn this much bolder (share of the side): thin strokes vanish at 64 px
LABEL_GAP = LINE / 2 + 0.015  # a gate's name sits this far above its body's edge (share of the side): clear of
#                               the outline's ink by about 1.5 px at 96 px
CAP_HEIGHT = 0.78  # the name's ink above its baseline, share of the font size (Aileron's capitals and digits)
PAGE_W, PAGE_H, PAGE_DPI = 850, 1100, 100
FIXED_DATE = time.gmtime(946684800)  # 2000-01-01 UTC: PIL writes the dates as given, so the bytes repeat


@functools.lru_cache(maxsize=64)
def font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(1, px))


class Canvas:
    """Unit coordinates on a supersampled square image."""

    def __init__(self, size: int, supersample: int = SUPERSAMPLE):
        self.size, self.side = size, size * supersample
        self.image = Image.new("RGB", (self.side, self.side), PAPER)
        self.draw = ImageDraw.Draw(self.image)
        self.lw = max(1, round(LINE * self.side))

    def p(self, x: float, y: float) -> tuple[float, float]:
        return x * self.side, y * self.side

    def line(self, pts, width: float | None = None) -> None:
        self.draw.line([self.p(*q) for q in pts], fill=INK, width=self.lw if width is None else width,
                       joint="curve")

    def polygon(self, pts, fill=PAPER, outline=INK) -> None:
        self.draw.polygon([self.p(*q) for q in pts], fill=fill, outline=outline,
                          width=self.lw if outline is not None else 0)

    def circle(self, x: float, y: float, r: float, fill=PAPER, outline=INK, width: int | None = None) -> None:
        (cx, cy), rr = self.p(x, y), r * self.side
        self.draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=fill, outline=outline,
                          width=(self.lw if width is None else width) if outline is not None else 0)

    def text(self, x: float, y: float, s: str, height: float, anchor: str = "mm") -> None:
        self.draw.text(self.p(x, y), s, font=font(round(height * self.side)), fill=INK, anchor=anchor,
                       stroke_width=round(TEXT_STROKE * self.side), stroke_fill=INK)

    def arrow(self, pts, head: float = 0.04) -> None:
        """A polyline ending in a filled arrowhead at its last point (the line stops at the head's base, so the
        head narrows to a visible point instead of ending in a line as wide as it)."""
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        d = math.hypot(x1 - x0, y1 - y0) or 1.0
        ux, uy = (x1 - x0) / d, (y1 - y0) / d
        self.line(list(pts[:-1]) + [(x1 - 0.5 * head * ux, y1 - 0.5 * head * uy)])
        w = head * 0.6
        self.draw.polygon([self.p(x1, y1), self.p(x1 - head * ux - w * uy, y1 - head * uy + w * ux),
                           self.p(x1 - head * ux + w * uy, y1 - head * uy - w * ux)], fill=INK)

    def done(self) -> Image.Image:
        return self.image.resize((self.size, self.size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------- flowcharts


def _row_y(row: int, rows: int) -> float:
    return (row + 0.5) / rows


def render_flowchart(chart: dict, size: int) -> Image.Image:
    c = Canvas(size)
    rows = 1 + max(n["row"] for n in chart["nodes"])
    pitch = 1 / rows
    bh = BOX_H * pitch  # box height
    dh = DIAMOND_H * pitch  # diamond height
    fh = min(0.11, 0.8 * bh)  # label height: as big as the box allows
    nodes = {n["id"]: n for n in chart["nodes"]}

    def centre(n):
        return (MAIN_X if n["col"] == 0 else SIDE_X), _row_y(n["row"], rows)

    def half(n):  # half width, half height
        if n["kind"] == "decision":
            return DIAMOND_W / 2, dh / 2
        return (SIDE_W if n["col"] else BOX_W) / 2, bh / 2

    for e in chart["edges"]:
        a, b = nodes[e["src"]], nodes[e["dst"]]
        (ax, ay), (bx, by) = centre(a), centre(b)
        (aw, ah), (bw, bh2) = half(a), half(b)
        if e["route"] == "main":
            c.arrow([(ax, ay + ah), (bx, by - bh2)])
            if e["label"]:
                c.text(ax - 0.03, ay + ah + 0.5 * (by - bh2 - ay - ah), e["label"], 0.07, anchor="rm")
        elif e["route"] == "side":
            c.arrow([(ax + aw, ay), (bx - bw, by)])
            c.text(ax + aw + 0.01, ay - 0.015, e["label"], 0.07, anchor="lb")
        elif e["route"] == "rejoin":  # down from the side step, left above the next row, down into its top
            x = bx + REJOIN_DX  # beside the main arrow, so the two never meet before the node
            # clear of the decision's lower-right side above x (the side step shares the decision's row)
            turn = ay + dh / 2 * (1 - REJOIN_DX / (DIAMOND_W / 2)) + 0.04
            # where x meets the next node's top: a box's flat edge, a diamond's upper-right side
            top = by - bh2 * (1 - REJOIN_DX / bw if b["kind"] == "decision" else 1)
            c.arrow([(ax, ay + ah), (ax, turn), (x, turn), (x, top)])
        else:  # loop: right from the diamond, up, left into the earlier step's right side
            c.arrow([(ax + aw, ay), (SIDE_X, ay), (SIDE_X, by), (bx + bw, by)])
            c.text(ax + aw + 0.01, ay - 0.015, e["label"], 0.07, anchor="lb")
    for n in chart["nodes"]:
        (x, y), (w, h) = centre(n), half(n)
        if n["kind"] == "decision":
            c.polygon([(x - w, y), (x, y - h), (x + w, y), (x, y + h)])
        else:
            radius = h * c.side if n["kind"] in ("start", "end") else 0.15 * h * c.side
            c.draw.rounded_rectangle((*c.p(x - w, y - h), *c.p(x + w, y + h)), radius=radius, fill=PAPER,
                                     outline=INK, width=c.lw)
        c.text(x, y, n["label"], 0.85 * fh if n["kind"] == "decision" else fh)  # a diamond narrows at its corners
    return c.done()


# ---------------------------------------------------------------------------------------------- circuits


def _geometry(levels: int) -> tuple[float, float, float]:
    """(column pitch, gate width, gate height) for `levels` gate columns."""
    cw = (COL_X1 - COL_X0) / levels
    gw = min(0.3, 0.62 * cw)
    return cw, gw, 0.85 * gw


def _label(levels: int) -> tuple[float, float]:
    """(font size of a gate's name, the band above the body its name takes: gap + capitals + stroke)."""
    _, _, gh = _geometry(levels)
    size = min(0.09, 0.45 * gh)
    return size, LABEL_GAP + CAP_HEIGHT * size + TEXT_STROKE


def _column_x(level: int, levels: int) -> float:
    """A gate's centre: gates sit at the right of their column, the wires' channel at its left."""
    cw, gw, _ = _geometry(levels)
    return COL_X0 + level * cw - gw / 2


def _input_ys(n: int, rng: random.Random) -> list[float]:
    """The inputs' heights: evenly spaced over a span of the left edge that varies from picture to picture."""
    if n == 1:
        return [round(rng.uniform(0.3, 0.7), 4)]
    span = rng.uniform(0.5, 0.68)  # inside the band gates may take, so a gate can line up with its input
    top = rng.uniform(0.18, 0.86 - span)
    return [round(top + i * span / (n - 1), 4) for i in range(n)]


def _pins(gate: dict, levels: int) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    """The gate's input pins (x at the body's back, where wires end) and its output point."""
    _, gw, gh = _geometry(levels)
    x, y = _column_x(gate["level"], levels), gate["y"]
    back = x - gw / 2
    if gate["type"] in ("OR", "NOR", "XOR"):  # to the concave back curve (deeper by sin(3 pi / 4) there)
        back += (0.1 * gw if gate["type"] == "XOR" else 0) + 0.12 * gw * math.sin(0.75 * math.pi)
    if gate["type"] == "NOT":
        return [(back, y)], (x + gw / 2, y)
    return [(back, y - gh / 4), (back, y + gh / 4)], (x + gw / 2, y)


def _wires(circuit: dict, levels: int, order: dict | None = None) -> list[dict]:
    """Every wire: {"net", "src", "dst" (gate names or None), "segments": [((x0, y0), (x1, y1)), ...]}."""
    _, gw, _ = _geometry(levels)
    gates = {g["name"]: g for g in circuit["gates"]}
    driver = {g["output"]: g for g in circuit["gates"]}
    src_pt = {n: (WIRE_X0, y) for n, y in zip(circuit["inputs"], circuit["input_y"])}
    src_pt.update({g["output"]: _pins(g, levels)[1] for g in circuit["gates"]})
    by_level: dict[int, list[tuple[str, int]]] = {}
    for g in circuit["gates"]:
        for k in range(len(g["inputs"])):
            by_level.setdefault(g["level"], []).append((g["name"], k))
    wires = []
    for level, sinks in by_level.items():
        left = WIRE_X0 + 0.02 if level == 1 else _column_x(level - 1, levels) + gw / 2 + 0.02
        right = _column_x(level, levels) - gw / 2 - 0.035  # a visible stub into the pin
        ranked = order[level] if order else sinks
        for j, (gname, k) in enumerate(ranked):
            g = gates[gname]
            net = g["inputs"][k]
            cx = left + (j + 1) * (right - left) / (len(ranked) + 1)
            (sx, sy), (px, py) = src_pt[net], _pins(g, levels)[0][k]
            segs = [((sx, sy), (cx, sy)), ((cx, sy), (cx, py)), ((cx, py), (px, py))]
            src = driver[net]["name"] if net in driver else None
            wires.append({"net": net, "src": src, "dst": gname, "segments": segs})
    for port, gname in circuit["outputs"].items():
        sx, sy = _pins(gates[gname], levels)[1]
        wires.append({"net": port, "src": gname, "dst": None, "segments": [((sx, sy), (WIRE_X1, sy))]})
    return wires


def _on(pt, seg, tol) -> bool:
    (x0, y0), (x1, y1) = seg
    x, y = pt
    return (min(x0, x1) - tol <= x <= max(x0, x1) + tol) and (min(y0, y1) - tol <= y <= max(y0, y1) + tol)


def _clashes(circuit: dict, levels: int, wires: list[dict], tol: float = 0.022) -> int:
    """How many ways the drawing would mislead (see the module notes); 0 for a clean layout. Wires of other
    nets crossing at right angles are allowed and counted separately by `_crossings`."""
    _, gw, gh = _geometry(levels)
    band = _label(levels)[1]  # the name above the body is part of the gate: no wire may run through it
    boxes = {g["name"]: (_column_x(g["level"], levels) - gw / 2 - 0.01, g["y"] - gh / 2 - band - LINE / 2 - 0.01,
                         _column_x(g["level"], levels) + gw / 2 + 0.01, g["y"] + gh / 2 + 0.01)
             for g in circuit["gates"]}
    segs = [(w["net"], w, s) for w in wires for s in w["segments"] if s[0] != s[1]]
    bad = 0
    for _, w, ((x0, y0), (x1, y1)) in segs:
        for name, (bx0, by0, bx1, by1) in boxes.items():
            if name in (w["src"], w["dst"]):
                continue
            if max(x0, x1) > bx0 and min(x0, x1) < bx1 and max(y0, y1) > by0 and min(y0, y1) < by1:
                bad += 1
    for (n1, _, s1), (n2, _, s2) in itertools.combinations(segs, 2):
        if n1 == n2:
            continue
        h1, h2 = s1[0][1] == s1[1][1], s2[0][1] == s2[1][1]
        if h1 == h2:  # parallel: overlapping within tol is one line for two nets
            a = 1 if h1 else 0
            if abs(s1[0][a] - s2[0][a]) < tol:
                lo1, hi1 = sorted((s1[0][1 - a], s1[1][1 - a]))
                lo2, hi2 = sorted((s2[0][1 - a], s2[1][1 - a]))
                if min(hi1, hi2) > max(lo1, lo2) - tol:
                    bad += 1
        else:  # a corner or end of one lying on the other looks like a junction
            if any(_on(p, s2, tol / 2) for p in s1) or any(_on(p, s1, tol / 2) for p in s2):
                bad += 1
    return bad


def _crossings(wires: list[dict]) -> int:
    segs = [(w["net"], s) for w in wires for s in w["segments"] if s[0] != s[1]]
    n = 0
    for (n1, s1), (n2, s2) in itertools.combinations(segs, 2):
        if n1 != n2 and (s1[0][1] == s1[1][1]) != (s2[0][1] == s2[1][1]):
            h, v = (s1, s2) if s1[0][1] == s1[1][1] else (s2, s1)
            if min(h[0][0], h[1][0]) < v[0][0] < max(h[0][0], h[1][0]) and \
                    min(v[0][1], v[1][1]) < h[0][1] < max(v[0][1], v[1][1]):
                n += 1
    return n


def _channel_orders(circuit: dict, levels: int, level: int, y: dict) -> list[tuple]:
    """The orders (left to right) of the channels of the wires into `level`'s gates, fewest crossings first
    (ties in a fixed order). Wire i left of wire j crosses it where i's last run (at its pin's height, from its
    channel rightwards) meets j's channel, or j's first run (at its source's height, from the left) meets i's."""
    gates = [g for g in circuit["gates"] if g["level"] == level]
    sinks = [(g["name"], k) for g in gates for k in range(len(g["inputs"]))]
    runs = {(g["name"], k): (g["inputs"][k], y[g["inputs"][k]], _pins(g, levels)[0][k][1])
            for g in gates for k in range(len(g["inputs"]))}

    def crossings(order):
        n = 0
        for i, j in itertools.combinations(order, 2):
            (ni, si, pi), (nj, sj, pj) = runs[i], runs[j]
            if ni != nj:
                n += (min(sj, pj) < pi < max(sj, pj)) + (min(si, pi) < sj < max(si, pi))
        return n

    orders = list(itertools.permutations(sinks)) if len(sinks) <= 6 else [tuple(sinks)]
    return sorted(orders, key=crossings)


def layout_circuit(circuit: dict, rng: random.Random, tries: int = 12) -> dict | None:
    """Place the circuit's gates in place (adds "level" and "y" to each gate, "input_y" and "channels" to the
    circuit) and return it, or None when no clean layout was found (see the module notes)."""
    level = dict.fromkeys(circuit["inputs"], 0)
    for g in circuit["gates"]:
        g["level"] = level[g["output"]] = 1 + max(level[s] for s in g["inputs"])
    levels = max(g["level"] for g in circuit["gates"])
    _, _, gh = _geometry(levels)
    band = _label(levels)[1]
    circuit["input_y"] = _input_ys(len(circuit["inputs"]), rng)
    for attempt in range(tries):
        y = dict(zip(circuit["inputs"], circuit["input_y"]))
        for lv in range(1, levels + 1):
            col = [g for g in circuit["gates"] if g["level"] == lv]
            for g in col:
                g["y"] = sum(y[s] for s in g["inputs"]) / len(g["inputs"]) + rng.uniform(-1, 1) * (0.04 + 0.04 * attempt)
                offsets = [0.0] if len(g["inputs"]) == 1 else [-gh / 4, gh / 4]  # pins, from the gate's centre
                for src, off in zip(sorted(g["inputs"], key=lambda s: y[s]), offsets):
                    if abs(y[src] - (g["y"] + off)) < 0.04:  # a tiny jog reads as a glitch: line the pin up
                        g["y"] = y[src] - off
                        break
            col.sort(key=lambda g: g["y"])
            # centres: the name of the lower gate fits between two bodies, the top gate's name inside the picture
            gap, lo, hi = max(1.45 * gh, gh + band + LINE / 2 + 0.01), 0.006 + band + gh / 2, 0.94 - gh / 2
            for a, b in zip(col, col[1:]):  # spread apart, then shift the column back inside the picture
                b["y"] = max(b["y"], a["y"] + gap)
            shift = max(0.0, col[-1]["y"] - hi)
            for g in col:
                g["y"] = round(max(lo, g["y"] - shift), 4)
            if any(b["y"] - a["y"] < gap - 1e-9 for a, b in zip(col, col[1:])):
                break
            for g in col:
                y[g["output"]] = g["y"]
                g["inputs"].sort(key=lambda s: y[s])  # the higher source to the upper pin: gates commute
        else:
            ranked = {lv: _channel_orders(circuit, levels, lv, y) for lv in range(1, levels + 1)}
            for pick in itertools.islice(itertools.product(range(3), repeat=levels), 3 ** levels):
                if any(p >= len(ranked[lv]) for lv, p in zip(range(1, levels + 1), pick)):
                    continue
                order = {lv: ranked[lv][p] for lv, p in zip(range(1, levels + 1), pick)}
                if _clashes(circuit, levels, _wires(circuit, levels, order)) == 0:
                    circuit["channels"] = {str(lv): [[g, k] for g, k in o] for lv, o in order.items()}
                    return circuit
    return None


def _or_curve(x0: float, x1: float, y: float, gh: float, depth: float, n: int = 12):
    """The OR body: top curve from the back to the tip, bottom curve back, concave back curve up."""
    top, bot = y - gh / 2, y + gh / 2
    front = []
    for i in range(n + 1):  # quadratic Bezier: back corner -> tip, control at the top, 60 % along
        t = i / n
        cx = x0 + 0.55 * (x1 - x0)
        front.append(((1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t * t * x1,
                      (1 - t) ** 2 * top + 2 * (1 - t) * t * top + t * t * y))
    lower = [(x, 2 * y - yy) for x, yy in reversed(front)]
    back = [(x0 + depth * math.sin(math.pi * i / n), bot - gh * i / n) for i in range(1, n)]
    return front + lower[1:] + back


def draw_gate(c: Canvas, gate: dict, levels: int, label_h: float) -> None:
    _, gw, gh = _geometry(levels)
    x, y, t = _column_x(gate["level"], levels), gate["y"], gate["type"]
    x0, x1 = x - gw / 2, x + gw / 2
    rb = 0.14 * gw if t in ("NAND", "NOR", "NOT") else 0.0  # output bubble radius: big enough to be a ring
    body_end = x1 - 2 * rb
    if t in ("AND", "NAND"):
        r = gh / 2
        arc = [(body_end - r + r * math.cos(a), y + r * math.sin(a))
               for a in (math.pi * (-0.5 + i / 16) for i in range(17))]
        c.polygon([(x0, y - r)] + arc + [(x0, y + r)])
    elif t in ("OR", "NOR", "XOR"):
        start = x0 + (0.1 * gw if t == "XOR" else 0)
        c.polygon(_or_curve(start, body_end, y, gh, 0.12 * gw))
        if t == "XOR":  # the second back curve
            c.line([(x0 + 0.12 * gw * math.sin(math.pi * i / 12), y + gh / 2 - gh * i / 12) for i in range(13)])
    else:  # NOT: a triangle
        h = 0.8 * gh / 2
        c.polygon([(x0, y - h), (body_end, y), (x0, y + h)])
    if rb:
        c.circle(body_end + rb, y, rb, width=max(1, round(0.7 * c.lw)))
    # the name above the body, for every type: inside, an OR's back curve (and XOR's second) crosses it
    c.text(x, y - gh / 2 - LABEL_GAP, gate["name"], label_h, anchor="ms")


def render_circuit(circuit: dict, size: int) -> Image.Image:
    c = Canvas(size)
    levels = max(g["level"] for g in circuit["gates"])
    _, gw, gh = _geometry(levels)
    order = {int(lv): [(g, k) for g, k in o] for lv, o in circuit.get("channels", {}).items()} or None
    wires = _wires(circuit, levels, order)
    letter = 0.1
    for name, y in zip(circuit["inputs"], circuit["input_y"]):
        c.text(IN_X, y, name, letter)
    for w in wires:
        c.line([s[0] for s in w["segments"]] + [w["segments"][-1][1]])
    by_net: dict[str, list[float]] = {}
    for w in wires:  # a dot where a net branches: each of its channels but the farthest on the source's line
        if w["dst"] is not None:
            by_net.setdefault(w["net"], []).append(w["segments"][0][1][0])
    src_y = {w["net"]: w["segments"][0][0][1] for w in wires}
    for net, xs in by_net.items():
        for x in sorted(xs)[:-1]:
            c.circle(x, src_y[net], 0.018, fill=INK, outline=None)
    for port, gname in circuit["outputs"].items():
        g = next(g for g in circuit["gates"] if g["name"] == gname)
        c.text(OUT_X, g["y"], port, letter)
    for g in circuit["gates"]:
        draw_gate(c, g, levels, _label(levels)[0])
    return c.done()


# ---------------------------------------------------------------------------------------------- shapes


def shape_points(kind: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        s = 0.85 * r
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if kind == "triangle":
        return [(x + 1.1 * r * math.cos(a), y + 0.15 * r + 1.1 * r * math.sin(a))
                for a in (math.radians(d) for d in (-90, 30, 150))]
    if kind == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if kind == "star":
        return [(x + (r if i % 2 == 0 else 0.45 * r) * math.cos(math.radians(-90 + 36 * i)),
                 y + (r if i % 2 == 0 else 0.45 * r) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)]
    raise ValueError(f"unknown shape {kind!r}")


def render_shapes(s: dict, size: int) -> Image.Image:
    c = Canvas(size)
    for x in s["shapes"]:
        colour = COLOURS[x["colour"]]
        if x["shape"] == "circle":
            c.circle(x["x"], x["y"], x["r"], fill=colour, outline=None)
        else:
            c.polygon(shape_points(x["shape"], x["x"], x["y"], x["r"]), fill=colour, outline=None)
    return c.done()


def render(sample: dict, size: int) -> Image.Image:
    """The picture of one sample (see `data_pipelines.diagrams.make_sample`), size x size RGB."""
    drawer = {"flowchart": render_flowchart, "circuit": render_circuit, "shapes": render_shapes}.get(sample["kind"])
    if drawer is None:
        raise ValueError(f"sample {sample.get('id')!r}: unknown kind {sample.get('kind')!r}")
    return drawer(sample, size)


# ---------------------------------------------------------------------------------------------- documents


def paragraph(sample: dict) -> str:
    """The text printed under a diagram on its page: how to read the figure, never what its questions ask (the
    caption, gate types, formulas, step words, colours, counts or the netlist would answer them without the
    picture; the pages show held-out samples)."""
    if sample["kind"] == "circuit":
        ins, outs = sample["inputs"], list(sample["outputs"])
        return (f"A combinational logic circuit with inputs {', '.join(ins)} on the left and output"
                f"{'s' if len(outs) > 1 else ''} {' and '.join(outs)} on the right. Each gate is drawn with its "
                "standard symbol and its name written above it; a dot marks where a wire branches.")
    if sample["kind"] == "flowchart":
        return ("A flowchart, from start to end. Each box is a step; a diamond is a decision, whose yes branch "
                "goes down and no branch right.")
    return "A picture of coloured shapes on a white background."


def document_page(sample: dict, number: int, diagram_px: int = 480) -> Image.Image:
    """One letter-shaped page: "Figure N" and the kind, the diagram, and `paragraph(sample)` wrapped below."""
    page = Image.new("RGB", (PAGE_W, PAGE_H), PAPER)
    d = ImageDraw.Draw(page)
    d.text((70, 60), f"Figure {number}. A {sample['kind'] if sample['kind'] != 'shapes' else 'picture of shapes'}",
           font=font(34), fill=INK)
    page.paste(render(sample, diagram_px), ((PAGE_W - diagram_px) // 2, 140))
    d.rectangle(((PAGE_W - diagram_px) // 2 - 2, 138, (PAGE_W + diagram_px) // 2 + 1, 140 + diagram_px + 1),
                outline=(128, 128, 128), width=2)
    y = 160 + diagram_px + 30
    for line in textwrap.wrap(paragraph(sample), 52):
        d.text((70, y), line, font=font(28), fill=INK)
        y += 40
    d.text((PAGE_W // 2, PAGE_H - 60), str(number), font=font(22), fill=INK, anchor="mm")
    return page


def write_pdf(path: str | Path, pages: Sequence[Image.Image]) -> None:
    """A multi-page PDF of the pages; fixed dates, so the same pages give the same file."""
    pages[0].save(path, "PDF", save_all=True, append_images=list(pages[1:]), resolution=PAGE_DPI,
                  title="Diagram documents", author="workbench data_pipelines.diagrams",
                  creationDate=FIXED_DATE, modDate=FIXED_DATE)
