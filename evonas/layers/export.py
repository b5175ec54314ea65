"""Genome -> one standalone .py file defining the layer as a torch module.

The last step of the flow: a found genome leaves evonas as source code that needs only
torch. The file is generated from the lowered steps (lowering.py), the same ones the
interpreter runs, never through sympy: each step becomes one line of `forward`, written
by its op's `source` (ops.py), and the kernels.py functions those lines call are copied
in verbatim, so exported and interpreted layers run the same code. The class follows
timm's norm-act constructor and has the interpreter's state_dict keys, so the two load
each other's weights, and it passes torch.jit.script and torch.compile.

The docstrings carry the formula (symbolic.py) and the genome JSON as provenance; the
JSON is data inside a raw docstring, never code, and json escapes every quote in it.
"""

from __future__ import annotations

import inspect
import json
import keyword
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from evonas import __version__
from evonas.layers import kernels as K
from evonas.errors import EvonasError
from evonas.layers.genome import Genome
from evonas.layers.lowering import Step, fold_affine, lower
from evonas.layers.ops import INPUTS, LAYOUTS

# Names the generated file defines or imports besides the copied kernels.
_FILE_NAMES = {"torch", "nn", "List", "resolve_groups"}


def export_source(genome: Genome, class_name: str = "EvolvedNormAct", *,
                  formula: bool = True) -> str:
    """Source of a standalone module defining `class_name`, the genome's layer.

    With formula=True the docstrings show the layer's formula as text and LaTeX (the
    formula imports sympy; formula=False skips it).
    """
    steps = lower(genome)
    helpers = _helpers(_emitted_steps(genome, steps))
    _check_class_name(class_name, {h.__name__ for h in helpers})
    shown = _formulas(genome) if formula else None
    sources = [inspect.getsource(h).rstrip() for h in helpers]
    parts = [
        _module_docstring(genome, class_name, shown) + "\n\n" + _imports(sources),
        "# Kernels copied from evonas.layers.kernels: the interpreter runs this same code.\n"
        + "\n\n\n".join(sources),
        _class_source(genome, steps, class_name, shown),
    ]
    source = "\n\n\n".join(parts) + "\n"
    compile(source, f"<evonas export of {class_name}>", "exec")  # a generator bug fails here
    return source


def export_file(genome: Genome, path: str | Path, class_name: str = "EvolvedNormAct", *,
                formula: bool = True) -> Path:
    """Write export_source(...) to path atomically: the file is complete or absent."""
    path = Path(path)
    source = export_source(genome, class_name, formula=formula)
    if not path.parent.is_dir():
        raise EvonasError(f"{path}: folder {path.parent} does not exist; create it or "
                          "choose another output path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the layer from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- parts of the file ------------------------------------------------------------------


def default_class_name(genome: Genome) -> str:
    """The class name an export gets when none is asked for: the genome's name in
    CamelCase, or EvolvedNormAct and the start of its structural hash."""
    if genome.name:
        name = "".join(part[:1].upper() + part[1:] for part in genome.name.replace("-", "_").split("_"))
        if name.isidentifier():
            return name
    return f"EvolvedNormAct{genome.structural_hash[:8]}"


def _emitted_steps(genome: Genome, steps: list[Step]) -> list[Step]:
    """Every step the forward writes: the folded ones, and the plain ones where they run
    too (a layout whose affine may be absent)."""
    folded = fold_affine(steps)
    if folded is None:
        return steps
    return folded + (steps if _FRAMES[genome.layout].optional_affine else [])


def _helpers(steps: list[Step]) -> list:
    """Kernel functions the steps call, each once, in kernels.py's order (callees first)."""
    order = {name: k for k, name in enumerate(vars(K))}
    used = {h for s in steps for h in s.op.helpers} | {K.resolve_groups}
    return sorted(used, key=lambda h: order[h.__name__])


def _check_class_name(name: str, helper_names: set[str]) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise EvonasError(f"class name {name!r} is not a Python identifier; use a name "
                          "like EvolvedNormAct")
    if name in _FILE_NAMES | helper_names:
        raise EvonasError(f"class name {name!r} would hide a name the exported file uses; "
                          "choose another, e.g. EvolvedNormAct")


def _formulas(genome: Genome) -> tuple[str, str]:
    """(text, LaTeX) of y, each a `y = ...` line or a block of lines ending with one."""
    from evonas.layers import symbolic  # sympy loads only when a formula is wanted

    return symbolic.equation(genome), symbolic.equation(genome, tex=True)


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines())


