"""The optimizer config: which parameters go where, and what each group runs.

A config is data.  Each *group* is one row of choices -- the LMO and where it
runs, the uplink compressor, the aggregator, the downlink compressor, the
per-layer learning-rate rule, momentum and weight decay -- plus a rule that
says which parameters it takes (name globs and dimensionality, first match
wins: a name glob, a parameter *role* read from the module tree -- ``hidden``,
``embedding``, ``head``, ``norm``, ``bias``, ``vector``, see :mod:`commlmo.routing` --
and the number of dimensions).  Parameters no group takes go to the ``fallback``
group, an ordinary group (AdamW on the float32 mean unless configured).  A group
runs either momentum and an LMO or an element-wise ``rule`` (AdamW, Distributed
Lion, 1-bit Adam...), always through an uplink compressor and an aggregator.

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
from .routing import role_by_shape

__all__ = [
    "MomentumConfig",
    "ParamMatch",
    "ViewConfig",
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
RuleField = _plugin_field("rule")

#: a learning rate or weight decay: a finite real number (YAML ``true`` or ``'0.01'`` are refused, not coerced)
Rate = Annotated[float, Field(ge=0.0, allow_inf_nan=False, strict=True)]


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
    """Which parameters a group takes: any name glob in ``names``, none in ``exclude``, a role in
    ``roles`` and ``ndim`` in ``ndim``."""

    names: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                             description="Globs (fnmatch, case-sensitive) on qualified parameter names; any one may match.")
    exclude: list[str] = Field(default_factory=list, description="Globs that reject a parameter that `names` matched.")
    ndim: list[Annotated[int, Field(ge=0, le=8)]] | None = Field(
        default_factory=lambda: [2, 3, 4, 5], description="Accepted tensor ranks; `null` accepts every rank.")
    roles: list[Literal["hidden", "embedding", "head", "norm", "bias", "vector"]] | None = Field(
        None, description="Accepted parameter roles read from the module tree (see commlmo.routing); "
        "`null` accepts every role.")

    def matches(self, name: str, tensor: torch.Tensor, role: str | None = None) -> bool:
        """Whether the parameter ``name`` (with this tensor and role) belongs to the group."""
        if self.ndim is not None and tensor.ndim not in self.ndim:
            return False
        if self.roles is not None and (role or role_by_shape(name, tensor)) not in self.roles:
            return False
        if not any(fnmatch.fnmatchcase(name, pat) for pat in self.names):
            return False
        return not any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)


class ViewConfig(_Model):
    """How the LMO and scaled compressors see a tensor of 2 or more dimensions.

    * ``auto`` (default) -- what the module tree says (:func:`commlmo.routing.parameter_views`:
      ``nn.MultiheadAttention``'s fused QKV, a model's ``commlmo_blocks``, 3-D+ tensors outside
      convolutions as stacks), else ``matrix``;
    * ``matrix`` -- one matrix ``out x (in*kh*kw...)`` (a conv kernel);
    * ``stack`` -- the leading dimension indexes independent matrices: an MoE expert
      tensor ``[E, m, n]`` is ``E`` matrices (batched Newton--Schulz), not one;
    * ``blocks`` -- dim 0 is ``blocks`` fused matrices of equal height, e.g. a fused QKV
      weight ``[3d, d]`` is 3 (or a merged qkvo weight 4, as in the SignMuon NanoGPT code)
      matrices, each orthogonalised on its own, with one compressor scale per block.
    """

    kind: Literal["auto", "matrix", "stack", "blocks"] = Field("auto", description="`auto`, `matrix`, `stack` or `blocks`.")
    blocks: int = Field(1, ge=1, description="For `blocks`: how many equal slices of dim 0.")

    @model_validator(mode="after")
    def _blocks_for_blocks(self) -> ViewConfig:
        if self.kind == "blocks" and self.blocks < 2:
            raise ValueError("view kind 'blocks' needs blocks >= 2 (e.g. 3 for a fused QKV weight)")
        if self.kind != "blocks" and self.blocks != 1:
            raise ValueError(f"blocks={self.blocks} only applies to view kind 'blocks'")
        return self

    def block_shape(self, shape: torch.Size) -> tuple[int, int, int]:
        """``(B, m, n)``: the tensor seen as ``B`` matrices of ``m x n``."""
        if len(shape) < 2:
            return 1, 1, int(torch.Size(shape).numel())
        if self.kind == "auto":
            return ViewConfig(kind="matrix").block_shape(shape)
        if self.kind == "stack":
            if len(shape) < 3:
                raise ValueError(f"view 'stack' needs a tensor of 3 or more dimensions, got shape {tuple(shape)}")
            return int(shape[0]), int(shape[1]), int(torch.Size(shape[2:]).numel())
        rest = int(torch.Size(shape[1:]).numel())
        if self.kind == "blocks":
            if shape[0] % self.blocks:
                raise ValueError(f"view blocks={self.blocks} must divide dim 0 of shape {tuple(shape)}")
            return self.blocks, int(shape[0]) // self.blocks, rest
        return 1, int(shape[0]), rest


class GroupConfig(_Model):
    """One row of choices, applied to the parameters that ``params`` selects.

    Either ``momentum`` + an ``lmo`` (``lmo_at`` worker, server or none), or an
    element-wise ``rule`` that keeps its own moments (then ``lmo`` is null and
    ``momentum`` is null).
    """

    name: str = Field(min_length=1, description="Unique group name, used by overrides "
                      "(`groups: {hidden: {...}}`) and byte-accounting labels.")
    params: ParamMatch = Field(default_factory=ParamMatch, description="Which parameters the group takes.")
    lmo: LMOField | None = Field(  # type: ignore[valid-type]
        default_factory=lambda: dict(GROUP_DEFAULTS["lmo"]), description="The LMO; `null` together with `lmo_at: none`.")
    rule: RuleField | None = Field(  # type: ignore[valid-type]
        None, description="An element-wise update rule (`adamw`, `lion`, `onebit_adam`...) instead of momentum + LMO.")
    view: ViewConfig = Field(default_factory=ViewConfig,
                             description="How the LMO and scaled compressors see each tensor (matrix, stack, blocks).")
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
    lr: Rate = Field(0.02, description="Learning rate (a finite number >= 0).")
    lr_rule: LRRuleField = Field(  # type: ignore[valid-type]
        default_factory=lambda: dict(GROUP_DEFAULTS["lr_rule"]),
        description="Per-layer multiplier `scale(X)` of the learning rate.")
    momentum: MomentumConfig | None = Field(default_factory=MomentumConfig,
                                            description="Momentum of each worker's gradient; `null`: none "
                                            "(always null with a `rule`).")
    weight_decay: Rate = Field(0.0, description="Decoupled weight decay `wd`: X ← X(1 − lr·wd) before the step.")
    server: Literal["replicated", "owner", "auto"] = Field(
        "auto", description="The server role: `replicated` (every rank runs the server step), `owner` "
        "(each parameter aggregated, given its server step and compressed once, by its owner rank; see "
        "commlmo.owner), `auto` (owner where supported and no dearer in bytes per rank; the choice is shown "
        "by describe_routing()).")
    state_dtype: Literal["param", "float32"] = Field(
        "param", description="Dtype of the group's optimizer state (momentum, a rule's moments, EF21's "
        "estimates, EF21-P's model): `param` (the parameter's own), or `float32` for low-precision "
        "(bfloat16, float16) parameters, whose state then accumulates in float32 and whose update is "
        "rounded to the parameter's dtype once, when it is applied.")

    @model_validator(mode="before")
    @classmethod
    def _rule_defaults(cls, data: Any) -> Any:
        # a rule replaces momentum + LMO: unless given, those default to null (and the lr rule to constant)
        if isinstance(data, Mapping) and data.get("rule") is not None:
            data = dict(data)
            data.setdefault("lmo", None)
            data.setdefault("lmo_at", "none")
            data.setdefault("momentum", None)
            data.setdefault("lr_rule", {"kind": "constant"})
        return data

    @model_validator(mode="after")
    def _compatible(self) -> GroupConfig:
        if self.rule is not None and self.lmo is not None:
            raise ValueError(f"rule {self.rule.kind!r} is an element-wise update rule: it replaces the LMO; "
                             f"set lmo: null (got lmo {self.lmo.kind!r})")
        if self.lmo is None and self.lmo_at != "none":
            raise ValueError(f"lmo is null but lmo_at is {self.lmo_at!r}; set lmo_at: none, or name an lmo")
        if self.lmo is not None and self.lmo_at == "none":
            raise ValueError(f"lmo_at is 'none' but lmo is {self.lmo.kind!r}; set lmo: null or lmo_at: worker|server")
        if self.rule is not None and self.momentum is not None:
            raise ValueError(f"rule {self.rule.kind!r} keeps its own moments; set momentum: null")
        # Declared capabilities only: validating a config builds no plugin.
        up_caps = registry.get("compressor", self.uplink.kind).capabilities_of(self.uplink)
        down_caps = registry.get("compressor", self.downlink.kind).capabilities_of(self.downlink)
        aggregator = registry.get("aggregator", self.aggregator.kind)
        lr_rule = registry.get("lr_rule", self.lr_rule.kind)
        if getattr(up_caps, "downlink_only", False):
            raise ValueError(f"uplink {self.uplink.kind!r} is a downlink-only compressor; use it as downlink")
        why = aggregator.check_uplink(self.aggregator, self.uplink.kind, up_caps)  # type: ignore[attr-defined]
        if why:
            raise ValueError(why)
        del down_caps
        if lr_rule.needs_dual_norm and self.lmo_at != "server":
            raise ValueError(
                f"lr_rule {self.lr_rule.kind!r} reads the dual norm of the aggregate, so it needs "
                f"lmo_at: server (got {self.lmo_at!r})"
            )
        return self


#: torch.optim names the ``fallback`` still accepts in the legacy form, and the rule each becomes
LEGACY_OPTIMIZERS = {"AdamW": "adamw"}


def _legacy_fallback(value: Any) -> Any:
    """Turn ``{optimizer: AdamW, lr, options}`` (the first release's fallback) into a group mapping."""
    if not isinstance(value, Mapping) or not ("optimizer" in value or "options" in value):
        return value
    value = {"optimizer": "AdamW", **value}
    extra = sorted(set(value) - {"optimizer", "lr", "options"})
    if extra:
        raise ValueError(f"a fallback given as {{optimizer: ...}} takes only optimizer, lr, options; "
                         f"got also {', '.join(extra)}")
    name = value["optimizer"]
    names = sorted(
        n for n, o in vars(torch.optim).items()
        if inspect.isclass(o) and issubclass(o, torch.optim.Optimizer) and o is not torch.optim.Optimizer
    )
    if name not in LEGACY_OPTIMIZERS:
        if name not in names:
            raise ValueError(f"fallback.optimizer = {name!r} is not a torch.optim optimizer"
                             f"{did_you_mean(str(name), names)}; "
                             f"allowed: {', '.join(LEGACY_OPTIMIZERS)}, or give the fallback as a group with an "
                             f"element-wise rule ({', '.join(registry.names('rule'))})")
        raise ValueError(f"fallback.optimizer = {name!r}: the fallback is a pipeline group, so it runs commlmo's own "
                         f"element-wise rules; allowed: {', '.join(LEGACY_OPTIMIZERS)} or a group with rule: "
                         f"{' | '.join(registry.names('rule'))}")
    options = dict(value.get("options") or {})
    accepted = {"betas", "eps", "weight_decay"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        real = set(inspect.signature(torch.optim.AdamW.__init__).parameters) - {"self", "params", "lr"}
        raise ValueError(
            f"torch.optim.{name} takes no option {', '.join(repr(u) for u in unknown)}"
            f"{did_you_mean(unknown[0], real)}; it takes: {', '.join(sorted(accepted))} here"
            if unknown[0] not in real else
            f"option {unknown[0]!r} of torch.optim.{name} has no commlmo equivalent; it takes: "
            f"{', '.join(sorted(accepted))}"
        )
    rule: dict[str, Any] = {"kind": LEGACY_OPTIMIZERS[name]}
    if "betas" in options:
        rule["betas"] = options["betas"]
    if "eps" in options:
        rule["eps"] = options["eps"]
    group: dict[str, Any] = {"rule": rule, "uplink": {"kind": "identity"}, "aggregator": {"kind": "mean"}}
    if "lr" in value:
        group["lr"] = value["lr"]
    # the legacy form means torch.optim.AdamW, so its defaults (weight decay 0.01) apply
    group["weight_decay"] = options.get("weight_decay", 0.01)
    return group


class FallbackConfig(GroupConfig):
    """The group of the parameters no other group takes: AdamW on the float32 mean unless configured.

    An ordinary group (any rule or LMO, uplink, aggregator).  The first release's form
    ``{optimizer: AdamW, lr: ..., options: {betas, eps, weight_decay}}`` is still read.
    """

    name: str = Field("fallback", min_length=1, description="Its name in routing and byte accounting.")
    params: ParamMatch = Field(default_factory=lambda: ParamMatch(ndim=None),
                               description="Ignored: the fallback takes whatever no group took.")
    lr: Rate = Field(1e-3, description="Learning rate.")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        data = _legacy_fallback(data)
        if isinstance(data, Mapping):
            data = dict(data)
            if data.get("rule") is None and "lmo" not in data and "momentum" not in data:
                data.setdefault("rule", {"kind": "adamw"})
        return data


class OptimizerConfig(_Model):
    """A whole optimizer: groups (first match wins), the fallback, and run-wide options."""

    preset: str | None = Field(None, description="Start from this preset; every other field given here overrides it "
                               "(`groups` given as a mapping merges into the preset's groups by name).")
    elementwise: Literal["adamw", "lion", "onebit_adam", "signum", "scion"] | None = Field(
        None, description="With a `preset`: the recipe of its embedding, head and vector groups "
        "(default: the preset's own; see commlmo.presets).")
    groups: list[GroupConfig] = Field(min_length=1, description="The rows of choices, tried in order: a parameter "
                                      "goes to the first group whose `params` match it.")
    fallback: FallbackConfig = Field(default_factory=lambda: FallbackConfig.model_validate({}),
                                     description="The group of the parameters no other group takes "
                                     "(default: AdamW on the float32 mean).")
    seed: int = Field(0, ge=0, lt=2**31, strict=True,
                      description="Seed of the random streams (sign of zeros, vote tie-breaks, stochastic compressors).")
    nonfinite: Literal["raise", "skip"] = Field(
        "raise", description="A gradient with NaN or Inf on any rank: `raise` an error, or `skip` the step; "
        "either way nothing is sent and no state changes.")
    verify_every: int = Field(0, ge=0, strict=True, description="Every this many steps, compare an exact checksum of every "
                              "parameter across ranks and raise if they diverged (0: never).")
    bucket_mb: float = Field(25.0, gt=0.0, allow_inf_nan=False,
                             description="Gradient megabytes (MiB) per bucket: each param group's parameters, "
                             "backwards, are cut into buckets that travel together (DDP's default size).")
    overlap: bool = Field(False, strict=True,
                          description="Start each bucket's uplink from a gradient hook as soon as backward() has "
                          "produced its gradients, so transfers overlap the rest of backward (see commlmo.overlap); "
                          "bitwise the same steps.")

    @field_validator("groups")
    @classmethod
    def _unique_names(cls, groups: list[GroupConfig]) -> list[GroupConfig]:
        seen: set[str] = set()
        for g in groups:
            if g.name in seen:
                raise ValueError(f"group name {g.name!r} is used twice; group names must be unique")
            seen.add(g.name)
        return groups

    @model_validator(mode="after")
    def _fallback_name_free(self) -> OptimizerConfig:
        if self.fallback.name in {g.name for g in self.groups}:
            raise ValueError(f"group name {self.fallback.name!r} is the fallback group's; rename the group")
        return self

    def with_rule_options(self, kind: str, **fields: Any) -> OptimizerConfig:
        """A copy in which every group whose rule is ``kind`` has ``fields`` changed, e.g.
        ``cfg.with_rule_options("onebit_adam", warmup=1)`` (benchmarks of a steady state).
        The new values are validated by the rule's own config."""
        def patched(g: GroupConfig) -> GroupConfig:
            if g.rule is None or g.rule.kind != kind:
                return g
            rule = type(g.rule).model_validate(g.rule.model_dump() | fields)
            return g.model_copy(update={"rule": rule})

        return self.model_copy(update={"groups": [patched(g) for g in self.groups],
                                       "fallback": patched(self.fallback)})

    def all_groups(self) -> list[GroupConfig]:
        """The groups in routing order, the fallback last."""
        return [*self.groups, self.fallback]

    def recipe(self) -> dict[str, str]:
        """``{role: group}``: which group takes a parameter of each role (matched by role and ndim only)."""
        from .routing import ROLES

        typical = {"hidden": 2, "embedding": 2, "head": 2, "norm": 1, "bias": 1, "vector": 1}
        out = {}
        for role in ROLES:
            probe = torch.empty((2,) * typical[role], device="meta")
            out[role] = next((g.name for g in self.groups if g.params.exclude == [] and g.params.matches(
                "x.bias" if role == "bias" else "x", probe, role)), self.fallback.name)
        return out

    def describe_recipe(self) -> str:
        """One line per parameter role: the group, its rule or LMO, uplink, aggregator and downlink."""
        by_name = {g.name: g for g in self.all_groups()}
        lines = []
        for role, name in self.recipe().items():
            g = by_name[name]
            lines.append(f"{role:<9} -> {name:<9} {describe_group(g)}")
        return "\n".join(lines)

    def describe(self) -> str:
        """The resolved config as YAML, for ``commlmo validate`` and logs."""
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=False), sort_keys=False)


