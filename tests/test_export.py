"""The exported layer file against the interpreter, the reference it must reproduce.

Exported modules are loaded from the generated source in tmp_path; each is compared with
GenomeLayer on the same genome for outputs, gradients, running estimates and state_dicts,
under TorchScript and torch.compile, and imported in a Python that cannot see evonas.
"""

import importlib.util
import inspect
import itertools
import os
import py_compile
import subprocess
import sys

import pytest
import torch

from evonas import __version__
from evonas.layers import symbolic
from evonas.layers import export as export_module
from evonas.errors import EvonasError
from evonas.layers.export import export_file, export_source
from evonas.layers.genome import Genome, chain
from evonas.layers.interpreter import GenomeLayer
from evonas.layers.lowering import lower

C = 8
B0 = chain(("std_NHW", ["x"]), ("mul", ["v1", "x"]), ("std_HW", ["x"]), ("add", ["n2", "n3"]),
           ("max", ["n1", "n4"]), ("div", ["x", "n5"]), name="evonorm_b0")
S0 = chain(("mul", ["v1", "x"]), ("sigmoid", ["n1"]), ("mul", ["x", "n2"]), ("std_GHW", ["x"]),
           ("div", ["n3", "n4"]), name="evonorm_s0")
# (x - mean_HW(x)) / (var_HW(x) + sigmoid(v1*x)): a variance may be 0, so the division
# keeps its guard.
GUARDED = chain(("mean_HW", ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"]), ("var_HW", ["x"]),
                ("mul", ["v1", "x"]), ("sigmoid", ["n5"]), ("add", ["n4", "n6"]),
                ("div", ["n3", "n7"]))
# max(x + 1, 0) + v0 * mean_NHW(x): the constants and the other vector.
CONSTANTS = chain(("add", ["x", "one"]), ("max", ["n1", "zero"]), ("mean_NHW", ["x"]),
                  ("mul", ["v0", "n3"]), ("add", ["n2", "n4"]))
GENOMES = {"b0": B0, "s0": S0, "guarded": GUARDED, "constants": CONSTANTS}
_module_ids = itertools.count()
no_script_warning = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")




def load_module(genome, folder, class_name="EvolvedNormAct"):
    module_name = f"exported_{next(_module_ids)}"
    path = export_file(genome, folder / f"{module_name}.py", class_name)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pair(genome, folder, **kw):
    """Interpreted and exported layers with equal, non-trivial parameters."""
    interpreted = GenomeLayer(genome, C, **kw)
    with torch.no_grad():
        for seed, p in enumerate(interpreted.parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    exported = load_module(genome, folder).EvolvedNormAct(C, **kw)
    exported.load_state_dict(interpreted.state_dict())
    return interpreted, exported


def batch(seed, n=4):
    return torch.randn(n, C, 4, 4, generator=torch.Generator().manual_seed(seed))


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def step(layer, x, lr=0.1):
    """One SGD step on a fixed linear loss: the output and the gradients it took."""
    x = x.clone().requires_grad_(True)
    module = getattr(layer, "_orig_mod", layer)  # torch.compile's wrapper prefixes names
    module.zero_grad()
    y = layer(x)
    (y * torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape)).sum().backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters()}
    with torch.no_grad():
        for p in module.parameters():
            p.sub_(lr * p.grad)
    return y.detach(), x.grad, grads


def assert_step_same(a, b, x):
    for got, want in zip(step(b, x), step(a, x)):
        if isinstance(want, dict):
            assert got.keys() == want.keys()
            for k in want:
                assert_same(got[k], want[k])
        else:
            assert_same(got, want)


def assert_state_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert_same(sb[k], sa[k])


@pytest.mark.parametrize("name", list(GENOMES))
def test_matches_interpreter_through_training(name, tmp_path):
    interpreted, exported = pair(GENOMES[name], tmp_path, groups=4)
    for seed in range(3):
        assert_step_same(interpreted, exported, batch(seed))
        assert_state_same(interpreted, exported)
    interpreted.eval()
    exported.eval()
    assert_step_same(interpreted, exported, batch(9))


