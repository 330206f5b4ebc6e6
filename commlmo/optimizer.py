r"""``CommOptimizer``: a ``torch.optim.Optimizer`` that runs a config's groups over a communicator.

Build it with :func:`build_optimizer`::

    opt = commlmo.build_optimizer(model, "signmuon")          # preset
    opt = commlmo.build_optimizer(model, "examples/torch_muon.yaml")
    opt = commlmo.build_optimizer([{"params": model.wte.parameters(), "group": "embedding", "lr": 1e-3},
                                   {"params": model.blocks.parameters()}], "signmuon")   # torch-style groups

Call ``loss.backward()`` on each rank's own batch, then ``opt.step()``: the
optimizer aggregates the workers' messages itself, so the model must *not* be
wrapped in ``DistributedDataParallel`` (refused at build time, and detected at
the next step when the model is wrapped afterwards and DDP's reduction was not
turned off: :mod:`commlmo.integrations`).  Without an initialised process group
it runs on one process and calls no collective; built before
``init_process_group`` under a launcher (``WORLD_SIZE`` > 1) it binds to the
world group at its first step (or ``load_state_dict``), and refuses to step if
there is still none.

Conventions from ``torch.optim``: ``param_groups`` (one per non-empty pipeline
group, the fallback group included, with ``params`` and ``param_names``, and
one more per :meth:`~CommOptimizer.add_param_group` or torch-style group that
overrides ``lr``/``weight_decay``), ``defaults`` with the hyperparameters LR
schedulers read (``lr``, ``weight_decay``, ``momentum``; ``betas`` when every
group's rule has them), lazily created ``state[p]``,
``state_dict``/``load_state_dict`` (momentum, error-feedback buffers, rule
moments, random generators; a state of another config or model is refused and
changes nothing; ``torch.distributed.checkpoint.state_dict`` round-trips it too),
closures, and ``torch.amp.GradScaler`` (``step`` is always called and agrees on
the scaler's inf check across ranks).  ``opt.routing()`` and
``opt.describe_routing()`` say where each parameter went.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch import Tensor

from .comm import Communicator, make_communicator
from .config import OptimizerConfig, ViewConfig, describe_group, load_config
from .errors import ConfigError, DistributedError, NonFiniteGradientError, did_you_mean
from .consistency import check_layout, verify_parameters
from .overlap import Bucket, Overlap, plan_buckets
from .pipeline import Adversary, BucketStep, GroupRuntime
from .plugin import finite_inputs
from .routing import parameter_roles, parameter_views, role_by_shape
from .sharding import is_dtensor, plan_sharding, replicate_communicator

__all__ = ["CommOptimizer", "build_optimizer", "named_parameters_of"]

#: the keys a torch-style param-group dict may hold (``build_optimizer`` and ``add_param_group``)
GROUP_KEYS = ("params", "param_names", "group", "lr", "weight_decay")
#: the per-parameter state keys that carry each group's random generators in a state dict
_GEN_KEYS = ("commlmo_generator_shared", "commlmo_generator_local")
#: the flags of the step's agreement, one byte each (the agreement takes their max over ranks), returned as
#: bits: 1 = a NaN/Inf gradient, 2 = a grad scaler found one (all ranks skip, whatever ``nonfinite`` says: the
#: scaler backs off and retries); with ``overlap``, 4 = a gradient hook failed on some rank, 8 = a gradient
#: changed after its bucket was sent (send again)
_NONFINITE, _SCALER_INF, _HOOK_ERROR, _RESEND = 1, 2, 4, 8
_FLAGS = (_NONFINITE, _SCALER_INF, _HOOK_ERROR, _RESEND)


def named_parameters_of(model_or_params: Any) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs from a module, named pairs, or plain tensors (named ``params.i``).

    A tensor given twice (under two names, or twice in a list) is refused: it would
    be updated twice per step.
    """
    if isinstance(model_or_params, torch.nn.Module):
        wrapper = type(model_or_params).__name__
        if isinstance(model_or_params, torch.nn.parallel.DistributedDataParallel) or wrapper in (
            "FullyShardedDataParallel", "DataParallel"
        ):
            raise DistributedError(
                f"the model is wrapped in {wrapper}, which all-reduces gradients in float32 before "
                "commlmo aggregates them again (paying twice, and defeating compression). Pass the "
                "unwrapped module (model.module) and let the commlmo optimizer do the communication."
            )
        named = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
    else:
        items = list(model_or_params)
        if not items:
            raise ConfigError("build_optimizer got an empty parameter list; pass a model or at least one parameter")
        if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
            named = [(n, p) for n, p in items]
        elif all(isinstance(x, Tensor) for x in items):
            named = [(f"params.{i}", p) for i, p in enumerate(items)]
        else:
            raise ConfigError("parameters must be a module, (name, tensor) pairs, or tensors (or a list of "
                              "torch-style param-group dicts: {'params': [...], 'group': ..., 'lr': ...})")
    seen: dict[int, str] = {}
    names: set[str] = set()
    for n, p in named:
        if isinstance(p, Tensor) and id(p) in seen:
            raise ConfigError(f"parameter {n!r} is the same tensor as {seen[id(p)]!r}; pass each parameter "
                              "once (it would be updated twice per step)")
        if n in names:
            raise ConfigError(f"two parameters are both named {n!r}; names must be unique")
        if isinstance(p, Tensor):
            seen[id(p)] = n
        names.add(n)
    return named


def _config_fingerprint(config: OptimizerConfig) -> str:
    """A short hash of the resolved config (what a state dict must have been saved under)."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rate(value: Any, where: str, key: str) -> float:
    """A param group's ``lr`` or ``weight_decay``: a finite real number >= 0."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: {key} = {value!r}; allowed: a finite number >= 0")
    return float(value)


