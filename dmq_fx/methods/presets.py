"""The one table of calibration stages and presets, looked up by name.

``STAGES`` names every built-in stage object; ``PRESETS`` names every preset: a frozen
:class:`Preset` with its stage names, the ``prepare_fx`` flags its stages need and a line of
documentation. Nothing registers itself elsewhere: to see what ``"dmq"`` runs, read
``PRESETS["dmq"]`` below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from dmq_fx.errors import ConfigError
from dmq_fx.methods.adaround import AdaRound
from dmq_fx.methods.fbr import FBR
from dmq_fx.methods.float_tuning import TuneFloatParameters
from dmq_fx.methods.les import LearnLES, SmoothQuantScales
from dmq_fx.methods.pts import VOTE_PTS
from dmq_fx.quantize.observe import OBSERVE_ACTIVATIONS, OBSERVE_WEIGHTS
from dmq_fx.quantize.stage import Stage, as_stage

__all__ = ["DEFAULT_STAGES", "PREPARE_FLAGS", "PRESETS", "STAGES", "Preset", "resolve_stages"]


@dataclasses.dataclass(frozen=True)
class Preset(Sequence[str]):
    """A named calibration recipe: ``stages`` (names in :data:`STAGES`), the ``prepare_fx``
    keyword arguments they need, and what it is. As a sequence, a preset is its stage names."""

    name: str
    stages: tuple[str, ...]
    prepare_flags: Mapping[str, Any]
    doc: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "prepare_flags", MappingProxyType(dict(self.prepare_flags)))

    def __hash__(self) -> int:  # prepare_flags is a read-only mapping, not hashable
        return hash((self.name, self.stages))

    def __iter__(self) -> Iterator[str]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, index):
        return self.stages[index]


def _stages(*stages: Stage) -> Mapping[str, Stage]:
    return MappingProxyType({s.name: s for s in stages})


#: every built-in stage by name
STAGES: Mapping[str, Stage] = _stages(
    OBSERVE_ACTIVATIONS,
    OBSERVE_WEIGHTS,
    VOTE_PTS,
    SmoothQuantScales(),
    LearnLES(),
    LearnLES.paper(),
    AdaRound(),
    AdaRound.paper(),
    FBR(),
    FBR.long(),
    FBR.paper(),
    TuneFloatParameters(),
)

#: min-max PTQ: activation ranges from the data, weight ranges by MSE grid search.
DEFAULT_STAGES: tuple[str, ...] = ("observe_activations", "observe_weights")
_OBSERVE = DEFAULT_STAGES
_LES = {"les": True}
_DMQ = {"les": True, "pts": "skip"}  # LES scale nodes, PTS quantizers on the skip layers


def _presets(*presets: Preset) -> Mapping[str, Preset]:
    return MappingProxyType({p.name: p for p in presets})


#: every preset by name
PRESETS: Mapping[str, Preset] = _presets(
    Preset("minmax", _OBSERVE, {}, "min-max activations, MSE-searched weight steps"),
    Preset("smoothquant", ("smoothquant", *_OBSERVE), _LES, "SmoothQuant scales (alpha 0.5)"),
    Preset("les", ("learn_les", *_OBSERVE), _LES, "DMQ's learned equivalent scaling"),
    Preset("les-paper", ("learn_les_paper", *_OBSERVE), _LES, "LES at DMQ's budget"),
    Preset(
        "pts",
        ("observe_activations", "vote_pts", "observe_weights"),
        {"pts": "skip"},
        "DMQ's power-of-two skip scales, chosen by voting",
    ),
    Preset("adaround", (*_OBSERVE, "adaround"), {}, "AdaRound block reconstruction"),
    Preset(
        "les+adaround",
        ("learn_les", *_OBSERVE, "adaround"),
        _LES,
        "LES, then AdaRound",
    ),
    Preset(
        "les+adaround-paper",
        ("learn_les_paper", *_OBSERVE, "adaround_paper"),
        _LES,
        "LES, then AdaRound, at DMQ's budget",
    ),
    Preset(
        "dmq",
        ("learn_les", "observe_activations", "vote_pts", "observe_weights", "adaround"),
        _DMQ,
        "DMQ: LES, PTS, AdaRound",
    ),
    Preset(
        "dmq-paper",
        ("learn_les_paper", "observe_activations", "vote_pts", "observe_weights", "adaround_paper"),
        _DMQ,
        "DMQ at the paper's budget",
    ),
    Preset("eda-dm", (*_OBSERVE, "fbr"), {}, "EDA-DM's fine-grained block reconstruction"),
    Preset("eda-dm-paper", (*_OBSERVE, "fbr_paper"), {}, "FBR at EDA-DM's budget"),
    Preset(
        "dmq+eda",
        (
            "learn_les",
            "observe_activations",
            "vote_pts",
            "observe_weights",
            "fbr_800",
            "tune_float_params",
        ),
        _DMQ,
        "DMQ's LES and PTS with EDA-DM's FBR (800 iterations per block), then the float "
        "parameters tuned to the output",
    ),
    Preset(
        "dmq+eda-paper",
        ("learn_les_paper", "observe_activations", "vote_pts", "observe_weights", "fbr_paper"),
        _DMQ,
        "dmq+eda at the papers' budgets",
    ),
)

#: the ``prepare_fx`` keyword arguments of each preset:
#: ``dmq_fx.prepare_fx(model, mapping, *ex, **PREPARE_FLAGS[p])``
PREPARE_FLAGS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: p.prepare_flags for name, p in PRESETS.items()}
)


def resolve_stages(stages: str | Preset | Any) -> list[Stage]:
    """Stage objects for a preset (by name or :class:`Preset`) or a list of stage names,
    :class:`~dmq_fx.quantize.stage.Stage` objects and plain callables."""
    if isinstance(stages, str):
        if stages not in PRESETS:
            raise ConfigError(f"unknown preset {stages!r}; known: {sorted(PRESETS)}")
        stages = PRESETS[stages]
    resolved = []
    for stage in stages:
        if isinstance(stage, str):
            if stage not in STAGES:
                raise ConfigError(f"unknown calibration stage {stage!r}; known: {sorted(STAGES)}")
            resolved.append(STAGES[stage])
        else:
            resolved.append(as_stage(stage))
    return resolved
