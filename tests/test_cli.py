"""CLI conventions: `moderator run`'s flags generated from WorkerSettings (every field, its
variable in the help, flag beats variable, one validation), exit codes, `--json`."""

from __future__ import annotations

import argparse
import json

import pytest

from moderator.cli import build_parser, main
from moderator.config import WorkerSettings
from moderator.settings_cli import flag_of, settings_from


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return sub.choices["run"]


def _run_settings(argv: list[str]) -> WorkerSettings:
    a = build_parser().parse_args(["run", *argv])
    return settings_from(a.settings_source, a)


def test_every_setting_is_a_run_flag_with_its_variable_in_the_help():
    parser = _run_parser()
    options = {s for action in parser._actions for s in action.option_strings}  # noqa: SLF001
    help_text = " ".join(parser.format_help().split())
    for name, field in WorkerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in options, flag
        if field.annotation is bool:
            assert f"--no-{name.replace('_', '-')}" in options and flag_of(name) == f"--[no-]{flag[2:]}"
        assert f"MODERATOR_{name.upper()}" in help_text, name
    # no hand-mapped flags beside the generated ones
    assert not {"--model", "--bootstrap-servers", "--group"} & options


def test_flags_beat_the_environment_and_share_its_validation(monkeypatch):
    monkeypatch.setenv("MODERATOR_MAX_BATCH", "7")
    monkeypatch.setenv("MODERATOR_INPUT_TOPIC", "from-env")
    s = _run_settings(["--max-batch", "16", "--model-dir", "/models/x", "--no-jpeg-draft",
                       "--fetch-allow-hosts", "a.example,b.example", "--processing-guarantee", "exactly_once"])
    assert (s.max_batch, str(s.model_dir), s.jpeg_draft) == (16, "/models/x", False)
    assert s.fetch_allow_hosts == ["a.example", "b.example"] and s.processing_guarantee == "exactly_once"
    assert s.input_topic == "from-env"  # no flag: the variable
    monkeypatch.delenv("MODERATOR_MAX_BATCH")
    assert _run_settings([]).max_batch == WorkerSettings.model_fields["max_batch"].default


@pytest.mark.parametrize("argv", [["--max-batch", "0"], ["--processing-guarantee", "twice"],
                                  ["--max-batch", "many"]])
def test_an_invalid_flag_is_a_usage_error_before_anything_starts(argv, capsys):
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moderator run: invalid settings") and "Traceback" not in err


def test_a_secret_given_as_a_flag_is_never_echoed(capsys):
    assert main(["run", "--kafka-sasl-password", "hunter2-very-secret", "--kafka-security-protocol", "NOPE"]) == 2
    err = capsys.readouterr().err
    assert "kafka_security_protocol" in err and "hunter2-very-secret" not in err


def test_unknown_flag_is_argparse_usage_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-such-setting", "1"])
    assert e.value.code == 2


def test_docs_reference_lists_each_flag():
    from moderator.docs import config_reference

    table = config_reference()
    for name in WorkerSettings.model_fields:
        assert f"`MODERATOR_{name.upper()}` | `{flag_of(name)}` |" in table, name


def test_json_output_of_synth(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--train", "3", "--heldout", "2", "--size", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["splits"]["train"]["images"] == 3 and out["splits"]["heldout"]["images"] == 2
    assert (tmp_path / "train.jsonl").is_file()


def test_usage_errors_are_caught_before_any_connection(capsys, monkeypatch):
    # nothing listens here: reaching the access check would take its 30 s timeout and exit 3
    monkeypatch.setenv("MODERATOR_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    assert main(["produce", "--topic", "t", "--synthetic", "1", "--envelopes", "json,nope"]) == 2
    assert "unknown 'nope'" in capsys.readouterr().err
    # the load generator is the Kafka latency phase's: asked for anywhere else, say so at once
    for extra in ([], ["--latency", "--source", "memory"], ["--latency", "--processes", "2"]):
        assert main(["bench-worker", "--model", "m", "--policy", "p", "--load-generator", "librdkafka",
                     *extra]) == 2, extra
        assert "needs --latency --source kafka" in capsys.readouterr().err
    monkeypatch.setenv("MODERATOR_LOG_FORMAT", "JSON")
    assert main(["docs", "metrics"]) == 2
    assert "must be text or json" in capsys.readouterr().err


def test_bench_worker_offers_every_envelope_produce_writes():
    from moderator.cli import BENCH_ENVELOPES, LOAD_GENERATORS, build_parser
    from moderator.produce import CLIENTS, ENVELOPES

    assert BENCH_ENVELOPES == ENVELOPES and LOAD_GENERATORS == CLIENTS
    args = build_parser().parse_args(["bench-worker", "--model", "m", "--policy", "p", "--envelope", ENVELOPES[-1]])
    assert args.envelope == ENVELOPES[-1]