def _group_dict(spec: Any, where: str, group_names: list[str], *, first_index: int) -> tuple[list, dict]:
    """``([(name, tensor)], overrides)`` of one torch-style param-group dict; refuses what it cannot honour.

    Tensors without a name are named ``params.<i>`` counting from ``first_index``.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a dict with 'params', got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(GROUP_KEYS), key=str)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; a commlmo param group takes "
            f"{', '.join(GROUP_KEYS)}. Other hyperparameters (momentum, betas, eps...) belong to the config "
            f"group (groups: {', '.join(group_names)}): set them in the optimizer config"
        )
    if "params" not in spec:
        raise ConfigError(f"{where} has no 'params'")
    params = spec["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, (set, frozenset)):
        raise ConfigError(f"{where}: params is a set, whose order changes between runs; pass a list")
    elif isinstance(params, torch.nn.Module):
        params = list(params.named_parameters())
    else:
        try:
            params = list(params)
        except TypeError:
            raise ConfigError(f"{where}: params must be tensors or (name, tensor) pairs, got "
                              f"{type(params).__name__}") from None
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in params) and params:
        if "param_names" in spec:
            raise ConfigError(f"{where}: give names either as (name, tensor) pairs or as param_names, not both")
        named = [(n, p) for n, p in params]
    elif all(isinstance(x, Tensor) for x in params):
        names = spec.get("param_names")
        if names is None:
            names = [f"params.{first_index + i}" for i in range(len(params))]
        else:
            names = list(names)
            if len(names) != len(params) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"{where}: param_names must be one string per parameter "
                                  f"({len(params)} parameters, {len(names)} names)")
        named = list(zip(names, params))
    else:
        bad = next(x for x in params if not isinstance(x, Tensor))
        raise ConfigError(f"{where}: params must be tensors or (name, tensor) pairs, got a {type(bad).__name__}")
    overrides: dict[str, Any] = {}
    if "group" in spec:
        name = spec["group"]
        if name not in group_names:
            raise ConfigError(f"{where}: group = {name!r} is not a group of this config"
                              f"{did_you_mean(str(name), group_names)}; its groups are: {', '.join(group_names)}")
        overrides["group"] = name
    for key in ("lr", "weight_decay"):
        if key in spec:
            overrides[key] = _rate(spec[key], where, key)
    return named, overrides


def _active_ddp() -> Any:
    """The ``DistributedDataParallel`` whose forward is running now, or ``None``."""
    return getattr(torch.nn.parallel.DistributedDataParallel, "_active_ddp_module", None)


def _ddp_hooked(p: Tensor) -> bool:
    """Whether a hook DDP registers (compiled/python reducer, delayed all-reduce) sits on ``p``, from a DDP
    whose reduction was not turned off (:func:`commlmo.integrations.turn_off_ddp_reduction`)."""
    from .integrations import reduction_is_off

    ddp = torch.nn.parallel.DistributedDataParallel
    for hooks in (getattr(p, "_backward_hooks", None), getattr(p, "_post_accumulate_grad_hooks", None)):
        for h in (hooks or {}).values():
            fn = getattr(h, "func", h)
            owner = getattr(fn, "__self__", None)
            if not isinstance(owner, ddp):  # the compiled reducer's hook is a closure over its DDP
                for cell in getattr(fn, "__closure__", None) or ():
                    try:
                        if isinstance(cell.cell_contents, ddp):
                            owner = cell.cell_contents
                    except ValueError:  # an empty cell
                        pass
            if isinstance(owner, ddp):
                if not reduction_is_off(owner):
                    return True
            elif getattr(fn, "__qualname__", "").startswith("DistributedDataParallel."):
                return True
    return False


def _digest(value: Any) -> str:
    """What must be equal for a state entry to be the same on two ranks: type, dtype, shape and bits."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


