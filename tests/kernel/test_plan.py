"""A scenario as the guest runs it: what maps to what, and what is refused by name."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from nbdproto.config import ConfigError
from testbed.config import load_scenario
from testbed.kernel.guest import INIT_SCRIPT
from testbed.kernel.image import missing_host_tools
from testbed.kernel.plan import guest_settings, memory_mib
from tests.processes import Cli


def scenario(**overrides: object):  # type: ignore[no-untyped-def]
    base: dict[str, object] = {"machine.memory": "96M"}
    base.update(overrides)
    return load_scenario("configs/kernel-calibration.toml", base)


def test_the_calibration_scenario_maps_onto_the_guest() -> None:
    s = guest_settings(scenario(**{"machine.swappiness": 100, "machine.min_free_kbytes": 2048}))
    conf = s.conf()
    assert "SWAPPINESS=100\n" in conf
    assert "MIN_FREE_KBYTES=2048\n" in conf
    assert "PAGE_CLUSTER=3\n" in conf
    assert "MAX_SECTORS_KB=128\n" in conf  # max_io_pages 32 x 4 KiB
    assert "VMA_RA=false\n" in conf and "ROTATIONAL=1\n" in conf  # readahead by slot
    # Two processes share 1.5 x 96 MiB, in whole 64 KiB blocks.
    assert s.workloads == (("hog", 2, 18432, 1, 0.0),)
    assert s.pages_written == 36864
    assert s.workload_lines() == "hog 2 18432 1 0\n"
    # The kernel's own min_free_kbytes unless the scenario sets one.
    assert "MIN_FREE_KBYTES=''\n" in guest_settings(scenario()).conf()
    assert memory_mib(scenario()) == 96


def test_the_net_tables_sysctls_reach_the_guest() -> None:
    """[net]'s tcp_mem, tcp_wmem and tcp_rmem are net.ipv4's: the guest is given them, or
    keeps its kernel's own (tcp_init's) when the scenario leaves them out."""
    conf = guest_settings(
        scenario(**{"net.tcp_mem": [100, 200, 300], "net.tcp_wmem": ["4K", "16K", "1M"]})
    ).conf()
    assert "TCP_MEM='100 200 300'\n" in conf
    assert "TCP_WMEM='4096 16384 1048576'\n" in conf
    assert "TCP_RMEM=''\n" in conf


def test_vma_readahead_needs_a_non_rotational_device() -> None:
    conf = guest_settings(scenario(**{"machine.swap_readahead": "vma"})).conf()
    assert "VMA_RA=true\n" in conf and "ROTATIONAL=0\n" in conf


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("swap.sndbuf", "4M", "swap.sndbuf"),
        ("swap.latency", 0.002, "swap.latency"),
        ("machine.bio_pool_size", 4, "machine.bio_pool_size"),
        ("machine.zones", [["DMA32", 0.5], ["Normal", 0.5]], "machine.zones"),
        ("faults.latency_ms", 5, "faults.latency_ms"),
        ("workloads.0.rate", 100.0, "workloads.0.rate"),
    ],
)
def test_what_the_guest_cannot_do_is_refused_by_name(key: str, value: object, named: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(named)):
        guest_settings(scenario(**{key: value}))


def test_noise_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^noise"):
        guest_settings(
            load_scenario(
                "configs/swap-over-nbd.toml",
                {"swap.sndbuf": "auto", "swap.rcvbuf": "auto", "swap.latency": 0.0},
            )
        )
    with pytest.raises(ConfigError, match="the kernel lab cannot set it"):
        guest_settings(load_scenario("configs/swap-over-nbd.toml"))


def test_file_readers_are_refused(tmp_path: Path) -> None:
    toml = tmp_path / "readers.toml"
    toml.write_text('[machine]\nmemory = "96M"\n[[workloads]]\nkind = "file_reader"\n')
    with pytest.raises(ConfigError, match=r"^workloads\.0\.kind 'file_reader'"):
        guest_settings(load_scenario(toml))


def test_a_guest_needs_64_mib() -> None:
    with pytest.raises(ConfigError, match=r"machine\.memory"):
        memory_mib(scenario(**{"machine.memory": "32M"}))


def test_the_init_script_reports_what_the_host_reads() -> None:
    """The records parse.py and run.py read are the ones /init writes."""
    for record in (
        "say modules",
        "say swapon",
        "say started",
        "say written",
        "say verified",
        "say done",
        "say end",
        "say error",
        'print "F "',
        "F tcpext",
    ):
        assert record in INIT_SCRIPT, record


def test_a_missing_host_tool_is_one_line_naming_its_package(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu, no busybox, no nbd-client
    done = cli("kernel", "run", "--memory", "96M")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "is not installed (Debian package: " in done.stderr


def test_an_unreachable_server_is_one_line_before_anything_boots(cli: Cli) -> None:
    if missing_host_tools():
        pytest.skip("the host tools are missing; the missing-tool test covers that")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = cli("kernel", "run", "--server", f"nbd://127.0.0.1:{port}/swap")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("netswap: cannot reach the NBD server at 127.0.0.1:")
    assert done.stderr.count("\n") == 1
    refused = cli("kernel", "run", "--server", "nbd://192.0.2.1:10809/swap")
    assert refused.returncode == 2 and "is not loopback" in refused.stderr
