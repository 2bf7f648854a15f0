"""Process group and device from the launcher's environment.

torchrun and the DeepSpeed launcher both export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `srun` tasks get them from SLURM's variables; without
them moco-scale runs as one plain process with no process group at all (the
reference crashes there).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moco_scale.config import ConfigError
from moco_scale.signals import training_loop_started


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _leading_int(value: str) -> int:
    """SLURM's per-node task counts look like "8", "8(x2)" or "8,4": the first node's count."""
    digits = ""
    for ch in value:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits or "1")


def adopt_slurm_env() -> None:
    """Under `srun` (one task per GPU, no torchrun), turn SLURM's variables into the launcher ones.

    Left alone when a launcher already set RANK, or for a single task (a plain process in an
    allocation). MASTER_ADDR must come from the job script (the first node of the allocation)."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError('running under srun with SLURM_NTASKS > 1 but MASTER_ADDR is not set; in the job script: '
                           'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_STEP_TASKS_PER_NODE") or "1"
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"), LOCAL_WORLD_SIZE=str(_leading_int(per_node)))
    os.environ.setdefault("MASTER_PORT", "29500")


def world_size_from_env() -> int:
    """The world size the launcher promised, readable before the process group exists."""
    adopt_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


#: all-gather into one flat tensor: `all_gather_single` where torch has it (2.14 deprecates the older name),
#: `all_gather_into_tensor` on torch 2.11-2.13; the same signature, so call sites need no version branch
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def cuda_ordinal(local_rank: int, device_count: int) -> int:
    """The GPU a rank uses: its local rank among the GPUs it sees. Under SLURM with one GPU visible per task
    (CUDA_VISIBLE_DEVICES set per task) every rank sees one device, ordinal 0, whatever its SLURM_LOCALID."""
    if device_count < 1:
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    return local_rank % device_count


def loader_workers(total: int, local_world_size: int) -> int:
    """Data-loading workers per rank: `-j` counts the workers of one node, as in the reference, shared by the
    ranks on that node (64 GPUs on 8 nodes with -j 32: 4 workers per GPU, not 1)."""
    return max(0, math.ceil(total / max(1, local_world_size)))


def _choose_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
        index = cuda_ordinal(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda, not {device!r}")
    return torch.device("cpu")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Stop glibc from handing big freed blocks back to the OS at every step (CPU training).

    A step's activations and gradients are tens of MB each: above glibc's mmap threshold, or freed at the top
    of the heap beyond its trim threshold, so by default each step unmaps them and page-faults them in again.
    Measured on a ViT-S/16 step at batch 8 on 2 cores: gelu 268 -> 74 ms, copies 192 -> 47 ms, the head's
    4096x4096 gradient sum 131 -> 20 ms. The heap then stays at the step's peak, which it reaches every step
    anyway. Returns False (nothing changed) off glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # 32 MiB is the largest mmap threshold glibc accepts; the trim threshold is an int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def init_distributed(device: str = "auto", timeout_s: float = 1800.0, require_group: bool = False) -> DistContext:
    """Join the launcher's process group (NCCL on GPU, gloo on CPU), or run alone: without a
    group, or (`require_group`, for the sharding engines) in a group of one."""
    world = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = _choose_device(device, local_rank)
    if dev.type == "cpu":
        keep_freed_memory()
    if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The DeepSpeed launcher does not set it; share the cores between local ranks.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                               "or deepspeed, or unset WORLD_SIZE to run as one process")
        started, where = time.monotonic(), f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        after = min(60.0, timeout_s / 2)
        try:
            with say_if_still_waiting(after, lambda: f"moco-scale: rank {rank}: still forming the process group of "
                                      f"{world} at {where} after {after:.0f} s; it waits up to --dist-timeout "
                                      f"{timeout_s:g} s for every rank"):
                dist.init_process_group(
                    backend="nccl" if dev.type == "cuda" else "gloo",
                    rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                )
        except (RuntimeError, ValueError) as e:  # the store's errors: DistNetworkError, DistStoreError, ...
            raise JoinError(join_failure(e, rank, world, time.monotonic() - started, timeout_s)) from e
    elif require_group and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1, timeout=timedelta(seconds=timeout_s))
    watch_deepspeed_launcher()
    return DistContext(rank, world, local_rank, local_world, dev)