def _provenance(genome: Genome) -> str:
    # json.dumps escapes quotes and backslashes: a name cannot end the raw docstring.
    name = f" {json.dumps(genome.name)}," if genome.name else ""
    return f"evonas {__version__}, genome{name} structural hash {genome.structural_hash}"


def _genome_json(genome: Genome) -> str:
    """The genome file's JSON (Genome.from_json reads it back), one node a line."""
    d = genome.to_dict()
    nodes = ",\n".join("  " + json.dumps(n) for n in d.pop("nodes"))
    output = json.dumps(d.pop("output"))
    head = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in d.items())
    return f'{{{head},\n "nodes": [\n{nodes}\n ],\n "output": {output}}}'


def _doc_body(genome: Genome, shown: tuple[str, str] | None) -> str:
    """Provenance, formula and genome: the part both docstrings carry."""
    lines = [f"Generated by {_provenance(genome)}.", ""]
    if shown is not None:
        text, tex = shown
        lines += [_indent(text), "    out = weight * y + bias  (per channel)", "", "LaTeX:", "",
                  _indent(tex), ""]
    lines += ["Genome (evonas.genome/1 JSON, kept as provenance):", "",
              _indent(_genome_json(genome))]
    return "\n".join(lines)


def _module_docstring(genome: Genome, class_name: str, shown: tuple[str, str] | None) -> str:
    return (f'r"""{class_name}: a {_FRAMES[genome.layout].what} evolved by evonas.\n\n'
            f"Standalone: it needs only torch. {_FRAMES[genome.layout].usage(class_name)}\n\n"
            f'{_doc_body(genome, shown)}\n"""')


def _imports(sources: list[str]) -> str:
    lines = ["from typing import List\n"] if any("List[" in s for s in sources) else []
    return "\n".join(lines + ["import torch", "from torch import nn"])


def _vectors(genome: Genome) -> list[str]:
    return sorted(i for i in genome.inputs_used if i in INPUTS and INPUTS[i].trainable)


def _class_docstring(genome: Genome, steps: list[Step], shown: tuple[str, str] | None) -> str:
    buffers = ", ".join(name for s in steps for name, _ in s.buffers)
    frame = _FRAMES[genome.layout]
    params = ", ".join(["weight", "bias"] + _vectors(genome))
    text = f"{frame.class_doc}\nParameters (per channel): {params}.\n"
    if genome.scalars:
        text += f"Learnt scalars: {', '.join(genome.scalars)}.\n"
    if buffers:
        text += ("Running estimates (float32; updated in training mode as BatchNorm2d's, "
                 f"read in eval mode):\n{buffers}.\n")
    text += f"\n{_doc_body(genome, shown)}"
    return f'    r"""{_indent(text)[4:]}\n    """'


def _class_source(genome: Genome, steps: list[Step], class_name: str,
                  shown: tuple[str, str] | None) -> str:
    frame = _FRAMES[genome.layout]
    return "\n\n".join([
        f"class {class_name}(nn.Module):\n{_class_docstring(genome, steps, shown)}",
        _init_source(genome, steps),
        _reset_source(genome, steps),
        _forward_source(genome, steps),
        frame.repr,
    ]) + "\n"


