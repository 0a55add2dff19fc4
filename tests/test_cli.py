import re
import subprocess
import sys

import pytest
from checkpoint_writers import write_rosinality
from PIL import Image

from handsoff import load_generator, save_networks
from handsoff.cli import _class_fractions, main

COMMANDS = ["demo", "run", "report", "benchmark", "init-generator", "convert", "sample", "train-gan", "train-encoder",
            "invert", "fit", "generate", "train-downstream", "evaluate", "render-heads", "import-data", "show"]


def test_every_documented_command_exists_and_has_help():
    """The commands themselves, not their names in the epilog: a deleted command fails here."""
    import argparse

    from handsoff.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMANDS)
    out = subprocess.run([sys.executable, "-m", "handsoff", "--help"], capture_output=True, text=True, check=True)
    listed = out.stdout[out.stdout.index("positional arguments"):out.stdout.index("options:")]
    assert sorted(re.findall(r"^    (\S+)", listed, re.M)) == sorted(COMMANDS)  # the list, not the epilog


def test_sample_writes_a_grid(tmp_path, tiny_generator):
    ckpt = save_networks(tmp_path / "g", tiny_generator)
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(ckpt), "--n", "6", "--seed", "3", "--out", str(out),
                 "--batch", "4", "--device", "cpu"]) == 0
    grid = Image.open(out)
    assert grid.size == (3 * 66 + 2, 2 * 66 + 2) and grid.mode == "RGB"
    again = tmp_path / "again.png"
    main(["sample", "--checkpoint", str(ckpt), "--n", "6", "--seed", "3", "--out", str(again), "--device", "cpu"])
    assert again.read_bytes() == out.read_bytes()  # same seed, different batching: same images


def test_convert_rosinality_to_handsoff(tmp_path, tiny_generator, tiny_discriminator, capsys):
    write_rosinality(tmp_path / "ros.pt", tiny_generator, tiny_discriminator)
    assert main(["convert", str(tmp_path / "ros.pt"), str(tmp_path / "out")]) == 0
    assert load_generator(tmp_path / "out").config == load_generator(tmp_path / "ros.pt").config
    assert main(["convert", str(tmp_path / "ros.pt"), str(tmp_path / "out")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "ros.pt"), str(tmp_path / "out"), "--force"]) == 0


def test_bad_checkpoint_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "x.png")]) == 1
    assert "bad.pt" in capsys.readouterr().err


def test_init_generator(tmp_path):
    out = tmp_path / "out"
    assert main(["init-generator", "--resolution", "32", "--seed", "1", "--out", str(out)]) == 0
    assert load_generator(out).img_resolution == 32


BAD_NUMBERS = [  # (command, option, bad value, expected message fragment)
    (["sample", "--checkpoint", "x", "--out", "g.png"], "--n", "-3", "must be >= 1"),
    (["sample", "--checkpoint", "x", "--out", "g.png"], "--truncation", "nan", "finite"),
    (["generate", "--label-generator", "x", "--out", "d"], "--n", "0", "must be >= 1"),
    (["generate", "--label-generator", "x", "--out", "d"], "--shards", "0", "must be >= 1"),
    (["generate", "--label-generator", "x", "--out", "d"], "--filter-top", "1", "must be < 1"),
    (["generate", "--label-generator", "x", "--out", "d"], "--seed", "-1", "must be >= 0"),
    (["fit", "--generator", "x", "--latents", "l", "--labels", "d", "--out", "o"], "--members", "0", "must be >= 1"),
    (["train-downstream", "--data", "d", "--val", "v", "--out", "o"], "--epochs", "0", "must be >= 1"),
    (["train-downstream", "--data", "d", "--val", "v", "--out", "o"], "--batch", "0", "must be >= 1"),
    (["train-downstream", "--data", "d", "--val", "v", "--out", "o"], "--lr", "inf", "finite"),
    (["train-gan", "--data", "d", "--out", "o"], "--augment-p", "1.5", "must be <= 1"),
    (["invert", "--generator", "x", "--images", "d", "--out", "o"], "--steps", "many", "expected an integer"),
    (["benchmark", "--out", "b"], "--labeled", "16,many", "expected comma-separated integers"),
    (["benchmark", "--out", "b"], "--labeled", "0,16", "sizes must be >= 1"),
]


