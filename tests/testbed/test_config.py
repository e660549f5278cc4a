"""Scenario keys added for issue G §4: bad values are configuration errors that say what
is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdproto.config import ConfigError
from testbed.config import load_scenario

SCENARIO = Path(__file__).resolve().parents[2] / "configs" / "swap-over-nbd.toml"


def test_the_defaults_are_zijlstras_tx_rule_and_todays_nbd_context() -> None:
    scenario = load_scenario(SCENARIO)
    assert scenario.reserve.tx_accounting == "posted"
    assert scenario.swap.nbd == "2.6.18"
    chosen = load_scenario(SCENARIO, {"reserve.tx_accounting": "bean-counted", "swap.nbd": "6.1"})
    assert (chosen.reserve.tx_accounting, chosen.swap.nbd) == ("bean-counted", "6.1")


def test_an_unknown_tx_accounting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"reserve.tx_accounting 'counted'.*posted, bean-counted"):
        load_scenario(SCENARIO, {"reserve.tx_accounting": "counted"})


def test_an_unknown_nbd_era_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"swap.nbd '2.6.99'.*2.6.18, 3.5, 3.6, 6.1"):
        load_scenario(SCENARIO, {"swap.nbd": "2.6.99"})
