r"""``CommOptimizer``: a ``torch.optim.Optimizer`` that runs a config's groups over a communicator.

Build it with :func:`build_optimizer`::

    opt = commlmo.build_optimizer(model, "signmuon")          # preset
    opt = commlmo.build_optimizer(model, "examples/torch_muon.yaml")

Call ``loss.backward()`` on each rank's own batch, then ``opt.step()``: the
optimizer aggregates the workers' messages itself, so the model must *not* be
wrapped in ``DistributedDataParallel``.  Without an initialised process group it
runs on one process and calls no collective.

Conventions from ``torch.optim``: ``param_groups`` (one per non-empty pipeline
group, the fallback group included, with ``params`` and ``param_names``), lazily
created ``state[p]``, ``state_dict``/``load_state_dict`` (momentum, error-feedback
buffers, rule moments, random generators; a state of another config or model is
refused and changes nothing), closures.  ``opt.routing()`` and
``opt.describe_routing()`` say where each parameter went.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .comm import Communicator, make_communicator
from .config import OptimizerConfig, ViewConfig, describe_group, load_config
from .errors import ConfigError, DistributedError, NonFiniteGradientError
from .consistency import check_layout, verify_parameters
from .pipeline import Adversary, GroupRuntime
from .routing import parameter_roles, parameter_views, role_by_shape

__all__ = ["CommOptimizer", "build_optimizer", "named_parameters_of"]


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
            raise ConfigError("parameters must be a module, (name, tensor) pairs, or tensors")
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


class CommOptimizer(torch.optim.Optimizer):
    """Communication-efficient layer-wise LMO optimizer described by an :class:`OptimizerConfig`.

    Every parameter belongs to a pipeline group (the config's groups, first match
    wins, then the ``fallback`` group), each with an uplink compressor and an
    aggregator; ``param_groups`` has one entry per non-empty group, with torch's
    ``params``/``param_names`` and the group's ``lr``, ``weight_decay`` and ``momentum``.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        config: OptimizerConfig,
        *,
        comm: Communicator,
        adversary: Adversary | None = None,
        roles: dict[str, str] | None = None,
        views: dict[str, dict] | None = None,
    ):
        self.config, self.comm = config, comm
        named = list(named_params)
        roles = dict(roles or {})
        all_groups = config.all_groups()
        routed: list[list[tuple[str, Tensor]]] = [[] for _ in all_groups]
        self._roles: dict[str, str] = {}
        for name, p in named:
            self._check_param(name, p)
            role = roles.get(name) or role_by_shape(name, p)
            self._roles[name] = role
            for i, g in enumerate(config.groups):
                if g.params.matches(name, p, role):
                    routed[i].append((name, p))
                    break
            else:
                routed[-1].append((name, p))

        groups, self._runtimes = [], []
        for i, (gcfg, members) in enumerate(zip(all_groups, routed)):
            if not members:
                continue
            rt = GroupRuntime.build(gcfg, index=i, seed=config.seed, rank=comm.rank, device=members[0][1].device)
            rt.adversary = adversary
            rt.views = {id(p): ViewConfig.model_validate(views[n]) for n, p in members if views and n in views}
            rt.transport = rt.plan([p for _, p in members], world_size=comm.world_size)
            for name, p in members:
                self._check_member(rt, gcfg, name, p)
            self._runtimes.append(rt)
            groups.append({
                "params": [p for _, p in members], "param_names": [n for n, _ in members], "group": gcfg.name,
                "lr": gcfg.lr, "weight_decay": gcfg.weight_decay,
                "momentum": gcfg.momentum.beta if gcfg.momentum is not None else 0.0,
            })
        if not groups:
            raise ConfigError("build_optimizer got no trainable parameters")
        first = groups[0]
        super().__init__(groups, defaults={"lr": first["lr"], "weight_decay": first["weight_decay"],
                                           "momentum": first["momentum"]})
        self.steps, self.skipped_steps, self._layout_checked = 0, 0, False

    @staticmethod
    def _check_param(name: str, p: Tensor) -> None:
        if not isinstance(p, Tensor):
            raise ConfigError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
        if p.is_complex():
            raise ConfigError(f"parameter {name!r} is complex ({p.dtype}); commlmo optimizes real tensors only")
        if not p.is_floating_point():
            raise ConfigError(f"parameter {name!r} has dtype {p.dtype}; commlmo optimizes floating-point tensors")

    @staticmethod
    def _check_member(rt: GroupRuntime, gcfg: Any, name: str, p: Tensor) -> None:
        """Fail at build time, naming the parameter, for what would fail at step 1."""
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
        return {g["group"]: list(g["param_names"]) for g in self.param_groups}

    def describe_routing(self) -> str:
        """Where each parameter went: per group its stages, then each tensor with its role and shape."""
        lines = []
        for rt, g in zip(self._runtimes, self.param_groups):
            numel = sum(p.numel() for p in g["params"])
            lines.append(f"{g['group']}: {describe_group(rt.config)}  transport={rt.transport}  "
                         f"({len(g['params'])} tensors, {numel:,} entries)")
            for n, p in zip(g["param_names"], g["params"]):
                view = rt.view_of(p)
                shown = "" if view.kind == "matrix" or p.ndim < 2 else (
                    f"  view={view.kind}" + (f"({view.blocks})" if view.kind == "blocks" else ""))
                lines.append(f"    {n}  [{self._roles.get(n, '?')}]  {tuple(p.shape)}{shown}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ step
    def _entries(self) -> list[tuple[str, Tensor]]:
        """Every parameter this optimizer updates, in a fixed order."""
        return [(n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"])]

    def _agree_on_gradients(self, entries: list[tuple[str, Tensor]]) -> bool:
        """One small collective: do all ranks have finite gradients, and which parameters have one?

        A parameter that has a gradient on some rank gets a zero gradient on the
        others (as DDP treats unused parameters), so every rank sends the same layout.
        """
        for name, p in entries:
            if p.grad is not None and p.grad.is_sparse:
                raise ConfigError(f"parameter {name!r} has a sparse gradient; commlmo needs dense gradients")
            if p.grad is not None and p.grad.shape != p.shape:
                raise ConfigError(f"parameter {name!r} of shape {tuple(p.shape)} has a gradient of shape {tuple(p.grad.shape)}")
        device = entries[0][1].device if entries else "cpu"
        grads = [p.grad for _, p in entries if p.grad is not None]
        nonfinite = (torch.stack([torch.isfinite(g).all() for g in grads]).all().logical_not()
                     if grads else torch.zeros((), dtype=torch.bool, device=device))
        present = torch.tensor([p.grad is not None for _, p in entries], dtype=torch.uint8, device=device)
        flags = torch.cat([nonfinite.reshape(1).to(torch.uint8), present])
        self.comm.all_max_(flags, label="step_agreement")
        if flags[0]:
            return False
        for i, (_, p) in enumerate(entries):
            if flags[1 + i] and p.grad is None:
                p.grad = torch.zeros_like(p)
        return True

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One optimizer step on every rank: agree, then each group's pipeline.

        Raises :class:`~commlmo.errors.NonFiniteGradientError` (policy ``raise``) or
        skips the step (policy ``skip``) when a gradient on any rank is NaN or Inf;
        either way nothing is sent and no parameter or state changes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.comm.bytes.new_step()
        entries = self._entries()
        first = not self._layout_checked
        if first:
            check_layout(entries, self.config, self.comm)
            self._layout_checked = True
        verify = bool(self.config.verify_every) and (self.steps + 1) % self.config.verify_every == 0
        if not self._agree_on_gradients(entries):
            if self.config.nonfinite == "skip":
                self.skipped_steps += 1
                return loss
            raise NonFiniteGradientError(
                "a gradient on some rank contains NaN or Inf; nothing was sent and no state changed "
                "(set nonfinite: skip to skip such steps)"
            )
        for rt, group in zip(self._runtimes, self.param_groups):
            live = [(n, p) for n, p in zip(group["param_names"], group["params"]) if p.grad is not None]
            if live:
                params = [p for _, p in live]
                rt.step(params, [p.grad for p in params], [self.state[p] for p in params], [n for n, _ in live],
                        group=group, comm=self.comm, step=self.steps, check_agreement=first or verify)
        self.steps += 1
        if self.config.verify_every and self.steps % self.config.verify_every == 0:
            verify_parameters(entries, self.comm)
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"commlmo"``: random generators, step counts, and what it was saved under.

        Momentum, EF21 estimators, the EF21-P exact model and every rule's moments
        are per-parameter state, saved as usual; together this resumes a run bitwise.
        """
        sd = super().state_dict()
        sd["commlmo"] = {
            "generators": [rt.generators.state() for rt in self._runtimes],
            "groups": [g["group"] for g in self.param_groups],
            "world_size": self.comm.world_size,
            "rank": self.comm.rank,
            "config": _config_fingerprint(self.config),
            "shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }
        return sd

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
        if len(extra.get("generators", ())) != len(self._runtimes):
            return f"it has {len(extra.get('generators', ()))} commlmo groups, this optimizer has {len(self._runtimes)}"
        return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; refuse (changing nothing) a state of another config or model."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("commlmo", None)
        if extra is None:
            raise ConfigError("this state_dict was not saved by a commlmo optimizer (no 'commlmo' entry)")
        why = self._refusal(extra)
        if why:
            raise ConfigError(f"cannot load this optimizer state: {why}; nothing was changed")
        before = (copy.copy(self.state), [dict(g) for g in self.param_groups])
        try:
            super().load_state_dict(state_dict)
            for rt, gs in zip(self._runtimes, extra["generators"]):
                rt.generators.load(gs)
        except Exception as exc:
            self.state = before[0]  # type: ignore[assignment]
            for g, saved in zip(self.param_groups, before[1]):
                g.clear()
                g.update(saved)
            raise ConfigError(f"cannot load this optimizer state: {type(exc).__name__}: {exc}; nothing was changed") from None
        self.steps, self.skipped_steps = extra.get("steps", 0), extra.get("skipped_steps", 0)


def build_optimizer(
    model_or_named_params: Any,
    config: Any = "muon",
    *,
    process_group: Any = None,
    adversary: Adversary | None = None,
) -> CommOptimizer:
    """Build a :class:`CommOptimizer` for a model (or named parameters) from any config source.

    ``config`` is anything :func:`commlmo.load_config` accepts: a preset name, a
    path, a mapping or an :class:`OptimizerConfig`.  ``process_group`` is a
    ``torch.distributed`` group (default: the world when initialised, else a
    world of one), or a :class:`~commlmo.comm.Communicator`.  ``adversary``
    makes this rank a Byzantine worker for robustness experiments: it sends
    ``flip``-ped, ``random`` or ``zero`` messages (see :func:`commlmo.pipeline.corrupt`).
    """
    cfg = load_config(config)
    named = named_parameters_of(model_or_named_params)
    module = model_or_named_params if isinstance(model_or_named_params, torch.nn.Module) else None
    roles = parameter_roles(module) if module is not None else None
    views = parameter_views(module) if module is not None else None
    return CommOptimizer(named, cfg, comm=make_communicator(process_group), adversary=adversary, roles=roles,
                         views=views)
