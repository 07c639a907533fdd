"""`memexp --help`: named memexp, every option described by its YAML, no schema anywhere.

The command line runs in this process (`memexp.__main__.cli` with its own argv), as the
console script runs it; the schemas are only reachable where the presets extend them. `--help`
is answered by `memexp.cli_help.app_help` before Hydra builds its app; Hydra's own help builder
(`memexp.__main__.main`) must print the same text.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from conftest import QUIET_HYDRA
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from memexp import CONF_DIR
from memexp.cli_help import app_help, leading_comment

ComposeFn = Callable[..., DictConfig]
APP_GROUPS = ("batch", "device", "logger", "model", "seq", "strategy")
USER_PRESET = """\
# My GPT-2-small-like model, from my own project.
defaults:
  - /schema/model@_here_
name: mymodel
vocab_size: 50257
hidden: 768
layers: 12
heads: 12
ffn_hidden: 3072
max_seq_len: 1024
seq_len: 1024
batch_size: 4
"""


def run_cli(
    *flags: str, overrides: Sequence[str] = (), entry: Callable[[], object] | None = None
) -> tuple[int, str]:
    """`memexp *flags *overrides` in this process: its exit status and what it printed.

    `entry` is the console script's `cli` unless given (`main`: Hydra's app alone). Hydra's
    logging stays off; the overrides come last, together, as argparse wants them.
    """
    from memexp.__main__ import cli

    main = entry or cli
    argv = sys.argv
    sys.argv = ["memexp", *flags, *overrides, *QUIET_HYDRA]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main()
    except SystemExit as exit_:
        return int(exit_.code or 0), out.getvalue()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return 0, out.getvalue()


def help_of(*flags: str, overrides: Sequence[str] = ()) -> str:
    status, text = run_cli("--help", *flags, overrides=overrides)
    assert status == 0, text
    return text


def option_line(text: str, group: str, option: str) -> str:
    """The help's line for `group=option` (its mark, name and description)."""
    listing = text.split(f"\n{group}:\n", 1)[1].split("\n\n", 1)[0]
    [line] = [line for line in listing.splitlines() if re.match(rf"^  [* ] {option}\b", line)]
    return line


def presets(group: str) -> list[Path]:
    return sorted((CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def default_help() -> str:
    return help_of()


def test_help_names_memexp_and_hides_hydra_and_schemas(default_help: str) -> None:
    text = default_help
    assert text.startswith("memexp: what training a transformer costs")
    assert "__main__" not in text
    assert "powered by Hydra" not in text
    assert "schema" not in text
    assert "memexp --hydra-help" in text


@pytest.mark.slow
def test_help_is_the_text_hydras_own_help_builder_prints(tmp_path: Path) -> None:
    from memexp.__main__ import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mymodel.yaml").write_text(USER_PRESET)
    command = ("--help", "--config-dir", str(tmp_path))
    overrides = ["model=mymodel", "strategy=sqrt"]
    fast = run_cli(*command, overrides=overrides)
    assert fast == run_cli(*command, overrides=overrides, entry=main)
    assert "  * mymodel " in fast[1]


def test_a_command_line_that_does_not_compose_is_left_to_hydra() -> None:
    assert app_help(["--help", "model=nosuchmodel"], CONF_DIR, "config") is None
    assert app_help(["model=tiny"], CONF_DIR, "config") is None  # no --help: a job
    assert app_help(["--hydra-help"], CONF_DIR, "config") is None


@pytest.mark.parametrize("group", APP_GROUPS)
def test_help_lists_every_preset_with_its_first_comment_line(group: str, default_help: str) -> None:
    for preset in presets(group):
        description = leading_comment(preset.read_text())[0]
        assert description, f"{preset} starts with no description"
        assert option_line(default_help, group, preset.stem)[4:].split(maxsplit=1)[1] == description


@pytest.mark.slow
def test_help_marks_the_command_lines_choices() -> None:
    text = help_of(overrides=["model=tiny", "strategy=sqrt"])
    assert option_line(text, "model", "tiny").startswith("  * tiny")
    assert option_line(text, "model", "small").startswith("    small")
    assert option_line(text, "strategy", "sqrt").startswith("  * sqrt")
    assert "  name: tiny\n" in text  # the composed config below the listing


def test_help_explains_every_strategy_with_its_whole_comment(default_help: str) -> None:
    section = default_help.split("== Strategies: what each recomputes ==")[1].split("== Config ==")[
        0
    ]
    for preset in presets("strategy"):
        comment = "\n".join(f"    {line}".rstrip() for line in leading_comment(preset.read_text()))
        assert f"{preset.stem}:\n{comment}\n" in section


def test_a_schema_is_not_an_option(compose_cfg: ComposeFn) -> None:
    with pytest.raises(MissingConfigException, match="Could not find 'model/schema'"):
        compose_cfg("model=schema")


@pytest.mark.slow
def test_a_users_own_preset_dir_adds_options_that_extend_the_schema(tmp_path: Path) -> None:
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "mymodel.yaml").write_text(USER_PRESET)
    conf = str(tmp_path / "conf")
    text = help_of("--config-dir", conf, overrides=["model=mymodel"])
    line = option_line(text, "model", "mymodel")
    # Marked as chosen; the description starts where the group's longest name leaves room.
    assert re.fullmatch(r"  \* mymodel +My GPT-2-small-like model, from my own project\.", line)
    assert option_line(text, "model", "tiny").startswith("    tiny")  # the package's presets stay
    status, config = run_cli("--config-dir", conf, "--cfg", "job", overrides=["model=mymodel"])
    assert status == 0, config
    assert "  name: mymodel\n  vocab_size: 50257\n" in config
    assert "  attention: naive\n" in config  # the schema's default: the preset extends it
    status, error = run_cli(
        "--config-dir", conf, "--cfg", "job", overrides=["model=mymodel", "model.hidden=wide"]
    )
    assert status == 1  # the schema checks the preset's types
    assert "model.hidden" in error


@pytest.mark.slow
def test_registering_the_schemas_does_not_import_torch() -> None:
    """`--help` and `--cfg` compose with the schemas only; torch is for the jobs (seconds to load)."""
    probe = (
        "import sys, memexp.configure, memexp.__main__; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert shown.strip() == "[]"
