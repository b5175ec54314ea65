"""Genome pictures: valid PNGs of bounded size, styled by role, argument positions only
where they matter."""

import struct

from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from evonas.layers import zoo
from evonas.layers.drawing import draw_genome, genome_figure
from evonas.layers.genome import MAX_NODES, chain

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    with Image.open(path) as img:
        img.verify()  # decodes the chunks' checksums; raises on a torn file
    return struct.unpack(">II", data[16:24])


def _six_nodes():
    # Every input kind, an aggregate, div with both argument orders, add(a, a).
    return chain(("div", ["x", "x"]), ("add", ["n1", "n1"]), ("div", ["n2", "v1"]),
                 ("mean_HW", ["n3"]), ("div", ["one", "n4"]), ("mul", ["n5", "x"]),
                 name="six")


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_six_node_genome_gives_a_valid_png(tmp_path):
    genome = _six_nodes()
    assert len(genome) == 6
    path = draw_genome(genome, tmp_path / "six.png")
    assert path == tmp_path / "six.png" and path.stat().st_size > 0
    width, height = _png_size(path)
    assert 300 <= width <= 2400 and 200 <= height <= 1400


def test_64_node_chain_stays_bounded(tmp_path):
    # alternately a statistic and x times it, so the output keeps x's shape
    steps = [("tanh", ["x"])] + [("mul", ["x", f"n{k}"]) if k % 2 else ("mean_HW", [f"n{k}"])
                                 for k in range(1, MAX_NODES)]
    genome = chain(*steps)
    assert len(genome) == MAX_NODES
    width, height = _png_size(draw_genome(genome, tmp_path / "c64.png", title="chain"))
    assert width <= 2400 and height <= 1400


def test_labels_name_ops_and_only_noncommutative_argument_positions():
    fig = genome_figure(_six_nodes())
    assert isinstance(fig.canvas, FigureCanvasAgg)  # no pyplot, no global backend
    texts = _texts(fig)
    for label in ("x", "one", "v1", "div", "add", "mean_HW", "mul"):
        assert label in texts
    # Three div nodes, two arguments each; add and mul are commutative: unlabelled.
    assert sorted(t for t in texts if t.isdigit()) == ["0"] * 3 + ["1"] * 3

    b0 = _texts(genome_figure(zoo.get("evonorm_b0")))
    assert sorted(t for t in b0 if t.isdigit()) == ["0", "1"]  # its final div only


def test_output_box_is_highlighted():
    fig = genome_figure(zoo.get("bn_relu"))
    boxes = {t.get_text(): t.get_bbox_patch() for t in fig.axes[0].texts
             if t.get_bbox_patch() is not None and not t.get_text().isdigit()}
    widths = {label: box.get_linewidth() for label, box in boxes.items()}
    assert widths["max"] > widths["mul"]  # max is bn_relu's output
