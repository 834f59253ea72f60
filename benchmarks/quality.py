"""Side-by-side quality of PTQ methods on the committed reference models.

    python benchmarks/quality.py [--quick] [--models fashion28 fashion16-text]
                                 [--bits w8a8 w4a8 w4a6] [--methods fp minmax ...] [--n N]

For each model, bit setting and method, one row:
- fid: Frechet distance of N generated samples (20-step DDIM, eta 1, fixed seeds) to N
  Fashion-MNIST test images in EfficientNet-Lite0 features; fd_clf: the same in the domain
  classifier's features; fid_real / fd_clf_real: two disjoint real sets of the same N, for scale;
- eps_sqnr_db: mean over the 20 steps of the per-step SQNR (dB) of the quantized model's noise
  prediction against the FP model's, on the FP model's own trajectories; eps_sqnr_db_steps: the
  20 per-step values, noisiest step first;
- psnr_db: PSNR of each quantized sample against the FP sample from the same noise (mean);
- label_agree: share of samples the classifier labels as it labels the FP sample;
- class_acc: (text model) share of samples classified as the prompted class;
- calib_s: wall time of prepare + calibrate + convert (calibration data collection excluded,
  it is shared by all methods and printed once per model).
Methods: fp; torchao-fx (torch.ao's own FX PTQ, x86 default qconfig, W8A8 only: its convert
cannot keep 4-bit or 6-bit ranges); minmax (dmq_fx min-max PTQ: MSE-searched weights, moving-
average min/max activations); smoothquant (fixed alpha 0.5, then min-max, same lowering); les
(learned equivalent scaling, the fast "les" preset, then min-max); adaround (min-max, then
block-wise learned weight rounding, the fast preset); les+adaround (both, DMQ's first half);
dmq (LES with timestep weighting + AdaRound + PTS voted on the skip layers); pts-mse-skip (PTS
chosen by plain MSE instead of voting); pts-vote-all-layers (PTS voted on every conv);
no-timestep-weighting (dmq with LES's loss unweighted across timesteps);
dmq-shared-les+adaround (the shared calibration of the three, without PTS: the same numbers as
les+adaround up to float rounding, a check); les-shared (the "les" preset's state taken from
that shared calibration before its AdaRound stage: the same stages as "les", run once). The dmq
rows share one LES + AdaRound calibration per model and bits (neither stage sees PTS); their
calib_s is that shared time plus their own (les-shared: the LES part only).
eda-dm (EDA-DM: a TDAC-selected calibration set of the same size as the uniform one, min-max,
then FBR, fast preset); eda-dm-uniform (the same on the uniform set: uniform vs TDAC
calibration); dmq+eda (TDAC with a quarter of the per-step count guaranteed at every step, LES
+ PTS voting on the skip layers + FBR in place of AdaRound). TDAC's selection time is printed
per model and, like the uniform collection, not part of calib_s.
Levers of the 4-bit rows: "<method>-mp4.5" gives the layers where 4-bit weights add most
output noise per parameter 8-bit weights within 4.5 bits on average (dmq_fx.mixed_precision_mapping
on two calibration batches; the effective bits are printed, and such a row is not a W4 row);
"<method>-hist" chooses activation ranges from a histogram (activation_ranges="histogram");
both on minmax and dmq+eda. dmq+eda-fbr300-relative: FBR (300 iterations) weighs each sample's
error relative to its target's energy (relative_loss=True), so low-energy samples count by
their SNR.
dmq+eda-fbr300 / dmq+eda-fbr800: FBR at 300 / 800 iterations per unit (the budget lever; the
preset ran 300 before it adopted 800, so dmq+eda-fbr800 is dmq+eda now).
dmq+eda-fbr300-timestep-weighted / dmq+eda-fbr800-timestep-weighted: FBR's loss weighted per
sampling step as LES's is (DMQ's adaptive timestep weighting, timestep_weighting="adaptive").
dmq+eda-sensitivity: FBR weighs each element of a unit's output error by the float model's
output sensitivity to it (output_sensitivity=True, docs/methods/adaround.md).
dmq+eda is the preset as it is now: its last stage tunes the float parameters (layer biases,
norm affines) to the float model's output (tune_float_params, docs/methods/float_tuning.md);
dmq+eda-untuned is the preset without that stage, as it was before, and so is every other
dmq+eda-<lever> row (the levers were measured on it). minmax-tuned: minmax, then
tune_float_params. A row with the tuning starts from the calibration of the same row without
it when that ran first in the call (its calib_s includes that calibration).
On the text model dmq+eda's tuning matches the classifier-free guided prediction
(TuneFloatParameters(guidance_scale=4) on batches of guidance pairs, as quantize_pipeline runs
the preset on guided data); dmq+eda-per-half tunes each guidance half on its own, as the preset
did before (on fashion28, which samples without guidance, both are the same).
Every dmq_fx row runs the x86 lowering.
--quick: 32 samples, 4 calibration samples per step (a few minutes, paired metrics only make
sense there); the default run is 1000 samples, 32 per step (hours per learned method on 2 CPU
cores: README's tables use --n 250 --per-step 8 and say so). The last line printed
is JSON: a list of rows {"model", "bits", "method", "fid", "eps_sqnr_db", "psnr_db", "class_acc",
"calib_s", ...} (null where a field does not apply).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from baselines import parse_bits, torchao_fx_quantize
from diffusers import DDIMScheduler
from dmq_fx.observers import PowerOfTwoFakeQuantize
from dmq_fx.passes import input_quantizer_name, skip_connection_layers
from dmq_fx_bench.datasets import load_fashion_mnist
from dmq_fx_bench.evaluation import (
    ClassifierFeatures,
    EfficientNetLite0Features,
    EpsSQNRProbe,
    frechet_distance,
    psnr_db,
)
from dmq_fx_bench.reference_models import (
    load_fashion16_text,
    load_fashion28,
    load_fashion_classifier,
    sample_ddim,
)

import dmq_fx
from dmq_fx.graph.meta import quantized_layer_nodes
from dmq_fx.methods.adaround import BlockReconstructionOptions
from dmq_fx.methods.pts import pts_quantizers
from dmq_fx.workflow.calibration_data import (
    CalibrationData,
    collect_calibration_data,
    guided_eps,
    select_samples,
)

STEPS = 20
GUIDANCE = 4.0  # the text model's guidance scale (benchmarks/reference_models.py uses it too)


@dataclass
class ReferenceModel:
    name: str
    unet: torch.nn.Module
    scheduler: object
    #: keyword arguments of sample_ddim / guided_eps for n samples
    conditioning: Callable[[int], dict] = lambda n: {}
    labels: Callable[[int], torch.Tensor | None] = lambda n: None
    collect_kwargs: dict = field(default_factory=dict)


def reference_models(names: list[str]) -> list[ReferenceModel]:
    out = []
    for name in names:
        if name == "fashion28":
            unet, sched = load_fashion28()
            out.append(ReferenceModel(name, unet, sched))
        elif name == "fashion16-text":
            unet, sched, embeds = load_fashion16_text()

            def labels(n):
                return torch.arange(n) % 10

            def conditioning(n, embeds=embeds, labels=labels):
                return dict(
                    prompt_embeds=embeds[labels(n)],
                    negative_prompt_embeds=embeds[10],
                    guidance_scale=GUIDANCE,
                )

            collect = dict(
                prompt_embeds=embeds[:10],
                negative_prompt_embeds=embeds[10:],
                guidance_scale=GUIDANCE,
            )
            out.append(ReferenceModel(name, unet, sched, conditioning, labels, collect))
        else:
            raise SystemExit(f"unknown model {name!r}: fashion28, fashion16-text")
    return out


#: TDAC's density radius for the reference models: their mid-attention features are on a
#: smaller scale than CIFAR's (benchmarks/tdac_features.py: fashion28's median pairwise mean
#: squared distance between steps is 0.27), so EDA-DM's pixel-space 3.0 puts every step within
#: every other's radius and the density term vanishes; 0.3 (EDA-DM's latent-model value) keeps
#: it informative.
TDAC_RADIUS = 0.3
TDAC_LAMBDA = 1.0


class CalibrationSets:
    """A model's calibration sets: the uniform one (``per_step`` samples at every step,
    docs/workflow/calibration_data.md) and TDAC selections of the same total size
    (docs/methods/eda_dm.md), made on first use."""

    def __init__(self, ref: ReferenceModel, per_step: int, seed: int = 0):
        self.ref, self.per_step, self.seed = ref, per_step, seed
        t = time.perf_counter()
        self.uniform = collect_calibration_data(
            ref.unet,
            DDIMScheduler.from_config(ref.scheduler.config),
            num_inference_steps=STEPS,
            samples_per_step=per_step,
            seed=seed,
            progress=False,
            **ref.collect_kwargs,
        )
        print(
            f"{ref.name}: {len(self.uniform)} uniform calibration samples in "
            f"{time.perf_counter() - t:.0f} s"
        )
        self._tdac: dict[int, CalibrationData] = {}

    def tdac(self, min_per_step: int) -> CalibrationData:
        if min_per_step not in self._tdac:
            t = time.perf_counter()
            data = select_samples(
                self.ref.unet,
                DDIMScheduler.from_config(self.ref.scheduler.config),
                self.per_step * STEPS,
                radius=TDAC_RADIUS,
                lam=TDAC_LAMBDA,
                min_per_step=min_per_step,
                num_inference_steps=STEPS,
                seed=self.seed,
                progress=False,
                **self.ref.collect_kwargs,
            )
            counts = torch.bincount(data.step_index, minlength=STEPS).tolist()
            print(
                f"{self.ref.name}: TDAC (min {min_per_step} per step) selected "
                f"{len(data)} samples in {time.perf_counter() - t:.0f} s, per step {counts}"
            )
            self._tdac[min_per_step] = data
        return self._tdac[min_per_step]


# -- methods: (float unet, bits, calibration sets) -> quantized graph ------------------------------
#: the stage that tunes the float parameters to the output: run after the rest of a preset
TUNING = "tune_float_params"

#: calibrated graphs by their settings, so that a method that adds stages to another (e.g.
#: dmq+eda-tuned) starts from that one's calibration: (graph, its calibration seconds)
_CALIBRATED: dict = {}


def _dmq_fx(
    preset: str,
    data: str = "uniform",
    mixed_bits: float | None = None,
    activation_ranges: str = "minmax",
    reconstruction: dict | None = None,
    then: tuple[str, ...] = (),
    untuned: bool = False,
    guided_tuning: bool = False,
):
    """A dmq_fx preset on the uniform calibration set, a TDAC selection (``data="tdac"``), or
    one with a quarter of the uniform per-step count guaranteed at every step
    (``"tdac-min"``, for DMQ's per-step stages). ``mixed_bits``: automatic mixed precision, the
    most weight-sensitive layers at 8 bits within that average weight width (the effective bits
    are printed); ``activation_ranges``: "minmax" or "histogram"; ``reconstruction``: fields
    replaced in the preset's AdaRound / FBR stage (e.g. ``{"relative_loss": True}``); ``then``:
    stages run after the preset's, on a copy of the preset's calibration when this run made it
    already (the row's calib_s is both parts). A preset's last stage ``tune_float_params`` is
    run that way too, so a preset and its ``untuned=True`` row (without that stage) share one
    calibration. ``guided_tuning``: on a model sampled with classifier-free guidance, that
    stage matches the guided prediction (``guidance_scale``, on batches of guidance pairs)."""

    def build(unet, bits, sets: CalibrationSets):
        key = (id(unet), bits, sets.seed, preset, data, mixed_bits, activation_ranges)
        key += (tuple(sorted((reconstruction or {}).items())),)
        if key not in _CALIBRATED:
            t = time.perf_counter()
            _CALIBRATED[key] = (calibrated(unet, bits, sets), time.perf_counter() - t)
        graph, base_s = _CALIBRATED[key]
        graph = copy.deepcopy(graph)
        t = time.perf_counter()
        tuned = TUNING in dmq_fx.PRESETS[preset].stages and not untuned
        then_stages = (TUNING,) * tuned + tuple(then)
        if then_stages:
            calib = sets.uniform if data == "uniform" else sets.tdac(_min_per_step(data, sets))
            guided = guided_tuning and calib.unconditional is not None
            batches = list(calib.batches(32, seed=sets.seed, guidance_pairs=guided))
            stages = [
                dmq_fx.TuneFloatParameters(guidance_scale=GUIDANCE) if guided and s == TUNING else s
                for s in then_stages
            ]
            dmq_fx.calibrate(graph, batches, stages, progress=False)
        lowered = dmq_fx.convert_fx(graph, "x86")
        return lowered, round(base_s + time.perf_counter() - t, 1)

    def calibrated(unet, bits, sets: CalibrationSets):
        calib = sets.uniform if data == "uniform" else sets.tdac(_min_per_step(data, sets))
        wb, ab = parse_bits(bits)
        example = next(calib.batches(8, shuffle=False))
        names = [name for name in dmq_fx.PRESETS[preset].stages if name != TUNING]
        stages = [dmq_fx.STAGES[name] for name in names]
        if reconstruction:
            stages = [
                dataclasses.replace(s, **reconstruction)
                if isinstance(s, BlockReconstructionOptions)
                else s
                for s in stages
            ]
        mapping = dmq_fx.get_default_qconfig_mapping(wb, ab, activation_ranges)
        if mixed_bits is not None and wb < 8:
            choice = dmq_fx.mixed_precision_mapping(
                unet,
                list(calib.batches(32, seed=sets.seed))[:2],
                wb,
                ab,
                budget_bits=mixed_bits,
                mapping=mapping,
                progress=False,
            )
            mapping = choice.mapping
            print(
                f"  mixed precision: {len(choice.eight_bit)} layers at 8-bit weights, "
                f"{choice.effective_bits:.2f} effective bits",
                flush=True,
            )
        prepared = dmq_fx.prepare_fx(
            unet,
            mapping,
            *example,
            **dmq_fx.PREPARE_FLAGS[preset],
        )
        dmq_fx.calibrate(prepared, list(calib.batches(32, seed=sets.seed)), stages, progress=False)
        return prepared

    return build


def _min_per_step(data: str, sets: CalibrationSets) -> int:
    """TDAC's guaranteed per-step count: a quarter of the uniform one for "tdac-min"."""
    return max(1, sets.per_step // 4) if data == "tdac-min" else 0


def _torchao_fx(unet, bits, sets: CalibrationSets):
    if bits != "w8a8":
        return None  # torch.ao's convert_fx clamps custom ranges to 8 bits (FINDINGS)
    calib = sets.uniform
    return torchao_fx_quantize(
        unet, next(calib.batches(8, shuffle=False)), list(calib.batches(32, seed=sets.seed))
    )


@dataclass
class SharedCalibration:
    """One LES + AdaRound calibration, shared by the les / les+adaround / dmq / PTS rows."""

    calibrated: torch.fx.GraphModule  # after AdaRound
    les_only: torch.fx.GraphModule  # the "les" preset's state: LES, then min-max
    batches: list
    skip: set[str]  # the skip-connection layers
    les_s: float
    total_s: float


_SHARED: dict = {}


def _les_adaround_with_pts_everywhere(
    unet, bits, sets: CalibrationSets, weighting: str
) -> SharedCalibration:
    """LES + AdaRound (fast presets) on a graph whose every conv has a PTS quantizer.

    Neither stage sees PTS (LES quantizes its unit per tensor, AdaRound leaves activations
    float), so les, les+adaround, dmq and its PTS ablations share this one calibration; a PTS
    quantizer whose exponents are all D is the plain per-tensor quantizer.
    """
    key = (id(unet), bits, weighting)
    calib = sets.uniform
    if key not in _SHARED:  # kept for every bits: the main loop alternates them
        t = time.perf_counter()
        wb, ab = parse_bits(bits)
        example = next(calib.batches(8, shuffle=False))
        mapping = dmq_fx.get_default_qconfig_mapping(wb, ab)
        prepared = dmq_fx.prepare_fx(unet, mapping, *example, les=True, pts="all")
        batches = list(calib.batches(32, seed=sets.seed))
        stages = [dmq_fx.LearnLES(weighting=weighting), "observe_activations", "observe_weights"]
        dmq_fx.calibrate(prepared, batches, stages, progress=False)
        les_s = time.perf_counter() - t
        les_only = _copy_graph(prepared)
        dmq_fx.calibrate(prepared, batches, ["adaround"], progress=False)  # continues it
        skip = {n.target for n in skip_connection_layers(dmq_fx.trace(unet, *example))}
        _SHARED[key] = SharedCalibration(
            prepared, les_only, batches, skip, les_s, time.perf_counter() - t
        )
    return _SHARED[key]


def _copy_graph(gm):
    copied = copy.deepcopy(gm)
    copied.meta = copy.deepcopy(gm.meta)
    return copied


def _shared_les(unet, bits, sets: CalibrationSets):
    """The "les" preset's graph, taken from the shared calibration before its AdaRound stage."""
    shared = _les_adaround_with_pts_everywhere(unet, bits, sets, "adaptive")
    t = time.perf_counter()
    lowered = dmq_fx.convert_fx(_copy_graph(shared.les_only), "x86")
    return lowered, round(shared.les_s + time.perf_counter() - t, 1)


def _dmq_variant(pts_layers: str | None, selection: str = "vote", weighting: str = "adaptive"):
    """dmq (pts_layers "skip", voting), its PTS ablations, or les+adaround (no PTS)."""

    def build(unet, bits, sets: CalibrationSets):
        shared = _les_adaround_with_pts_everywhere(unet, bits, sets, weighting)
        t = time.perf_counter()
        prepared = _copy_graph(shared.calibrated)
        if pts_layers is not None:
            for q in pts_quantizers(prepared):
                q.observer.selection = selection
            dmq_fx.calibrate(prepared, shared.batches, ["vote_pts"], progress=False)
            for node in quantized_layer_nodes(prepared):
                if pts_layers == "skip" and node.target not in shared.skip:
                    n = len(node.meta["dmq_fx"].input_groups)
                    for g in range(n):
                        q = prepared.get_submodule(input_quantizer_name(node.target, g, n))
                        if isinstance(q, PowerOfTwoFakeQuantize):
                            q.observer.exponents = torch.zeros(0, dtype=torch.long)  # plain s
        lowered = dmq_fx.convert_fx(prepared, "x86")
        return lowered, round(shared.total_s + time.perf_counter() - t, 1)

    return build


METHODS: dict[str, Callable | None] = {
    "fp": None,
    "torchao-fx": _torchao_fx,
    "minmax": _dmq_fx("minmax"),
    "smoothquant": _dmq_fx("smoothquant"),
    "les": _dmq_fx("les"),
    "les-shared": _shared_les,
    "adaround": _dmq_fx("adaround"),
    "les+adaround": _dmq_fx("les+adaround"),
    "dmq": _dmq_variant("skip"),
    "pts-mse-skip": _dmq_variant("skip", selection="mse"),
    "pts-vote-all-layers": _dmq_variant("all"),
    "dmq-shared-les+adaround": _dmq_variant(None),
    "no-timestep-weighting": _dmq_variant("skip", weighting="uniform"),
    "eda-dm": _dmq_fx("eda-dm", data="tdac"),
    "eda-dm-uniform": _dmq_fx("eda-dm"),
    "dmq+eda": _dmq_fx("dmq+eda", data="tdac-min", guided_tuning=True),
    "dmq+eda-per-half": _dmq_fx("dmq+eda", data="tdac-min"),
    "dmq+eda-untuned": _dmq_fx("dmq+eda", untuned=True, data="tdac-min"),
    "dmq+eda-fbr300-relative": _dmq_fx(
        "dmq+eda",
        untuned=True,
        data="tdac-min",
        reconstruction={"iterations": 300, "relative_loss": True},
    ),
    "dmq+eda-fbr300": _dmq_fx(
        "dmq+eda", untuned=True, data="tdac-min", reconstruction={"iterations": 300}
    ),
    "dmq+eda-fbr800": _dmq_fx(
        "dmq+eda", untuned=True, data="tdac-min", reconstruction={"iterations": 800}
    ),
    "dmq+eda-fbr300-timestep-weighted": _dmq_fx(
        "dmq+eda",
        untuned=True,
        data="tdac-min",
        reconstruction={"iterations": 300, "timestep_weighting": "adaptive"},
    ),
    "dmq+eda-fbr800-timestep-weighted": _dmq_fx(
        "dmq+eda",
        untuned=True,
        data="tdac-min",
        reconstruction={"iterations": 800, "timestep_weighting": "adaptive"},
    ),
    "dmq+eda-sensitivity": _dmq_fx(
        "dmq+eda", untuned=True, data="tdac-min", reconstruction={"output_sensitivity": True}
    ),
    "minmax-tuned": _dmq_fx("minmax", then=(TUNING,)),
    "minmax-mp4.25": _dmq_fx("minmax", mixed_bits=4.25),
    "minmax-mp4.5": _dmq_fx("minmax", mixed_bits=4.5),
    "minmax-mp5": _dmq_fx("minmax", mixed_bits=5.0),
    "dmq+eda-mp4.5": _dmq_fx("dmq+eda", untuned=True, data="tdac-min", mixed_bits=4.5),
    "minmax-hist": _dmq_fx("minmax", activation_ranges="histogram"),
    "minmax-mp4.5-hist": _dmq_fx("minmax", mixed_bits=4.5, activation_ranges="histogram"),
    "dmq+eda-hist": _dmq_fx(
        "dmq+eda", untuned=True, data="tdac-min", activation_ranges="histogram"
    ),
    "dmq+eda-mp4.5-hist": _dmq_fx(
        "dmq+eda", untuned=True, data="tdac-min", mixed_bits=4.5, activation_ranges="histogram"
    ),
}


# -- measuring ------------------------------------------------------------------------------------
def real_images(n: int, size: int, offset: int = 0) -> torch.Tensor:
    images, _ = load_fashion_mnist("test")
    x = torch.from_numpy(images[offset : offset + n]).float().div(127.5).sub(1).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=size, mode="area")
    return x


def _slice(cond: dict, start: int, stop: int) -> dict:
    return {k: (v[start:stop] if k == "prompt_embeds" else v) for k, v in cond.items()}


def sample_batches(unet, ref: ReferenceModel, n: int, batch: int, shape, trajectory=None):
    """n samples in batches (batch b uses seed b + 1); ``trajectory`` collects (t, x_t, eps)."""
    cond, out = ref.conditioning(n), []
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        steps: list = []

        def record(i, t, x, eps, steps=steps):
            steps.append((t, x, eps))

        out.append(
            sample_ddim(
                unet,
                ref.scheduler,
                stop - start,
                steps=STEPS,
                seed=start + 1,
                sample_shape=shape,
                on_step=None
                if trajectory is None
                else lambda i, t, x, e, s=steps: s.append((t, x, e)),
                **_slice(cond, start, stop),
            )
        )
        if trajectory is not None:
            trajectory.append((start, stop, steps))
    return torch.cat(out)


def evaluate(ref, q_unet, fp, args, feats, clf, real) -> dict:
    """Metrics of ``q_unet`` (None: the FP model) against the FP samples and trajectories."""
    fp_samples, trajectory = fp
    n, shape = len(fp_samples), tuple(fp_samples.shape[1:])
    probe = None
    if q_unet is None:
        samples = fp_samples
    else:
        samples = sample_batches(q_unet, ref, n, args.batch, shape)
        cond = ref.conditioning(n)
        probe = EpsSQNRProbe()
        with torch.no_grad():
            for start, stop, steps in trajectory:
                c = _slice(cond, start, stop)
                for i, (t, x, eps) in enumerate(steps):
                    probe.add(i, eps, guided_eps(q_unet, x, t, **c))

    def classify(x):
        with torch.no_grad():
            return clf(F.interpolate(x, size=28, mode="bilinear") if x.shape[-1] != 28 else x)

    pred, fp_pred = classify(samples).argmax(1), classify(fp_samples).argmax(1)
    labels = ref.labels(n)
    return {
        "fid": round(frechet_distance(real, samples, feats), 2),
        "fd_clf": round(frechet_distance(real, samples, ClassifierFeatures(clf)), 3),
        "eps_sqnr_db": None if probe is None else round(probe.mean_db, 2),
        # where the error sits: the SQNR of each sampling step, noisiest first
        "eps_sqnr_db_steps": None if probe is None else [round(v, 2) for v in probe.per_step_db()],
        "psnr_db": None if probe is None else round(psnr_db(fp_samples, samples), 2),
        "label_agree": None if probe is None else round((pred == fp_pred).float().mean().item(), 3),
        "class_acc": None if labels is None else round((pred == labels).float().mean().item(), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (paired metrics)")
    ap.add_argument("--models", nargs="+", default=["fashion28", "fashion16-text"])
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w4a8", "w4a6"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--n", type=int, help="generated samples (default 1000, quick 32)")
    ap.add_argument("--per-step", type=int, help="calibration samples per step (32, quick 4)")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--calib-seed",
        type=int,
        default=0,
        help="seed of the calibration data (sampler noise, TDAC, batch order) for spread rows",
    )
    args = ap.parse_args()
    for m in args.methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    for b in args.bits:
        parse_bits(b)
    n = args.n or (32 if args.quick else 1000)
    per_step = args.per_step or (4 if args.quick else 32)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    feats, clf = EfficientNetLite0Features(), load_fashion_classifier()
    rows = []
    for ref in reference_models(args.models):
        shape = (ref.unet.config.in_channels, *[ref.unet.config.sample_size] * 2)
        real = real_images(n, shape[-1])
        real_other = real_images(n, shape[-1], offset=5000)
        calib = CalibrationSets(ref, per_step, args.calib_seed)
        trajectory: list = []
        fp_samples = sample_batches(ref.unet, ref, n, args.batch, shape, trajectory)
        scale = {
            "fid_real": round(frechet_distance(real, real_other, feats), 2),
            "fd_clf_real": round(frechet_distance(real, real_other, ClassifierFeatures(clf)), 3),
        }
        for method in args.methods:
            for bits in ["fp"] if method == "fp" else args.bits:
                q_unet, calib_s = None, None
                if method != "fp":
                    t = time.perf_counter()
                    q_unet = METHODS[method](ref.unet, bits, calib)
                    calib_s = round(time.perf_counter() - t, 1)
                    if isinstance(q_unet, tuple):  # (graph, its own calibration time)
                        q_unet, calib_s = q_unet
                    if q_unet is None:
                        continue
                row = {"model": ref.name, "bits": bits, "method": method}
                row.update(evaluate(ref, q_unet, (fp_samples, trajectory), args, feats, clf, real))
                row.update(calib_s=calib_s, n=n, calib_seed=args.calib_seed, **scale)
                print(row, flush=True)
                rows.append(row)
    print_table(rows)
    print(json.dumps(rows))


def print_table(rows: list[dict]) -> None:
    cols = ["model", "bits", "method", "fid", "fd_clf", "eps_sqnr_db", "psnr_db", "label_agree"]
    cols += ["class_acc", "calib_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(
                ""
                if v is None
                else str(v)
                if not isinstance(v, float) or math.isfinite(v)
                else "inf"
            )
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
