"""`evonas train`'s flags: FullTrainConfig holds every default once; a flag not given
leaves it there, and the help shows it as the dataclass has it."""

import dataclasses
from types import SimpleNamespace

import pytest

from evonas.cli import build_parser
from evonas.cli.train import config_from_args
from evonas.fulltrain.config import FullTrainConfig

# What a search's run folder gives full training where no flag says otherwise.
RUN = SimpleNamespace(config=SimpleNamespace(dataset="synthetic", data_dir=None,
                                            archs=("resnet",)))


@pytest.fixture(autouse=True)
def no_data_dir(monkeypatch):
    monkeypatch.delenv("EVONAS_DATA_DIR", raising=False)


def parse(*flags: str):
    return build_parser().parse_args(["train", "RUN", *flags])


def test_flags_not_given_leave_every_default_to_the_config():
    args = parse()
    restated = {k: v for k, v in vars(args).items()
                if v is not None and k not in ("run_dir", "run", "command")}
    assert restated == {}
    assert config_from_args(args, RUN) == FullTrainConfig(dataset="synthetic")


def test_given_flags_replace_only_their_fields():
    config = config_from_args(parse("--steps", "40", "--seeds", "0,3", "--bf16", "--top", "2"),
                              RUN)
    assert (config.steps, config.epochs, config.seeds, config.bf16, config.top) == \
        (40, None, (0, 3), True, 2)
    others = {f.name for f in dataclasses.fields(FullTrainConfig)} - {
        "steps", "epochs", "seeds", "bf16", "top", "dataset"}
    default = FullTrainConfig(dataset="synthetic")
    assert all(getattr(config, n) == getattr(default, n) for n in others)


def test_help_shows_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    d = FullTrainConfig()
    for shown in (f"({d.top})", f"({d.epochs}", f"({','.join(d.archs)}",
                  f"({','.join(map(str, d.batch_sizes))}", f"({d.trials_per_layer})",
                  f"({d.max_retries})", f"({d.gpus_per_trial})", f"({','.join(d.optimizers)}",
                  # and, where they differ, the defaults after a search of sequence layers
                  "after a sequence search lm_full for lm, vit_full for vit",
                  "after a sequence search adamw,sgd for lm"):
        assert shown in text, shown
