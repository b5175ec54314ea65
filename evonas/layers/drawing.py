"""Pictures of layer genomes: the graph drawn left to right, from the inputs to y.

Where it sits: the tracker (tracking.py) stores one picture per candidate as graph.png
beside its formula, and reports and the CLI draw the layers they show. The picture reads
the genome's networkx view (Genome.graph): each node is placed in the column of its depth
(inputs in column 0, an op one column right of its deepest input), labelled with its op;
graph inputs, aggregates, element-wise ops and the output are styled apart, and the
edges into a non-commutative binary op (div) carry their argument position, the only
place where the order of the inputs changes the value.

matplotlib is used through Figure and FigureCanvasAgg only, never pyplot: nothing global
(backend, current figure, figure registry) changes, so drawing is safe inside a search
driver, a worker or a notebook, and a figure is freed as soon as it is dropped.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from evonas.layers.genome import Genome
from evonas.layers.ops import AGGREGATE, INPUTS, OPS

# Box colours by role: the data input, fixed constants, trainable vectors, element-wise
# ops, aggregates (the statistics that make a layer a normalization).
_STYLE = {
    "x": ("#9ecae1", "input x"),
    "constant": ("#d9d9d9", "constant (zero, one)"),
    "trainable": ("#c7e9c0", "trainable (v0, v1, scalars)"),
    "elementwise": ("#ffffff", "element-wise op"),
    "aggregate": ("#fdae6b", "aggregate (statistic)"),
}
_OUTPUT_EDGE = "#cb181d"
_EDGE = "#525252"

# Figure size per column and per row of the layout, and the bounds that keep a 64-node
# genome's picture within 2400 x 1400 pixels (a 64-node chain: 45 KB); fonts shrink with
# the scale so labels stay in their boxes.
_INCH_PER_COLUMN, _INCH_PER_ROW = 1.35, 0.75
_MAX_WIDTH, _MAX_HEIGHT = 24.0, 14.0
_DPI = 100
_BOX_PAD = 0.35  # box padding around a label, in font sizes


def draw_genome(genome: Genome, path: str | Path, *, title: str | None = None) -> Path:
    """Save a PNG picture of the genome's graph at `path` and return the path."""
    path = Path(path)
    fig = genome_figure(genome, title=title)
    try:
        # tight: the legend below a small graph is wider than the graph's own figure
        fig.savefig(path, format="png", dpi=_DPI, bbox_inches="tight")
    finally:
        fig.clear()  # a pyplot-free figure has nothing to close; clearing frees its artists
    return path


def genome_figure(genome: Genome, *, title: str | None = None) -> Figure:
    """The picture as a matplotlib Figure (with an Agg canvas), e.g. for log_figure."""
    g = genome.graph
    layout = _Layout(g)
    n_cols, n_rows = len(layout.columns), max(len(c) for c in layout.columns)
    width = min(max(n_cols * _INCH_PER_COLUMN, 4.0), _MAX_WIDTH)
    height = min(max(n_rows * _INCH_PER_ROW + 1.2, 2.8), _MAX_HEIGHT)
    scale = min(1.0, width / (n_cols * _INCH_PER_COLUMN), height / (n_rows * _INCH_PER_ROW + 1.2))
    font = max(4.0, 9.0 * scale)

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    heading = title if title is not None else genome.name
    ax = fig.add_axes((0.01, 0.08, 0.98, 0.84 if heading else 0.9))
    ax.set_axis_off()
    ax.set_xlim(-0.6, n_cols - 0.4)
    ax.set_ylim(-0.6 - n_rows / 2, n_rows / 2 + 0.6)

    labels = {node: _draw_node(ax, g, node, layout.pos[node], font) for node in g.nodes}
    boxes = _box_sizes(fig, labels)
    for src, bus in layout.buses.items():
        xs, ys = zip(*(layout.pos[p] for p in [src, *bus]))
        ax.plot(xs, ys, color=_EDGE, lw=0.8, zorder=1)  # starts under src's box
    for src, dst, key, data in g.edges(keys=True, data=True):
        _draw_edge(ax, g, layout, (src, dst, key, data["arg"]), boxes, font)

    if heading:
        fig.suptitle(heading, fontsize=max(font + 2, 8))
    _legend(fig, g, font)
    return fig


