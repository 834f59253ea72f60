"""Data-parallel calibration: 2 gloo ranks on CPU against one process on all the data."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import calibration_data
from safetensors.torch import load_file, save_file

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet, example_inputs
from dmq_fx.quantize.state import learned_state


def _stages():
    return [
        dmq_fx.LearnLES(iterations=5, max_samples=16),
        "observe_activations",
        "vote_pts",
        "observe_weights",
        dmq_fx.FBR(iterations=5, max_samples=16, step_lr=1e-3),
    ]


def _prepared():
    torch.manual_seed(0)
    model = build_unet(TINY_DDPM)
    a, k = example_inputs(model, batch=4)
    mapping = dmq_fx.get_default_qconfig_mapping(4, 8)
    return model, dmq_fx.prepare_fx(model, mapping, a, k, les=True, pts="skip")


def _calibrated(batches):
    model, prepared = _prepared()
    return model, dmq_fx.calibrate(prepared, batches, _stages(), progress=False)


def _rank(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_unet(TINY_DDPM)
        shard = calibration_data(model, n=4)[rank::world]  # each rank holds its own shard
        _, prepared = _calibrated(shard)
        save_file(learned_state(prepared), os.path.join(folder, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    # gradients, ranges and votes were combined: both ranks hold the same calibration
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    model = build_unet(TINY_DDPM)
    model_single, single = _calibrated(calibration_data(model, n=4))
    _, dist_graph = _prepared()  # the same graph with the ranks' calibrated state
    dmq_fx.workflow.serialization.assign_state(dist_graph, rank0)
    a, k = example_inputs(model, batch=4, seed=42)
    with torch.no_grad():
        fp = model_single(*a, **k).sample
        err_single = (single(*a, **k).sample - fp).norm()
        err_dist = (dist_graph(*a, **k).sample - fp).norm()
    # stated tolerance: the two calibrations' quantization errors within 10% of each other
    assert abs(err_dist - err_single) <= 0.10 * err_single
