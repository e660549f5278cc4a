"""Scenario keys added for issue G §4: bad values are configuration errors that say what
is allowed."""

from __future__ import annotations

from pathlib import Path

import attrs
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


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("machine.swappiness", 300, "'swappiness' must be <= 200: 300"),
        ("machine.min_free_kbytes", -1, "'min_free_kbytes' must be >= 0: -1"),
        ("machine.bio_cache", "slab", "'bio_cache' must be in ('page', 'kernel') (got 'slab')"),
        ("machine.swap_readahead", "ahead", "'swap_readahead' must be in ('cluster', 'vma')"),
        ("machine.page_cluster", 11, "'page_cluster' must be <= 10: 11"),
        ("machine.readahead_pages", 0, "readahead_pages must be >= 1, got 0"),
        ("machine.max_io_pages", 300, "machine.max_io_pages 300: must be 1..256"),
    ],
)
def test_a_bad_machine_value_is_checked_once_by_the_memory_model(
    key: str, value: object, needle: str
) -> None:
    """``[machine]`` is the memory model's configuration under the scenario's names: its
    values are checked by ``MemoryConfig``'s validators, and a bad one is one line naming
    the key and the value."""
    with pytest.raises(ConfigError) as caught:
        load_scenario(SCENARIO, {key: value})
    message = str(caught.value)
    assert needle in message and "\n" not in message, message


def test_the_memory_model_gets_every_machine_key_it_has() -> None:
    machine = load_scenario(
        SCENARIO, {"machine.swappiness": 100, "machine.bio_cache": "page", "machine.memory": "32M"}
    ).machine
    config = machine.memory_config()
    assert (config.total_bytes, config.swappiness, config.bio_cache) == (32 << 20, 100, "page")
    shared = set(attrs.fields_dict(type(config))) & set(attrs.fields_dict(type(machine)))
    assert shared and all(getattr(config, k) == getattr(machine, k) for k in shared)
