"""The interpreter: genome -> nn.Module in train and eval mode, dtypes, devices, compile."""

import pytest
import torch

from evonas.layers.genome import chain
from evonas.layers.interpreter import GenomeLayer, layer_factory
from evonas.layers.lowering import lower

B0 = chain(("std_NHW", ["x"]), ("mul", ["v1", "x"]), ("std_HW", ["x"]),
           ("add", ["n2", "n3"]), ("max", ["n1", "n4"]), ("div", ["x", "n5"]), name="b0")


def reference_b0(x, v1, running_var, training, eps=1e-5, momentum=0.1):
    if training:
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        n = x.numel() / x.size(1)
        running_var.mul_(1 - momentum).add_(momentum * var.flatten() * n / (n - 1))
    else:
        var = running_var.view(1, -1, 1, 1)
    inst = (x.var(dim=(2, 3), unbiased=False, keepdim=True) + eps).sqrt()
    return x / torch.maximum((var + eps).sqrt(), v1.view(1, -1, 1, 1) * x + inst)


def test_train_then_eval_follows_running_estimate():
    gen = torch.Generator().manual_seed(0)
    layer = GenomeLayer(B0, 8)
    with torch.no_grad():
        layer.v1.uniform_(-1, 1, generator=gen)
    running = torch.ones(8)
    for _ in range(3):
        x = torch.randn(4, 8, 5, 5, generator=gen) * 3 + 1
        torch.testing.assert_close(layer(x), reference_b0(x, layer.v1.detach(), running, True))
    layer.eval()
    x = torch.randn(4, 8, 5, 5, generator=gen)
    torch.testing.assert_close(layer(x), reference_b0(x, layer.v1.detach(), running, False))
    torch.testing.assert_close(layer.running_var_n1, running)


def test_state_dict_names_and_round_trip():
    layer = GenomeLayer(B0, 8)
    assert list(layer.state_dict()) == ["weight", "bias", "v1", "running_var_n1"]
    other = GenomeLayer(B0, 8)
    with torch.no_grad():
        layer.v1.fill_(0.3)
        layer.running_var_n1.fill_(2.0)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(other.eval()(x), layer.eval()(x))


def test_apply_act_false_is_affine_only():
    layer = GenomeLayer(B0, 4, apply_act=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        layer.bias.fill_(0.5)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer(x), x * layer.weight.view(1, -1, 1, 1) + 0.5)


def test_bfloat16_in_bfloat16_out_with_float32_statistics():
    layer = GenomeLayer(B0, 8)
    x = torch.randn(4, 8, 5, 5)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and layer.running_var_n1.dtype == torch.float32
    ref = GenomeLayer(B0, 8)(x.bfloat16().float())
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)


def test_constants_and_trainable_vectors_are_inputs():
    g = chain(("add", ["x", "one"]), ("mul", ["n1", "v0"]), ("add", ["n2", "x"]))
    layer = GenomeLayer(g, 3)
    assert [k for k, _ in layer.named_parameters()] == ["weight", "bias", "v0"]
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), x)  # v0 starts at 0
    layer(x).sum().backward()
    assert layer.v0.grad is not None and layer.v0.grad.abs().sum() > 0


