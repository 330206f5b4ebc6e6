r"""``CommOptimizer``: a ``torch.optim.Optimizer`` that runs a config's groups over a communicator.

Build it with :func:`build_optimizer`::

    opt = commlmo.build_optimizer(model, "signmuon")          # preset
    opt = commlmo.build_optimizer(model, "examples/torch_muon.yaml")

Call ``loss.backward()`` on each rank's own batch, then ``opt.step()``: the
optimizer aggregates the workers' messages itself, so the model must *not* be
wrapped in ``DistributedDataParallel``.  Without an initialised process group it
runs on one process and calls no collective.

Conventions from ``torch.optim``: ``param_groups`` (one per config group, then
the fallback optimizer's groups, shared so LR schedulers reach all of them),
lazily created ``state[p]``, ``state_dict``/``load_state_dict`` (momentum,
error-feedback buffers, random generators and the fallback's state), closures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .comm import Communicator, make_communicator
from .config import OptimizerConfig, load_config
from .errors import ConfigError, DistributedError, NonFiniteGradientError
from .consistency import check_layout, verify_parameters
from .pipeline import Adversary, GroupRuntime

__all__ = ["CommOptimizer", "build_optimizer", "named_parameters_of"]


def named_parameters_of(model_or_params: Any) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs from a module, named pairs, or plain tensors (named ``params.i``)."""
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
        return [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
    items = list(model_or_params)
    if not items:
        raise ConfigError("build_optimizer got an empty parameter list; pass a model or at least one parameter")
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        return [(n, p) for n, p in items]
    if all(isinstance(x, Tensor) for x in items):
        return [(f"params.{i}", p) for i, p in enumerate(items)]
    raise ConfigError("parameters must be a module, (name, tensor) pairs, or tensors")


class CommOptimizer(torch.optim.Optimizer):
    """Communication-efficient layer-wise LMO optimizer described by an :class:`OptimizerConfig`."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        config: OptimizerConfig,
        *,
        comm: Communicator,
        adversary: Adversary | None = None,
    ):
        self.config, self.comm = config, comm
        named = list(named_params)
        routed: list[list[tuple[str, Tensor]]] = [[] for _ in config.groups]
        fallback: list[tuple[str, Tensor]] = []
        for name, p in named:
            self._check_param(name, p)
            for i, g in enumerate(config.groups):
                if g.params.matches(name, p):
                    routed[i].append((name, p))
                    break
            else:
                fallback.append((name, p))

        groups, self._runtimes = [], []
        for i, (gcfg, members) in enumerate(zip(config.groups, routed)):
            if not members:
                continue
            rt = GroupRuntime.build(gcfg, index=i, seed=config.seed, rank=comm.rank, device=members[0][1].device)
            rt.adversary = adversary
            for name, p in members:
                if rt.lmo is not None and not rt.lmo.capabilities.accepts(p.ndim):
                    raise ConfigError(
                        f"groups.{gcfg.name}: lmo {rt.lmo.kind!r} does not accept parameter {name!r} of shape "
                        f"{tuple(p.shape)} ({p.ndim}-D); narrow params.ndim or pick another lmo"
                    )
                if not rt.lr_rule.needs_dual_norm:  # shape-only rules: fail now, not at step 1
                    try:
                        rt.lr_rule.scale(p.shape, lmo=rt.lmo, step_family=rt.family, name=name)
                    except ValueError as exc:
                        raise ConfigError(f"groups.{gcfg.name}: parameter {name!r}: {exc}") from None
            self._runtimes.append(rt)
            groups.append({
                "params": [p for _, p in members], "names": [n for n, _ in members], "group": gcfg.name,
                "lr": gcfg.lr, "weight_decay": gcfg.weight_decay, "momentum": gcfg.momentum.beta,
            })
        if not groups and not fallback:
            raise ConfigError("build_optimizer got no trainable parameters")
        self.fallback_names = [n for n, _ in fallback]
        self.fallback: torch.optim.Optimizer | None = (
            config.fallback.build([p for _, p in fallback]) if fallback else None
        )
        if groups:
            super().__init__(groups, defaults={})
        else:  # every parameter went to the fallback
            super().__init__([{"params": [], "group": "_none"}], defaults={})
            self.param_groups.clear()
        self._n_main = len(self.param_groups)
        self.steps, self.skipped_steps, self._layout_checked = 0, 0, False
        if self.fallback is not None:
            for fg in self.fallback.param_groups:
                fg.setdefault("group", "fallback")
            self.param_groups.extend(self.fallback.param_groups)  # shared dicts: schedulers reach both

    @staticmethod
    def _check_param(name: str, p: Tensor) -> None:
        if not isinstance(p, Tensor):
            raise ConfigError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
        if p.is_complex():
            raise ConfigError(f"parameter {name!r} is complex ({p.dtype}); commlmo optimizes real tensors only")
        if not p.is_floating_point():
            raise ConfigError(f"parameter {name!r} has dtype {p.dtype}; commlmo optimizes floating-point tensors")

    # ------------------------------------------------------------------ info
    @property
    def bytes(self):
        """Byte accounting of this rank: ``.step`` (last step) and ``.total``, per collective."""
        return self.comm.bytes

    def routing(self) -> dict[str, list[str]]:
        """Which parameter names each group (and the fallback) took."""
        out = {g["group"]: list(g["names"]) for g in self.param_groups[: self._n_main]}
        out["fallback"] = list(self.fallback_names)
        return out

    # ------------------------------------------------------------------ step
    def _entries(self) -> list[tuple[str, Tensor]]:
        """Every parameter this optimizer updates, in a fixed order (main groups, then fallback)."""
        out = [(n, p) for g in self.param_groups[: self._n_main] for n, p in zip(g["names"], g["params"])]
        fallback = [p for g in self.param_groups[self._n_main:] for p in g["params"]]
        return out + list(zip(self.fallback_names, fallback))

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
        nonfinite = any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for _, p in entries)
        flags = torch.tensor([nonfinite] + [p.grad is not None for _, p in entries], dtype=torch.uint8,
                             device=entries[0][1].device if entries else "cpu")
        self.comm.all_max_(flags, label="step_agreement")
        if flags[0]:
            return False
        for i, (_, p) in enumerate(entries):
            if flags[1 + i] and p.grad is None:
                p.grad = torch.zeros_like(p)
        return True

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One optimizer step on every rank: agree, aggregate, update.

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
        if not self._layout_checked:
            check_layout(entries, self.config, self.comm)
            self._layout_checked = True
        if not self._agree_on_gradients(entries):
            if self.config.nonfinite == "skip":
                self.skipped_steps += 1
                return loss
            raise NonFiniteGradientError(
                "a gradient on some rank contains NaN or Inf; nothing was sent and no state changed "
                "(set nonfinite: skip to skip such steps)"
            )
        for rt, group in zip(self._runtimes, self.param_groups):
            live = [(n, p) for n, p in zip(group["names"], group["params"]) if p.grad is not None]
            if live:
                params = [p for _, p in live]
                rt.step(params, [p.grad for p in params], [self.state[p] for p in params], [n for n, _ in live],
                        group=group, comm=self.comm)
        fb = [p for g in self.param_groups[self._n_main:] for p in g["params"] if p.grad is not None]
        if fb:
            self._fallback_step(fb)
        self.steps += 1
        if self.config.verify_every and self.steps % self.config.verify_every == 0:
            verify_parameters(entries, self.comm)
        return loss

    def _fallback_step(self, params: list[Tensor]) -> None:
        """AdamW (or the configured optimizer) on the mean gradient, as DDP would feed it."""
        from .transport import sum_by_dtype

        m = self.comm.world_size
        if m > 1:
            sums = sum_by_dtype([p.grad for p in params], self.comm, transport="owner", label="fallback")  # type: ignore[misc]
            for p, total in zip(params, sums):
                p.grad = total.div(m)
        self.fallback.step()  # type: ignore[union-attr]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"commlmo"``: random generators, the fallback's state, step counts.

        Momentum, EF21 estimators and the EF21-P exact model are per-parameter
        state, saved as usual; together this resumes a run bitwise.
        """
        sd = super().state_dict()
        sd["commlmo"] = {
            "generators": [rt.generators.state() for rt in self._runtimes],
            "fallback": self.fallback.state_dict() if self.fallback is not None else None,
            "world_size": self.comm.world_size,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (same config and parameters)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("commlmo", None)
        if extra is None:
            raise ConfigError("this state_dict was not saved by a commlmo optimizer (no 'commlmo' entry)")
        if len(extra["generators"]) != len(self._runtimes):
            raise ConfigError(
                f"state_dict has {len(extra['generators'])} commlmo groups, this optimizer has {len(self._runtimes)}"
            )
        super().load_state_dict(state_dict)
        for rt, gs in zip(self._runtimes, extra["generators"]):
            rt.generators.load(gs)
        self.steps, self.skipped_steps = extra.get("steps", 0), extra.get("skipped_steps", 0)
        if self.fallback is not None:
            self.fallback.load_state_dict(extra["fallback"])
            del self.param_groups[self._n_main:]
            self.param_groups.extend(self.fallback.param_groups)


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
    return CommOptimizer(named, cfg, comm=make_communicator(process_group), adversary=adversary)
