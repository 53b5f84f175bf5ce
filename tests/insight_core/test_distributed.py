"""``insight_core.distributed``: no-ops in a single process; collectives on a one-rank gloo group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from insight_core import distributed
from insight_core.distributed import DistInfo
from insight_core.errors import ConfigError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()


@pytest.mark.usefixtures("no_torchrun")
def test_single_process_helpers_are_no_ops() -> None:
    first = distributed.init_from_env("cpu")
    second = distributed.init_from_env("auto")  # safe to call twice
    assert first == second == DistInfo(rank=0, world_size=1, local_rank=0)
    assert not first.is_distributed
    assert first.is_main
    assert not distributed.is_initialized()
    assert distributed.current() == DistInfo()
    assert distributed.is_main()
    x = torch.tensor([1.0, -2.0, 3.0])
    assert distributed.all_reduce_(x, "sum") is x
    assert distributed.all_reduce_(x, "max") is x
    assert distributed.broadcast_(x, src=0) is x
    assert torch.equal(x, torch.tensor([1.0, -2.0, 3.0]))
    assert distributed.broadcast_flag(True) is True
    assert distributed.broadcast_flag(False) is False
    distributed.barrier()
    distributed.cleanup()
    assert not dist.is_initialized()


def test_world_size_one_from_torchrun_does_not_init(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.init_from_env("cpu") == DistInfo()
    assert not dist.is_initialized()


def test_env_info_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = distributed.env_info()
    assert info == DistInfo(rank=3, world_size=4, local_rank=1)
    assert info.is_distributed
    assert not info.is_main


@pytest.mark.parametrize(("rank", "world"), [("2", "2"), ("x", "2"), ("0", "0")])
def test_inconsistent_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch, rank, world) -> None:
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(ConfigError, match=r"RANK|WORLD_SIZE"):
        distributed.env_info()


def test_local_device_is_cuda_local_rank_only_when_distributed() -> None:
    single, second = DistInfo(), DistInfo(rank=1, world_size=2, local_rank=1)
    assert distributed.local_device_name("auto", single) == "auto"
    assert distributed.local_device_name("cuda:1", single) == "cuda:1"
    assert distributed.local_device_name("cpu", second) == "cpu"
    assert distributed.local_device_name("cuda", second) == "cuda:1"
    assert distributed.local_device(torch.device("cuda", 0), second) == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cpu"), second) == torch.device("cpu")
    assert distributed.local_device(torch.device("cuda", 0), single) == torch.device("cuda", 0)


@pytest.mark.usefixtures("no_torchrun")
def test_collectives_on_a_one_rank_gloo_group() -> None:
    """The real (non no-op) code paths, on a process group of one."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert distributed.is_initialized()
        assert distributed.current() == DistInfo(rank=0, world_size=1, local_rank=0)
        x = torch.tensor([1.0, -2.0, 3.0])
        for op in ("sum", "max", "min", dist.ReduceOp.SUM):
            assert torch.equal(distributed.all_reduce_(x, op), torch.tensor([1.0, -2.0, 3.0]))
        assert distributed.broadcast_flag(True)
        assert torch.equal(distributed.broadcast_(torch.arange(3)), torch.arange(3))
        distributed.barrier()
    finally:
        distributed.cleanup()
    assert not dist.is_initialized()


@pytest.mark.usefixtures("no_torchrun")
def test_job_group_leaves_a_callers_group_up_and_stays_up_on_error() -> None:
    with distributed.job_group("cpu") as info:  # single process: nothing to join or leave
        assert info == DistInfo()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with distributed.job_group("cpu"):  # e.g. extract called by build, which owns the group
            pass
        assert dist.is_initialized()
    finally:
        distributed.cleanup()


def test_job_group_leaves_the_group_it_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    joined: list[str] = []
    monkeypatch.setattr(
        distributed, "init_from_env", lambda device, timeout: joined.append("init") or DistInfo()
    )
    monkeypatch.setattr(distributed, "is_initialized", lambda: bool(joined) and joined[-1] == "init")
    monkeypatch.setattr(distributed, "cleanup", lambda: joined.append("cleanup"))
    with distributed.job_group("cpu"):
        assert joined == ["init"]
    assert joined == ["init", "cleanup"]
    joined.clear()
    with pytest.raises(RuntimeError), distributed.job_group("cpu"):
        raise RuntimeError("a rank failed")
    assert joined == ["init"]  # no barrier that could wait forever on a dead peer
