"""The optimizer config: which parameters go where, and what each group runs.

A config is data.  Each *group* is one row of choices -- the LMO and where it
runs, the uplink compressor, the aggregator, the downlink compressor, the
per-layer learning-rate rule, momentum and weight decay -- plus a rule that
says which parameters it takes (name globs and dimensionality, first match
wins).  Parameters no group takes go to the fallback optimizer (AdamW unless
configured), fed with the plain mean gradient.

:func:`load_config` accepts a path (``.yaml``/``.yml``, ``.toml``, ``.json``), a
mapping, a preset name, or an :class:`OptimizerConfig`; a config may name a
``preset`` and override any field (``groups`` given as a mapping merges into the
preset's groups by name).  Errors name the field path, the bad value and what
is allowed.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from . import registry
from .errors import CommlmoError, ConfigError, did_you_mean
from .plugin import PluginConfig

__all__ = [
    "MomentumConfig",
    "ParamMatch",
    "GroupConfig",
    "FallbackConfig",
    "OptimizerConfig",
    "load_config",
    "read_config_file",
    "config_json_schema",
]


def _plugin_field(family: str):
    """Annotated type that validates ``{"kind": ...}`` against the named plugin's own Config."""

    def _validate(value: Any) -> Any:
        if value is None:
            return None
        try:
            return registry.validate_plugin_config(family, value)
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']} (got {e.get('input')!r})"
                for e in exc.errors()
            )
            kind = value.get("kind") if isinstance(value, Mapping) else value
            raise PydanticCustomError("plugin_config", "{msg}", {"msg": f"invalid {family} {kind!r}: {details}"}) from None
        except CommlmoError as exc:
            raise PydanticCustomError("plugin", "{msg}", {"msg": str(exc)}) from None

    return Annotated[SerializeAsAny[PluginConfig], BeforeValidator(_validate)]


#: the plugins a group gets when its config does not name them
GROUP_DEFAULTS: dict[str, dict[str, Any]] = {
    "lmo": {"kind": "spectral"},
    "uplink": {"kind": "identity"},
    "aggregator": {"kind": "mean"},
    "downlink": {"kind": "identity"},
    "lr_rule": {"kind": "original"},
}

LMOField = _plugin_field("lmo")
CompressorField = _plugin_field("compressor")
AggregatorField = _plugin_field("aggregator")
LRRuleField = _plugin_field("lr_rule")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class MomentumConfig(_Model):
    """``ema``: ``M = beta*M + (1-beta)*G`` (torch.optim.Muon, SignMuon); ``heavy_ball``:
    ``M = beta*M + G``.  Nesterov uses ``(1-beta)*G + beta*M`` (ema) or ``G + beta*M``."""

    beta: float = Field(0.95, ge=0.0, lt=1.0, description="Momentum coefficient β.")
    kind: Literal["ema", "heavy_ball"] = Field("ema", description="`ema`: M = βM + (1 − β)G; `heavy_ball`: M = βM + G.")
    nesterov: bool = Field(True, description="Step along the look-ahead (1 − β)G + βM (`ema`) or G + βM (`heavy_ball`).")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> MomentumConfig:
        if self.nesterov and self.beta == 0.0:
            raise ValueError("nesterov=true needs beta > 0; set nesterov: false for plain steps")
        return self


