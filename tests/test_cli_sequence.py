"""The layer commands on sequence (ntc) layers, as a user runs them: `evonas spaces` says
each space's layout and which is causal, `evonas show` and `evonas export` handle layouts
and learnt scalars, and the exported file replaces nn.LayerNorm without evonas."""

import json
import os
import subprocess
import sys


def evonas(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "evonas", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_spaces_lists_layout_and_causality():
    out = evonas("spaces")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in out.stdout.splitlines()}
    assert rows["seq_causal"] == ["ntc", "causal"]
    assert rows["seq_bidirectional"] == ["ntc", "bidirectional"]
    assert rows["norm_act"] == ["nchw", "-"] and rows["act"] == ["nchw", "-"]


def test_show_json_carries_layout_and_scalars():
    out = evonas("show", "derf", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["layout"] == "ntc" and data["scalars"] == {"alpha": 0.5, "shift": 0.0}
    assert evonas("show", "derf").stdout.startswith("y = erf(alpha*x + shift)")


def test_export_writes_a_layernorm_drop_in_that_runs_without_evonas(tmp_path):
    out = evonas("export", "layernorm", "--out", str(tmp_path / "ln.py"))
    assert out.returncode == 0, out.stderr
    code = (
        "import os, sys\n"
        "sys.modules['evonas'] = None\n"
        "sys.path.insert(0, os.getcwd())\n"
        "import torch\n"
        "from ln import Layernorm\n"
        "ref = torch.nn.LayerNorm(16)\n"
        "layer = Layernorm(16)\n"
        "layer.load_state_dict(ref.state_dict())\n"
        "x = torch.randn(2, 5, 16)\n"
        "torch.testing.assert_close(layer(x), ref(x))\n"
        "torch.jit.script(layer)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "-W", "ignore", "-c", code], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