def _init_source(genome: Genome, steps: list[Step]) -> str:
    lines = list(_FRAMES[genome.layout].init)
    for name in _vectors(genome):
        lines.append(f"        self.{name} = nn.Parameter(torch.empty(num_features, **kw))")
    for name in genome.scalars:
        lines.append(f"        self.{name} = nn.Parameter(torch.empty((), **kw))")
    buffers = [name for s in steps for name, _ in s.buffers]
    if buffers:
        lines.append("        # statistics stay float32 whatever the parameters' dtype")
        lines.append('        stat_kw = {"device": device, "dtype": torch.float32}')
    for b in buffers:
        lines.append(f'        self.register_buffer("{b}", torch.empty(num_features, **stat_kw))')
    lines.append("        self.reset_parameters()")
    return "\n".join(lines)


def _reset_source(genome: Genome, steps: list[Step]) -> str:
    lines = ["    def reset_parameters(self) -> None:", *_FRAMES[genome.layout].reset]
    lines += [f"        nn.init.constant_(self.{v}, {INPUTS[v].init!r})" for v in _vectors(genome)]
    lines += [f"        nn.init.constant_(self.{k}, {init!r})"
              for k, init in genome.scalars.items()]
    lines += [f"        nn.init.constant_(self.{name}, {init!r})"
              for s in steps for name, init in s.buffers]
    return "\n".join(lines)


def _input_line(name: str, layout: str) -> str:
    inp = INPUTS.get(name)
    if inp is None:  # a learnt scalar
        return f"        {name} = self.{name}.to(x.dtype)"
    if inp.constant is not None:
        return f"        {name} = x.new_full((), {inp.constant!r})"
    return f"        {name} = self.{name}.view({_view(layout)}).to(x.dtype)"


def _view(layout: str) -> str:
    return ", ".join(str(d) for d in LAYOUTS[layout].vector_shape)


def _forward_source(genome: Genome, steps: list[Step]) -> str:
    inputs = [_input_line(name, genome.layout) for name in sorted(genome.inputs_used - {"x"})]
    folded = fold_affine(steps)
    body = _frame_body(inputs, steps)
    body_folded = _frame_body(inputs, folded) if folded else None
    lines = _FRAMES[genome.layout].forward(body, body_folded, steps[-1].node)
    return "\n".join(["    def forward(self, x: torch.Tensor) -> torch.Tensor:", *lines])


def _frame_body(inputs: list[str], steps: list[Step]) -> list[str]:
    lines = list(inputs)
    for s in steps:
        code = s.op.source(s.inputs, running=", ".join(f"self.{name}" for name, _ in s.buffers))
        lines.append(f"        {s.node} = {code}")
    return lines


def _conv_forward(body: list[str], folded: list[str] | None, y: str) -> list[str]:
    lines = ["        weight = self.weight.view(1, -1, 1, 1).to(x.dtype)",
             "        bias = self.bias.view(1, -1, 1, 1).to(x.dtype)",
             "        if not self.apply_act:",
             "            return x * weight + bias"]
    if folded:  # the last fused normalisation applies weight and bias
        return lines + folded + [f"        return {y}"]
    return lines + body + [f"        return {y} * weight + bias"]


def _sequence_forward(body: list[str], folded: list[str] | None, y: str) -> list[str]:
    # locals, so TorchScript refines the Optional parameters
    lines = ["        weight = self.weight", "        bias = self.bias"]
    if folded:  # with both parameters the last fused normalisation applies them
        lines += ["        if weight is not None and bias is not None:",
                  "            weight = weight.to(x.dtype)",
                  "            bias = bias.to(x.dtype)",
                  *["    " + line for line in folded],
                  f"            return {y}"]
    return lines + body + [
        "        if weight is not None:", f"            {y} = {y} * weight.to(x.dtype)",
        "        if bias is not None:", f"            {y} = {y} + bias.to(x.dtype)",
        f"        return {y}"]


@dataclass(frozen=True)
class _Frame:
    """The exported class around the genome's steps, one per layout: the constructor
    users of that layout expect, and the final affine."""

    what: str
    usage: Callable[[str], str]
    class_doc: str
    optional_affine: bool  # whether weight and bias may be absent (then forward has both paths)
    init: tuple[str, ...]  # __init__ up to the genome's own parameters (kw defined)
    reset: tuple[str, ...]  # reset_parameters' lines for the affine
    # (lines of the body, of the body with the affine folded or None, y's name) -> lines
    forward: Callable[[list[str], list[str] | None, str], list[str]]
    repr: str


