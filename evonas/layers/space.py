"""Search spaces: which ops and inputs a search may use, and how large a graph may grow.

Spaces are data, JSON files in search_spaces/ (shipped as evonas.search_spaces), loaded by
name (`norm_act`) or by path (`./my_space.json`):

    {"format": "evonas.space/1", "name": "norm_act", "description": "...",
     "ops": ["add", ...], "inputs": ["x", "zero", "one", "v0", "v1"],
     "max_nodes": 10, "groups": 8,
     "layout": "nchw", "causal": false, "scalars": {}}

The last three keys are optional. layout is the activations' shape (ops.LAYOUTS: "nchw"
when absent, "ntc" for (N, T, C) sequences and any (..., C) input); a space lists only
aggregates of its layout. causal (ntc only) marks a space for decoders, in which position
t must not see later tokens: it may list no statistic over tokens (ops.AXES' `tokens`).
scalars are learnt scalar inputs with their initial values ({"alpha": 0.5}); genomes of
the space may read them besides `inputs` and carry their values.

max_nodes bounds the intermediate (op) nodes of a genome after pruning. groups is the
group count of the group aggregates during the search; the proxies are narrow (16-64
channels), so 8 keeps at least two channels in a group where 32 would make most groups a
single channel, i.e. instance statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from evonas.errors import GenomeError, SpaceError
from evonas.layers.genome import MAX_NODES, Genome, check_scalars
from evonas.layers.ops import AGGREGATE, AXES, DEFAULT_LAYOUT, INPUTS, LAYOUTS, OPS

FORMAT = "evonas.space/1"
_KEYS = {"format", "name", "description", "ops", "inputs", "max_nodes", "groups", "layout",
         "causal", "scalars"}


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    ops: tuple[str, ...]
    inputs: tuple[str, ...]
    max_nodes: int = 10
    groups: int = 8
    layout: str = DEFAULT_LAYOUT
    causal: bool = False
    scalars: tuple[tuple[str, float], ...] = ()  # (name, initial value), sorted by name

    @property
    def aggregate_ops(self) -> tuple[str, ...]:
        return tuple(o for o in self.ops if OPS[o].kind == AGGREGATE)

    @property
    def sources(self) -> tuple[str, ...]:
        """Everything a node may read besides other nodes: the inputs, then the scalars."""
        return self.inputs + tuple(name for name, _ in self.scalars)

    def check(self, genome: Genome) -> None:
        """Raise GenomeError if the genome is not a member of this space."""
        if genome.layout != self.layout:
            raise GenomeError(f"is a layer for {genome.layout} ({LAYOUTS[genome.layout].doc}); "
                              f"space {self.name} is for {self.layout} "
                              f"({LAYOUTS[self.layout].doc}): use a space of its layout")
        foreign = sorted(genome.ops_used - set(self.ops))
        if foreign:
            raise GenomeError(f"uses op(s) {', '.join(foreign)} outside space {self.name}")
        inputs = sorted(genome.inputs_used - set(self.sources))
        if inputs:
            raise GenomeError(f"reads input(s) {', '.join(inputs)} outside space {self.name}")
        if len(genome) > self.max_nodes:
            raise GenomeError(f"{len(genome)} nodes, more than space {self.name}'s limit of "
                              f"{self.max_nodes}")

    def contains(self, genome: Genome) -> bool:
        try:
            self.check(genome)
        except GenomeError:
            return False
        return True

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "name": self.name, "description": self.description,
             "ops": list(self.ops), "inputs": list(self.inputs),
             "max_nodes": self.max_nodes, "groups": self.groups}
        # the keys of the sequence spaces only, so conv spaces' records stay as they were
        if self.layout != DEFAULT_LAYOUT:
            d.update(layout=self.layout, causal=self.causal)
        if self.scalars:
            d["scalars"] = dict(self.scalars)
        return d


def builtin_spaces() -> list[str]:
    folder = resources.files("evonas.search_spaces")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_space(spec: str) -> SearchSpace:
    """A space by built-in name or by path to a JSON file."""
    if spec in builtin_spaces():
        text = resources.files("evonas.search_spaces").joinpath(f"{spec}.json").read_text()
        return space_from_dict(json.loads(text), spec)
    path = Path(spec)
    if not path.is_file():
        raise SpaceError(f"unknown search space {spec!r}; use one of "
                         f"{', '.join(builtin_spaces())} or the path of a space JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpaceError(f"{path}: not a readable JSON space file ({err.__class__.__name__}); "
                         "see search_spaces/norm_act.json for the format") from None
    return space_from_dict(data, str(path))


def space_from_dict(data: object, source: str) -> SearchSpace:
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: a space is a JSON object; see search_spaces/norm_act.json")
    unknown = set(data) - _KEYS
    if unknown:
        raise SpaceError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    if data.get("format", FORMAT) != FORMAT:
        raise SpaceError(f"{source}: format {data.get('format')!r} is not {FORMAT!r}")
    ops, inputs = data.get("ops"), data.get("inputs", list(INPUTS))
    if not isinstance(ops, list) or not ops or not all(isinstance(o, str) for o in ops):
        raise SpaceError(f"{source}: 'ops' must be a non-empty list of op names")
    bad = [o for o in ops if o not in OPS or not OPS[o].searchable]
    if bad:
        raise SpaceError(f"{source}: unknown op(s) {', '.join(bad)}; `evonas ops` lists them")
    layout, causal = data.get("layout", DEFAULT_LAYOUT), data.get("causal", False)
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise SpaceError(f"{source}: 'layout' must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(causal, bool) or (causal and layout != "ntc"):
        raise SpaceError(f"{source}: 'causal' is true or false, and true only with layout ntc")
    foreign = [o for o in ops if OPS[o].layout not in (None, layout)]
    if foreign:
        other = OPS[foreign[0]].layout
        raise SpaceError(f"{source}: op(s) {', '.join(foreign)} are statistics of layout "
                         f"{other}, not {layout}; set \"layout\": \"{other}\" or list {layout} "
                         "ones (`evonas ops`)")
    leaking = [o for o in ops if causal and OPS[o].axes and AXES[OPS[o].axes].tokens]
    if leaking:
        raise SpaceError(f"{source}: a causal space cannot list {', '.join(leaking)}: "
                         "statistics over tokens see later tokens; drop them or set causal false")
    scalars = _scalars(data.get("scalars", {}), source)
    if all(OPS[o].kind == AGGREGATE for o in ops):
        raise SpaceError(f"{source}: 'ops' needs an element-wise op: aggregates alone cannot "
                         "return a value of x's shape")
    if len(set(ops)) != len(ops):
        raise SpaceError(f"{source}: 'ops' lists an op twice")
    if not isinstance(inputs, list) or "x" not in inputs or not all(i in INPUTS for i in inputs):
        raise SpaceError(f"{source}: 'inputs' must list x and any of {', '.join(INPUTS)}")
    max_nodes, groups = data.get("max_nodes", 10), data.get("groups", 8)
    for key, value, top in (("max_nodes", max_nodes, MAX_NODES), ("groups", groups, 4096)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise SpaceError(f"{source}: '{key}' must be an integer from 1 to {top}, got {value!r}")
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise SpaceError(f"{source}: 'name' must be a non-empty string")
    return SearchSpace(name=name, description=str(data.get("description", "")),
                       ops=tuple(ops), inputs=tuple(inputs), max_nodes=max_nodes, groups=groups,
                       layout=layout, causal=causal, scalars=scalars)


def _scalars(value: object, source: str) -> tuple[tuple[str, float], ...]:
    try:
        return tuple(sorted(check_scalars(value).items()))
    except GenomeError as err:
        raise SpaceError(f"{source}: {err}") from None