class ParamMatch(_Model):
    """Which parameters a group takes: any name glob in ``names``, none in ``exclude``, ``ndim`` in ``ndim``."""

    names: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                             description="Globs (fnmatch, case-sensitive) on qualified parameter names; any one may match.")
    exclude: list[str] = Field(default_factory=list, description="Globs that reject a parameter that `names` matched.")
    ndim: list[Annotated[int, Field(ge=0, le=8)]] | None = Field(
        default_factory=lambda: [2, 3, 4, 5], description="Accepted tensor ranks; `null` accepts every rank.")

    def matches(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether the parameter ``name`` (with this tensor) belongs to the group."""
        if self.ndim is not None and tensor.ndim not in self.ndim:
            return False
        if not any(fnmatch.fnmatchcase(name, pat) for pat in self.names):
            return False
        return not any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)


class GroupConfig(_Model):
    """One row of choices, applied to the parameters that ``params`` selects."""

    name: str = Field(min_length=1, description="Unique group name, used by overrides "
                      "(`groups: {hidden: {...}}`) and byte-accounting labels.")
    params: ParamMatch = Field(default_factory=ParamMatch, description="Which parameters the group takes.")
    lmo: LMOField | None = Field(  # type: ignore[valid-type]
        default_factory=lambda: dict(GROUP_DEFAULTS["lmo"]), description="The LMO; `null` together with `lmo_at: none`.")
    lmo_at: Literal["worker", "server", "none"] = Field(
        "server", description="Where the LMO runs: on each `worker` before the uplink, on the `server` role "
        "after aggregation, or `none`.")
    uplink: CompressorField = Field(  # type: ignore[valid-type]
        default_factory=lambda: dict(GROUP_DEFAULTS["uplink"]), description="Compressor of each worker's message.")
    aggregator: AggregatorField = Field(  # type: ignore[valid-type]
        default_factory=lambda: dict(GROUP_DEFAULTS["aggregator"]), description="How the workers' messages are combined.")
    downlink: CompressorField = Field(  # type: ignore[valid-type]
        default_factory=lambda: dict(GROUP_DEFAULTS["downlink"]),
        description="Compressor of the server's step before every worker applies it (`ef21p` compresses the model).")
    lr: float = Field(0.02, ge=0.0, description="Learning rate.")
    lr_rule: LRRuleField = Field(  # type: ignore[valid-type]
        default_factory=lambda: dict(GROUP_DEFAULTS["lr_rule"]),
        description="Per-layer multiplier `scale(X)` of the learning rate.")
    momentum: MomentumConfig = Field(default_factory=MomentumConfig, description="Momentum of each worker's gradient.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay `wd`: X ← X(1 − lr·wd) before the step.")

    @model_validator(mode="after")
    def _compatible(self) -> GroupConfig:
        if self.lmo is None and self.lmo_at != "none":
            raise ValueError(f"lmo is null but lmo_at is {self.lmo_at!r}; set lmo_at: none, or name an lmo")
        if self.lmo is not None and self.lmo_at == "none":
            raise ValueError(f"lmo_at is 'none' but lmo is {self.lmo.kind!r}; set lmo: null or lmo_at: worker|server")
        uplink = registry.build_plugin("compressor", self.uplink)
        registry.build_plugin("compressor", self.downlink)  # building it checks its own constraints
        aggregator = registry.build_plugin("aggregator", self.aggregator)
        lr_rule = registry.get("lr_rule", self.lr_rule.kind)
        if getattr(uplink.capabilities, "downlink_only", False):
            raise ValueError(f"uplink {uplink.kind!r} is a downlink-only compressor; use it as downlink")
        why = aggregator.check_uplink(uplink)
        if why:
            raise ValueError(why)
        if lr_rule.needs_dual_norm and self.lmo_at != "server":
            raise ValueError(
                f"lr_rule {self.lr_rule.kind!r} reads the dual norm of the aggregate, so it needs "
                f"lmo_at: server (got {self.lmo_at!r})"
            )
        return self


class FallbackConfig(_Model):
    """Optimizer for the parameters no group takes, fed with the mean gradient."""

    optimizer: str = Field("AdamW", description="Name of a `torch.optim` optimizer class.")
    lr: float = Field(1e-3, ge=0.0, description="Its learning rate.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Other keyword arguments of that optimizer, e.g. `{weight_decay: 0.01}`.")

    @field_validator("optimizer")
    @classmethod
    def _known(cls, v: str) -> str:
        names = sorted(
            n for n, o in vars(torch.optim).items()
            if inspect.isclass(o) and issubclass(o, torch.optim.Optimizer) and o is not torch.optim.Optimizer
        )
        if v not in names:
            raise ValueError(f"{v!r} is not a torch.optim optimizer{did_you_mean(v, names)}; allowed: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _options_accepted(self) -> FallbackConfig:
        # Names are checked against the constructor's signature; building a throw-away
        # optimizer would check values too but imports torch._dynamo (about 1.5 s per process).
        cls = getattr(torch.optim, self.optimizer)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr"}
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise ValueError(
                f"torch.optim.{self.optimizer} takes no option {', '.join(repr(u) for u in unknown)}"
                f"{did_you_mean(unknown[0], accepted)}; it takes: {', '.join(sorted(accepted))}"
            )
        return self

    def build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The torch optimizer over ``params``; a bad option value raises :class:`ConfigError`."""
        try:
            return getattr(torch.optim, self.optimizer)(params, lr=self.lr, **self.options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"fallback: torch.optim.{self.optimizer}(lr={self.lr}, **{self.options}) fails: {exc}") from None


class OptimizerConfig(_Model):
    """A whole optimizer: groups (first match wins), the fallback, and run-wide options."""

    preset: str | None = Field(None, description="Start from this preset; every other field given here overrides it "
                               "(`groups` given as a mapping merges into the preset's groups by name).")
    groups: list[GroupConfig] = Field(min_length=1, description="The rows of choices, tried in order: a parameter "
                                      "goes to the first group whose `params` match it.")
    fallback: FallbackConfig = Field(default_factory=FallbackConfig,
                                     description="The optimizer of the parameters no group takes (fed the mean gradient).")
    seed: int = Field(0, ge=0, description="Seed of the random streams (sign of zeros, vote tie-breaks, stochastic compressors).")
    nonfinite: Literal["raise", "skip"] = Field(
        "raise", description="A gradient with NaN or Inf on any rank: `raise` an error, or `skip` the step; "
        "either way nothing is sent and no state changes.")
    verify_every: int = Field(0, ge=0, description="Every this many steps, compare an exact checksum of every "
                              "parameter across ranks and raise if they diverged (0: never).")

    @field_validator("groups")
    @classmethod
    def _unique_names(cls, groups: list[GroupConfig]) -> list[GroupConfig]:
        seen: set[str] = set()
        for g in groups:
            if g.name in seen:
                raise ValueError(f"group name {g.name!r} is used twice; group names must be unique")
            seen.add(g.name)
        return groups

    def describe(self) -> str:
        """The resolved config as YAML, for ``commlmo validate`` and logs."""
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=False), sort_keys=False)