@contextlib.contextmanager
def say_if_still_waiting(after_s: float, describe: Callable[[], str | None]) -> Iterator[None]:
    """A wait that may be long or endless (joining the group, an op build behind a lock) says so: if the block
    is still running after `after_s`, `describe()`'s line (None: nothing to say) goes to stderr, once."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(after_s) and (line := describe()) and not done.is_set():
            print(line, file=sys.stderr, flush=True)

    threading.Thread(target=watch, name="moco-scale-wait-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


class JoinError(ConfigError):
    """The process group could not be formed: what failed (address, port, which ranks) and what to change."""


def join_failure(e: BaseException, rank: int, world: int, seconds: float, timeout_s: float) -> str:
    """One line for a failed start: the master port in use, a rank that never joined, rank 0 not reachable
    (torch's store says which in its message), instead of "another rank died"."""
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    where = f"rank {rank} of {world}, after {seconds:.0f} s"
    if "EADDRINUSE" in text or "address already in use" in text:
        return (f"could not start the process group ({where}): MASTER_PORT {port} on {addr} is in use (another job, "
                "or a run still exiting); launch with another port (--master_port for torchrun and deepspeed, "
                "MASTER_PORT otherwise)")
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        missing = int(joined[2]) - int(joined[1])
        return (f"could not start the process group ({where}): only {joined[1]} of {joined[2]} ranks joined "
                f"{addr}:{port} within --dist-timeout {timeout_s:g} s; {missing} never started or cannot reach "
                f"{addr}:{port}: check every node's launch line (the same MASTER_ADDR, MASTER_PORT and world size, "
                "each node its own rank) and that the port is open between the nodes")
    if rank != 0 and re.search(r"connect|timed out|refused|resolve|Ping failed|getaddrinfo", text):
        return (f"could not start the process group ({where}): rank 0's store at {addr}:{port} could not be "
                f"reached ({first}); check that MASTER_ADDR is rank 0's address as seen from this node, that "
                "MASTER_PORT is open, and that rank 0 is running")
    return f"could not start the process group at {addr}:{port} ({where}): {first}"


_WATCHING = False


def watch_deepspeed_launcher(interval_s: float = 2.0) -> bool:
    """Under the deepspeed launcher, a SIGTERM to `deepspeed` on one node ends only that runner (it forwards
    signals only to pdsh jobs): its `deepspeed.launcher.launch` child and the ranks under it would train on,
    orphaned, to the end. Each rank watches the runner and, once it is gone, sends itself SIGTERM: the run saves
    at the next agreed step and exits, as for a SIGTERM to the job. Returns whether it watches."""
    global _WATCHING
    if _WATCHING:
        return True
    try:
        import psutil  # deepspeed's dependency
    except ImportError:
        return False
    try:
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
            return False
        runner = parent.parent()
    except (OSError, psutil.Error):  # nothing there to watch
        return False
    if runner is None:
        return False

    def alive() -> bool:
        try:
            return runner.is_running() and runner.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(interval_s)
        print(f"moco-scale: rank {os.environ.get('RANK', '0')}: the deepspeed launcher (pid {runner.pid}) is gone: "
              "stopping as for SIGTERM", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="moco-scale-launcher-watch", daemon=True).start()
    _WATCHING = True
    return True


def shutdown() -> None:
    """Tear the group down after a barrier, so no rank leaves while another still talks to it."""
    gc.collect()  # free engine-held tensors while gloo can still release them (DeepSpeed exit abort)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (the global-batch loss from per-rank losses)."""
    value = value.detach().to(torch.promote_types(value.dtype, torch.float32)).clone()
    if get_world_size() > 1:
        dist.all_reduce(value)
        value /= get_world_size()
    return value


class StopRequest:
    """SIGTERM (what SLURM sends before preemption or the time limit), SIGHUP (a closed terminal or ssh session)
    and a first Ctrl-C (SIGINT) ask the run to save and exit 0; a second Ctrl-C aborts at once
    (KeyboardInterrupt), as a user pressing it twice means.

    The handler only records the signal; `agreed()` at a step boundary makes every rank decide the same,
    since the signal reaches ranks at different moments. That takes a tiny all-reduce whose answer the host
    must read (a sync with the device), so ranks agree on logging steps, and also every `every` steps,
    a count all ranks share that the agreement itself sets to about `interval_s` of the slowest rank's steps
    (it starts at 50): a run whose -p is longer than the steps it has left still stops within about
    `interval_s`. One process answers at every step, at no cost."""

    def __init__(self, ctx: DistContext, interval_s: float = 30.0) -> None:
        self.ctx, self.signal_name, self.interval_s = ctx, None, interval_s
        self.every, self._since = 50, None  # (time, step) of the last agreement that had a step
        training_loop_started()
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C is the default one: abort
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, may_sync: bool, step: int | None = None) -> bool:
        """Whether every rank stops now, after `step` steps; `may_sync`: this step may wait for the device (a
        logging step). Given `step`, the ranks also agree every `self.every` steps."""
        if not self.ctx.is_distributed or self.ctx.world_size == 1:
            return self.requested
        if not (may_sync or (step is not None and step % self.every == 0)):
            return False
        now = time.monotonic()
        per_step = None
        if step is not None and self._since is not None and step > self._since[1]:
            per_step = (now - self._since[0]) / (step - self._since[1])
        flag = torch.tensor([1.0 if self.requested else 0.0, per_step or 0.0], dtype=torch.float64,
                            device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        requested = flag[0].item()
        if per_step is not None:  # the same on every rank: they take the same steps (read after the first: no wait)
            self.every = max(1, min(10_000, int(self.interval_s / max(flag[1].item(), 1e-6))))
        if step is not None:
            self._since = (now, step)
        return bool(requested)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
