"""What every command shares: one duration grammar, and library errors named by their flag."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from planner.cli import app
from planner.cli._common import fail_error, flag_for, parse_duration
from planner.search.candidate import RecommendError
from planner.spec.errors import FieldError


@pytest.mark.parametrize("text, seconds", [
    ("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("0.5m", 30), ("500ms", 0.5),
    ("1.5h", 5400), (" 3 s ", 3), (".5s", 0.5), ("1m30s", 90), ("2h15m10s", 8110)])
def test_one_grammar_reads_every_duration_the_commands_take(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "0s", "m", "ms", "-5s", "30m1h", "1m1m",
                                  "1h 30"])
def test_unreadable_durations_name_the_field(text):
    with pytest.raises(FieldError, match="duration: ") as err:
        parse_duration(text, "duration")
    assert err.value.field == "duration"


def test_zero_is_a_duration_only_where_asked():
    assert parse_duration("0", allow_zero=True) == 0.0
    with pytest.raises(FieldError, match="must be positive"):
        parse_duration("0")


def test_a_library_field_is_named_by_its_flag(capsys):
    assert flag_for("max_devices") == "--max-devices"
    assert flag_for("host_speed") == "--host-speed"
    err = RecommendError("must be >= 1, got 0", field="max_devices")
    assert str(err) == "max_devices: must be >= 1, got 0"  # the library names the field
    with pytest.raises(typer.Exit) as stop:
        fail_error(err)
    assert stop.value.exit_code == 2
    assert "--max-devices: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(typer.Exit):
        fail_error(ValueError("plain message"))
    assert "plain message" in capsys.readouterr().err


@pytest.mark.parametrize("args, flag", [(["bench", "serve", "--rate", "2", "--duration", "soon"], "--duration"),
                                        (["bench", "fit", "--budget", "soon"], "--budget")])
def test_a_bad_duration_is_named_by_its_flag_once(args, flag, tmp_path):
    result = CliRunner().invoke(app, [*args, *(["--workdir", str(tmp_path)] if "fit" in args else [])])
    assert result.exit_code == 2
    assert f"error: {flag}: cannot read 'soon'" in " ".join(result.output.split()), result.output