def test_guarded_division_stays_guarded():
    assert [s.op.name for s in lower(GUARDED)][-1] == "div"
    assert "safe_div(n3, n7)" in export_source(GUARDED)
    assert "n6 = x / n5" in export_source(B0)  # a max with a std needs no guard


@pytest.mark.parametrize("name", list(GENOMES))
def test_state_dicts_load_both_ways(name, tmp_path):
    genome = GENOMES[name]
    interpreted, exported = pair(genome, tmp_path)
    fresh = load_module(genome, tmp_path).EvolvedNormAct(C)
    fresh.load_state_dict(interpreted.state_dict(), strict=True)
    assert_state_same(interpreted, fresh)
    back = GenomeLayer(genome, C)
    back.load_state_dict(exported.state_dict(), strict=True)
    assert_state_same(exported, back)
    assert all(b.dtype == torch.float32 for b in exported.buffers())


@no_script_warning
def test_torchscript_matches(tmp_path):
    interpreted, exported = pair(B0, tmp_path)
    scripted = torch.jit.script(exported)
    assert_step_same(interpreted, scripted, batch(0))
    assert_state_same(interpreted, scripted)
    interpreted.eval()
    scripted.eval()
    assert_step_same(interpreted, scripted, batch(1))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torch_compile_matches(tmp_path):
    # aot_eager traces forward and backward with AOTAutograd (the in-place running
    # estimate updates included) in about a second; inductor adds code generation
    # that takes ten on a small CPU without catching more here.
    interpreted, exported = pair(B0, tmp_path)
    compiled = torch.compile(exported, backend="aot_eager")
    assert_step_same(interpreted, compiled, batch(0))
    assert_state_same(interpreted, exported)


