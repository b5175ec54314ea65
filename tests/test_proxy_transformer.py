"""The transformer proxies: a causal LM and a ViT hosting a norm layer at every LayerNorm
site, the text datasets they read, and the LM's training to bits per character."""

import dataclasses
import gzip
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from evonas.errors import EvonasError
from evonas.proxy.data import DATASETS, load_dataset, make_synthetic
from evonas.proxy.models import ARCHS, build_model
from evonas.proxy.text import TextDataset, eval_windows, sample_windows
from evonas.proxy.train import train_proxy
from evonas.proxy.train_transformer import LM_PROXY, VIT_PROXY, LMTrainer, train_lm
from evonas.proxy.transformer import PLACEMENTS, Block, post_norm_blocks

SHAKESPEARE_GZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt.gz"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE_GZ.is_file(),
                                       reason="no copy of tiny Shakespeare on this machine")


class CountingFactory:
    """norm_layer factory building nn.LayerNorm and keeping every module it built."""

    def __init__(self) -> None:
        self.built: list[nn.Module] = []

    def __call__(self, num_features: int) -> nn.Module:
        self.built.append(nn.LayerNorm(num_features))
        return self.built[-1]


def tiny_lm(placement: str, norm_layer=nn.LayerNorm, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return build_model("lm", norm_layer, 32, num_classes=16, depth=depth, context=16,
                       placement=placement)


# --- the LM --------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_lm_logits_at_t_ignore_later_tokens(placement):
    model = tiny_lm(placement)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (3, 16), generator=gen)
    for t in (0, 7, 14):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, 16, (3, 15 - t), generator=gen)
        torch.testing.assert_close(model(changed)[:, :t + 1], model(ids)[:, :t + 1])
        assert not torch.allclose(model(changed)[:, t + 1:], model(ids)[:, t + 1:])


@pytest.mark.parametrize("placement, expected", [("pre", 2 * 4 + 1), ("post", 2 * 4),
                                                 ("mixln", 2 * 4 + 1)])
def test_factory_builds_every_norm_and_each_is_used(placement, expected):
    factory = CountingFactory()
    model = tiny_lm(placement, factory)
    calls = []
    for module in factory.built:
        module.register_forward_hook(lambda m, args, out: calls.append(m))
    model(torch.zeros(2, 16, dtype=torch.long))
    assert len(factory.built) == expected
    assert {id(m) for m in calls} == {id(m) for m in factory.built}
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert {id(m) for m in norms} == {id(m) for m in factory.built}  # no LayerNorm of its own


def test_mixln_is_post_norm_in_the_first_quarter_only():
    assert post_norm_blocks("mixln", 8) == [True, True] + [False] * 6
    assert post_norm_blocks("post", 3) == [True] * 3
    assert post_norm_blocks("pre", 3) == [False] * 3


