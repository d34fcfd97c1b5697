"""nemo_lpo.bridge.cpu_compat: per patch, the Megatron-Bridge call that fails on CPU without it and works with it.

Marker ``bridge``: ``make test`` runs it in .venv-bridge. One process, a one-rank gloo group (nemo-lpo's
``initialize_parallel``). Each test first calls the Bridge code with the real ``torch`` (CUDA-only: it raises),
then applies the layer. Executed on CPU only; on a GPU ``apply_bridge_cpu_compat`` is a no-op (checked below).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import bridge_te_shim

bridge_te_shim.install()
from megatron.bridge.data import loaders  # noqa: E402
from megatron.bridge.training import checkpointing  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402

from nemo_lpo.bridge.cpu_compat import PATCHES, apply_bridge_cpu_compat  # noqa: E402
from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel  # noqa: E402

pytestmark = [pytest.mark.bridge,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is a no-op where CUDA exists")]


@pytest.fixture(scope="module")
def one_rank():
    initialize_parallel(backend="gloo")
    yield ProcessGroupCollection.use_mpu_process_groups()
    destroy_parallel()


def test_read_metadata_all_reduces_the_iteration(one_rank, tmp_path):
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text("2")
    checkpointing.torch = torch
    with pytest.raises((RuntimeError, AssertionError)):
        checkpointing.read_metadata(str(tracker))
    PATCHES["checkpoint_cuda_state"]()
    assert checkpointing.read_metadata(str(tracker)) == (2, False)


def test_rng_state_is_saved_from_the_cpu_generator(one_rank):
    checkpointing.torch = torch
    with pytest.raises((RuntimeError, AssertionError)):
        checkpointing.get_rng_state(False, "torch_dist", pg_collection=one_rank)
    PATCHES["checkpoint_cuda_state"]()
    sharded = checkpointing.get_rng_state(False, "torch_dist", pg_collection=one_rank)
    state = sharded.data[0]
    assert torch.equal(state["cuda_rng_state"], torch.get_rng_state())
    assert state["rng_tracker_states"].keys() == tensor_parallel.get_cuda_rng_tracker().get_states().keys()


def test_loader_flags_go_to_the_cpu(one_rank):
    loaders.torch = torch
    with pytest.raises((RuntimeError, AssertionError)):
        loaders.torch.tensor([1, 0, 0], dtype=torch.long, device="cuda")
    PATCHES["loader_flags"]()
    flags = loaders.torch.tensor([1, 0, 0], dtype=torch.long, device="cuda")  # what the loaders broadcast
    torch.distributed.broadcast(flags, 0)
    assert flags.device.type == "cpu" and flags.tolist() == [1, 0, 0]
    assert loaders.torch.float32 is torch.float32  # everything else is torch itself


def test_ddp_wrapping_builds_under_a_host_stream(one_rank):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.training.models import dist_utils

    from nemo_lpo.bridge.provider import lpo_model_provider

    model = [lpo_model_provider("tiny-mixtral", seq_length=64).provide(pre_process=True, post_process=True)]
    dist_utils.torch = torch
    with pytest.raises((RuntimeError, AssertionError)):
        dist_utils._ddp_wrap(model, False, DistributedDataParallelConfig(), False, pg_collection=one_rank)
    PATCHES["ddp_init_stream"]()
    wrapped = dist_utils._ddp_wrap(model, False, DistributedDataParallelConfig(), False, pg_collection=one_rank)
    assert isinstance(wrapped[0], DistributedDataParallel) and wrapped[0].module is model[0]


def test_training_log_sums_losses_on_the_cpu(one_rank):
    from megatron.bridge.training.utils import train_utils

    train_utils.torch = torch
    with pytest.raises((RuntimeError, AssertionError)):  # the start value training_log adds each step's loss to
        train_utils.torch.tensor([0.0], dtype=torch.float, device="cuda")
    PATCHES["train_log_accumulators"]()
    total = train_utils.torch.tensor([0.0], dtype=torch.float, device="cuda") + torch.tensor([1.5])
    assert total.device.type == "cpu" and total.item() == 1.5
    assert train_utils.torch.float32 is torch.float32


def test_apply_is_idempotent_and_active_without_cuda(one_rank):
    assert apply_bridge_cpu_compat() is True and apply_bridge_cpu_compat() is True
    assert isinstance(checkpointing.torch.cuda.get_rng_state(), torch.Tensor)
