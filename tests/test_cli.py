"""The layer commands as a user runs them: real processes, real files, exit codes."""

import json
import os
import subprocess
import sys

import pytest


def evonas(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "evonas", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_help_and_bad_arguments_load_no_heavy_library():
    code = ("import sys\nfrom evonas.cli import main\n"
            "for argv in (['--help'], ['export']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_zoo_lists_every_known_layer_with_its_formula():
    out = evonas("zoo")
    assert out.returncode == 0, out.stderr
    for name in ("bn_relu", "gn_relu", "in_relu", "ln_relu", "bn_silu", "evonorm_b0",
                 "evonorm_b1", "evonorm_b2", "evonorm_s0", "evonorm_s1", "evonorm_s2"):
        assert any(line.startswith(name + " ") for line in out.stdout.splitlines()), name
    assert "std_NHW" in out.stdout


def test_show_formula_latex_and_json(tmp_path):
    out = evonas("show", "evonorm_b0")
    assert out.returncode == 0 and out.stdout.startswith("y = x")
    assert "std_NHW(x)" in out.stdout and "std_HW(x)" in out.stdout
    latex = evonas("show", "evonorm_b0", "--latex").stdout
    assert "\\max" in latex and "\\sigma" in latex
    genome = evonas("show", "evonorm_s0", "--json").stdout
    path = tmp_path / "s0.json"
    path.write_text(genome)
    assert json.loads(genome)["format"] == "evonas.genome/1"
    again = evonas("show", str(path))
    assert again.returncode == 0 and again.stdout == evonas("show", "evonorm_s0").stdout


def test_export_writes_a_module_that_runs_without_evonas(tmp_path):
    out = evonas("export", "evonorm_s0", "--out", str(tmp_path / "s0.py"), "--class-name", "S0")
    assert out.returncode == 0, out.stderr
    check = ("import torch, s0\n"
             "m = s0.S0(16, groups=4)\n"
             "print(tuple(m(torch.randn(2, 16, 4, 4)).shape), 'evonas' in __import__('sys').modules)")
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, '.'); {check}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.stdout.split() == ["(2,", "16,", "4,", "4)", "False"], run.stderr


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    # As `evonas zoo | head -0`: the reader has closed the pipe before the first line comes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([sys.executable, "-m", "evonas", "zoo"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert (out.returncode, out.stderr) == (1, "")


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["show", "evonorm_z9"], "is neither a zoo layer, a genome file nor RUN:ID"),
    (lambda d: ["show", str(d / "bad.json")], "not valid JSON"),
    (lambda d: ["show", str(d / "unknown_op.json")], "unknown op 'warp'"),
    (lambda d: ["export", "evonorm_b0", "--out", str(d / "b0.py"), "--class-name", "1x"],
     "not a Python identifier"),
    (lambda d: ["export", "evonorm_b0", "--out", str(d / "nope" / "b0.py")], "does not exist"),
    (lambda d: ["export", "evonorm_b0", "--out", str(d / "b0.txt")], "must end in .py"),
    (lambda d: ["export", str(d / "bad.json"), "--out", str(d / "b0.py")], "not valid JSON"),
    (lambda d: ["export", "evonorm_b0"], "--out"),
    (lambda d: ["frobnicate"], "invalid choice"),
])
def test_bad_input_gets_one_line_exit_2_and_writes_nothing(tmp_path, make_args, message):
    (tmp_path / "bad.json").write_text('{"nodes": [')
    (tmp_path / "unknown_op.json").write_text(json.dumps(
        {"nodes": [{"id": "a", "op": "warp", "inputs": ["x"]}], "output": "a"}))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = evonas(*make_args(tmp_path))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_demo_runs_and_exports_the_zoo(tmp_path):
    out = evonas("demo", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "demo").glob("*.py"))) == 18  # 11 conv and 7 sequence layers
    assert "after" in out.stdout
