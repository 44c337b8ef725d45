"""`jtrail serve`'s async-scheduling switch: on by default (the engine's default), off with
--no-async-scheduling, and the flag reaches the EngineConfig the server (model or --mock) runs."""

from __future__ import annotations

import pytest
from jtrail.serving.engine.llm_engine import EngineConfig

from jtrail.cli import build_parser
from jtrail.serve import engine_config


@pytest.mark.parametrize(("flags", "want"), [([], True), (["--no-async-scheduling"], False),
                                             (["--async-scheduling"], True)])
def test_serve_flag_sets_engine_async_scheduling(flags: list[str], want: bool) -> None:
    args = build_parser().parse_args(["serve", "--mock", *flags])
    assert args.async_scheduling is want
    assert engine_config(args).async_scheduling is want


def test_engine_default_is_async() -> None:
    assert EngineConfig().async_scheduling is True


@pytest.mark.parametrize("mode", ["recompute", "swap", "keep"])
def test_serve_preemption_mode_reaches_the_engine(mode: str) -> None:
    args = build_parser().parse_args(["serve", "--mock", "--preemption-mode", mode])
    assert engine_config(args).preemption_mode == mode
    assert build_parser().parse_args(["serve", "--mock"]).preemption_mode == EngineConfig().preemption_mode


def test_serve_refuses_an_unknown_preemption_mode(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--mock", "--preemption-mode", "drop"])
    assert "--preemption-mode" in capsys.readouterr().err
