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


def test_socket_buffers_are_autotuned_unless_a_scenario_sets_them() -> None:
    """swap.sndbuf/rcvbuf and a noise table's rcvbuf are SO_SNDBUF/SO_RCVBUF as the buffer
    sizes they set; absent or "auto", TCP autotunes them (None)."""
    plain = load_scenario(None)
    assert (plain.swap.sndbuf, plain.swap.rcvbuf) == (None, None)
    scenario = load_scenario(SCENARIO)  # the kernel's defaults, but the fileserver sets its own
    assert (scenario.swap.sndbuf, scenario.swap.rcvbuf) == (None, None)
    assert scenario.noise[0].rcvbuf == 512 << 10
    locked = load_scenario(SCENARIO, {"swap.sndbuf": "768K", "swap.rcvbuf": "1M"})
    assert (locked.swap.sndbuf, locked.swap.rcvbuf) == (768 << 10, 1 << 20)
    auto = load_scenario(SCENARIO, {"swap.sndbuf": "auto", "noise.0.rcvbuf": "AUTO"})
    assert (auto.swap.sndbuf, auto.noise[0].rcvbuf) == (None, None)
    with pytest.raises(ConfigError, match=r"'lots' is not a size.*'auto'|or 'auto'"):
        load_scenario(SCENARIO, {"swap.sndbuf": "lots"})


def test_the_net_table_takes_three_values_in_order() -> None:
    scenario = load_scenario(
        SCENARIO, {"net.tcp_mem": [750, 1000, 1500], "net.tcp_rmem": ["4K", "128K", "6M"]}
    )
    assert scenario.net.tcp_mem == (750, 1000, 1500)
    assert scenario.net.tcp_rmem == (4096, 131072, 6 << 20)
    assert scenario.net.tcp_wmem is None  # tcp_init's, from the machine's memory
    for key, value, message in [
        ("net.tcp_mem", [1, 2], r"net.tcp_mem \[1, 2\]: expected three page counts"),
        ("net.tcp_mem", [3, 2, 1], r"must be 0 < low <= pressure <= high"),
        ("net.tcp_mem", [1.5, 2, 3], r"net.tcp_mem: 1.5 is not a number of pages"),
        ("net.tcp_wmem", ["4K", "x", "4M"], r"net.tcp_wmem: 'x' is not a size"),
        ("net.tcp_rmem", ["4K", "1M", "128K"], r"must be 0 < min <= default <= max"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_scenario(SCENARIO, {key: value})


def test_an_index_into_an_array_the_scenario_lacks_is_a_one_line_error() -> None:
    """``--set noise.0.sockets=1`` on a scenario without ``[[noise]]`` names what is missing
    instead of failing inside the structuring of a table made up for it."""
    with pytest.raises(ConfigError, match=r"no 'noise' array to index \(add a \[\[noise\]\]"):
        load_scenario(None, {"noise.0.sockets": 1})
    assert load_scenario(SCENARIO, {"noise.0.sockets": 1}).noise[0].sockets == 1