_FLOATS = ("        # floats whatever was passed, so TorchScript types the kernels' arguments",
           "        self.eps = float(eps)",
           "        self.momentum = float(momentum)",
           "        self.groups = resolve_groups(num_features, groups, group_size or 0)",
           '        kw = {"device": device, "dtype": dtype}')

_FRAMES = {
    # timm's norm-act constructor: norm_layer=functools.partial(Cls, groups=8)
    "nchw": _Frame(
        what="normalization-activation layer",
        usage=lambda name: ("The constructor is timm's norm-act one, so\n"
                            f"`norm_layer=functools.partial({name}, groups=8)` fits a timm model."),
        class_doc=("Normalization-activation layer evolved by evonas.\n\n"
                   "With apply_act=False the layer is the affine only: out = weight * x + bias."),
        optional_affine=False,
        init=("    def __init__(self, num_features, apply_act=True, eps=1e-5, momentum=0.1, groups=32,",
              "                 group_size=None, device=None, dtype=None, **_):",
              "        super().__init__()",
              "        self.num_features = num_features",
              "        self.apply_act = apply_act",
              *_FLOATS,
              "        self.weight = nn.Parameter(torch.empty(num_features, **kw))",
              "        self.bias = nn.Parameter(torch.empty(num_features, **kw))"),
        reset=("        nn.init.ones_(self.weight)", "        nn.init.zeros_(self.bias)"),
        forward=_conv_forward,
        repr=("    def extra_repr(self) -> str:\n"
              '        return (f"{self.num_features}, apply_act={self.apply_act}, eps={self.eps}, "\n'
              '                f"groups={self.groups}")'),
    ),
    # torch.nn.LayerNorm's constructor, then the search's own keywords
    "ntc": _Frame(
        what="normalization layer for (..., C) activations",
        usage=lambda name: ("The constructor is torch.nn.LayerNorm's, so\n"
                            f"`{name}(d_model)` replaces `nn.LayerNorm(d_model)`: it normalises the\n"
                            "last dimension of any (..., C) input."),
        class_doc=("Drop-in for torch.nn.LayerNorm over the last dimension, evolved by evonas.\n\n"
                   "normalized_shape is C or (C,); elementwise_affine=False drops weight and\n"
                   "bias, bias=False the bias, as in nn.LayerNorm; momentum, groups and\n"
                   "group_size are the running estimates' momentum and the feature groups."),
        optional_affine=True,
        init=("    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,",
              "                 device=None, dtype=None, momentum=0.1, groups=32, group_size=None):",
              "        super().__init__()",
              "        if isinstance(normalized_shape, int):",
              "            normalized_shape = (normalized_shape,)",
              "        self.normalized_shape = tuple(normalized_shape)",
              "        if len(self.normalized_shape) != 1:",
              '            raise ValueError(f"normalized_shape {normalized_shape}: this layer normalises "',
              '                             "the last dimension only; give one int, e.g. 512")',
              "        num_features = self.normalized_shape[0]",
              "        self.num_features = num_features",
              "        self.elementwise_affine = elementwise_affine",
              *_FLOATS,
              "        if elementwise_affine:",
              "            self.weight = nn.Parameter(torch.empty(num_features, **kw))",
              "        else:",
              '            self.register_parameter("weight", None)',
              "        if elementwise_affine and bias:",
              "            self.bias = nn.Parameter(torch.empty(num_features, **kw))",
              "        else:",
              '            self.register_parameter("bias", None)'),
        reset=("        if self.weight is not None:", "            nn.init.ones_(self.weight)",
               "        if self.bias is not None:", "            nn.init.zeros_(self.bias)"),
        forward=_sequence_forward,
        repr=("    def extra_repr(self) -> str:\n"
              '        return (f"{self.normalized_shape}, eps={self.eps}, "\n'
              '                f"elementwise_affine={self.elementwise_affine}, groups={self.groups}")'),
    ),
}


__all__ = ["export_source", "export_file"]
