"""`memexp --help`: every config group with its options, each described by its own YAML.

An option's YAML describes itself in its leading comment: the first line is the one-line
description the group listing shows, the whole comment is what the strategy section shows.
Options come from Hydra's config search path, so a user's own presets (`--config-dir`) are
listed too; the schemas the presets extend live in `SCHEMA_GROUP`, which is never listed.
The help template (`memexp/conf/hydra/help/memexp.yaml`) calls the resolvers registered here.

`app_help` answers `--help` before Hydra's own app is built: Hydra's help builder lists every
group of the search path for `$APP_CONFIG_GROUPS` and `$HYDRA_CONFIG_GROUPS` whether the template
uses them or not, deep-copying the config store once per option (seconds); memexp's template uses
neither, so they are never built.
"""

from __future__ import annotations

import copy
import os
import string
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path, get_args_parser
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

# What memexp's help template may fill in (Hydra's `$FLAGS_HELP` and `$CONFIG`); a template that
# asks for more (Hydra's group listings) is left to Hydra's own help builder.
CHEAP_TEMPLATE_FIELDS = frozenset({"FLAGS_HELP", "CONFIG"})
# The ConfigStore group of the structured schemas (`schema/model`, `schema/strategy/sqrt`, ...).
SCHEMA_GROUP = "schema"
# Hydra's own groups stay in `--hydra-help`, except the one that says how jobs run.
LISTED_HYDRA_GROUPS = ("hydra/launcher",)
STRATEGY_GROUP = "strategy"


def leading_comment(text: str) -> list[str]:
    """The comment lines a YAML file starts with, less `# ` (indents kept) and `# @package` headers."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @"):
            lines.append(line.removeprefix("#").removeprefix(" ").rstrip())
    return lines


def _option_text(group: str, option: str) -> str | None:
    """The option's YAML as the first config source on Hydra's search path that holds it has it.

    None for an option stored in Hydra's ConfigStore (a Python object, no text).
    """
    path = f"{group}/{option}.yaml"
    for source in GlobalHydra.instance().config_loader().get_sources():
        if not source.is_config(path):
            continue
        if source.scheme() == "file":
            return (Path(source.path) / path).read_text()
        if source.scheme() == "pkg":
            return resources.files(source.path).joinpath(path).read_text()
        return None
    return None


def option_comment(group: str, option: str) -> list[str]:
    text = _option_text(group, option)
    return leading_comment(text) if text is not None else []


def listed_groups() -> list[str]:
    """The app's groups (the schema group left out), then the Hydra groups worth choosing."""
    loader = GlobalHydra.instance().config_loader()
    own = [g for g in loader.list_groups("") if g not in ("hydra", SCHEMA_GROUP)]
    return [*sorted(own), *LISTED_HYDRA_GROUPS]


def _chosen(group: str) -> str | None:
    """The option this command line composes (Hydra's `runtime.choices`), marked in the listing."""
    return HydraConfig.get().runtime.choices.get(group)


def format_groups() -> str:
    """Each group, then one line per option: a `*` on the chosen one, and its description."""
    loader = GlobalHydra.instance().config_loader()
    blocks = []
    for group in listed_groups():
        options = sorted(loader.get_group_options(group))
        width = max(map(len, options), default=0)
        chosen = _chosen(group)
        lines = [f"{group}:"]
        for option in options:
            mark = "*" if option == chosen else " "
            description = next(iter(option_comment(group, option)), "")
            lines.append(f"  {mark} {option:<{width}}  {description}".rstrip())
        blocks.append("\n".join(lines))
    return _template_safe("\n\n".join(blocks))


def format_strategies() -> str:
    """Every strategy with its whole comment: what it recomputes, and its settings."""
    loader = GlobalHydra.instance().config_loader()
    blocks = []
    for option in sorted(loader.get_group_options(STRATEGY_GROUP)):
        comment = option_comment(STRATEGY_GROUP, option)
        blocks.append("\n".join([f"{option}:", *(f"    {line}" for line in comment)]))
    return _template_safe("\n".join(blocks))


def _template_safe(text: str) -> str:
    """Hydra fills `$CONFIG` into the resolved template with `string.Template`: `$` must double."""
    return text.replace("$", "$$")


def register_resolvers() -> None:
    """`${memexp_help_groups:}` and `${memexp_help_strategies:}`, used by the help template."""
    OmegaConf.register_new_resolver("memexp_help_groups", format_groups, replace=True)
    OmegaConf.register_new_resolver("memexp_help_strategies", format_strategies, replace=True)


def app_help(argv: Sequence[str], conf_dir: Path, config_name: str) -> str | None:
    """The text `memexp --help` prints, as Hydra's `app_help` renders it, for the command line
    `argv`; None where Hydra must answer itself (no `--help`, `--hydra-help`, a template that
    lists Hydra's groups, a command line that does not compose: Hydra reports its error)."""
    parser = get_args_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit:  # argparse's own error: Hydra says it again, with its usage
        return None
    if not args.help or args.hydra_help:
        return None
    search_path = create_config_search_path(f"file://{conf_dir}")
    if args.config_dir is not None:
        search_path.prepend(
            provider="command-line",
            path=f"file://{os.path.abspath(args.config_dir)}",
            anchor=SearchPathQuery(provider="schema"),
        )
    try:
        hydra = Hydra.create_main_hydra2(task_name="memexp", config_search_path=search_path)
        cfg = hydra.compose_config(
            config_name=args.config_name or config_name,
            overrides=args.overrides,
            run_mode=RunMode.RUN,
            with_log_configuration=False,
        )
    except Exception:
        GlobalHydra.instance().clear()
        return None
    HydraConfig.instance().set_config(cfg)  # the listing marks this command line's choices
    template = string.Template(cfg.hydra.help.template)
    if not set(template.get_identifiers()) <= CHEAP_TEMPLATE_FIELDS:
        GlobalHydra.instance().clear()
        return None
    job_cfg = copy.deepcopy(cfg)
    with open_dict(job_cfg):
        del job_cfg["hydra"]
    return template.substitute(
        FLAGS_HELP=hydra.format_args_help(parser),
        CONFIG=OmegaConf.to_yaml(job_cfg, resolve=args.resolve),
    )