def describe_group(g: GroupConfig) -> str:
    """``lion -> sign -> majority_vote -> identity`` style summary of one group's stages."""
    if g.rule is not None:
        step = g.rule.kind
    elif g.lmo is not None:
        step = f"{g.lmo.kind}@{g.lmo_at}"
    else:
        step = f"momentum({g.momentum.beta:g})" if g.momentum is not None else "gradient"
    up = g.uplink.kind + ("(scaled)" if getattr(g.uplink, "scale", "none") != "none" else "")
    return f"{step}  uplink={up}  aggregator={g.aggregator.kind}  downlink={g.downlink.kind}  lr={g.lr:g}"


# --------------------------------------------------------------------------- loading


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file into a dict."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start} is "
                          f"{exc.object[exc.start:exc.start + 1]!r}); configs are YAML, TOML or JSON text") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if "\x00" in text:
        raise ConfigError(f"config file {str(path)!r} contains NUL bytes; configs are YAML, TOML or JSON text")
    try:
        if suffix in (".yaml", ".yml"):
            data = _load_yaml(text)
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
    _check_size(data, str(path))
    return data


#: the most values (scalars, lists and mappings, aliases expanded) a config may hold
MAX_CONFIG_VALUES = 100_000


def _check_size(data: Any, source: str) -> None:
    """Refuse a config that expands to more than :data:`MAX_CONFIG_VALUES` values (a YAML alias bomb)."""
    budget = [MAX_CONFIG_VALUES]

    def walk(x: Any) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(f"config {source!r} expands to more than {MAX_CONFIG_VALUES:,} values "
                              "(nested YAML aliases?); a commlmo config is a few hundred at most")
        if isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(data)


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``1e-3`` as a number (YAML 1.2), not as the string '1e-3'."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


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
            # a plugin given with another kind replaces the preset's plugin wholesale, and so
            # does a fallback in the first release's {optimizer: ...} form
            if sub == "fallback" and isinstance(v, Mapping) and ("optimizer" in v or "options" in v):
                out[k] = {"optimizer": "AdamW", **v}
            elif isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and v.get("kind", out[k].get("kind")) != out[k].get("kind"):
                out[k] = dict(v)
            else:
                out[k] = _merge(out.get(k), v, sub) if k in out else v
        return out
    return copy.deepcopy(override)