@pytest.mark.parametrize("command, option, value, fragment", BAD_NUMBERS)
def test_bad_numbers_are_refused_before_any_work(tmp_path, monkeypatch, capsys, command, option, value, fragment):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*command, option, value])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: handsoff "), lines  # one line, as every handsoff error
    err = lines[0]
    assert option in err and fragment in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_outputs_never_land_on_files_handsoff_did_not_write(tmp_path, tiny_generator, capsys):
    """fit --out at a generator folder and invert --out at a dataset card are refused before any work."""
    gen_dir = save_networks(tmp_path / "gen", tiny_generator)
    before = {p.name: p.read_bytes() for p in gen_dir.iterdir()}
    assert main(["fit", "--generator", str(gen_dir), "--latents", str(tmp_path / "l.safetensors"), "--labels",
                 str(tmp_path), "--out", str(gen_dir)]) == 1
    assert "handsoff will not overwrite it" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in gen_dir.iterdir()} == before
    card = tmp_path / "data" / "dataset.json"
    card.parent.mkdir()
    card.write_text("{}")
    assert main(["invert", "--generator", str(gen_dir), "--images", str(card.parent), "--out", str(card)]) == 1
    assert "must end in .safetensors" in capsys.readouterr().err
    assert card.read_text() == "{}"


def test_force_replaces_only_what_handsoff_wrote(tmp_path, tiny_generator, capsys):
    """--force rewrites a generator folder or a dataset folder, never a folder of someone else's files."""
    write_rosinality(tmp_path / "ros.pt", tiny_generator)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["convert", str(tmp_path / "ros.pt"), str(mine), "--force"]) == 1
    assert "is not a handsoff generator folder" in capsys.readouterr().err
    assert main(["render-heads", "--out", str(mine), "--n", "2", "--force"]) == 1
    assert "holds thesis.tex, which is not part of a labeled dataset" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def _defaults(command: str) -> dict:
    import argparse

    from handsoff.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.default for a in sub.choices[command]._actions if a.dest != "help"}


def test_cli_defaults_are_the_run_config_and_library_defaults():
    """One default per setting: each command's options default to what `handsoff run` and the library use."""
    import inspect

    from handsoff.pipeline.benchmark import run_benchmark
    from handsoff.pipeline.config import (
        DownstreamSettings,
        GenerationSettings,
        InversionSettings,
        LabelGeneratorSettings,
    )

    compared = 0
    for command, settings in (("invert", InversionSettings), ("fit", LabelGeneratorSettings),
                              ("generate", GenerationSettings), ("train-downstream", DownstreamSettings)):
        cli = {"architecture" if k == "arch" else k: v for k, v in _defaults(command).items()}
        if "min_class_fraction" in cli:  # repeated CLASS=F options, parsed as the config's mapping
            cli["min_class_fraction"] = _class_fractions(cli["min_class_fraction"] or [])
        # labeled_share says which datasets `run` gives HandsOff's network; train-downstream takes them as
        # --data (and --shares) instead. mirror says which labeled images `run` inverts and fits on; invert and
        # fit take that folder as --images / --labels (write_mirrored_dataset makes it).
        fields = [f for f in settings.model_fields if f not in ("labeled_share", "mirror")]
        assert set(fields) <= set(cli), command  # every run-config setting is a CLI option
        for field in fields:
            assert settings.model_fields[field].get_default(call_default_factory=True) == cli[field], (command, field)
            compared += 1
    assert compared == 42
    # ... and the stage functions the CLI and `run` call take the same defaults (renamed where noted).
    import dataclasses

    from handsoff.downstream import train_downstream
    from handsoff.generation import GenerationConfig
    from handsoff.inversion import invert_folder
    from handsoff.label_generator import fit_from_folder, fit_label_generator

    def signature_defaults(*functions):
        return {name: p.default for f in functions for name, p in inspect.signature(f).parameters.items()
                if p.default is not inspect.Parameter.empty}

    renamed = {"pixels": "pixels_per_image", "batch": "batch_size", "format": "fmt"}
    generation = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                  for f in dataclasses.fields(GenerationConfig)}
    stage_compared = 0
    for settings, stage in ((InversionSettings, signature_defaults(invert_folder)),
                            (LabelGeneratorSettings, signature_defaults(fit_from_folder, fit_label_generator)),
                            (GenerationSettings, generation),
                            (DownstreamSettings, signature_defaults(train_downstream))):
        for field in settings.model_fields:
            name = renamed.get(field, field)
            if name in stage and stage[name] is not dataclasses.MISSING:
                assert settings.model_fields[field].get_default(call_default_factory=True) == stage[name], \
                    (settings.__name__, field)
                stage_compared += 1
    assert stage_compared == 30, stage_compared
    signature = inspect.signature(run_benchmark).parameters
    cli = _defaults("benchmark")
    for option in ("validation", "test", "oracle", "generated"):
        assert signature[option].default == cli[option], option