class _DDPProbe:
    """A forward pre-hook on the module an optimizer was built for: notes a forward run inside DDP.

    DDP's reducer leaves nothing on the parameters that Python can see, but it runs
    the wrapped module's forward inside ``DistributedDataParallel._active_ddp_module``.
    The probe holds the optimizer weakly and is dropped when the module is copied or pickled.
    """

    def __init__(self, opt: CommOptimizer):
        self._ref: Any = weakref.ref(opt)

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        ddp = _active_ddp() if self._ref is not None else None
        if ddp is not None:
            opt = self._ref()
            if opt is not None:
                opt._note_ddp(ddp)

    def __getstate__(self) -> dict[str, Any]:
        return {"_ref": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._ref = None


def _maybe_nonfinite(grads: list[Tensor], device: Any) -> Tensor:
    """A 0-d bool, with no host read: might a gradient hold a NaN or an Inf?

    One sum per gradient (one read, no full-size temporary): a finite sum proves every
    entry finite; a non-finite one means a NaN or an Inf -- or finite entries whose sum
    overflows, which :func:`_nonfinite` settles exactly, only then.
    """
    if not grads:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.stack([g.sum().to(device) for g in grads]).isfinite().all().logical_not()


def _nonfinite(grads: list[Tensor], device: Any) -> Tensor:
    """A 0-d bool: does a gradient hold a NaN or an Inf (entry by entry)?"""
    if not grads:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.stack([torch.isfinite(g).all().to(device) for g in grads]).all().logical_not()


class CommOptimizer(torch.optim.Optimizer):
    """Communication-efficient layer-wise LMO optimizer described by an :class:`OptimizerConfig`.

    Every parameter belongs to a pipeline group (the config's groups, first match
    wins, then the ``fallback`` group, unless a torch-style group names one), each
    with an uplink compressor and an aggregator; ``param_groups`` has one entry per
    non-empty group (and per ``lr``/``weight_decay`` override), with torch's
    ``params``/``param_names``, the config group's name under ``group``, and the
    group's ``lr``, ``weight_decay``, ``momentum`` and, for rules that have them,
    ``betas``: all read at every step, so schedulers may change them.
    """

    #: ``torch.amp.GradScaler`` always calls :meth:`step` (setting ``grad_scale`` and ``found_inf`` on the
    #: optimizer) instead of skipping it on a rank that found an inf: the ranks agree on skipping in the
    #: step's one agreement collective, so no rank is left waiting in a collective the others skipped
    _step_supports_amp_scaling = True

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        config: OptimizerConfig,
        *,
        comm: Communicator,
        adversary: Adversary | None = None,
        roles: dict[str, str] | None = None,
        views: dict[str, dict] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
    ):
        self.config, self.comm, self._adversary = config, comm, adversary
        named = list(named_params)
        # FSDP2: DTensor parameters run on their local shards, the LMO gathered in the shard group (commlmo.sharding)
        self._sharding = plan_sharding(named, comm, config)
        roles = dict(roles or {})
        overrides = dict(overrides or {})
        all_groups = config.all_groups()
        self._roles: dict[str, str] = {}
        # (config group index, lr, weight_decay) -> members, in order of first appearance
        buckets: dict[tuple[int, float, float], list[tuple[str, Tensor]]] = {}
        for name, p in named:
            self._check_param(name, p)
            role = roles.get(name) or role_by_shape(name, p)
            self._roles[name] = role
            o = overrides.get(name, {})
            gi = self._group_index(o["group"]) if "group" in o else self._route(name, p, role)
            g = all_groups[gi]
            buckets.setdefault((gi, o.get("lr", g.lr), o.get("weight_decay", g.weight_decay)), []).append((name, p))

        runtimes: dict[int, GroupRuntime] = {}
        for gi, gcfg in enumerate(all_groups):
            members = [m for key, ms in buckets.items() if key[0] == gi for m in ms]
            if not members:
                continue
            rt = self._build_runtime(gcfg, gi, members, views=views, seed=config.seed, comm=comm,
                                     adversary=adversary)
            rt.sharding = self._sharding
            for name, p in members:
                self._check_member(rt, gcfg, name, p)
            runtimes[gi] = rt

        groups, self._runtimes = [], []
        for (gi, lr, wd), members in sorted(buckets.items(), key=lambda kv: kv[0][0]):  # stable: config order
            self._runtimes.append(runtimes[gi])
            groups.append(self._entry(all_groups[gi], members, lr=lr, weight_decay=wd))
        if not groups:
            raise ConfigError("build_optimizer got no trainable parameters")
        first = groups[0]
        defaults = {"lr": first["lr"], "weight_decay": first["weight_decay"], "momentum": first["momentum"]}
        if all("betas" in g for g in groups):  # OneCycleLR(cycle_momentum=True) then cycles beta1
            defaults["betas"] = first["betas"]
        self._building = True
        super().__init__(groups, defaults=defaults)
        self._building = False
        self.steps, self.skipped_steps, self._layout_checked = 0, 0, False
        self._rule_variants: dict[int, tuple[tuple[float, ...], Any]] = {}
        self._ddp_seen: str | None = None
        self._ddp_checked: set[int] = set()
        self._built_before_pg: int | None = None
        self._overlap: Overlap | None = Overlap(self) if config.overlap else None
        self._book_open = False
        self._plan_buckets()

    # ------------------------------------------------------------------ routing
    def _group_index(self, name: str) -> int:
        return [g.name for g in self.config.all_groups()].index(name)

    def _route(self, name: str, p: Tensor, role: str) -> int:
        """The config group a parameter goes to: the first whose ``params`` match, else the fallback."""
        for i, g in enumerate(self.config.groups):
            if g.params.matches(name, p, role):
                return i
        return len(self.config.groups)

    @staticmethod
    def _entry(gcfg: Any, members: list[tuple[str, Tensor]], *, lr: float, weight_decay: float) -> dict[str, Any]:
        """A ``param_groups`` entry of config group ``gcfg``."""
        entry: dict[str, Any] = {
            "params": [p for _, p in members], "param_names": [n for n, _ in members], "group": gcfg.name,
            "lr": lr, "weight_decay": weight_decay,
            "momentum": gcfg.momentum.beta if gcfg.momentum is not None else 0.0,
        }
        betas = getattr(gcfg.rule, "betas", None) if gcfg.rule is not None else None
        if betas is not None:
            entry["betas"] = tuple(betas)
        return entry

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters, routed like those given at build time (``torch.optim`` convention).

        ``param_group`` is ``{"params": ..., "group": <config group>, "lr": ..., "weight_decay": ...}``
        (all but ``params`` optional; ``param_names`` or ``(name, tensor)`` pairs name the tensors,
        else they are ``params.<i>``).  Without ``group`` the parameters are routed by the config's
        rules, roles read from shape and name only (there is no module), so they may land in several
        config groups: one ``param_groups`` entry each, sharing the runtime (plugins, generators) of
        that config group, built now if no parameter took it before.  Anything it cannot honour is
        refused with a :class:`~commlmo.errors.ConfigError` and changes nothing.  Every rank must add
        the same parameters (the next step checks the layout across ranks again).
        """
        if getattr(self, "_building", False):
            super().add_param_group(param_group)
            return
        all_groups = self.config.all_groups()
        group_names = [g.name for g in all_groups]
        where = f"add_param_group (param group {len(self.param_groups)})"
        total = sum(len(g["params"]) for g in self.param_groups)
        named, o = _group_dict(param_group, where, group_names, first_index=total)
        if not named:
            raise ConfigError(f"{where}: no parameters; every added group must hold at least one parameter")
        owner = {id(p): n for g in self.param_groups for n, p in zip(g["param_names"], g["params"])}
        names = set(owner.values())
        new: dict[int, list[tuple[str, Tensor]]] = {}
        roles: dict[str, str] = {}
        for name, p in named:
            self._check_param(name, p)
            if id(p) in owner:
                raise ConfigError(f"{where}: parameter {name!r} is already optimized (as {owner[id(p)]!r}); "
                                  "a parameter belongs to one param group")
            if name in names:
                raise ConfigError(f"{where}: a parameter is already named {name!r}; names must be unique "
                                  "(pass param_names or (name, tensor) pairs)")
            if not (p.is_leaf or p.retains_grad):
                raise ConfigError(f"{where}: parameter {name!r} is not a leaf tensor; optimize leaves only")
            owner[id(p)], roles[name] = name, role_by_shape(name, p)
            names.add(name)
            gi = self._group_index(o["group"]) if "group" in o else self._route(name, p, roles[name])
            new.setdefault(gi, []).append((name, p))
        plan: list[tuple[GroupRuntime, dict[str, Any]]] = []
        for gi in sorted(new):
            gcfg, members = all_groups[gi], new[gi]
            rt = next((r for r in self._runtimes if r.index == gi), None)
            if rt is None:  # a config group no parameter took so far: build it now
                rt = self._build_runtime(gcfg, gi, members, views=None, seed=self.config.seed, comm=self.comm,
                                         adversary=self._adversary)
            for name, p in members:
                self._check_member(rt, gcfg, name, p)
            plan.append((rt, self._entry(gcfg, members, lr=o.get("lr", gcfg.lr),
                                         weight_decay=o.get("weight_decay", gcfg.weight_decay))))
        for rt, entry in plan:  # everything was checked: commit
            keys = set(entry)
            super().add_param_group(entry)
            for k in set(entry) - keys:  # a default of another kind of group (betas on a momentum group)
                del entry[k]
            if all(q is not entry["params"][0] for q in rt.members):  # an existing runtime: place them
                rt.members.extend(entry["params"])
                if rt.server == "owner":
                    from .owner import assign_owners

                    rt.owners = assign_owners(rt.members, self.comm.world_size, rt.owners)
            self._runtimes.append(rt)
        self._roles.update(roles)
        self._layout_checked = False
        self._plan_buckets()

    @classmethod
    def _build_runtime(cls, gcfg: Any, index: int, members: list[tuple[str, Tensor]], *, views: dict | None,
                       seed: int, comm: Communicator, adversary: Adversary | None) -> GroupRuntime:
        """A group's plugins and its plan (block views, transport, server role) for ``members``."""
        rt = GroupRuntime.build(gcfg, index=index, seed=seed, rank=comm.rank, device=members[0][1].device)
        rt.adversary = adversary
        rt.views = {id(p): ViewConfig.model_validate(views[n]) for n, p in members if views and n in views}
        rt.members = [p for _, p in members]
        rt.transport = rt.plan(rt.members, world_size=comm.world_size)
        cls._plan_server(rt, gcfg, rt.members, comm.world_size)
        return rt

    @staticmethod
    def _plan_server(rt: GroupRuntime, gcfg: Any, params: list[Tensor], world_size: int) -> None:
        """The group's server role: ``owner`` (checked), ``replicated``, or what ``auto`` picks, with why."""
        from .owner import assign_owners, choose_server, owner_problem

        if gcfg.server == "owner":
            why = owner_problem(rt)
            if why is not None:
                raise ConfigError(f"groups.{gcfg.name}: server: owner is not supported here: {why}; "
                                  "use server: replicated (or auto)")
            rt.server, rt.server_reason = "owner", "configured"
        elif gcfg.server == "auto":
            rt.server, rt.server_reason = choose_server(rt, params, world_size)
        else:
            rt.server, rt.server_reason = "replicated", "configured"
        rt.owners = assign_owners(params, world_size) if rt.server == "owner" else []

    def _check_param(self, name: str, p: Tensor) -> None:
        if not isinstance(p, Tensor):
            raise ConfigError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
        sharding = getattr(self, "_sharding", None)
        if (is_dtensor(p) or sharding is not None) and (sharding is None or id(p) not in sharding.specs):
            raise ConfigError(f"parameter {name!r}: an optimizer of FSDP-sharded (DTensor) parameters takes all of "
                              "them when it is built, and nothing else; add_param_group cannot add a parameter to "
                              "it or a DTensor to an optimizer of plain tensors. Build the optimizer again with "
                              "every parameter")
        if p.is_complex():
            raise ConfigError(f"parameter {name!r} is complex ({p.dtype}); commlmo optimizes real tensors only")
        if not p.is_floating_point():
            raise ConfigError(f"parameter {name!r} has dtype {p.dtype}; commlmo optimizes floating-point tensors")

    @staticmethod
    def _check_member(rt: GroupRuntime, gcfg: Any, name: str, p: Tensor) -> None:
        """Fail at build time, naming the parameter, for what would fail at step 1."""
        if p.device != rt.generators.device:
            raise ConfigError(
                f"groups.{gcfg.name}: parameter {name!r} is on {p.device}, the group's other parameters on "
                f"{rt.generators.device}; a group's parameters travel and draw their random streams together, "
                "so they must share a device: move it, or give it a group of its own (params.names)")
        try:
            b, m, n = rt.block_shape(p)
        except ValueError as exc:
            raise ConfigError(f"groups.{gcfg.name}: parameter {name!r}: {exc}") from None
        ndim = 2 if rt.view_of(p).kind != "matrix" else p.ndim
        if rt.lmo is not None and not rt.lmo.capabilities.accepts(ndim):
            raise ConfigError(
                f"groups.{gcfg.name}: lmo {rt.lmo.kind!r} does not accept parameter {name!r} of shape "
                f"{tuple(p.shape)} ({p.ndim}-D); narrow params.ndim or pick another lmo"
            )
        if not rt.lr_rule.needs_dual_norm:  # shape-only rules: fail now, not at step 1
            try:
                rt.lr_scale(p, name)
            except ValueError as exc:
                raise ConfigError(f"groups.{gcfg.name}: parameter {name!r}: {exc}") from None
        if rt.sharding is not None:  # FSDP2: what the sharded pipeline cannot do (commlmo.sharding)
            rt.sharding.check_member(rt, gcfg, name, p)

    # ------------------------------------------------------------------ info
    @property
    def bytes(self):
        """Byte accounting of this rank: ``.step`` (last step) and ``.total``, per collective."""
        return self.comm.bytes

    @property
    def names(self) -> list[list[str]]:
        """Parameter names per param group (torch's ``param_names``)."""
        return [list(g["param_names"]) for g in self.param_groups]

    def routing(self) -> dict[str, list[str]]:
        """Which parameter names each group took (the fallback group included when it took any)."""
        out: dict[str, list[str]] = {}
        for g in self.param_groups:
            out.setdefault(g["group"], []).extend(g["param_names"])
        return out

    def describe_routing(self) -> str:
        """Where each parameter went: per group its stages, then each tensor with its role and shape."""
        lines = []
        for rt, g in zip(self._runtimes, self.param_groups):
            numel = sum(p.numel() for p in g["params"])
            role = f"server={rt.server}" + (f" ({rt.config.server}: {rt.server_reason})"
                                             if rt.config.server == "auto" and rt.server_reason else "")
            transport = "to owners (all-to-all-v)" if rt.server == "owner" and self.comm.world_size > 1 else rt.transport
            lines.append(f"{g['group']}: {describe_group(rt.config)}  transport={transport}  {role}  "
                         f"({len(g['params'])} tensors, {numel:,} entries)")
            for n, p in zip(g["param_names"], g["params"]):
                view = rt.view_of(p)
                shown = "" if view.kind == "matrix" or p.ndim < 2 else (
                    f"  view={view.kind}" + (f"({view.blocks})" if view.kind == "blocks" else ""))
                lines.append(f"    {n}  [{self._roles.get(n, '?')}]  {tuple(p.shape)}{shown}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ guards
    def _watch(self, module: torch.nn.Module) -> None:
        """Notice, from now on, a forward of ``module`` run by ``DistributedDataParallel``."""
        handle = module.register_forward_pre_hook(_DDPProbe(self))
        weakref.finalize(self, handle.remove)

    def _note_ddp(self, ddp: Any) -> None:
        """A DDP forward ran one of our modules: remember it if its backward will reduce our parameters.

        Checked at every forward, because DDP decides at forward time: its backward reduces
        nothing when the forward ran under ``no_sync()`` or without grad, nor when
        :func:`commlmo.integrations.local_gradients` replaced its reduction.  A DDP whose
        reduction an integration asked to turn off (``_ddp_turn_off``) gets that hook now,
        before its first backward.
        """
        if self._ddp_seen is not None or not torch.is_grad_enabled() or \
                not getattr(ddp, "require_backward_grad_sync", True):
            return
        from .integrations import local_gradients, reduction_is_off

        if reduction_is_off(ddp):
            return
        if id(ddp) in self._ddp_checked:  # checked before: it reduces none of our parameters
            return
        reduced = getattr(ddp, "_module_parameters", None)
        if reduced is None:
            reduced = list(ddp.module.parameters()) if isinstance(getattr(ddp, "module", None), torch.nn.Module) else []
        ours = {id(p) for g in self.param_groups for p in g["params"]}
        if not any(id(p) in ours for p in reduced):
            self._ddp_checked.add(id(ddp))
            return
        hooks = [getattr(h, "__qualname__", repr(h)) for h, _ in getattr(ddp, "_comm_hooks", ())]
        if not hooks and getattr(self, "_ddp_turn_off", False) and hasattr(ddp, "register_comm_hook"):
            ddp.register_comm_hook(None, local_gradients)
            return
        self._ddp_seen = type(ddp).__name__ + (f" (communication hook {', '.join(hooks)})" if hooks else "")

    def _bind_to_process_group(self, *, strict: bool) -> None:
        """Bind an optimizer built before the process group (``WORLD_SIZE`` > 1) to the world group.

        Frameworks initialise ``torch.distributed`` themselves (``TrainingArguments``,
        ``Accelerator()``, Lightning's strategy setup), often after the optimizer was
        built: the communicator and each group's plan (transport, server role, the
        rank's random streams) are made again for the world group, which is only
        possible before the first step.  ``strict``: refuse when the group still does
        not exist (a step, a load), instead of leaving the optimizer unbound.
        """
        n = self._built_before_pg
        if n is None:
            return
        if not (dist.is_available() and dist.is_initialized()):
            if not strict:
                return
            raise DistributedError(
                f"WORLD_SIZE={n} in the environment, but torch.distributed was never initialised, so this "
                "optimizer would be a world of one and each rank would train alone. Call "
                "dist.init_process_group() (or commlmo.launch.init_from_env(), or let your framework do it) "
                "before the first step or load_state_dict: the optimizer binds to the world group then. "
                "Pass process_group=commlmo.LocalComm() to train on one process on purpose")
        comm = make_communicator()
        if comm.world_size != n:
            raise DistributedError(
                f"WORLD_SIZE={n} in the environment when the optimizer was built, but the process group that "
                f"now exists has {comm.world_size} ranks; build the optimizer under the launcher that runs it, "
                "or pass process_group=")
        if self.steps or self.skipped_steps:
            raise DistributedError("this optimizer stepped as a world of one before the process group existed; "
                                   "build it again after dist.init_process_group()")
        rebuilt: dict[int, GroupRuntime] = {}
        for rt in self._runtimes:
            if id(rt) in rebuilt:
                continue
            members = [(n_, p) for r, g in zip(self._runtimes, self.param_groups) if r is rt
                       for n_, p in zip(g["param_names"], g["params"])]
            views = {n_: rt.views[id(p)] for n_, p in members if id(p) in rt.views}
            rebuilt[id(rt)] = self._build_runtime(rt.config, rt.index, members, views=views, seed=self.config.seed,
                                                  comm=comm, adversary=self._adversary)
        self._runtimes = [rebuilt[id(rt)] for rt in self._runtimes]
        self.comm, self._built_before_pg, self._layout_checked = comm, None, False
        if hasattr(self, "_plan_buckets"):
            self._plan_buckets()

    def _check_stack(self, entries: list[tuple[str, Tensor]], first: bool) -> None:
        """Refuse to step, before anything is sent, under a PyTorch stack that would break the step.

        Binds an optimizer built before the process group to it (:meth:`_bind_to_process_group`),
        and refuses a ``DistributedDataParallel`` that reduces our parameters in its backward.
        """
        self._bind_to_process_group(strict=True)
        if self._ddp_seen is None and first:
            hooked = next((n for n, p in entries if _ddp_hooked(p)), None)
            if hooked is not None:
                self._ddp_seen = f"DistributedDataParallel (hooks on {hooked!r})"
        if self._ddp_seen is not None:
            raise DistributedError(
                f"the model runs inside {self._ddp_seen}, which all-reduces every gradient in float32 during "
                "backward, and commlmo aggregates it again: gradients cross the wire twice (and compression is "
                "defeated). Either do not wrap the model (call backward on the unwrapped module), or turn DDP's "
                "reduction off: commlmo.integrations.turn_off_ddp_reduction(ddp_model), or the recipe of your "
                "framework in docs/integrations.md (HF Trainer, accelerate, Lightning, Fabric). no_sync() only "
                "turns it off when the forward runs inside it too (DDP decides at forward time). Nothing was sent.")

    def _step_rules(self) -> list[Any]:
        """Each param group's rule for this step (its ``betas`` applied), after checking ``momentum``."""
        rules = []
        for rt, g in zip(self._runtimes, self.param_groups):
            if rt.config.momentum is not None:
                beta = g.get("momentum")
                beta = float(beta) if isinstance(beta, Tensor) and beta.numel() == 1 else beta
                if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                    raise ConfigError(f"param group {g['group']!r}: momentum = {g.get('momentum')!r}; "
                                      "allowed: a number in [0, 1). Nothing was changed")
            rules.append(self._rule_for(rt, g))
        return rules

    def _rule_for(self, rt: GroupRuntime, group: dict[str, Any]) -> Any:
        """``rt.rule``, or a copy of it with ``group["betas"]`` when a scheduler changed them."""
        rule = rt.rule
        betas = group.get("betas")
        if rule is None or betas is None or not hasattr(rule.config, "betas"):
            return rule
        try:
            betas = tuple(float(b) for b in betas)
        except (TypeError, ValueError):
            raise ConfigError(f"param group {group['group']!r}: betas = {betas!r}; allowed: a pair of numbers "
                              "in [0, 1)") from None
        if betas == tuple(rule.config.betas):
            return rule
        cached = self._rule_variants.get(rt.index)  # the latest only: a scheduler moves betas every step
        if cached is None or cached[0] != betas:
            try:
                cfg = type(rule.config).model_validate({**rule.config.model_dump(), "betas": betas})
            except ValidationError as exc:
                msg = "; ".join(e["msg"] for e in exc.errors())
                raise ConfigError(f"param group {group['group']!r}: betas = {betas!r}: {msg}. "
                                  "Nothing was changed") from None
            cached = self._rule_variants[rt.index] = (betas, type(rule)(cfg))
        return cached[1]

    # ------------------------------------------------------------------ step
    def _entries(self) -> list[tuple[str, Tensor]]:
        """Every parameter this optimizer updates, in a fixed order."""
        return [(n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"])]

    def _check_grads(self, entries: list[tuple[str, Tensor]]) -> None:
        for name, p in entries:
            if p.grad is not None and p.grad.is_sparse:
                raise ConfigError(f"parameter {name!r} has a sparse gradient; commlmo needs dense gradients")
            if p.grad is not None and p.grad.shape != p.shape:
                raise ConfigError(f"parameter {name!r} of shape {tuple(p.shape)} has a gradient of shape {tuple(p.grad.shape)}")
            if p.grad is not None and is_dtensor(p) and (
                    not is_dtensor(p.grad) or tuple(p.grad.placements) != tuple(p.placements)):
                got = tuple(p.grad.placements) if is_dtensor(p.grad) else "a plain tensor"
                raise DistributedError(
                    f"parameter {name!r} is sharded {tuple(p.placements)}, its gradient is {got}: commlmo takes the "
                    "gradient FSDP's reduce-scatter leaves after backward (set p.grad = None, not to another layout)")

    def _local_flag(self, grads: list[Tensor], device: Any, *, unscale: bool = True) -> Tensor:
        """This rank's flags (``_FLAGS``, one uint8 each) as a tensor: no host read.

        Under ``torch.amp.GradScaler`` the scaler's own ``found_inf`` is the flag, and gradients
        still scaled (``grad_scale``) are unscaled here first (``unscale``: not done already this step).
        """
        def flags_of(grads: list[Tensor]) -> Tensor:
            flags = torch.zeros(len(_FLAGS), dtype=torch.uint8, device=device)
            found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
            if unscale and isinstance(grad_scale, Tensor):  # GradScaler.step without unscale_: still scaled
                inv = grad_scale.double().reciprocal().float()
                for g in grads:
                    g.mul_(inv.to(g.device))
            if isinstance(found_inf, Tensor):
                flags[1] = (found_inf.reshape(()).to(device) > 0).to(torch.uint8)
            else:
                flags[0] = _maybe_nonfinite(grads, device).to(torch.uint8)
            return flags

        return self._on_own_rows(grads, flags_of)

    def _on_own_rows(self, grads: list[Tensor], check: Callable[[list[Tensor]], Tensor]) -> Tensor:
        """``check(grads)``; under FSDP2 each rank checks its own rows and the shard group agrees (max) first."""
        sharding = getattr(self, "_sharding", None)
        if sharding is None:
            return check(grads)
        return sharding.agree(check(sharding.local_grads(grads)))

    def _agree(self, entries: list[tuple[str, Tensor]], flag: Tensor, present: list[bool],
               extra: int = 0) -> tuple[int, list[int]]:
        """The step's one agreement collective: the max over ranks of ``[flags..., present...]``, read once.

        Returns ``(bits, present anywhere)``; ``extra`` are this rank's own bits besides ``flag``'s.  That
        read is the step's one host synchronisation.  When a gradient *might* be non-finite (a sum
        was), every rank checks entry by entry and agrees once more: a sum that overflowed over
        finite entries is not a reason to skip.
        """
        device = entries[0][1].device if entries else "cpu"
        mine = flag.to(device) | torch.tensor([bool(extra & f) for f in _FLAGS], dtype=torch.uint8, device=device)
        flags = torch.cat([mine, torch.tensor(present, dtype=torch.uint8, device=device)])
        self.comm.all_max_(flags, label="step_agreement")
        out = flags.tolist()
        if out[0]:
            again = self._on_own_rows([p.grad for _, p in entries if p.grad is not None],
                                      lambda grads: _nonfinite(grads, device).reshape(1).to(torch.uint8))
            self.comm.all_max_(again, label="step_agreement")
            out[0] = int(again.tolist()[0])
        n = len(_FLAGS)
        return sum(f for f, on in zip(_FLAGS, out[:n]) if on), out[n:]

    def _agree_on_gradients(self, entries: list[tuple[str, Tensor]], *, unscale: bool = True) -> int:
        """One small collective: do all ranks have finite gradients, and which parameters have one?

        Returns 0 (go), ``_NONFINITE`` (a NaN/Inf gradient on some rank) or ``_SCALER_INF``
        (a grad scaler found one on some rank).  A parameter that has a gradient on
        some rank gets a zero gradient on the others (as DDP treats unused
        parameters), so every rank sends the same layout.
        """
        self._check_grads(entries)
        device = entries[0][1].device if entries else "cpu"
        flag = self._local_flag([p.grad for _, p in entries if p.grad is not None], device, unscale=unscale)
        bits, present = self._agree(entries, flag, [p.grad is not None for _, p in entries])
        if bits:
            return bits
        for (_, p), anywhere in zip(entries, present):
            if anywhere and p.grad is None:
                p.grad = torch.zeros_like(p)
        return 0

    # ------------------------------------------------------------------ buckets
    def _plan_buckets(self) -> None:
        """Cut the param groups into buckets (and re-attach the overlap hooks to them)."""
        self._buckets: list[Bucket] = plan_buckets(self.param_groups, self.config.bucket_mb)
        if self._overlap is not None:
            self._overlap.attach(self._buckets, self.param_groups)

    def _overlap_armed(self) -> bool:
        """Whether a gradient hook may launch a bucket now (overlap on, after the first step)."""
        return self._overlap is not None and self._layout_checked and self._built_before_pg is None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without starting their uplink (``overlap``), as ``DistributedDataParallel.no_sync``.

        Run the backward of every micro-batch but the last inside it; without ``overlap`` it does nothing.
        """
        if self._overlap is None:
            yield
            return
        self._overlap.suspended += 1
        try:
            yield
        finally:
            self._overlap.suspended -= 1

    def _launch_bucket(self, bucket: Bucket, *, zero_fill: bool, agreed: bool, dummy: bool = False,
                       ) -> BucketStep | None:
        """Prepare a bucket (worker stage, uplink compression) and put its first collectives in flight.

        ``zero_fill``: a parameter without a gradient here takes part with a zero one;
        ``agreed``: every rank agreed its gradients are finite (one process may then update momentum in
        place); ``dummy``: every gradient is taken as zero (a failed hook still sends its share).
        """
        group, rt = self.param_groups[bucket.entry], self._runtimes[bucket.entry]
        index = [i for i in bucket.index if zero_fill or dummy or group["params"][i].grad is not None]
        if not index:
            return None
        if self._overlap is not None and not self._overlap.launched and not self._book_open:
            self.comm.bytes.new_step()
        self._book_open = True
        params = [group["params"][i] for i in index]
        grads = [torch.zeros_like(p) if dummy or p.grad is None else p.grad for p in params]
        with finite_inputs():  # the gradients are agreed finite, or (overlap) the step is dropped if not
            b = rt.prepare(params, grads, [self.state[p] for p in params],
                           [group["param_names"][i] for i in index], [rt.position(p) for p in params],
                           group=group, comm=self.comm, step=self.steps, rule=self._rule_for(rt, group),
                           in_place=agreed and self.comm.world_size == 1 and getattr(self, "_sharding", None) is None)
            rt.launch(b, self.comm)
        b.versions = [(id(g), g._version) for g in grads]
        return b

    def _finish_all(self, steps: list[BucketStep], *, check: bool) -> None:
        with finite_inputs():
            for b in steps:
                b.rt.finish(b, self.comm, check_agreement=check)

    @staticmethod
    def _drain(steps: list[BucketStep | None]) -> None:
        """Complete the exchanges in flight without using them (every rank does the same collectives)."""
        for b in steps:
            if b is not None and b.started is not None:
                b.started.finish()

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One optimizer step on every rank: agree, then every bucket's pipeline.

        Raises :class:`~commlmo.errors.NonFiniteGradientError` (policy ``raise``) or
        skips the step (policy ``skip``) when a gradient on any rank is NaN or Inf;
        either way no parameter or state changes (and, without ``overlap``, nothing is
        sent).  Under ``torch.amp.GradScaler`` a rank's inf check is agreed the same way
        and every rank skips (whatever the policy: the scaler backs off and tries again).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = self._entries()
        first = not self._layout_checked
        self._check_stack(entries, first)
        self._step_rules()
        ov = self._overlap
        try:
            if ov is None or not ov.launched:
                self.comm.bytes.new_step()
                self._book_open = True
            if first:
                check_layout(entries, self.config, self.comm)
                self._layout_checked = True
            verify = bool(self.config.verify_every) and (self.steps + 1) % self.config.verify_every == 0
            untouched: list[Tensor] = []
            if ov is not None and ov.launched:
                outcome = self._overlapped(entries, ov)
                if outcome is None:
                    return loss
                steps, untouched = outcome
            else:
                agreed = self._agree_on_gradients(entries)
                if agreed:
                    return self._skip(agreed, loss, sent=False)
                steps = [b for b in (self._launch_bucket(bk, zero_fill=False, agreed=True) for bk in self._buckets) if b is not None]
            with self._kept(untouched):
                self._finish_all(steps, check=first or verify)
            self.steps += 1
            if self.config.verify_every and self.steps % self.config.verify_every == 0:
                verify_parameters(entries, self.comm)
            return loss
        finally:
            self._book_open = False
            if ov is not None:
                ov.reset(len(self._buckets))

    def _skip(self, agreed: int, loss: Any, *, sent: bool) -> Any:
        if self.config.nonfinite == "skip" or agreed & _SCALER_INF:
            self.skipped_steps += 1
            return loss
        what = "nothing was sent and no state changed" if not sent else \
            "no parameter or state changed (its buckets were already sent: overlap)"
        raise NonFiniteGradientError(
            f"a gradient on some rank contains NaN or Inf; {what} (set nonfinite: skip to skip such steps)")

    def _overlapped(self, entries: list[tuple[str, Tensor]],
                    ov: Overlap) -> tuple[list[BucketStep], list[Tensor]] | None:
        """``step()`` after gradient hooks launched some buckets: launch the rest, agree, and return the
        buckets to finish and the parameters no rank had a gradient for (``None``: the step was skipped)."""
        self._check_grads(entries)
        ov.last_resent = False
        present = [p.grad is not None for _, p in entries]
        device = entries[0][1].device if entries else "cpu"
        flag = self._local_flag([p.grad for _, p in entries if p.grad is not None], device)
        steps = [rec.step for rec in ov.records[:ov.next]]
        steps += [self._launch_bucket(bk, zero_fill=True, agreed=False) for bk in self._buckets[ov.next:]]
        errors = [rec.error for rec in ov.records if rec.error is not None]
        changed = ov.stale or isinstance(getattr(self, "grad_scale", None), Tensor) or any(
            (id(p.grad), p.grad._version) != v for b in steps[:ov.next] if b is not None
            for p, v in zip(b.params, b.versions) if p.grad is not None)
        extra = (_HOOK_ERROR if errors else 0) | (_RESEND if changed else 0)
        bits, anywhere = self._agree(entries, flag, present, extra)
        if bits:
            self._drain(steps)
            if bits & _HOOK_ERROR:
                if errors:
                    raise errors[0]
                raise DistributedError("another rank failed while preparing a bucket in a gradient hook; no "
                                       "parameter or state changed")
            if bits & _RESEND:
                ov.last_resent = True
                if changed:
                    ov.warn_stale("gradients changed after their bucket was sent (gradient accumulation outside "
                                  "no_sync(), gradient clipping or GradScaler after backward)")
                agreed = self._agree_on_gradients(entries, unscale=False)  # unscaled above, if scaled
                if agreed:
                    self._skip(agreed, None, sent=False)
                    return None
                return [b for b in (self._launch_bucket(bk, zero_fill=False, agreed=True) for bk in self._buckets)
                        if b is not None], []
            self._skip(bits, None, sent=True)
            return None
        # sent as zeros where nobody had a gradient: those parameters are left untouched
        return [b for b in steps if b is not None], [p for (_, p), there in zip(entries, anywhere) if not there]

    @contextlib.contextmanager
    def _kept(self, params: list[Tensor]) -> Iterator[None]:
        """Put ``params`` and their state back as they were after the block (``overlap``: no rank had a gradient)."""
        saved = [(p, p.detach().clone(), {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.state[p].items()})
                 for p in params]
        yield
        for p, value, state in saved:
            p.copy_(value)
            if state:
                self.state[p] = state
            else:
                self.state.pop(p, None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"commlmo"``: random generators, step counts, and what it was saved under.

        Momentum, EF21 estimators, the EF21-P exact model and every rule's moments
        are per-parameter state, saved as usual; together this resumes a run bitwise.
        The same facts also travel inside ``state`` (each group's generators, under
        its first parameter) and ``param_groups`` (``"commlmo"``: config fingerprint,
        step count, shapes), which is all ``torch.distributed.checkpoint`` keeps.

        The state is this rank's: each worker's momentum, EF21's ``g_i`` and error-feedback
        memories differ by rank, and ``load_state_dict`` on another rank refuses it.  After
        :meth:`consolidate_state_dict` (a collective, on every rank) and until
        the next step, ``"commlmo"`` also holds every other rank's entries that differ from
        this one's (``ranks``, and which entries those are, ``rank_keys``), so the one file a
        framework writes from one rank resumes every rank.
        """
        self._bind_to_process_group(strict=False)
        sd = super().state_dict()
        fingerprint = _config_fingerprint(self.config)
        sd["commlmo"] = {
            "generators": [rt.generators.state() for rt in self._runtimes],
            "groups": [g["group"] for g in self.param_groups],
            "world_size": self.comm.world_size,
            "rank": self.comm.rank,
            "config": fingerprint,
            "shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }
        parts = getattr(self, "_rank_parts", None)
        if parts is not None and parts["at"] == self._state_version():
            sd["commlmo"]["rank_keys"] = parts["rank_keys"]
            sd["commlmo"]["ranks"] = {r: part for r, part in parts["ranks"].items() if r != self.comm.rank}
        state = sd["state"] = dict(sd["state"])
        owners: dict[int, int] = {}
        for i, (rt, g) in enumerate(zip(self._runtimes, sd["param_groups"])):
            j = owners.setdefault(id(rt), i)
            g["commlmo"] = {"config": fingerprint, "steps": self.steps, "world_size": self.comm.world_size,
                            "rank": self.comm.rank, "shapes": sd["commlmo"]["shapes"][i], "generators_in": j}
            if j == i:
                pid = g["params"][0]
                gens = rt.generators.state()
                state[pid] = {**state.get(pid, {}), _GEN_KEYS[0]: gens["shared"], _GEN_KEYS[1]: gens["local"]}
        return sd

    def consolidate_state_dict(self, to: int | None = 0) -> None:
        """Collect every rank's per-rank state on rank ``to`` (every rank when ``None``); call it on every rank.

        torch's convention for an optimizer whose state is spread over ranks
        (``ZeroRedundancyOptimizer.consolidate_state_dict``), which Lightning and Fabric
        call on every rank before the global rank 0 saves.  Until the next step,
        :meth:`state_dict` on rank ``to`` then also holds, for every other rank, its
        entries that differ from this rank's (entries bitwise equal on every rank are
        kept once), and :meth:`load_state_dict` of that one file on rank ``r`` takes
        rank ``r``'s back.  Rank ``to`` holds about ``world_size`` times its own
        per-rank state (in CPU memory) until then.  Not counted in :attr:`bytes`: it is
        checkpoint traffic, not a step's.
        """
        inner = self.__dict__.get("_optimizer")
        if isinstance(inner, CommOptimizer) and inner is not self:  # Fabric's wrapper, which imitates our class
            return inner.consolidate_state_dict(to)
        self._bind_to_process_group(strict=False)
        world, rank = self.comm.world_size, self.comm.rank
        own = self.state_dict()["state"]
        entries = {(pid, key): v for pid, st in own.items() for key, v in st.items()}
        digests = {k: _digest(v) for k, v in entries.items()}
        group = getattr(self.comm, "group", None)
        if world > 1 and group is None:
            raise DistributedError(f"consolidate_state_dict needs a torch.distributed process group; this "
                                   f"optimizer runs on {self.comm.describe()}")
        everyone: list[Any] = [digests]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, digests, group=group)
        varying = {k for k in set().union(*everyone) if any(d.get(k) != everyone[0].get(k) for d in everyone)}
        mine: dict[int, dict[str, Any]] = {}
        for pid, key in varying:
            if (pid, key) in entries:
                v = entries[(pid, key)]
                mine.setdefault(pid, {})[key] = v.detach().cpu() if isinstance(v, Tensor) else v
        parts: list[Any] = [mine]
        if world > 1:
            if to is None:
                parts = [None] * world
                dist.all_gather_object(parts, mine, group=group)
            else:
                parts = [None] * world if rank == to else None  # type: ignore[assignment]
                dist.gather_object(mine, parts, dst=dist.get_global_rank(group, to), group=group)
        if to is not None and rank != to:
            self._rank_parts = None
            return
        rank_keys: dict[int, list[str]] = {}
        for pid, key in sorted(varying, key=str):
            rank_keys.setdefault(pid, []).append(key)
        self._rank_parts = {"at": self._state_version(), "rank_keys": rank_keys, "ranks": dict(enumerate(parts))}

    def _state_version(self) -> tuple:
        """What :meth:`consolidate_state_dict`'s collection is valid for: the step counts and layout."""
        return self.steps, self.skipped_steps, tuple(len(g["params"]) for g in self.param_groups)

    def _refusal(self, extra: dict[str, Any]) -> str | None:
        """Why a saved state does not fit this optimizer, or ``None``."""
        groups = [g["group"] for g in self.param_groups]
        if extra.get("groups", groups) != groups:
            return f"it was saved with groups {extra.get('groups')}, this optimizer has {groups}"
        if extra.get("config", _config_fingerprint(self.config)) != _config_fingerprint(self.config):
            return "it was saved under a different optimizer config (fingerprints differ)"
        shapes = [[list(p.shape) for p in g["params"]] for g in self.param_groups]
        saved = extra.get("shapes", shapes)
        if saved != shapes:
            for gi, (a, b) in enumerate(zip(saved, shapes)):
                if a != b:
                    return (f"group {groups[gi]!r} was saved with parameter shapes {a[:4]}{'...' if len(a) > 4 else ''}, "
                            f"this model has {b[:4]}{'...' if len(b) > 4 else ''}")
            return "it was saved for a different model"
        gens = extra.get("generators", ())
        if len(gens) != len(self._runtimes) or any(g is None for g in gens):
            return f"it has {len(gens)} commlmo groups, this optimizer has {len(self._runtimes)}"
        saved_rank, rank = extra.get("rank"), self.comm.rank
        if saved_rank is not None and saved_rank != rank:
            held = sorted({saved_rank, *(extra.get("ranks") or ())})
            return (f"it holds the per-rank state of rank(s) {held} (saved by rank {saved_rank} of "
                    f"{extra.get('world_size')}), not of rank {rank}: each worker's momentum, error-feedback memories "
                    "and random streams differ by rank, so this rank would silently continue from another's. Call "
                    "opt.consolidate_state_dict() on every rank before rank 0 calls "
                    "state_dict() (the framework recipes in docs/integrations.md do), or save one file per rank")
        return None

    @staticmethod
    def _unpack(state_dict: dict[str, Any], rank: int | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(torch's state dict, commlmo's facts)``: the facts from ``"commlmo"``, or rebuilt from what
        :meth:`state_dict` put into ``state`` and ``param_groups`` (a ``torch.distributed.checkpoint`` load).

        When the facts hold the gathered state of ``rank`` (another rank saved it), ``state``
        becomes that rank's: the entries equal on every rank, then ``rank``'s own.
        """
        sd = dict(state_dict)
        extra = sd.pop("commlmo", None)
        raw = dict(sd.get("state", {}))
        if isinstance(extra, Mapping) and rank is not None and extra.get("rank") != rank \
                and rank in (extra.get("ranks") or {}):
            differs, own = extra.get("rank_keys") or {}, extra["ranks"][rank]
            mine = {}
            for pid in [*raw, *(k for k in own if k not in raw)]:
                entry = {k: v for k, v in dict(raw.get(pid) or {}).items() if k not in differs.get(pid, ())}
                entry.update(own.get(pid) or {})
                if entry:
                    mine[pid] = entry
            raw, extra = mine, {**extra, "rank": rank, "generators": None}  # this rank's generators: from `state`
        groups = [dict(g) for g in sd.get("param_groups", [])]
        embedded = [g.pop("commlmo", None) for g in groups]
        state = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
        generators: dict[Any, dict[str, Tensor]] = {}
        for k, v in list(state.items()):
            if isinstance(v, dict) and _GEN_KEYS[0] in v:
                generators[k] = {"shared": v.pop(_GEN_KEYS[0]), "local": v.pop(_GEN_KEYS[1], None)}
                if not v:
                    del state[k]
        sd["param_groups"], sd["state"] = groups, state
        gens: list[Any] = []
        if groups and all(isinstance(e, Mapping) for e in embedded):
            for e in embedded:
                owner = groups[e.get("generators_in", 0)] if e.get("generators_in", 0) < len(groups) else None
                gens.append(generators.get(owner["params"][0]) if owner and owner.get("params") else None)
        if extra is None and gens:
            e0 = embedded[0]
            extra = {"generators": gens, "groups": [g.get("group") for g in groups], "config": e0.get("config"),
                     "shapes": [e.get("shapes") for e in embedded], "steps": e0.get("steps", 0),
                     "world_size": e0.get("world_size"), "rank": e0.get("rank")}
        elif isinstance(extra, Mapping) and extra.get("generators", ()) is None:
            extra = {**extra, "generators": gens}
        return sd, extra

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; refuse (changing nothing) a state of another config or model,
        or of another rank (unless it holds this rank's: :meth:`consolidate_state_dict`).

        An optimizer built before the process group binds to it first, so that it knows its rank.
        """
        self._bind_to_process_group(strict=True)
        state_dict, extra = self._unpack(state_dict, self.comm.rank)
        if extra is None:
            raise ConfigError("this state_dict was not saved by a commlmo optimizer (no 'commlmo' entry)")
        why = self._refusal(extra)
        if why:
            raise ConfigError(f"cannot load this optimizer state: {why}; nothing was changed")
        before = (copy.copy(self.state), [dict(g) for g in self.param_groups],
                  [rt.generators.state() for rt in self._runtimes])
        # torch casts every floating state tensor to its parameter's dtype (an adam_step count to bfloat16
        # on bfloat16 parameters); put back what was saved, on the parameter's device
        ours = list(chain.from_iterable(g["params"] for g in self.param_groups))
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        keep = {}
        for k, p in zip(saved_ids, ours):
            for key, v in (state_dict["state"].get(k) or {}).items():
                if isinstance(v, Tensor) and key != "step" and v.dtype != p.dtype:
                    keep[(id(p), key)] = (p, key, v)
        try:
            super().load_state_dict(state_dict)
            for p, key, v in keep.values():
                self.state[p][key] = v.to(device=p.device)
            for rt, gs in zip(self._runtimes, extra["generators"]):
                rt.generators.load(gs)
        except Exception as exc:
            self.state = before[0]  # type: ignore[assignment]
            for g, saved in zip(self.param_groups, before[1]):
                g.clear()
                g.update(saved)
            for rt, gs in zip(self._runtimes, before[2]):
                rt.generators.load(gs)
            raise ConfigError(f"cannot load this optimizer state: {type(exc).__name__}: {exc}; nothing was changed") from None
        self.steps, self.skipped_steps = extra.get("steps", 0), extra.get("skipped_steps", 0)
        self._rank_parts = None


def build_optimizer(
    model_or_named_params: Any,
    config: Any = "muon",
    *,
    process_group: Any = None,
    mesh: Any = None,
    adversary: Adversary | None = None,
) -> CommOptimizer:
    """Build a :class:`CommOptimizer` for a model (or named parameters) from any config source.

    ``model_or_named_params`` is a module (roles read from its tree), ``(name, tensor)``
    pairs, tensors, or torch-style param-group dicts as ``torch.optim`` optimizers take
    them (``[{"params": [...], "group": "embedding", "lr": 1e-3}, {"params": ...}]``): a
    dict that names a config group (``group``) puts its parameters there, one without is
    routed by the config's rules (roles by shape and name: there is no module), and
    ``lr``/``weight_decay`` override the config group's; other keys are refused.

    ``config`` is anything :func:`commlmo.load_config` accepts: a preset name, a
    path, a mapping or an :class:`OptimizerConfig`.  ``process_group`` is a
    ``torch.distributed`` group (default: the world when initialised, else a
    world of one), or a :class:`~commlmo.comm.Communicator`.  Parameters sharded by
    FSDP2's ``fully_shard`` (DTensors) run on their local shards (:mod:`commlmo.sharding`,
    docs/fsdp.md): commlmo aggregates over the replicate dimension of ``mesh`` (the 2-D
    ``(replicate, shard)`` mesh of HSDP whose ``shard`` dimension ``fully_shard`` used), or
    over a world of one for plain FSDP2 (a 1-D mesh, or no ``mesh``).  ``adversary``
    makes this rank a Byzantine worker for robustness experiments: it sends
    ``flip``-ped, ``random`` or ``zero`` messages (see :func:`commlmo.pipeline.corrupt`).
    """
    cfg = load_config(config)
    module = model_or_named_params if isinstance(model_or_named_params, torch.nn.Module) else None
    overrides: dict[str, dict[str, Any]] = {}
    if module is None and not isinstance(model_or_named_params, Tensor):
        items = list(model_or_named_params)
        if items and all(isinstance(x, Mapping) for x in items):
            group_names = [g.name for g in cfg.all_groups()]
            pairs: list[tuple[str, Tensor]] = []
            for i, spec in enumerate(items):
                named, o = _group_dict(spec, f"param group {i}", group_names, first_index=len(pairs))
                pairs.extend(named)
                overrides.update({n: o for n, _ in named})
            if not pairs:
                raise ConfigError("build_optimizer got param groups without parameters")
            named_params = named_parameters_of(pairs)
        elif any(isinstance(x, Mapping) for x in items):
            raise ConfigError("build_optimizer got param-group dicts mixed with tensors; pass either a list of "
                              "dicts ({'params': [...]}) or a list of tensors")
        else:
            named_params = named_parameters_of(items)
    else:
        named_params = named_parameters_of(model_or_named_params)
    roles = parameter_roles(module) if module is not None else None
    views = parameter_views(module) if module is not None else None
    comm = replicate_communicator(named_params, mesh=mesh, process_group=process_group)
    opt = CommOptimizer(named_params, cfg, comm=comm, adversary=adversary, roles=roles,
                        views=views, overrides=overrides)
    if module is not None:
        opt._watch(module)
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            world = 1
        if world > 1:
            opt._built_before_pg = world
    return opt