def _format_validation_error(exc: ValidationError, source: str, raw: Any = None) -> str:
    lines = [f"invalid commlmo config ({source}): {exc.error_count()} error(s)"]
    groups = raw.get("groups") if isinstance(raw, Mapping) else None
    for e in exc.errors():
        parts = [str(p) for p in e["loc"]]
        # name a group as the user does (`groups.hidden`), not by its position in the list
        if len(parts) > 1 and parts[0] == "groups" and parts[1].isdigit() and isinstance(groups, list):
            i = int(parts[1])
            if i < len(groups) and isinstance(groups[i], Mapping) and isinstance(groups[i].get("name"), str):
                parts[1] = groups[i]["name"]
        loc = ".".join(parts) or "(top level)"
        value = e.get("input")
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("float_type", "int_type", "bool_type"):
            msg += f" (got {type(value).__name__}: write an unquoted number such as 0.02; nothing is coerced)"
        elif e["type"] == "finite_number":
            msg += "; allowed: a finite number (not .inf or .nan)"
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
        from .presets import ELEMENTWISE

        recipe = raw.get("elementwise")
        if recipe is not None and recipe not in ELEMENTWISE:
            raise ConfigError(f"elementwise = {recipe!r}: unknown element-wise recipe"
                              f"{did_you_mean(str(recipe), ELEMENTWISE)}; allowed: {', '.join(ELEMENTWISE)}")
        raw = _merge(preset_dict(name, elementwise=recipe), {k: v for k, v in raw.items() if k != "preset"})
        raw["preset"] = name
    elif isinstance(raw.get("groups"), Mapping):
        raise ConfigError("groups given as a mapping only override a preset's groups; without a preset, give a list")
    try:
        return OptimizerConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, label, raw)) from None


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