# --- layout -----------------------------------------------------------------------------


class _Layout:
    """Where each node goes: columns by depth, rows ordered to keep edges short.

    An op's depth is the longest path from x to it. Constants and trainable vectors sit
    one column before their first reader instead of beside x: v0 added at the end of a
    layer would otherwise send an edge across the whole picture.

    A value read more than one column to its right (x, read by most nodes, above all)
    runs along a bus: a line through a waypoint, ("bus", value, column), in every column
    up to the one before its last reader, each waypoint holding its own row. Each reader
    branches off the waypoint in the column before it, so no edge crosses a box.
    """

    def __init__(self, g: nx.MultiDiGraph):
        self.depth = _depths(g)
        self.buses: dict[str, list[tuple]] = {}
        for src in g.nodes:
            last = max((self.depth[s] for s in g.successors(src)), default=0)
            waypoints = [("bus", src, c) for c in range(self.depth[src] + 1, last)]
            if waypoints:
                self.buses[src] = waypoints
        self.columns = self._ordered_columns(g)
        # Columns are centred vertically; the first point of a column is at the top.
        self.pos = {p: (float(c), (len(column) - 1) / 2 - r)
                    for c, column in enumerate(self.columns) for r, p in enumerate(column)}

    def anchor(self, src: str, dst: str):
        """The point an edge src -> dst starts from: src, or src's waypoint before dst."""
        column = self.depth[dst] - 1
        return ("bus", src, column) if column > self.depth[src] else src

    def _ordered_columns(self, g: nx.MultiDiGraph) -> list[list]:
        columns: list[list] = [[] for _ in range(max(self.depth.values()) + 1)]
        for node in sorted(g.nodes, key=_input_order):
            columns[self.depth[node]].append(node)
        for src, waypoints in self.buses.items():
            for point in waypoints:
                columns[point[2]].append(point)
        rank: dict = {}
        for column in columns:
            # A point follows the mean row of the points it comes from; inputs, which come
            # from nowhere, keep their fixed order at the top.
            column.sort(key=lambda p: (self._mean_rank(g, p, rank), _input_order(p)))
            rank.update({p: i for i, p in enumerate(column)})
        return columns

    def _mean_rank(self, g: nx.MultiDiGraph, point, rank: dict) -> float:
        if isinstance(point, tuple):
            _, src, column = point
            sources = [src if column - 1 == self.depth[src] else ("bus", src, column - 1)]
        else:
            sources = [self.anchor(p, point) for p in g.predecessors(point)]
        ranks = [rank[s] for s in sources if s in rank]
        return sum(ranks) / len(ranks) if ranks else -1.0


def _depths(g: nx.MultiDiGraph) -> dict[str, int]:
    depth: dict[str, int] = {}
    for node in nx.topological_sort(g):
        preds = [p for p in g.predecessors(node) if p == "x" or not g.nodes[p]["input"]]
        depth[node] = 1 + max(depth[p] for p in preds) if preds else 0
    for node in g.nodes:
        if g.nodes[node]["input"] and node != "x":
            depth[node] = min(depth[s] for s in g.successors(node)) - 1
    return depth


def _input_order(point) -> int:
    order = list(INPUTS)
    return order.index(point) if isinstance(point, str) and point in INPUTS else len(order)


# --- nodes and edges --------------------------------------------------------------------


def _role(g: nx.MultiDiGraph, node: str) -> str:
    if g.nodes[node]["input"]:
        spec = INPUTS.get(node)  # None: a learnt scalar of the genome
        return "x" if node == "x" else "trainable" if spec is None or spec.trainable else "constant"
    return "aggregate" if OPS[g.nodes[node]["op"]].kind == AGGREGATE else "elementwise"


