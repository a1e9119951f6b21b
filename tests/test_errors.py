"""aligndistil.errors: one base class; the CLI maps errors to exit codes without importing the world."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aligndistil.errors import EXIT_DIVERGED, EXIT_USAGE, AlignDistilError


def _error_classes():
    from aligndistil.config import ConfigError
    from aligndistil.data import DataError
    from aligndistil.data.prompt_sets import PromptFileError
    from aligndistil.model.loading import ModelLoadError
    from aligndistil.rewards import RewardError
    from aligndistil.train.loop import TrainingError
    from aligndistil.train.teacher_cache import TeacherCacheError
    from aligndistil.workflows.evaluate import EvalError
    from aligndistil.workflows.make_prefs import PrefsError

    return [ConfigError, DataError, PromptFileError, ModelLoadError, RewardError, TrainingError,
            TeacherCacheError, EvalError, PrefsError]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_kind_has_the_one_base(cls):
    assert issubclass(cls, AlignDistilError)
    expected = EXIT_DIVERGED if cls.__name__ == "TrainingError" else EXIT_USAGE
    assert cls.exit_code == expected


def test_the_cli_maps_an_error_by_its_own_exit_code_and_label(monkeypatch, capsys):
    from aligndistil import cli
    from aligndistil.train.loop import TrainingError

    def boom(*a, **k):
        raise TrainingError("non-finite loss at step 7")

    monkeypatch.setattr("aligndistil.config.help_text", boom)
    assert cli.main(["config-help"]) == 3
    assert capsys.readouterr().err.strip() == "aligndistil: training stopped: non-finite loss at step 7"


def test_importing_the_cli_loads_neither_torch_nor_the_workflows():
    code = ("import sys, aligndistil.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'aligndistil.workflows.evaluate', 'aligndistil.train.loop') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
