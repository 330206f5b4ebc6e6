"""The run config of ``commlmo train``: which optimizer, which task, how long.

A run config is a YAML, TOML or JSON file (or a mapping) with three sections::

    optimizer: signmuon                 # anything commlmo.load_config accepts:
                                        # a preset name, a path, or a mapping
    task: {kind: mnist1d, model: cnn}   # mnist1d | matrix | chargpt | custom
    train: {steps: 2000, global_batch: 128, nproc: 4, seed: 0}

Every section is validated by pydantic with ``extra="forbid"``, and an error
names the field, the bad value and what is allowed.  ``TASKS`` holds the
named tasks ``commlmo compare signmuon muon --task mnist1d-cnn`` uses.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .config import OptimizerConfig, load_config, read_config_file
from .errors import ConfigError, did_you_mean
from .tasks import TaskConfig

__all__ = ["ScheduleConfig", "AdversaryConfig", "FaultConfig", "TrainConfig", "RunConfig", "TASKS",
           "RESUMABLE_CHANGES", "load_run_config", "apply_overrides", "is_run_config"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleConfig(_Model):
    """Learning-rate multiplier over steps: linear warmup, then constant, cosine or linear decay to ``final``.

    The run applies it with :class:`torch.optim.lr_scheduler.LambdaLR` (:meth:`scheduler`),
    whose state is checkpointed and resumed with the optimizer's.
    """

    kind: Literal["constant", "cosine", "linear"] = "constant"
    warmup: int = Field(0, ge=0)
    final: float = Field(0.0, ge=0.0, le=1.0)

    def __call__(self, step: int, total: int) -> float:
        """Multiplier for 0-based ``step`` of ``total``."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        t = (step - self.warmup) / max(1, total - self.warmup)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if self.kind == "cosine" else 1 - t
        return self.final + (1 - self.final) * shape

    def lr_lambda(self, total: int) -> Callable[[int], float]:
        """The multiplier of step ``k`` (0-based) of ``total``, as ``LambdaLR`` calls it."""

        def multiplier(step: int) -> float:
            return self(step, total)

        return multiplier

    def scheduler(self, optimizer: Any, total: int) -> Any:
        """A :class:`torch.optim.lr_scheduler.LambdaLR` over ``optimizer``: step 1 runs at ``lr * self(0, total)``.

        Call its ``step()`` after each ``optimizer.step()``.
        """
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, self.lr_lambda(total))


