"""The framework recipes of docs/integrations.md on 2 gloo ranks, for tests/test_integrations.py.

One torchrun-style launch (``torch.distributed.launcher.api.elastic_launch``: the
environment ``torchrun`` sets, no process group) runs every framework in turn: importing
transformers and Lightning costs more than the runs.  HuggingFace ``Trainer`` goes first,
with the optimizer built before ``TrainingArguments`` initialises ``torch.distributed``.

Every recipe trains ``N + K`` steps straight through, saving a checkpoint after step ``N``
through the framework, then resumes from that checkpoint in fresh objects (the model
initialised differently) and trains ``K`` steps.  Each run records the parameters, the
optimizer state, commlmo's bytes per step, and the gloo collectives that ran (torch's
profiler names each ``gloo:<collective>``), which tells whether DDP all-reduced anything.
"""

from __future__ import annotations

import copy
import math
import os
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

PRESET = "signmuon"  # every group communicates, 1 bit per entry; worker momentum differs by rank


def world() -> int:
    """The number of processes of the launch (torchrun's ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
N, K = 2, 2          # steps before the checkpoint, steps after it
BATCH = 4


class Tiny(torch.nn.Module):
    """A model the HF ``Trainer`` accepts: ``forward(x, labels)`` returns ``{"loss", "logits"}``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body(x)
        return {"loss": (out - labels).square().mean(), "logits": out}


def samples(n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed samples; frameworks shard them over the ranks."""
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(6, generator=g), "labels": torch.randn(3, generator=g)} for _ in range(n)]


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of ``step``, for the hand-written loops."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


@contextmanager
def collectives():
    """The gloo collectives run in the block: ``{"gloo:all_reduce": count, ...}``, and under
    ``"all_reduce_numel"`` the number of entries each all-reduce reduced (DDP's: one bucket of
    gradients, every parameter's entries together)."""
    counts: dict = {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        yield counts
    events = [e for e in prof.events() if e.name.startswith("gloo:")]
    counts.update(Counter(e.name for e in events))
    counts["all_reduce_numel"] = [math.prod(e.input_shapes[0]) if e.input_shapes else 0
                                  for e in events if e.name == "gloo:all_reduce"]


def commlmo_calls(opt: Any) -> Counter:
    """commlmo's collective calls since the optimizer was built, by collective (``all_reduce``...)."""
    out: Counter = Counter()
    for label, row in opt.bytes.total.items():
        out["gloo:" + label.rsplit("/", 1)[-1]] += row["calls"]
    return out


def step_bytes(opt: Any) -> dict[str, int]:
    """Bytes this rank sent in the optimizer's last step, by label."""
    return {label: row["sent"] for label, row in opt.bytes.step.items()}


def hooks_of(model: Any) -> list[str] | None:
    """The communication hooks of the DDP wrapping ``model`` (``None``: no DDP)."""
    from commlmo.integrations import find_ddp

    ddp = find_ddp(model)
    return None if ddp is None else [getattr(h, "__qualname__", "?") for h, _ in ddp._comm_hooks]


def outcome(model: torch.nn.Module, opt: Any, per_step: list, counts: dict, hooks: list[str] | None) -> dict:
    """What a run leaves, for the comparisons: parameters, optimizer state, bytes, collectives, DDP hooks."""
    state = opt.state_dict()["state"]
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": {(pid, k): v.clone() for pid, st in state.items() for k, v in st.items()
                  if isinstance(v, torch.Tensor)},
        "steps": opt.steps,
        "bytes": per_step,
        "collectives": dict(counts),
        "commlmo_calls": dict(commlmo_calls(opt)),
        "comm": opt.comm.describe(),
        "ddp_hooks": hooks,
    }


# ---------------------------------------------------------------------------- HuggingFace Trainer


def hf(tmp: Path, rank: int) -> dict:
    import commlmo
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from commlmo.integrations import commlmo_optimizer
    from commlmo.integrations.transformers import CommLMOCallback, CommLMOFactory

    class Bytes(TrainerCallback):
        def __init__(self):
            self.per_step: list = []

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.per_step.append(step_bytes(commlmo_optimizer(optimizer)))

    def arguments(out: Path) -> TrainingArguments:
        return TrainingArguments(output_dir=str(out), max_steps=N + K, save_steps=N, per_device_train_batch_size=BATCH,
                                 lr_scheduler_type="constant", report_to=[], logging_strategy="no", use_cpu=True,
                                 seed=0, disable_tqdm=True, dataloader_num_workers=0, ddp_timeout=120)

    data = samples(2 * BATCH * (N + K))
    out: dict = {}
    model = Tiny()
    opt = commlmo.build_optimizer(model, PRESET)  # before TrainingArguments: no process group yet
    out["built_on"] = opt.comm.describe()
    args = arguments(tmp / "straight")
    rec = Bytes()
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                      callbacks=[CommLMOCallback(), rec])
    with collectives() as counts:
        trainer.train()
    out["straight"] = outcome(model, opt, rec.per_step, counts, hooks_of(trainer.model_wrapped))
    # resumed: the optimizer comes from HF's factory protocol (optimizer_cls_and_kwargs), the model from the checkpoint
    model = Tiny(seed=7)
    rec = Bytes()
    trainer = Trainer(model=model, args=arguments(tmp / "resumed"), train_dataset=data,
                      optimizer_cls_and_kwargs=(CommLMOFactory, {"config": PRESET}), callbacks=[CommLMOCallback(), rec])
    with collectives() as counts:
        trainer.train(resume_from_checkpoint=str(tmp / "straight" / f"checkpoint-{N}"))
    out["resumed"] = outcome(model, commlmo_optimizer(trainer.optimizer), rec.per_step, counts,
                             hooks_of(trainer.model_wrapped))
    if world() == 1:  # no DDP: nothing to refuse
        return out
    # without the callback: DDP reduces in the first backward, and the first step refuses
    model = Tiny()
    opt = commlmo.build_optimizer(model, PRESET)
    trainer = Trainer(model=model, args=arguments(tmp / "plain"), train_dataset=data, optimizers=(opt, None))
    with collectives() as counts:
        try:
            trainer.train()
            out["plain_error"] = None
        except commlmo.DistributedError as exc:
            out["plain_error"] = str(exc)
    out["plain_collectives"] = counts
    out["plain_steps"] = opt.steps
    out["plain_commlmo_calls"] = dict(commlmo_calls(opt))
    # a model with buffers, which DDP would broadcast at every forward
    args = TrainingArguments(output_dir=str(tmp / "buffers"), ddp_broadcast_buffers=None, use_cpu=True, report_to=[])
    out["buffers_error"] = _config_error(lambda: CommLMOCallback().on_train_begin(
        args, None, None, optimizer=commlmo.build_optimizer(with_buffers(), PRESET), model=with_buffers()))
    return out


