"""``finish_distributed_process``: how a finished multi-process run ends (the entry points call it after ``train()``).

Two ranks under ``torchrun`` (gloo): both exit with code 0, Python's exit handlers ran, buffered output reached the
pipe, and nothing after the call ran (the process left through ``os._exit``). One rank in this process: the group is
destroyed and the call returns.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch.distributed as dist

from llava.train.distributed import finish_distributed_process

REPO = Path(__file__).resolve().parents[2]

RANK_SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    import torch.distributed as dist
    from llava.train.distributed import finish_distributed_process

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    atexit.register(lambda: open(os.path.join(out, f"atexit{rank}"), "w").close())
    sys.stdout.write(f"buffered line of rank {rank}\\n")  # a pipe: block-buffered until flushed
    finish_distributed_process()
    open(os.path.join(out, f"after{rank}"), "w").close()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_exit_zero_after_exit_handlers(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"buffered line of rank {rank}" in proc.stdout, proc.stdout
        assert (tmp_path / f"atexit{rank}").exists()
        assert not (tmp_path / f"after{rank}").exists()


def test_one_rank_group_is_destroyed_and_the_call_returns(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    finish_distributed_process()
    assert not dist.is_initialized()
    finish_distributed_process()  # no group: nothing to do