def test_post_norm_block_ends_in_its_norm_and_pre_norm_block_does_not():
    x = 3.0 + 2.0 * torch.randn(2, 5, 16)
    outputs = {}
    for post in (True, False):
        torch.manual_seed(0)
        block = Block(16, 4, lambda c: nn.LayerNorm(c, elementwise_affine=False), causal=True,
                      post=post, out_std=0.02)
        outputs[post] = block(x)
    torch.testing.assert_close(outputs[True].mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    assert outputs[False].mean(-1).abs().min() > 1.0  # the residual stream keeps its offset


@pytest.mark.parametrize("kwargs, words", [
    ({"placement": "mixln", "depth": 2}, "depth >= 4"),
    ({"placement": "middle"}, "pre, post, mixln"),
    ({"heads": 5}, "multiple of its 5 heads"),
    ({"embed_std": 0}, "embed_std must be a positive number"),
])
def test_bad_transformer_options_get_one_line(kwargs, words):
    with pytest.raises(EvonasError, match=words) as err:
        build_model("lm", nn.LayerNorm, 32, **kwargs)
    assert "\n" not in str(err.value)


def test_lm_refuses_a_window_longer_than_its_context():
    with pytest.raises(EvonasError, match="context 16"):
        tiny_lm("pre")(torch.zeros(1, 17, dtype=torch.long))


# --- training the LM -----------------------------------------------------------------------


def small_lm_config(**changes):
    return dataclasses.replace(LM_PROXY, width=32, batch_size=16, eval_size=32, **changes)


def test_a_few_dozen_steps_learn_the_markov_chain():
    data = load_dataset("synthetic_text", seed=0)
    trainer = LMTrainer(nn.LayerNorm, small_lm_config(steps=40), data, seed=0)
    before = trainer.evaluate()
    trainer.train_until(40)
    after = trainer.evaluate()
    # Uniform guessing scores 4 bits, symbol frequencies alone 3.4 (seed 0's chain): below
    # 3 bits the model has learnt transitions. Its entropy rate is 1.24 bits.
    assert before > 3.8
    assert after < 3.0
    assert trainer.curve[-1] < trainer.curve[0] - 0.5


def test_same_seed_same_bpc_and_the_result_is_json():
    data = load_dataset("synthetic_text", seed=0)
    runs = [train_lm(nn.LayerNorm, small_lm_config(steps=3), data, seed=5) for _ in range(2)]
    assert runs[0].bpc == runs[1].bpc and runs[0].fitness == -runs[0].bpc
    assert runs[0].to_dict()["steps_done"] == 3


def test_a_diverging_layer_is_an_outcome_with_no_bpc():
    class TimesInf(nn.Module):
        def forward(self, x):
            return x * math.inf

    result = train_lm(lambda c: TimesInf(), small_lm_config(steps=3),
                      load_dataset("synthetic_text"), seed=0)
    assert result.diverged and result.bpc == math.inf and result.to_dict()["bpc"] is None


def test_lm_trainer_refuses_an_image_dataset():
    with pytest.raises(EvonasError, match="text dataset"):
        LMTrainer(nn.LayerNorm, small_lm_config(), make_synthetic(64, 16), seed=0)


# --- text data -----------------------------------------------------------------------------


def test_windows_are_next_character_pairs_from_the_generator():
    ids = torch.arange(100)
    x, y = sample_windows(ids, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    torch.testing.assert_close(y, x + 1)
    again, _ = sample_windows(ids, 4, 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, x)
    vx, vy = eval_windows(ids, 8)
    assert vx.shape == (12, 8) and vy[-1, -1] == 96


@needs_shakespeare
@pytest.mark.parametrize("as_text", [False, True])
def test_shakespeare_reads_from_a_data_dir(tmp_path, as_text):
    text = gzip.decompress(SHAKESPEARE_GZ.read_bytes()).decode()
    if as_text:
        (tmp_path / "input.txt").write_text(text)
    else:
        shutil.copy(SHAKESPEARE_GZ, tmp_path / "tinyshakespeare.txt.gz")
    data = load_dataset("shakespeare", tmp_path, download=False)
    assert isinstance(data, TextDataset) and "shakespeare" in DATASETS
    assert len(data.vocab) == 65 and len(data.train) + len(data.val) == len(text)
    assert data.decode(data.val[:200]) == text[len(data.train):len(data.train) + 200]
    assert abs(len(data.val) / len(text) - 0.1) < 1e-5


@needs_shakespeare
@pytest.mark.parametrize("name, content, words", [
    ("tinyshakespeare.txt.gz", b"not gzip at all", "cannot read"),
    ("tinyshakespeare.txt.gz", gzip.compress(b"To be, or not to be", mtime=0),
     "is not tiny Shakespeare"),
    ("input.txt", b"To be, or not to be", "is not tiny Shakespeare"),
], ids=["not-gzip", "other-text-gzipped", "other-text"])
def test_a_corrupt_shakespeare_file_gets_one_line(tmp_path, name, content, words):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(EvonasError, match=words) as err:
        load_dataset("shakespeare", tmp_path, download=False)
    assert "\n" not in str(err.value) and "--data-dir" in str(err.value)


def test_a_folder_without_shakespeare_gets_one_line(tmp_path):
    with pytest.raises(EvonasError, match="holds none of input.txt") as err:
        load_dataset("shakespeare", tmp_path, download=False)
    assert "\n" not in str(err.value)


# --- the ViT -------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_classifies_images_and_builds_every_norm(pool):
    factory = CountingFactory()
    model = build_model("vit", factory, 32, num_classes=10, depth=2, pool=pool)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert len(factory.built) == 2 * 2 + 1


def test_vit_trains_on_synthetic_images():
    config = dataclasses.replace(VIT_PROXY, width=32, steps=3, batch_size=16, eval_size=32)
    result = train_proxy(nn.LayerNorm, config, make_synthetic(64, 32), seed=0)
    assert result.steps_done == 3 and not result.diverged
    assert 0.0 <= result.accuracy <= 1.0 and all(map(math.isfinite, result.train_loss_curve))


def test_transformers_are_registered_architectures():
    assert {"lm", "lm_full", "vit", "vit_full"} <= set(ARCHS)
    assert build_model("lm_full", nn.LayerNorm, 64, num_classes=65).context == 256
