"""The method catalogue: every attribution method, declared once, in the family's order.

Each ``MethodSpec`` says what the rest of the code needs to know about a method —
whether the engine computes it for all K hits at once (``batched``) or it runs per
pair, whether it perturbs the crop (``needs_pixels``) or backpropagates through the
encoder (``needs_gradients``), what one side and view costs in forward passes
(``passes``: the implementation's ``cost`` computes it), its options and their
defaults, its sign convention, what its map sums to, whether it is drawn by default,
and which class implements it (``implementation``: a class of ``cam``, ``pixel`` or
``verification``, resolved by ``explain.attribution.methods``).

Everything else is a view of ``CATALOGUE``: ``METHOD_NAMES``, ``BATCHED``,
``DEFAULT_METHODS``, the engine's ``BATCHED_MAPS``, the family's ``METHODS``. Names
are checked once, where a request enters (``check_methods``), and options typed and
checked once (``MethodSpec.options``; ``typed_options`` for the wire's floats).

Importable without torch: server configuration and the CLI's help read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from explain.errors import InvalidOption, UnknownMethod

# Largest batch sizes (the ``batch_size`` options): a batch is the unit of work between
# two guard polls, so it bounds how long a cancelled or late call keeps running and the
# memory one call holds. Within these, each batch is sized by the time it takes
# (``Guard.batches``); on a shared 2-core CPU (SFace, 112x112) that is a few
# forward-only images or one or two forward and backward.
NO_GRAD_BATCH = 4
GRAD_BATCH = 2

# Options every method takes: what ``attribute`` does to the map it returns.
POSTPROCESS: Mapping[str, bool] = MappingProxyType(
    {"relu": False, "absolute": False, "normalise": False})

# OpenCV's published cosine threshold for SFace (samples/dnn/face_detect.py, 0.363): xSSAB
# splits the cosine's arguments at threshold / D. Pass another encoder's EER threshold.
SFACE_COSINE_THRESHOLD = 0.363

PULLS_TOGETHER = "positive pulls the faces together, negative pushes them apart"


@dataclass(frozen=True)
class MethodSpec:
    """What the code needs to know about one attribution method.

    resolution: "feature" (the encoder's cell grid) or "pixel" (the aligned crop).
    batched: the engine computes it for a query and K hits in one pass
    (``explain.attribution.engine.BATCHED_MAPS``); else it runs per pair.
    passes: forward passes per side and view, as a formula of its options.
    defaults: every option the method takes, with its default (an int default makes
    the option a non-negative int). warm_up: the cheapest options, for a first call.
    """

    name: str
    implementation: str  # "module.Class" under explain.attribution
    resolution: Literal["feature", "pixel"]
    passes: str
    sign: str
    sums_to: str | None = None  # None: no sum rule
    batched: bool = False
    needs_pixels: bool = True
    needs_gradients: bool = False
    default: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    warm_up: Mapping[str, Any] = field(default_factory=dict)

    def typed(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` typed like the defaults: a float for an int option is truncated (the
        wire sends every value as a float), a number for a flag made a bool; an option the
        method lacks is passed on as it is (``options`` refuses it)."""
        known = {**POSTPROCESS, **self.defaults}
        out = {}
        for key, value in given.items():
            default = known.get(key)
            if isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, int) and isinstance(value, float):
                value = int(value)
            out[key] = value
        return out

    def options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every option of a call: the defaults (``POSTPROCESS`` included) updated with
        ``given``, typed; InvalidOption for an option the method lacks or an int option
        that is not a non-negative int."""
        unknown = sorted(set(given) - set(POSTPROCESS) - set(self.defaults))
        if unknown:
            raise InvalidOption(f"method {self.name} has no option {', '.join(unknown)}; "
                                f"it takes {sorted(self.defaults) or 'none'}")
        opts = {**POSTPROCESS, **self.defaults, **self.typed(given)}
        for key, default in self.defaults.items():
            value = opts[key]
            if isinstance(default, int) and not isinstance(default, bool) and (
                    not isinstance(value, int) or value < 0):
                raise InvalidOption(f"option {key} of {self.name} must be a non-negative int")
        return opts


def _cam(name: str, implementation: str, sums_to: str | None = None, **kw: Any) -> MethodSpec:
    """A method of the CAM family: Σ_c w_c F_c at the CAM layer, from the head's
    analytic gradient (no pass beyond the two encodes)."""
    return MethodSpec(name, implementation, "feature", "0", PULLS_TOGETHER, sums_to,
                      needs_pixels=False, **kw)


SIMILARITY_SUM = "cosine - bias_share (residual ≈ 0)"

CATALOGUE: tuple[MethodSpec, ...] = (
    MethodSpec("contrast", "cam.Contrast", "feature", "0",
               "negative where the faces differ, positive where a cell supports the other "
               "face more than itself", "(cosine - 1) - bias_share", batched=True,
               needs_pixels=False, default=True),
    _cam("similarity", "cam.Similarity", SIMILARITY_SUM, batched=True, default=True),
    _cam("hirescam", "cam.HiResCAM", SIMILARITY_SUM),
    _cam("gradcam", "cam.GradCAM", batched=True),
    _cam("gradcam++", "cam.GradCAMPlusPlus"),
    _cam("xgradcam", "cam.XGradCAM"),
    _cam("layercam", "cam.LayerCAM"),
    MethodSpec("scorecam", "pixel.ScoreCAM", "feature", "min(channels, C) + 1", PULLS_TOGETHER,
               defaults={"channels": 64, "batch_size": NO_GRAD_BATCH},
               warm_up={"channels": 1}),
    MethodSpec("occlusion", "pixel.Occlusion", "pixel", "windows + 1",
               "positive where hiding the pixel lowers the similarity",
               defaults={"patch": 10, "stride": 10, "batch_size": NO_GRAD_BATCH},
               warm_up={"patch": 112, "stride": 112}),
    MethodSpec("rise", "pixel.RISE", "pixel", "masks", PULLS_TOGETHER,
               defaults={"masks": 250, "grid": 7, "p": 0.5, "seed": 0,
                         "batch_size": NO_GRAD_BATCH, "centre": True},
               warm_up={"masks": 2}),
    MethodSpec("integrated_gradients", "pixel.IntegratedGradients", "pixel", "steps",
               PULLS_TOGETHER, "t(face) - t(black face)", needs_gradients=True,
               defaults={"steps": 32, "batch_size": GRAD_BATCH}, warm_up={"steps": 2}),
    MethodSpec("smoothgrad", "pixel.SmoothGrad", "pixel", "samples", PULLS_TOGETHER,
               needs_gradients=True,
               defaults={"samples": 16, "sigma": 0.15, "seed": 0, "batch_size": GRAD_BATCH,
                         "times_input": False},
               warm_up={"samples": 2}),
    MethodSpec("saliency", "pixel.Saliency", "pixel", "1", PULLS_TOGETHER,
               needs_gradients=True),
    MethodSpec("guided_backprop", "pixel.GuidedBackprop", "pixel", "1",
               "positive gradients only flow back", needs_gradients=True),
    MethodSpec("deeplift", "pixel.DeepLift", "pixel", "2", PULLS_TOGETHER,
               "t(face) - t(black face)", needs_gradients=True),
    MethodSpec("xssab", "verification.XSSAB", "pixel", "2",
               "positive where pixels drive the agreeing embedding dimensions",
               needs_gradients=True,
               defaults={"threshold": SFACE_COSINE_THRESHOLD, "held_norm": False}),
    MethodSpec("corrrise", "verification.CorrRISE", "pixel", "masks",
               PULLS_TOGETHER + "; each value a correlation in [-1, 1]",
               defaults={"masks": 250, "patches": 3, "patch": 30, "seed": 0, "batch_size": 32,
                         "rank": True, "held_norm": False},
               warm_up={"masks": 3}),
)

SPECS: Mapping[str, MethodSpec] = MappingProxyType({s.name: s for s in CATALOGUE})
METHOD_NAMES: tuple[str, ...] = tuple(SPECS)
BATCHED: tuple[str, ...] = tuple(s.name for s in CATALOGUE if s.batched)
DEFAULT_METHODS: tuple[str, ...] = tuple(s.name for s in CATALOGUE if s.default)


def spec(name: str) -> MethodSpec:
    """The method called ``name``; UnknownMethod names the known ones."""
    try:
        return SPECS[name]
    except KeyError:
        raise UnknownMethod(f"unknown attribution method {name!r}; "
                            f"known: {', '.join(METHOD_NAMES)}") from None


def check_methods(names: Sequence[str]) -> tuple[str, ...]:
    """Method names in order, duplicates dropped; UnknownMethod names any the catalogue
    lacks. Called where a request enters (servicer, CLI, ``explain_matches``)."""
    names = tuple(dict.fromkeys(names))
    unknown = [m for m in names if m not in SPECS]
    if unknown:
        raise UnknownMethod(f"unknown explain method(s) {unknown}; known: {list(METHOD_NAMES)}")
    return names


def typed_options(method: str, values: Mapping[str, float]) -> dict[str, Any]:
    """Options as they come from the wire (floats) -> typed like the method's defaults
    (an int option's value is truncated to int, so ``patch=10.0`` reaches occlusion as 10)."""
    return SPECS[method].typed(values) if method in SPECS else dict(values)