def test_file_needs_only_torch(tmp_path):
    export_file(S0, tmp_path / "evolved_layer.py")
    code = (
        "import os, sys\n"
        "sys.modules['evonas'] = None  # any import of evonas now fails\n"
        "sys.path.insert(0, os.getcwd())\n"
        "import torch\n"
        "from evolved_layer import EvolvedNormAct\n"
        "y = EvolvedNormAct(8, groups=4)(torch.randn(2, 8, 3, 3))\n"
        "assert y.shape == (2, 8, 3, 3)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'evonas'))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['evonas']"  # only the blocking entry
    py_compile.compile(str(tmp_path / "evolved_layer.py"), doraise=True)


def genome_in(doc):
    return Genome.from_json(doc[doc.index('{"format"'):doc.rindex("}") + 1])


def test_docstrings_carry_formula_and_genome(tmp_path):
    module = load_module(B0, tmp_path)
    text, tex = symbolic.formula(B0), symbolic.latex(B0)
    for doc in (module.__doc__, module.EvolvedNormAct.__doc__):
        assert f"y = {text}" in doc and f"y = {tex}" in doc
        assert f"evonas {__version__}" in doc and B0.structural_hash in doc
        assert genome_in(doc) == B0
    assert "y =" not in export_source(B0, formula=False)


def test_quotes_in_genome_name_stay_data(tmp_path):
    named = B0.renamed('b0"""\n__import__("os")\\')
    module = load_module(named, tmp_path)
    assert genome_in(module.EvolvedNormAct.__doc__).name == named.name


def test_apply_act_false_is_affine(tmp_path):
    _, exported = pair(B0, tmp_path, apply_act=False)
    x = batch(0)
    want = x * exported.weight.view(1, -1, 1, 1) + exported.bias.view(1, -1, 1, 1)
    assert_same(exported(x), want)
    assert_same(exported.running_var_n1, torch.ones(C))  # no statistics taken


@pytest.mark.parametrize("groups, group_size, expected", [
    (32, None, 8),  # more groups than channels: one channel each
    (3, None, 2),  # not a divisor: reduced to one
    (32, 4, 2),  # group_size decides
])
def test_groups_like_timm(groups, group_size, expected, tmp_path):
    interpreted, exported = pair(S0, tmp_path, groups=groups, group_size=group_size)
    assert exported.groups == interpreted.groups == expected
    x = batch(0)
    v1 = exported.v1.view(1, -1, 1, 1)
    std = x.reshape(4, expected, -1).var(-1, unbiased=False, keepdim=True).add(1e-5).sqrt()
    std = std.expand(4, expected, C // expected).reshape(4, C, 1, 1)
    y = x * torch.sigmoid(v1 * x) / std
    want = y * exported.weight.view(1, -1, 1, 1) + exported.bias.view(1, -1, 1, 1)
    assert_same(exported(x), want)


def test_group_size_must_divide(tmp_path):
    layer_class = load_module(S0, tmp_path).EvolvedNormAct
    with pytest.raises(ValueError, match="does not divide"):
        layer_class(C, group_size=3)


def test_constructor_is_timms_norm_act(tmp_path):
    layer_class = load_module(B0, tmp_path).EvolvedNormAct
    params = inspect.signature(layer_class).parameters
    assert [(p.name, p.default) for p in params.values() if p.kind != p.VAR_KEYWORD] == [
        ("num_features", inspect.Parameter.empty), ("apply_act", True), ("eps", 1e-5),
        ("momentum", 0.1), ("groups", 32), ("group_size", None), ("device", None),
        ("dtype", None)]
    layer = layer_class(C, act_layer="relu", dtype=torch.float64)  # extra kwargs ignored
    assert layer.weight.dtype == torch.float64 and layer.running_var_n1.dtype == torch.float32
    with torch.no_grad():
        layer.weight.fill_(3.0)
    layer.reset_parameters()
    assert_same(layer.weight, torch.ones(C, dtype=torch.float64))


@pytest.mark.parametrize("name", ["1layer", "class", "my-layer", "torch", "batch_std", ""])
def test_rejects_bad_class_name(name):
    with pytest.raises(EvonasError, match="class name"):
        export_source(B0, name)


def test_class_name_is_used(tmp_path):
    module = load_module(S0, tmp_path, class_name="EvoNormS0")
    assert module.EvoNormS0(C)(batch(0)).shape == (4, C, 4, 4)


def test_export_file_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "layer.py"
    path.write_text("previous\n")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        export_file(B0, path)
    assert path.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["layer.py"]  # no temp file left
    with pytest.raises(EvonasError, match="does not exist"):
        export_file(B0, tmp_path / "missing" / "layer.py")


def test_export_has_no_unused_kernels():
    source = export_source(chain(("mul", ["v1", "x"]), ("sigmoid", ["n1"]), ("mul", ["x", "n2"])))
    assert "def safe_div" not in source and "List" not in source
    assert "def resolve_groups" in source
    data = export_source(S0)
    assert data.count("def _grouped") == 1 and data.count("def group_std") == 1


# --- sequence (ntc) layers: drop-ins for torch.nn.LayerNorm -------------------------------

# bn_nt then Derf on top, through a per-feature vector: running estimates, scalars, the
# fused batch norm over (L, C) rows and an unfused per-token group statistic.
SEQ = chain(("mean_NT", ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"]), ("std_NT", ["x"]),
            ("div", ["n3", "n4"]), ("mul", ["alpha", "n5"]), ("add", ["n6", "shift"]),
            ("erf", ["n7"]), ("rms_G", ["x"]), ("mul", ["n8", "n9"]), ("mul", ["n10", "v1"]),
            layout="ntc", scalars={"alpha": 0.5, "shift": 0.1}, name="seq_mix")
LN = chain(("mean_C", ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"]), ("std_C", ["x"]),
           ("div", ["n3", "n4"]), layout="ntc")
SEQ_GENOMES = {"mix": SEQ, "layernorm": LN}


def seq_pair(genome, folder, **kw):
    interpreted = GenomeLayer(genome, C, groups=4)
    with torch.no_grad():
        for seed, p in enumerate(interpreted.parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    exported = load_module(genome, folder).EvolvedNormAct(C, groups=4, **kw)
    exported.load_state_dict(interpreted.state_dict(), strict=not kw)  # kw may drop the affine
    return interpreted, exported


def tokens(seed, shape=(4, 6)):
    return torch.randn(*shape, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SEQ_GENOMES))
def test_sequence_export_matches_interpreter_through_training(name, tmp_path):
    interpreted, exported = seq_pair(SEQ_GENOMES[name], tmp_path)
    for seed in range(3):
        assert_step_same(interpreted, exported, tokens(seed))
        assert_state_same(interpreted, exported)
    interpreted.eval()
    exported.eval()
    assert_step_same(interpreted, exported, tokens(9, (2, 3, 5)))  # any (..., C)


def test_sequence_constructor_is_layernorms(tmp_path):
    layer_class = load_module(SEQ, tmp_path).EvolvedNormAct
    params = [(p.name, p.default) for p in inspect.signature(layer_class).parameters.values()]
    want = [(p.name, p.default)
            for p in inspect.signature(torch.nn.LayerNorm).parameters.values()]
    assert params[:len(want)] == want  # then the search's own keywords, all defaulted
    assert all(default is not inspect.Parameter.empty for _, default in params[len(want):])
    for shape in (C, (C,), [C]):
        assert layer_class(shape).normalized_shape == (C,)
    with pytest.raises(ValueError, match="last dimension only"):
        layer_class((3, C))


def test_sequence_export_loads_an_nn_layernorm(tmp_path):
    ln = torch.nn.LayerNorm(C)
    with torch.no_grad():
        ln.weight.normal_(generator=torch.Generator().manual_seed(0))
        ln.bias.normal_(generator=torch.Generator().manual_seed(1))
    exported = load_module(LN, tmp_path).EvolvedNormAct(C)
    exported.load_state_dict(ln.state_dict())
    x = tokens(0)
    assert_same(exported(x), ln(x))


@pytest.mark.parametrize("kw, params", [
    (dict(elementwise_affine=False), []),
    (dict(bias=False), ["weight"]),
])
def test_sequence_affine_switches_like_layernorm(kw, params, tmp_path):
    interpreted = GenomeLayer(LN, C)
    exported = load_module(LN, tmp_path).EvolvedNormAct(C, **kw)
    ln = torch.nn.LayerNorm(C, **kw)
    assert [k for k, _ in exported.named_parameters()] == params
    assert [k for k, _ in ln.named_parameters()] == params
    x = tokens(1)
    assert_same(exported(x), ln(x))
    assert_same(exported(x), interpreted(x))  # weight 1 and bias 0 are no affine


@no_script_warning
@pytest.mark.parametrize("kw", [{}, dict(elementwise_affine=False), dict(bias=False)])
def test_sequence_torchscript_matches(kw, tmp_path):
    interpreted, exported = seq_pair(SEQ, tmp_path, **kw)
    scripted = torch.jit.script(exported)
    x = tokens(2)
    assert_same(scripted(x), exported(x))
    if not kw:
        assert_step_same(interpreted, scripted, tokens(3))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sequence_torch_compile_matches(tmp_path):
    interpreted, exported = seq_pair(SEQ, tmp_path)
    compiled = torch.compile(exported, backend="aot_eager")
    assert_step_same(interpreted, compiled, tokens(0))
    assert_state_same(interpreted, exported)


def test_sequence_docstrings_carry_formula_genome_and_scalars(tmp_path):
    module = load_module(SEQ, tmp_path)
    text = symbolic.formula(SEQ)
    assert "erf(alpha*" in text
    for doc in (module.__doc__, module.EvolvedNormAct.__doc__):
        assert f"y = {text}" in doc and SEQ.structural_hash in doc
        back = genome_in(doc)
        assert back == SEQ and back.layout == "ntc" and back.scalars == SEQ.scalars
    assert "nn.LayerNorm" in module.__doc__ and "Learnt scalars: alpha, shift" in \
        module.EvolvedNormAct.__doc__


def test_layernorm_export_is_one_fused_call_with_its_affine():
    body = export_source(LN, formula=False).split("def forward", 1)[1]
    assert "n5 = token_normalize_affine(x, weight, bias, self.eps)\n            return n5" in body
    # without weight and bias the plain kernel runs, and the affine only where present
    assert "n5 = token_normalize(x, self.eps)" in body
