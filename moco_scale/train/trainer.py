"""The training loop, written once for every command (pretrain, finetune, lincls), after torchtitan's Trainer:
`train()` runs epochs of steps with the save cadence and stop signals, `train_step(batch)` one step (its
schedules, the engine's step, the meter and the logs), `state_dict()` the run's position (the step is the
truth; epoch and batch are derived from it), `close()` the summary.

What differs between commands comes in as parts: the engine (what a step trains), the schedule (a pure
function of the fractional epoch), the feed (batches on the device), an evaluation at epoch ends, and the
checkpoint manager's export.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from moco_scale.checkpoint.manager import CheckpointManager
from moco_scale.dist import DistContext, StopRequest, mean_across_ranks
from moco_scale.engines.base import Engine
from moco_scale.telemetry import RunLogger, Throughput
from moco_scale.train.config import RunConfig, finite
from moco_scale.train.run import release_run

#: the fractional epoch -> {"lr": ..., and "moco_m" for MoCo's momentum}
Schedule = Callable[[float], dict[str, float]]
#: an epoch end (the fractional epoch reached) -> metrics to log and keep ({} when it does not evaluate)
Evaluate = Callable[[float], dict[str, float]]


class Trainer:
    """One run's loop. `record` holds what meta.json must carry beside the step (what a resume must match)."""

    def __init__(self, run: RunConfig, ctx: DistContext, engine: Engine, batches: Iterable, sampler: Any,
                 schedule: Schedule, manager: CheckpointManager, record: dict[str, Any],
                 flops_per_image: float = 0.0, peak_tflops: float | None = None,
                 evaluate: Evaluate | None = None, watch: tuple[str, ...] = (), desc: str = "pretrain") -> None:
        self.run, self.ctx, self.engine, self.batches, self.sampler = run, ctx, engine, batches, sampler
        self.schedule, self.manager, self.record, self.evaluate, self.watch = (schedule, manager, record, evaluate,
                                                                               watch)
        self.flops_per_image, self.peak_tflops, self.desc = flops_per_image, peak_tflops, desc
        self.step, self.last_loss, self.interrupted = 0, float("nan"), False
        #: evaluations so far (one dict per evaluated epoch end), kept in meta.json across resumes
        self.history: list[dict[str, float]] = []
        self._logging = False
        self.logger: RunLogger | None = None
        #: lines the run's log starts with (the run, where it resumed), printed once the logger exists
        self.notes: list[str] = []
        manager.track(engine, self)

    # -- Stateful: meta.json ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "iters_per_epoch": self.run.iters_per_epoch,
                "global_batch": self.run.global_batch, "dataset_size": self.run.dataset_size,
                "history": self.history, **self.record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.history = list(state.get("history", []))

    # -- the loop -------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Epochs of steps from `self.step` to the run's last; saves on the manager's cadence; a stop signal
        agreed by every rank saves and ends the run. Returns the summary."""
        total, iters = self.run.total_steps, self.run.iters_per_epoch
        self.logger = RunLogger(self.run.output_dir, self.ctx.is_main, total, self.step, desc=self.desc)
        self.meter = Throughput(self.ctx.world_size, self.ctx.device, self.flops_per_image, self.peak_tflops,
                                total, self.step)
        for note in self.notes:
            self.logger.message(note)
        self.started = time.time()
        stop = StopRequest(self.ctx)
        try:
            while self.step < total and not self.interrupted:
                self.sampler.set_epoch(*divmod(self.step, iters))
                for batch, data_wait in self._timed(self.batches):
                    self.train_step(batch, data_wait)
                    if self.step == total:
                        break
                    if stop.agreed(may_sync=self._logging, step=self.step):
                        saved = self.manager.save()
                        self.logger.message(f"{stop.signal_name or 'a signal on another rank'}: saved {saved} at "
                                            f"step {self.step}; exiting (continue with --resume auto)")
                        self.interrupted = True
                        break
                    self.manager.after_step(self.step)
                if not self.interrupted:
                    self.end_epoch()
        finally:
            stop.close()
        return self.summary()

    @staticmethod
    def _timed(batches: Iterable) -> Iterator[tuple[Any, float]]:
        """Each batch with the seconds the loop waited for it."""
        it, start = iter(batches), time.perf_counter()
        for batch in it:
            yield batch, time.perf_counter() - start
            start = time.perf_counter()

    def train_step(self, batch: tuple[torch.Tensor, ...], data_wait: float = 0.0) -> torch.Tensor:
        """One step at the schedule's values for this step's fractional epoch; logs every -p steps (the only
        steps that wait for the device: the loss is averaged over ranks and read)."""
        epoch = self.step / self.run.iters_per_epoch
        values = self.schedule(epoch)
        self._logging = (self.step + 1) % self.run.print_freq == 0 or self.step + 1 == self.run.total_steps
        loss = self.engine.train_step(batch, values["lr"], values.get("moco_m"),
                                      watch=self.watch if self._logging else ())
        self.step += 1
        self.meter.add(self.run.global_batch, data_wait)
        self.logger.advance()
        if self._logging:
            self.last_loss = mean_across_ranks(loss).item()
            if not math.isfinite(self.last_loss):
                raise FloatingPointError(f"loss is {self.last_loss} at step {self.step} (epoch {epoch:.3f})")
            norms = {f"grad_norm/{n.removeprefix('base_encoder.')}": v for n, v in self.engine.last_grad_norms.items()}
            self.logger.log({"step": self.step, "epoch": epoch, "loss": self.last_loss, **values, **norms,
                             **self.meter.read()})
        return loss

    def end_epoch(self) -> None:
        """An epoch's end (or the run's last step): evaluate, then save and export on the manager's cadence."""
        if self.evaluate is not None:
            results = self.evaluate(self.step / self.run.iters_per_epoch)
            if results:
                row = {"step": self.step, "epoch": self.step / self.run.iters_per_epoch, **results}
                self.history.append(row)
                self.logger.log_eval(row)
        self.manager.after_epoch(last=self.step == self.run.total_steps)

    def train_or_evaluate(self, evaluate_only: bool, measure: Callable[[], dict[str, Any]],
                          resumed_from: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """-e/--evaluate: only `measure()` the restored model (no step, no save); otherwise train to the end.
        Returns (the last evaluation, the summary); the engine is released either way."""
        if evaluate_only:
            final, summary = measure(), {"evaluated": resumed_from, "steps": self.step}
            self.engine.close()
            return final, summary
        summary = self.train()
        self.close(summary)
        return (self.history[-1] if self.history else {}), summary

    # -- the end --------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """summary.json (strict JSON: null where there is no value), written by rank 0; the logger closes."""
        saved = self.manager.last_saved
        out = {"steps": self.step, "epochs": self.step / self.run.iters_per_epoch,
               "final_loss": finite(self.last_loss), "interrupted": self.interrupted,
               "seconds": time.time() - self.started,
               "resumable": None if saved is None else str(self.manager.folder(saved))}
        if self.history:
            out["history"] = self.history
        return out

    def close(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json (rank 0), say how the run ended, release the logger and the engine."""
        self.manager.discard_aside()  # --overwrite, and this run saved nothing
        if self.ctx.is_main:
            with open(os.path.join(self.run.output_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, allow_nan=False)
        loss = "no step logged" if summary["final_loss"] is None else f"final loss {summary['final_loss']:.4f}"
        self.logger.message(f"moco-scale: {'stopped' if self.interrupted else 'done'} at step {self.step}/"
                            f"{self.run.total_steps} after {summary['seconds']:.0f} s, {loss}; summary in "
                            f"{self.run.output_dir}/summary.json")
        self.logger.close()
        self.engine.close()
        release_run(self.run.output_dir)
        return summary