class AdversaryConfig(_Model):
    """Byzantine workers, for robustness experiments: ``ranks`` send ``mode`` messages instead of their own.

    ``flip`` sends ``-v`` (every sign inverted), ``random`` Gaussian noise of the
    same norm, ``zero`` nothing (a sign uplink turns it into random bits); see
    :func:`commlmo.pipeline.corrupt`.  Majority vote tolerates a minority of such
    workers (Bernstein et al. 2019); a float32 mean does not.
    """

    ranks: list[int] = Field(min_length=1, description="Ranks that send corrupted messages.")
    mode: Literal["flip", "amplify", "random", "zero"] = "flip"

    @field_validator("ranks")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if any(r < 0 for r in v):
            raise ValueError(f"ranks must be >= 0; got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"ranks must be distinct; got {v}")
        return sorted(v)

    def check(self, world_size: int) -> None:
        """Raise ``ValueError`` unless every rank exists in a world of ``world_size`` and one stays honest."""
        bad = [r for r in self.ranks if r >= world_size]
        if bad:
            raise ValueError(f"rank(s) {bad} do not exist with {world_size} "
                             f"worker(s) (ranks 0..{world_size - 1}); raise train.nproc or drop them")
        if len(self.ranks) == world_size:
            raise ValueError(f"ranks {self.ranks} make all {world_size} workers adversarial; "
                             "leave at least one honest worker")

    def mode_of(self, rank: int) -> Literal["flip", "amplify", "random", "zero"] | None:
        """What ``rank`` sends: ``mode`` if it is adversarial, else ``None`` (its own messages)."""
        return self.mode if rank in self.ranks else None


class FaultConfig(_Model):
    """Testing hook: rank ``rank`` fails at the start of step ``at_step``.

    ``exit`` ends the process at once (``os._exit(1)``, as a crash or an OOM kill
    would: no exception, no clean-up); ``hang`` stops it answering (the others
    then time out after ``train.collective_timeout_s``).  It fires in the first attempt
    only, not after the launcher restarted the workers (``train.max_restarts``).
    Never part of a real run.
    """

    rank: int = Field(ge=0)
    at_step: int = Field(ge=1)
    kind: Literal["exit", "hang"] = "exit"


#: ``train`` fields a resumed run may change: they steer the run's execution, not what it computes.
RESUMABLE_CHANGES = frozenset({"timeout_s", "collective_timeout_s", "checkpoint_every", "keep_checkpoints",
                               "stop_after", "fault", "backend", "max_restarts"})


class TrainConfig(_Model):
    """How long, on how many workers, and what to measure."""

    steps: int = Field(1000, ge=1)
    global_batch: int = Field(128, ge=1)
    nproc: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval_every: int = Field(100, ge=0)  # 0: evaluate only at the end
    target_loss: float | None = None  # report steps, bytes and time to reach it
    stop_at_target: bool = False  # end the run once the evaluated loss reaches target_loss
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_s: float = Field(3600.0, gt=0.0, description="Bound on the whole run, in seconds.")
    collective_timeout_s: float = Field(
        120.0, gt=0.0, description="Bound on each collective: if a rank dies or hangs, the others stop "
        "with an error after this many seconds instead of waiting forever.")
    checkpoint_every: int = Field(
        0, ge=0, description="Write a checkpoint every this many steps into <out>/checkpoints (0: never); "
        "`commlmo train --resume` continues from the last one.")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the most recent checkpoints to keep.")
    max_restarts: int = Field(
        0, ge=0, description="How many times the launcher restarts every worker after one failed; a restarted "
        "run continues from the newest checkpoint every rank holds intact (ignored under torchrun: use its "
        "--max-restarts).")
    adversaries: AdversaryConfig | None = Field(
        None, description="Byzantine workers: these ranks send flipped, random or zero messages.")
    stop_after: int | None = Field(
        None, ge=1, description="Testing hook: stop after this step as if interrupted (no checkpoint beyond the "
        "last regular one); continue with --resume --set train.stop_after=null.")
    fault: FaultConfig | None = Field(None, description="Testing hook: make one rank die or hang at a step.")

    @model_validator(mode="after")
    def _target_for_stop(self) -> TrainConfig:
        if self.stop_at_target and self.target_loss is None:
            raise ValueError("stop_at_target: true needs target_loss")
        return self

    @field_validator("adversaries", "fault")
    @classmethod
    def _ranks_exist(cls, v: Any, info: ValidationInfo) -> Any:
        nproc = info.data.get("nproc")
        if v is None or nproc is None:
            return v
        if isinstance(v, AdversaryConfig):
            v.check(nproc)
        elif v.rank >= nproc:
            raise ValueError(f"rank {v.rank} does not exist with {nproc} worker(s) (ranks 0..{nproc - 1})")
        return v

class RunConfig(_Model):
    """One training run: ``optimizer``, ``task`` and ``train``."""

    name: str | None = None
    optimizer: str | dict[str, Any] = "muon"
    task: TaskConfig
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("optimizer")
    @classmethod
    def _loadable(cls, v: str | dict[str, Any]) -> str | dict[str, Any]:
        try:
            load_config(v)
        except ConfigError as exc:
            raise ValueError(str(exc).replace("\n", "\n    ")) from None
        return v

    def optimizer_config(self) -> OptimizerConfig:
        return load_config(self.optimizer)

    def label(self) -> str:
        """A short name: ``name``, else the optimizer preset or file stem."""
        if self.name:
            return self.name
        if isinstance(self.optimizer, str):
            return Path(self.optimizer).stem if "/" in self.optimizer or "." in self.optimizer else self.optimizer
        return str(self.optimizer.get("preset") or "custom")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Named tasks for `commlmo compare PRESET... --task NAME`, with step counts and
# schedules tuned on a 2-core CPU (docs/benchmarks/mnist1d.md).
TASKS: dict[str, dict[str, Any]] = {
    "mnist1d-cnn": {
        "task": {"kind": "mnist1d", "model": "cnn"},
        "train": {"steps": 1500, "global_batch": 128, "nproc": 4, "eval_every": 100,
                  "schedule": {"kind": "cosine", "warmup": 50}},
    },
    "mnist1d-mlp": {
        "task": {"kind": "mnist1d", "model": "mlp"},
        "train": {"steps": 1500, "global_batch": 128, "nproc": 4, "eval_every": 100,
                  "schedule": {"kind": "cosine", "warmup": 50}},
    },
    "matrix": {
        "task": {"kind": "matrix", "m": 100, "n": 100},
        "train": {"steps": 300, "global_batch": 4, "nproc": 4, "eval_every": 1,
                  "schedule": {"kind": "linear"}},
    },
    "chargpt": {
        "task": {"kind": "chargpt"},
        "train": {"steps": 300, "global_batch": 32, "nproc": 2, "eval_every": 50,
                  "schedule": {"kind": "cosine", "warmup": 20}},
    },
    # GPT on BPE tokens (1.33 M parameters, 40 % of them in wte + wpe; untied 1.86 M, 57 %)
    "gpt": {
        "task": {"kind": "gpt", "vocab": 4096, "width": 128, "layers": 4, "heads": 4, "block": 64},
        "train": {"steps": 300, "global_batch": 32, "nproc": 4, "eval_every": 50,
                  "schedule": {"kind": "cosine", "warmup": 20}},
    },
    "gpt-untied": {
        "task": {"kind": "gpt", "vocab": 4096, "width": 128, "layers": 4, "heads": 4, "block": 64,
                 "tie_head": False},
        "train": {"steps": 300, "global_batch": 32, "nproc": 4, "eval_every": 50,
                  "schedule": {"kind": "cosine", "warmup": 20}},
    },
}


# --------------------------------------------------------------------------- loading


def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid run config ({source}): {exc.error_count()} error(s)"]
    for e in exc.errors():
        path = e["loc"]
        if len(path) > 1 and path[0] == "task" and path[1] in _task_kinds():
            path = (path[0], *path[2:])  # pydantic puts the union's tag in the path
        loc = ".".join(str(p) for p in path) or "(top level)"
        shown = repr(e.get("input"))
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field {e['loc'][-1]!r}" + _allowed(e["loc"][:-1], str(e["loc"][-1]))
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown task kind; allowed: {', '.join(_task_kinds())}"
        lines.append(f"  {loc} = {shown}: {msg}")
    return "\n".join(lines)


def _task_kinds() -> list[str]:
    from .tasks import KINDS

    return list(KINDS)


def _allowed(loc: tuple[Any, ...], bad: str) -> str:
    from .tasks import KINDS

    model: Any = RunConfig
    for part in loc:
        if part in KINDS:  # the discriminated union puts the kind in the path
            model = KINDS[part].Config
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            if part == "task":
                return f"; tasks: {', '.join(KINDS)}"
            return ""
        ann = field.annotation
        model = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return ""
    names = sorted(model.model_fields)
    return f"{did_you_mean(bad, names)}; allowed: {', '.join(names)}"


def is_run_config(source: Any) -> bool:
    """Whether ``source`` (path or mapping) is a run config (has a ``task``) rather than an optimizer config."""
    if isinstance(source, Mapping):
        return "task" in source
    path = Path(str(source))
    if path.suffix.lower() in (".yaml", ".yml", ".toml", ".json") and path.is_file():
        return "task" in read_config_file(path)
    return False


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.steps": 100}`` -> ``raw["train"]["steps"] = 100`` (values may be YAML strings)."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                why = " ".join(str(getattr(exc, "problem", None) or exc).split())
                raise ConfigError(f"--set {dotted}={value}: the value is not valid YAML ({why}); quote a string "
                                  f"with spaces or colons, e.g. --set '{dotted}=\"...\"'") from None
        node = out
        *parents, leaf = dotted.split(".")
        if not all(parents) or not leaf:
            raise ConfigError(f"--set {dotted}: empty part in the key; expected a dotted path such as train.steps")
        for p in parents:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ConfigError(f"--set {dotted}: {p!r} is not a section")
            node = node[p]
        node[leaf] = value
    return out


def load_run_config(source: Any, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A validated :class:`RunConfig` from a path or mapping, with dotted ``overrides`` applied.

    A relative optimizer path is resolved against the run config's directory, and
    that directory is importable for a custom task.
    """
    if isinstance(source, RunConfig) and not overrides:
        return source
    label = "mapping"
    if isinstance(source, RunConfig):
        raw = source.model_dump(mode="json")
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(str(source))
        if path.suffix.lower() not in (".yaml", ".yml", ".toml", ".json"):
            raise ConfigError(
                f"{str(source)!r} is not a run config file (.yaml, .yml, .toml or .json); "
                f"named tasks for `commlmo compare --task`: {', '.join(TASKS)}"
            )
        raw, label = read_config_file(path), str(path)
        base = path.resolve().parent
        opt = raw.get("optimizer")
        if isinstance(opt, str) and not Path(opt).is_absolute() and (base / opt).exists():
            raw["optimizer"] = str(base / opt)
        task = raw.get("task")
        if isinstance(task, dict) and task.get("kind") == "custom":
            task["paths"] = [*task.get("paths", []), str(base), str(Path.cwd())]
    if "task" not in raw:
        raise ConfigError(f"run config ({label}) has no 'task' section; tasks: {', '.join(_task_kinds())}")
    raw = apply_overrides(raw, overrides or {})
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, label)) from None