# --------------------------------------------------------------------------- loading


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file into a dict."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {str(path)!r}: unknown extension {suffix!r}; use .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid {suffix[1:]}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _merge(base: Any, override: Any, path: str = "") -> Any:
    """Deep-merge ``override`` into ``base``; ``groups`` given as a mapping merge by group name."""
    if path == "groups" and isinstance(override, Mapping) and isinstance(base, list):
        by_name = {g["name"]: g for g in base}
        for name, fields in override.items():
            if name not in by_name:
                raise ConfigError(
                    f"groups.{name}: the preset has no group {name!r}{did_you_mean(name, by_name)}; "
                    f"its groups are: {', '.join(by_name)}"
                )
            if not isinstance(fields, Mapping):
                raise ConfigError(f"groups.{name}: overrides must be a mapping of fields, got {fields!r}")
            by_name[name] = _merge(by_name[name], fields, f"groups.{name}")
        return [by_name[g["name"]] for g in base]
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        out = dict(base)
        for k, v in override.items():
            sub = f"{path}.{k}" if path else k
            # a plugin given with another kind replaces the preset's plugin wholesale
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and v.get("kind", out[k].get("kind")) != out[k].get("kind"):
                out[k] = dict(v)
            else:
                out[k] = _merge(out.get(k), v, sub) if k in out else v
        return out
    return copy.deepcopy(override)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid commlmo config ({source}): {exc.error_count()} error(s)"]
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            msg = f"unknown field {e['loc'][-1]!r}" + _allowed_fields(parent)
        lines.append(f"  {loc} = {shown}: {msg}")
    return "\n".join(lines)


def _allowed_fields(loc: tuple[Any, ...]) -> str:
    model: Any = OptimizerConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return ""
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if model is None or not issubclass(model, BaseModel):
        return ""
    allowed = sorted(model.model_fields)
    return f"; allowed: {', '.join(allowed)}"


def load_config(source: Any) -> OptimizerConfig:
    """Load an :class:`OptimizerConfig` from a path, mapping, preset name or config.

    >>> cfg = load_config("signmuon")
    >>> cfg = load_config({"preset": "muon", "groups": {"hidden": {"lr": 0.01}}})
    >>> cfg = load_config("examples/torch_muon.yaml")
    """
    from .presets import PRESETS, preset_dict

    if isinstance(source, OptimizerConfig):
        return source
    label = "mapping"
    if isinstance(source, (str, Path)):
        text = str(source)
        if isinstance(source, str) and text in PRESETS:
            raw: dict[str, Any] = {"preset": text}
            label = f"preset {text!r}"
        elif Path(text).suffix.lower() in (".yaml", ".yml", ".toml", ".json") or Path(text).exists():
            raw = read_config_file(text)
            label = text
        elif Path(text).suffix:
            raise ConfigError(
                f"{text!r} is not a preset, and {Path(text).suffix!r} is not a config file extension; "
                "use .yaml, .yml, .toml or .json"
            )
        else:
            raise ConfigError(
                f"{text!r} is neither a config file nor a preset{did_you_mean(text, PRESETS)}; "
                f"presets: {', '.join(PRESETS)}"
            )
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        raise ConfigError(f"load_config takes a path, mapping, preset name or OptimizerConfig; got {type(source).__name__}")

    if raw.get("preset") is not None:
        name = raw["preset"]
        if name not in PRESETS:
            raise ConfigError(f"preset = {name!r}: unknown preset{did_you_mean(str(name), PRESETS)}; presets: {', '.join(PRESETS)}")
        raw = _merge(preset_dict(name), {k: v for k, v in raw.items() if k != "preset"})
        raw["preset"] = name
    elif isinstance(raw.get("groups"), Mapping):
        raise ConfigError("groups given as a mapping only override a preset's groups; without a preset, give a list")
    try:
        return OptimizerConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, label)) from None


# --------------------------------------------------------------------------- schema


def config_json_schema() -> dict[str, Any]:
    """JSON schema of a full config, with every installed plugin's fields."""
    from typing import Union

    from pydantic import create_model

    def union(family: str) -> Any:
        classes = tuple(cls.Config for _, cls, err in registry.plugins(family) if cls is not None)
        return Annotated[Union[classes], Field(discriminator="kind")]  # type: ignore[valid-type]

    group = create_model(
        "GroupConfig",
        __base__=GroupConfig,
        lmo=(union("lmo") | None, GROUP_DEFAULTS["lmo"]),
        uplink=(union("compressor"), GROUP_DEFAULTS["uplink"]),
        aggregator=(union("aggregator"), GROUP_DEFAULTS["aggregator"]),
        downlink=(union("compressor"), GROUP_DEFAULTS["downlink"]),
        lr_rule=(union("lr_rule"), GROUP_DEFAULTS["lr_rule"]),
    )
    full = create_model("OptimizerConfig", __base__=OptimizerConfig, groups=(list[group], ...))  # type: ignore[valid-type]
    return full.model_json_schema()
