"""Quantization configuration: what :func:`q2ext.prepare` puts into each layer.

:class:`LayerQConfig` is the resolved setting of one layer; :class:`QConfig` is the
model-wide setting: the same fields as defaults, plus first/last-layer bits, a skip list
and per-layer overrides, each keyed by a module-name glob or a module type.
"""
from __future__ import annotations

import dataclasses
import sys
from types import SimpleNamespace
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from torch import nn

__all__ = ["LayerQConfig", "QConfig", "W_QUANTIZERS", "A_QUANTIZERS"]

W_QUANTIZERS = ("lsq", "none")
# "auto": per-tensor LSQ, unsigned when the observed input is non-negative, LSQ+ (learned
# offset) when it goes negative; "lsq": LSQ with `a_signed` (None = decided from data);
# "lsq+": always LSQ+; "pact": PACT; "none": leave the input in float.
A_QUANTIZERS = ("auto", "lsq", "lsq+", "pact", "none")

Pattern = Union[str, type]


def _check_bits(value, where: str):
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ValueError(f"{where} must be an int in 2..8, got {value!r}")


@dataclass
class LayerQConfig:
    """How one layer is quantized.

    Attributes:
        w_bits, a_bits: int 2..8, weight and input-activation bits.
        w_quantizer: ``"lsq"`` (signed LSQ) or ``"none"`` (float weights).
        a_quantizer: one of :data:`A_QUANTIZERS` (see there).
        w_per_channel: per-output-channel weight scales (else one per tensor).
        a_per_channel: per-input-channel activation scales (else one per tensor).
        a_signed: for ``a_quantizer="lsq"``: True, False, or None (decided from data).
        a_learnable: learn the input quantizer's step (and offset/alpha); False keeps the
            values it initialised from data (``freeze()``).
        init_batches: forward passes whose statistics initialise the quantizers (>= 1).
    """

    w_bits: int = 4
    a_bits: int = 4
    w_quantizer: str = "lsq"
    a_quantizer: str = "auto"
    w_per_channel: bool = True
    a_per_channel: bool = False
    a_signed: bool | None = None
    a_learnable: bool = True
    init_batches: int = 1

    def __post_init__(self):
        self.validate(type(self).__name__)

    def validate(self, where: str) -> None:
        """Raise ValueError/TypeError naming `where`.<field> for an invalid field."""
        _check_bits(self.w_bits, f"{where}.w_bits")
        _check_bits(self.a_bits, f"{where}.a_bits")
        if self.w_quantizer not in W_QUANTIZERS:
            raise ValueError(f"{where}.w_quantizer must be one of {W_QUANTIZERS}, got {self.w_quantizer!r}")
        if self.a_quantizer not in A_QUANTIZERS:
            raise ValueError(f"{where}.a_quantizer must be one of {A_QUANTIZERS}, got {self.a_quantizer!r}")
        for name in ("w_per_channel", "a_per_channel", "a_learnable"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{where}.{name} must be a bool, got {getattr(self, name)!r}")
        if self.a_signed not in (None, True, False):
            raise ValueError(f"{where}.a_signed must be True, False or None, got {self.a_signed!r}")
        if isinstance(self.init_batches, bool) or not isinstance(self.init_batches, int) or self.init_batches < 1:
            raise ValueError(f"{where}.init_batches must be an int >= 1, got {self.init_batches!r}")

    def replace(self, **changes) -> "LayerQConfig":
        return dataclasses.replace(self, **changes)


LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerQConfig))