# ---------------------------------------------------------------------------- plain torch: the reference and the guards


def with_buffers() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.BatchNorm1d(3))


def _error_message(call, kind: str = "ConfigError") -> str | None:
    """The message of the ``commlmo.<kind>`` that ``call()`` raises, or ``None`` when it returns."""
    import commlmo

    try:
        call()
    except getattr(commlmo, kind) as exc:
        return str(exc)
    return None


def _config_error(call) -> str | None:
    return _error_message(call, "ConfigError")


def _refused(step) -> str | None:
    """The ``DistributedError`` message of ``step()``, or ``None`` when it stepped."""
    return _error_message(step, "DistributedError")


def torch_loop(tmp: Path, rank: int, early: tuple[torch.nn.Module, Any]) -> dict:
    """No framework: the bytes every recipe must match, consolidated state dicts, and the DDP guards."""
    import commlmo
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from commlmo.integrations import turn_off_ddp_reduction

    out: dict = {}
    model = Tiny()
    opt = commlmo.build_optimizer(model, PRESET)
    per_step = []
    for step in range(N + K):
        x, y = batch(rank, step)
        model(x, y)["loss"].backward()
        opt.step()
        opt.zero_grad()
        per_step.append(step_bytes(opt))
        if step + 1 == N:  # rank 0's state dict, without and with consolidation
            own = opt.state_dict()
            opt.consolidate_state_dict()
            files = [copy.deepcopy((own, opt.state_dict())) if rank == 0 else None]  # as torch.save would
            dist.broadcast_object_list(files, src=0)
            weights = {k: v.clone() for k, v in model.state_dict().items()}
    out["reference_bytes"] = per_step
    out["reference"] = outcome(model, opt, per_step, {}, None)
    own0, all0 = files[0]
    out["file_ranks"] = sorted(all0["commlmo"]["ranks"])
    # rank 0's own state: rank 1 refuses it and changes nothing
    fresh = commlmo.build_optimizer(Tiny(), PRESET)
    try:
        fresh.load_state_dict(own0)
        out["unconsolidated_load"] = None
    except commlmo.ConfigError as exc:
        out["unconsolidated_load"] = str(exc)
    out["unconsolidated_unchanged"] = fresh.steps == 0 and not fresh.state
    # the consolidated file resumes every rank, into the optimizer built before the process group existed
    emodel, early = early
    out["early_built_on"] = early.comm.describe()
    emodel.load_state_dict(weights)
    early.load_state_dict(all0)
    per_step = []
    for step in range(N, N + K):
        x, y = batch(rank, step)
        emodel(x, y)["loss"].backward()
        early.step()
        early.zero_grad()
        per_step.append(step_bytes(early))
    out["early_resumed"] = outcome(emodel, early, per_step, {}, None)

    # DDP's reduction: refused at the first step, unless turned off or skipped by no_sync around the forward too
    def first_step(wrap, *, no_sync: str = "") -> dict:
        m = Tiny()
        o = commlmo.build_optimizer(m, PRESET)
        wrapped = wrap(m)
        x, y = batch(rank, 0)
        if no_sync == "both":
            with wrapped.no_sync():
                wrapped(x, y)["loss"].backward()
        elif no_sync == "backward":
            loss = wrapped(x, y)["loss"]
            with wrapped.no_sync():
                loss.backward()
        else:
            wrapped(x, y)["loss"].backward()
        before = [p.detach().clone() for p in m.parameters()]
        error = _refused(o.step)
        return {"error": error, "steps": o.steps,
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, m.parameters()))}

    def fp16(m):
        d = DDP(m)
        d.register_comm_hook(None, fp16_compress_hook)
        return d

    out["guards"] = {
        "ddp": first_step(DDP),
        "ddp_fp16_hook": first_step(fp16),
        "no_sync_backward_only": first_step(DDP, no_sync="backward"),
        "no_sync_forward_and_backward": first_step(DDP, no_sync="both"),
        "turned_off": first_step(lambda m: turn_off_ddp_reduction(DDP(m))),
    }
    return out


