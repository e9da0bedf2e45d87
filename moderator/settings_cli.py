"""``moderator run``'s flags, generated from ``WorkerSettings`` by pydantic-settings' CLI support.

One flag per setting (``--max-batch`` for ``MODERATOR_MAX_BATCH``; booleans as
``--jpeg-draft`` / ``--no-jpeg-draft``), with the setting's description, default and
environment variable in ``--help``, so flags, environment variables and the README's
configuration reference cannot drift: all three come from the model. A flag beats the
environment variable; validation is the model's, so a bad value is the same error either way.
"""

from __future__ import annotations

import argparse

from pydantic_settings import CliSettingsSource

from moderator.config import WorkerSettings


def add_settings_flags(parser: argparse.ArgumentParser) -> CliSettingsSource:
    """Add every ``WorkerSettings`` field to ``parser`` as a flag; returns the source that
    turns the parsed namespace back into settings (``settings_from``)."""
    return CliSettingsSource(WorkerSettings, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
                             cli_show_env_vars=True, cli_hide_none_type=True, cli_avoid_json=True)


def settings_from(source: CliSettingsSource, args: argparse.Namespace) -> WorkerSettings:
    """Settings from the flags given in ``args``, then ``MODERATOR_*``, then the defaults."""
    return WorkerSettings(_cli_settings_source=source(parsed_args=args))


def flag_of(field_name: str) -> str:
    """The flag of a setting, as ``add_settings_flags`` names it (``--[no-]x`` for booleans)."""
    flag = field_name.replace("_", "-")
    return f"--[no-]{flag}" if WorkerSettings.model_fields[field_name].annotation is bool else f"--{flag}"