@dataclass
class QConfig(LayerQConfig):
    """Model-wide configuration for :func:`q2ext.prepare` (defaults: W4A4 LSQ).

    Attributes (besides :class:`LayerQConfig`'s defaults for every layer):
        first_layer_bits: w and a bits of the first quantizable layer in registration
            order (the layer that sees the raw input); None = no special case.  Default 8.
        last_layer_bits: same for the last quantizable layer (the classifier/predictor).
        freeze_network_input: the first layer's input quantizer (it sees the network
            input) initialises from data and then stays fixed (``a_learnable=False``).
            Learning it needs the gradient w.r.t. the input image - the first conv's
            backward-data pass, which float training never computes: about 10 % of a
            ResNet-18 step on a CPU, for a step size that 8 bits barely uses.  False (or an
            override ``{"a_learnable": True}``) learns it like every other step.
        skip: module-name globs (``fnmatch``, e.g. ``"backbone.body.layer1.*"``) or module
            types; a layer is left in float when it, or a module containing it, matches.
        overrides: ``{glob or type: {field: value}}`` with LayerQConfig fields; applied in
            order after the first/last rule (a later entry wins).

    A glob or type that matches no quantizable layer is an error (typos do not pass
    silently).
    """

    first_layer_bits: int | None = 8
    last_layer_bits: int | None = 8
    freeze_network_input: bool = True
    skip: Sequence[Pattern] = ()
    overrides: Mapping[Pattern, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        self.validate("QConfig")
        for name in ("first_layer_bits", "last_layer_bits"):
            if getattr(self, name) is not None:
                _check_bits(getattr(self, name), f"QConfig.{name}")
        if not isinstance(self.freeze_network_input, bool):
            raise TypeError(f"QConfig.freeze_network_input must be a bool, got {self.freeze_network_input!r}")
        if isinstance(self.skip, (str, type)):
            self.skip = (self.skip,)
        self.skip = tuple(self.skip)
        for pat in self.skip:
            _check_pattern(pat, "QConfig.skip")
        if not isinstance(self.overrides, Mapping):
            raise TypeError(f"QConfig.overrides must be a mapping {{glob or type: {{field: value}}}}, "
                            f"got {type(self.overrides).__name__}")
        for pat, changes in self.overrides.items():
            _check_pattern(pat, "QConfig.overrides")
            if not isinstance(changes, Mapping):
                raise TypeError(f"QConfig.overrides[{pat!r}] must be a mapping of LayerQConfig fields, "
                                f"got {type(changes).__name__}")
            unknown = sorted(set(changes) - set(LAYER_FIELDS))
            if unknown:
                raise ValueError(f"QConfig.overrides[{pat!r}]: unknown field(s) {unknown}; "
                                 f"valid: {list(LAYER_FIELDS)}")
            merged = {name: getattr(self, name) for name in LAYER_FIELDS} | dict(changes)
            LayerQConfig.validate(SimpleNamespace(**merged), f"QConfig.overrides[{pat!r}]")

    def layer_defaults(self) -> LayerQConfig:
        return LayerQConfig(**{name: getattr(self, name) for name in LAYER_FIELDS})

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """This config as plain data (str, int, bool, None, lists, dicts): storable in a
        checkpoint that ``torch.load(weights_only=True)`` reads, or in JSON.  Module-type
        patterns are stored by name (``{"type": "package.module.Class"}``)."""
        out = {"format": _FORMAT}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("skip", "overrides")})
        out["skip"] = [_pattern_to_data(p) for p in self.skip]
        out["overrides"] = [[_pattern_to_data(p), dict(changes)] for p, changes in self.overrides.items()]
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "QConfig":
        """The config :meth:`to_dict` stored.  A module-type pattern is looked up among the
        modules already imported (the float model's classes are); unknown keys, an unknown
        format or an unresolvable type are errors naming the entry."""
        if not isinstance(data, Mapping):
            raise TypeError(f"QConfig.from_dict: expected a mapping, got {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise ValueError(f"QConfig.from_dict: unknown format {data.get('format')!r} (this q2ext reads {_FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"format"})
        if unknown:
            raise ValueError(f"QConfig.from_dict: unknown field(s) {unknown}; valid: {sorted(names)}")
        kwargs = {k: v for k, v in data.items() if k in names and k not in ("skip", "overrides")}
        kwargs["skip"] = tuple(_pattern_from_data(p, "skip") for p in data.get("skip", ()))
        overrides = {}
        for i, entry in enumerate(data.get("overrides", ())):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], Mapping)):
                raise ValueError(f"QConfig.from_dict: overrides[{i}] must be [pattern, {{field: value}}], "
                                 f"got {entry!r}")
            overrides[_pattern_from_data(entry[0], f"overrides[{i}]")] = dict(entry[1])
        kwargs["overrides"] = overrides
        return cls(**kwargs)


_FORMAT = "q2ext.QConfig/1"


def _pattern_to_data(pat):
    return pat if isinstance(pat, str) else {"type": f"{pat.__module__}.{pat.__qualname__}"}


def _pattern_from_data(data, where):
    if isinstance(data, str):
        return data
    name = data.get("type") if isinstance(data, Mapping) else None
    if not isinstance(name, str):
        raise ValueError(f"QConfig.from_dict: {where}: a pattern is a glob string or {{'type': 'module.Class'}}, "
                         f"got {data!r}")
    # Only modules already imported: reading a config must not import (run) code.
    module_name, obj = name, None
    while "." in module_name and obj is None:
        module_name, _, _ = module_name.rpartition(".")
        if module_name in sys.modules:
            obj = sys.modules[module_name]
            for part in name[len(module_name) + 1:].split("."):
                obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"QConfig.from_dict: {where}: module type {name!r} is not an nn.Module class of an "
                         "imported module (import the module that defines it first)")
    return obj


def _check_pattern(pat, where):
    if isinstance(pat, str):
        if not pat:
            raise ValueError(f"{where}: empty module-name pattern")
        return
    if isinstance(pat, type) and issubclass(pat, nn.Module):
        return
    raise TypeError(f"{where}: a pattern must be a module-name glob (str) or an nn.Module subclass, got {pat!r}")