def _draw_node(ax, g: nx.MultiDiGraph, node: str, xy: tuple[float, float], font: float):
    is_output = node == g.graph["output"]
    label = node if g.nodes[node]["input"] else g.nodes[node]["op"]
    box = dict(boxstyle=f"round,pad={_BOX_PAD}", facecolor=_STYLE[_role(g, node)][0],
               edgecolor=_OUTPUT_EDGE if is_output else _EDGE,
               linewidth=2.4 if is_output else 0.8)
    return ax.text(*xy, label, ha="center", va="center", fontsize=font, zorder=2,
                   fontweight="bold" if is_output else "normal", bbox=box)


def _box_sizes(fig: Figure, labels: dict) -> dict[str, tuple[float, float]]:
    """Half width and half height of each node's box in display pixels (text plus pad)."""
    renderer = fig.canvas.get_renderer()
    sizes = {}
    for node, text in labels.items():
        extent = text.get_window_extent(renderer)
        pad = _BOX_PAD * text.get_fontsize() * fig.dpi / 72
        sizes[node] = (extent.width / 2 + pad, extent.height / 2 + pad)
    return sizes


def _shrink(ax, box: tuple[float, float], here: tuple[float, float],
            there: tuple[float, float]) -> float:
    """Points from a box's centre to its edge towards `there`, where an arrow must stop.

    Computed rather than left to matplotlib's patchA/patchB clipping, which bisects the
    path against each box and took half the time of a picture."""
    (x1, y1), (x2, y2) = ax.transData.transform([here, there])
    dx, dy = abs(x2 - x1), abs(y2 - y1)
    half_w, half_h = box
    pixels = min(half_w / dx if dx else float("inf"), half_h / dy if dy else float("inf"))
    return pixels * (dx * dx + dy * dy) ** 0.5 * 72 / ax.figure.dpi + 1.0


def _draw_edge(ax, g: nx.MultiDiGraph, layout: _Layout, edge: tuple[str, str, int, int],
               boxes: dict, font: float) -> None:
    src, dst, key, arg = edge
    start = layout.anchor(src, dst)
    a, b = layout.pos[start], layout.pos[dst]
    # Parallel edges (add(a, a)) bend apart.
    rad = (0.25 if key == 0 else -0.25) if g.number_of_edges(src, dst) > 1 else 0.0
    shrink_a = _shrink(ax, boxes[src], a, b) if start == src else 0.0
    ax.annotate("", xy=b, xytext=a, zorder=1,
                arrowprops=dict(arrowstyle="-|>", color=_EDGE, lw=0.8, shrinkA=shrink_a,
                                shrinkB=_shrink(ax, boxes[dst], b, a),
                                connectionstyle=f"arc3,rad={rad}"))
    spec = OPS[g.nodes[dst]["op"]]
    if spec.arity == 2 and not spec.commutative:
        x, y = _on_arc(ax, a, b, rad, 0.72)
        ax.text(x, y, str(arg), fontsize=max(font - 1, 4), ha="center", va="center",
                color="#08519c", zorder=4,
                bbox=dict(boxstyle="circle,pad=0.1", facecolor="white", edgecolor="none"))


def _on_arc(ax, a: tuple[float, float], b: tuple[float, float], rad: float,
            t: float) -> tuple[float, float]:
    """Data point at fraction t of matplotlib's arc3 curve from a to b: a quadratic Bezier
    whose control point is the midpoint moved by rad times the perpendicular, computed in
    display coordinates as matplotlib does (the axes' x and y scales differ)."""
    (x1, y1), (x2, y2) = ax.transData.transform([a, b])
    cx, cy = (x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1)
    u = 1 - t
    point = (u * u * x1 + 2 * u * t * cx + t * t * x2, u * u * y1 + 2 * u * t * cy + t * t * y2)
    x, y = ax.transData.inverted().transform(point)
    return float(x), float(y)


def _legend(fig: Figure, g: nx.MultiDiGraph, font: float) -> None:
    roles = {_role(g, node) for node in g.nodes}
    handles = [Patch(facecolor=color, edgecolor=_EDGE, label=text)
               for role, (color, text) in _STYLE.items() if role in roles]
    handles.append(Patch(facecolor="white", edgecolor=_OUTPUT_EDGE, linewidth=2.4,
                         label="output y"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=max(font - 1, 5))