def test_division_guard_is_dropped_only_where_the_denominator_is_bounded():
    ops = {s.node: s.op.name for s in lower(B0)}
    assert ops["n6"] == "div_unguarded"  # x / max(std, ...) >= sqrt(eps)
    risky = chain(("mean_HW", ["x"]), ("div", ["x", "n1"]))
    assert [s.op.name for s in lower(risky)] == ["mean_HW", "div"]
    x = torch.zeros(2, 3, 4, 4, requires_grad=True)
    out = GenomeLayer(risky, 3)(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_factory_follows_timm_norm_act_signature():
    factory = layer_factory(B0, groups=4)
    layer = factory(16, apply_act=True, eps=1e-3, act_layer="ignored")
    assert layer.eps == 1e-3 and layer.groups == 4
    assert GenomeLayer(B0, 24, groups=32).groups == 24
    assert GenomeLayer(B0, 24, group_size=6).groups == 4


def test_torch_compile_matches_eager():
    layer = GenomeLayer(B0, 8)
    x = torch.randn(4, 8, 5, 5)
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), GenomeLayer(B0, 8)(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = torch.randn(4, 8, 5, 5)
    cpu = GenomeLayer(B0, 8)
    gpu = GenomeLayer(B0, 8, device="cuda")
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), atol=1e-5, rtol=1e-4)
    assert gpu.running_var_n1.device.type == "cuda"


# --- sequence layout ----------------------------------------------------------------------

LN = chain(("mean_C", ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"]), ("std_C", ["x"]),
           ("div", ["n3", "n4"]), layout="ntc")


@pytest.mark.parametrize("shape", [(3, 5, 8), (3, 8), (2, 3, 4, 8)])
def test_sequence_factory_is_a_norm_layer_over_the_last_dimension(shape):
    norm_layer = layer_factory(LN)  # what a transformer takes: norm_layer(num_features)
    layer, ln = norm_layer(8), torch.nn.LayerNorm(8)
    with torch.no_grad():
        layer.weight.normal_()
        ln.weight.copy_(layer.weight)
    x = torch.randn(*shape)
    torch.testing.assert_close(layer(x), ln(x))


def test_scalars_are_zero_dim_parameters_with_their_initial_values():
    dyt = chain(("mul", ["alpha", "x"]), ("tanh", ["n1"]), layout="ntc", scalars={"alpha": 0.5})
    layer = GenomeLayer(dyt, 8, dtype=torch.float64)
    assert [(k, tuple(p.shape)) for k, p in layer.named_parameters()] == [
        ("weight", (8,)), ("bias", (8,)), ("alpha", ())]
    assert layer.alpha.item() == 0.5 and layer.alpha.dtype == torch.float64
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.tanh(0.5 * x))
    layer(x).sum().backward()
    assert layer.alpha.grad is not None


def test_batch_over_tokens_follows_batchnorm1d_running_estimates():
    bn_nt = chain(("mean_NT", ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"]), ("std_NT", ["x"]),
                  ("div", ["n3", "n4"]), layout="ntc")
    layer, bn = GenomeLayer(bn_nt, 8), torch.nn.BatchNorm1d(8)
    for seed in range(3):
        x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(seed)) * 2 + 1
        torch.testing.assert_close(layer(x), bn(x.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(layer.running_var_n4, bn.running_var)
    layer.eval()
    bn.eval()
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(layer(x), bn(x.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("mean, std, reference", [
    ("mean_NHW", "std_NHW", lambda: torch.nn.BatchNorm2d(8)),
    ("mean_GHW", "std_GHW", lambda: torch.nn.GroupNorm(2, 8)),
])
def test_a_closing_normalisation_takes_the_layers_affine_in_one_kernel(mean, std, reference):
    genome = chain((mean, ["x"]), ("neg", ["n1"]), ("add", ["x", "n2"]), (std, ["x"]),
                   ("div", ["n3", "n4"]))
    layer, ref = GenomeLayer(genome, 8, groups=2), reference()
    assert layer._affine_folded  # torch's norm kernel applies weight and bias
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            p.normal_(generator=torch.Generator().manual_seed(len(p) + int(p is layer.bias)))
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(layer.bias)
    for mode in (True, False):
        layer.train(mode)
        ref.train(mode)
        x = torch.randn(4, 8, 3, 3, requires_grad=True)
        (layer(x) * x).sum().backward()
        grad, x.grad = x.grad, None
        (ref(x) * x).sum().backward()
        torch.testing.assert_close(layer(x), ref(x))
        torch.testing.assert_close(grad, x.grad)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
