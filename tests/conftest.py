import os
import sys
from pathlib import Path

import pytest
import torch

# tests import their reference helpers (reference_losses.py) as plain modules
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def world():
    """A process group of one for the in-process engine tests, shared by the whole session.

    Once per session: DeepSpeed caches its process groups in module globals, so a group destroyed
    and created again by a later test module would leave those caches pointing at a dead group.
    Torn down, and the environment restored, at the end of the session.
    """
    saved, threads = dict(os.environ), torch.get_num_threads()
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)  # tiny matrices: more threads only wait for each other
    from mlkd_scale.engine.distributed import init_distributed

    info = init_distributed()
    yield info
    import deepspeed.comm.comm as ds_comm

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    ds_comm.cdb = None
    os.environ.clear()
    os.environ.update(saved)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny teacher directory and a small jsonl corpus (tests/run_fixtures.py), once per module."""
    from run_fixtures import make_corpus, make_teacher

    root = tmp_path_factory.mktemp("assets")
    return make_teacher(root / "teacher"), make_corpus(root / "docs.jsonl")