# ---------------------------------------------------------------------------- accelerate


def accelerate(tmp: Path, rank: int) -> dict:
    import commlmo
    from accelerate import Accelerator

    from commlmo.integrations.accelerate import prepare

    def run(resume: bool) -> dict:
        accelerator = Accelerator(cpu=True)
        model = Tiny(seed=7 if resume else 0)
        opt = commlmo.build_optimizer(model, PRESET)
        wrapped, opt = prepare(accelerator, model, opt)
        first = 0
        if resume:
            accelerator.load_state(str(tmp / "checkpoint"))
            first = N
        per_step = []
        with collectives() as counts:
            for step in range(first, N + K):
                x, y = batch(rank, step)
                accelerator.backward(wrapped(x, y)["loss"])
                opt.step()
                opt.zero_grad()
                per_step.append(step_bytes(opt.optimizer))
                if not resume and step + 1 == N:
                    accelerator.save_state(str(tmp / "checkpoint"))
        return outcome(model, opt.optimizer, per_step, counts, hooks_of(wrapped))

    out = {"straight": run(False), "resumed": run(True)}
    if world() > 1:
        model = with_buffers()
        out["buffers_error"] = _config_error(
            lambda: prepare(Accelerator(cpu=True), model, commlmo.build_optimizer(model, PRESET)))
    return out


# ---------------------------------------------------------------------------- Lightning Trainer and Fabric


