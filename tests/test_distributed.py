"""Data-parallel calibration: 2 gloo ranks on CPU against one process.

The ranks meet through a file store in the test's own folder (``init_method="file://..."``):
no port is picked, released and bound again later.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import calibration_data
from safetensors.torch import load_file, save_file

import dmq_fx
from dmq_fx.graph.unet_configs import TINY_DDPM, build_unet
from dmq_fx.quantize.state import learned_state

#: stages whose ranks' results combine exactly: ranges, SmoothQuant's max|X|, PTS votes
EXACT = ("smoothquant", "observe_activations", "vote_pts", "observe_weights")


def _learned():
    return [
        dmq_fx.LearnLES(iterations=5, max_samples=16),
        "observe_activations",
        "vote_pts",
        "observe_weights",
        dmq_fx.FBR(iterations=5, max_samples=16, step_lr=1e-3),
    ]


def _calibrated(batches, stages):
    """Calibrated in this process with 1 thread, as each rank (float sums depend on the thread
    count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _calibrated_here(batches, stages)
    finally:
        torch.set_num_threads(threads)


def _calibrated_here(batches, stages):
    torch.manual_seed(0)
    model = build_unet(TINY_DDPM)
    mapping = dmq_fx.get_default_qconfig_mapping(4, 8)
    prepared = dmq_fx.prepare_fx(model, mapping, *batches[0], les=True, pts="skip")
    return dmq_fx.calibrate(prepared, batches, stages, progress=False)


def _rank(rank: int, world: int, folder: str, stages: str, shard: str) -> None:
    torch.set_num_threads(1)
    store = f"file://{os.path.join(folder, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        batches = _same_batch() if shard == "same" else _four_batches()[rank::world]
        prepared = _calibrated(batches, EXACT if stages == "exact" else _learned())
        save_file(learned_state(prepared), os.path.join(folder, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _four_batches():
    return calibration_data(build_unet(TINY_DDPM), n=4)


def _same_batch():
    return calibration_data(build_unet(TINY_DDPM), n=1, batch=8)


def _run_ranks(folder, stages: str, shard: str) -> dict:
    mp.spawn(_rank, args=(2, str(folder), stages, shard), nprocs=2, join=True)
    rank0 = load_file(str(folder / "rank0.safetensors"))
    rank1 = load_file(str(folder / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks disagree"
    return rank0


def test_ranges_votes_and_smoothquant_equal_one_process_on_the_union(tmp_path):
    """Each rank holds every other batch; the result is the single process's on all four
    batches, bit for bit (PTS's summed float64 errors: to their rounding)."""
    ranks = _run_ranks(tmp_path, "exact", "interleaved")
    single = learned_state(_calibrated(_four_batches(), EXACT))
    assert ranks.keys() == single.keys()
    checked = {"min_val": 0, "max_val": 0, "votes": 0, "exponents": 0, "tau": 0}
    for key, value in single.items():
        leaf = key.rsplit(".", 1)[-1]
        checked[leaf] = checked.get(leaf, 0) + 1
        if leaf == "summed_errors":
            torch.testing.assert_close(ranks[key], value, rtol=1e-12, atol=0)
        else:
            assert torch.equal(ranks[key], value), key
    assert all(checked[k] > 0 for k in ("min_val", "max_val", "votes", "exponents", "tau"))
    # a rank alone would have had other ranges: the combination did something
    shard_only = learned_state(_calibrated(_four_batches()[0::2], EXACT))
    assert any(not torch.equal(shard_only[k], single[k]) for k in single if k.endswith("max_val"))


def test_learned_stages_equal_one_process_fed_the_same_batches(tmp_path):
    """LES and FBR: with the same batch on both ranks (so each draws the same samples; observing
    one batch twice leaves a moving average where one observation puts it), averaging the
    ranks' gradients and summing LES's running losses must reproduce the single process on that
    batch exactly."""
    ranks = _run_ranks(tmp_path, "learned", "same")
    single = learned_state(_calibrated(_same_batch(), _learned()))
    assert ranks.keys() == single.keys()
    for key, value in single.items():
        if key.endswith((".votes", ".summed_errors")):  # both ranks voted on the batch
            torch.testing.assert_close(ranks[key], 2 * value, rtol=1e-12, atol=0)
        else:
            assert torch.equal(ranks[key], value), key