def lightning(tmp: Path, rank: int) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    import commlmo
    from commlmo.integrations import commlmo_optimizer
    from commlmo.integrations.lightning import CommLMOCallback, setup

    class Lit(L.LightningModule):
        def __init__(self, seed: int = 0):
            super().__init__()
            self.net = Tiny(seed)

        def training_step(self, b, i):
            return self.net(b["x"], b["labels"])["loss"]

        def configure_optimizers(self):
            return commlmo.build_optimizer(self, PRESET)

    class Bytes(L.Callback):
        def __init__(self):
            self.per_step: list = []

        def on_train_batch_end(self, trainer, module, *args):
            self.per_step.append(step_bytes(commlmo_optimizer(trainer.optimizers[0])))
            self.hooks = hooks_of(trainer.strategy.model)  # the strategy unwraps the model when fit ends

    # N steps per epoch: the checkpoint of epoch 1 is the state after step N
    loader = torch.utils.data.DataLoader(samples(world() * BATCH * N), batch_size=BATCH)

    def run(resume: bool) -> dict:
        module, rec = Lit(seed=7 if resume else 0), Bytes()
        ckpt = ModelCheckpoint(dirpath=str(tmp / "ckpt"), filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = L.Trainer(accelerator="cpu", devices=world(), strategy="ddp", max_epochs=(N + K) // N, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            default_root_dir=str(tmp), enable_checkpointing=not resume,
                            callbacks=[CommLMOCallback(), rec] + ([] if resume else [ckpt]))
        with collectives() as counts:
            trainer.fit(module, loader, ckpt_path=str(tmp / "ckpt" / "epoch=0.ckpt") if resume else None)
        return outcome(module, commlmo_optimizer(trainer.optimizers[0]), rec.per_step, counts, rec.hooks)

    out = {"straight": run(False), "resumed": run(True)}
    if world() == 1:
        return out
    # without the callback: Lightning's DDP reduces, and the first step refuses
    trainer = L.Trainer(accelerator="cpu", devices=world(), strategy="ddp", max_steps=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    out["plain_error"] = _refused(lambda: trainer.fit(Lit(), loader))
    def buffers() -> None:
        f = L.Fabric(accelerator="cpu", devices=world(), strategy="ddp")
        f.launch()
        model = with_buffers()
        setup(f, model, commlmo.build_optimizer(model, PRESET))

    out["buffers_error"] = _config_error(buffers)
    return out


def fabric(tmp: Path, rank: int) -> dict:
    import lightning as L

    import commlmo
    from commlmo.integrations.lightning import setup

    def run(resume: bool) -> dict:
        f = L.Fabric(accelerator="cpu", devices=world(), strategy="ddp")
        f.launch()
        model = Tiny(seed=7 if resume else 0)
        wrapped, opt = setup(f, model, commlmo.build_optimizer(model, PRESET))
        first = 0
        if resume:
            state = {"model": wrapped, "optimizer": opt, "step": 0}
            f.load(str(tmp / "fabric.ckpt"), state)
            first = state["step"]
        per_step = []
        with collectives() as counts:
            for step in range(first, N + K):
                x, y = batch(rank, step)
                f.backward(wrapped(x, y)["loss"])
                opt.step()
                opt.zero_grad()
                per_step.append(step_bytes(opt.optimizer))
                if not resume and step + 1 == N:
                    f.save(str(tmp / "fabric.ckpt"), {"model": wrapped, "optimizer": opt, "step": step + 1})
        return outcome(model, opt.optimizer, per_step, counts, hooks_of(wrapped))

    return {"straight": run(False), "resumed": run(True)}


# ---------------------------------------------------------------------------- torchtitan's optimizer container


def torchtitan(tmp: Path, rank: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.optimizer import ParamGroupConfig

    from commlmo.integrations.torchtitan import CommLMOOptimizersContainer

    config = CommLMOOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r"^body\.0\.", optimizer_name="CommLMO", optimizer_kwargs={"lr": 0.05}),
                      ParamGroupConfig(pattern=r".*", optimizer_name="CommLMO", optimizer_kwargs={})],
        optimizer_factory_kwargs_by_name={"CommLMO": {"config": PRESET}})

    def run(resume: bool) -> dict:
        model = Tiny(seed=7 if resume else 0)
        container = config.build(model_parts=[model])
        opt = container.optimizers[0]
        first = 0
        if resume:
            weights = model.state_dict()
            dcp.load({"model": weights, "optimizer": container}, checkpoint_id=str(tmp / "dcp"))
            model.load_state_dict(weights)
            first = N
        per_step = []
        with collectives() as counts:
            for step in range(first, N + K):
                x, y = batch(rank, step)
                model(x, y)["loss"].backward()
                container.step()
                container.zero_grad()
                per_step.append(step_bytes(opt))
                if not resume and step + 1 == N:
                    dcp.save({"model": model.state_dict(), "optimizer": container}, checkpoint_id=str(tmp / "dcp"))
        return {**outcome(model, opt, per_step, counts, None),
                "group_names": [g["param_names"] for g in opt.param_groups],
                "lrs": [g["lr"] for g in opt.param_groups]}

    return {"straight": run(False), "resumed": run(True)}


# ---------------------------------------------------------------------------- the launch


RECIPES = {"hf": hf, "torch": torch_loop, "accelerate": accelerate, "lightning": lightning, "fabric": fabric,
           "torchtitan": torchtitan}


def worker(tmp: str) -> dict:
    """Every recipe in turn on this rank; a recipe's exception is its result (the others still run)."""
    import commlmo

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results: dict = {"initialised_at_start": dist.is_initialized()}
    early_model = Tiny()
    early = (early_model, commlmo.build_optimizer(early_model, PRESET))  # no process group yet: bound by its load
    for name, recipe in RECIPES.items():
        if name == "torch" and world() == 1:
            continue  # the guards and the consolidated state dict are about several ranks
        start = time.monotonic()
        folder = Path(tmp) / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            results[name] = recipe(folder, rank, early) if name == "torch" else recipe(folder, rank)
        except ImportError as exc:
            results[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.monotonic() - start
        if dist.is_initialized():
            dist.barrier()  # a recipe's leftovers never meet the next recipe's collectives
    return results


def launch(tmp: str, nproc: int = 2) -> dict[int, dict]:
    """``worker(tmp)`` on ``nproc`` processes started as ``torchrun --nproc-per-node nproc`` would."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", run_id=f"integrations-{os.getpid()}", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    return elastic_launch(config, worker)(tmp)
