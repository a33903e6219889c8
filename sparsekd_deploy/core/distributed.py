"""Distributed runs: one process per device, started by ``torchrun`` or ``accelerate launch`` (DDP through Hugging
Face Accelerate; ``distill`` and ``build`` run unchanged under either).

The rules every rank keeps, so that all of them take the same decisions:

- **The main process decides and writes.** Building the data set, scoring and masks, held-out measurements (and so
  every stage verdict), the run dir, checkpoints, plots, the top-K cache's manifest and the output lock are the main
  process's alone; it shares each result (:meth:`Team.on_main`, :meth:`Team.share_masks`, :meth:`Team.sync_module`)
  and the others continue from it. A stage is therefore never accepted on one rank and rejected on another. The one
  file other ranks write is their shard of a new teacher top-K cache (the teacher pass split over the ranks;
  ``topk_cache.py``), which every rank then reads whole.
- **The global batch is one batch.** Every step draws its ``batch_size`` rows from a generator seeded identically on
  every rank, and rank r trains on the r-th contiguous share of them (:meth:`Team.shard`): with the gradients
  averaged by DDP, N ranks × B/N rows make the update of one process on B rows.
- **A failure reaches every rank.** An error on the main process is sent to the others instead of leaving them
  waiting; a rank that dies (killed, out of memory) stops the rest with one line (:class:`RankLostError`) saying that
  the run dir holds the last accepted stage and that ``--resume`` continues it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, SparseKDError, first_line

# Collectives wait this long for the main process's main-only work (sampling the data set from the teacher, the
# load-path analysis, writing the top-K cache: hours on a large teacher) before giving up. A rank that dies is noticed
# at once anyway (its sockets close; the launcher stops the others), not after this.
MAIN_WORK_TIMEOUT = _dt.timedelta(hours=12)


class RankLostError(SparseKDError):
    """Another process of the distributed run stopped (or the launcher stopped this one): the run cannot go on."""

    exit_code = 1


class FollowerError(SparseKDError):
    """What a non-main rank raises when the main process failed: the main process prints the reason, once."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def launched_world_size() -> int:
    """Processes in this run as the launcher (torchrun / accelerate launch) set them up; 1 when run directly."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def check_global_batch(batch_size: int, world: int | None = None) -> None:
    """Every rank takes an equal share of the global batch (that is what makes N ranks one update)."""
    world = launched_world_size() if world is None else world
    if world > 1 and batch_size % world:
        lower, upper = batch_size - batch_size % world, batch_size + world - batch_size % world
        sizes = f"{upper} or {lower}" if lower else f"{upper}"
        raise ConfigError([f"batch_size {batch_size} is the global batch, split evenly over the {world} processes of "
                           f"this run, and {world} does not divide it; pass --batch-size {sizes}, or launch a number "
                           f"of processes that divides {batch_size}"])


def fsdp_problems(cfg) -> list[str]:
    """Why ``--fsdp`` cannot run with this launch and config (config validation reports them with the rest). FSDP2
    (core/fsdp.py) shards the student over the launched processes, on GPUs (NCCL) or CPUs (gloo) alike."""
    problems = []
    if launched_world_size() < 2:
        problems.append("fsdp shards the student over the processes of a launched run and this is one process: "
                        "launch N ≥ 2, e.g. torchrun --standalone --nproc_per_node 2 --no-python sparsekd-deploy "
                        "distill ... --fsdp (or accelerate launch --num_processes 2 --no_python ...), or drop --fsdp")
    # Every option runs sharded: channel pruning's fisher and ls (fsdp_channels.py), taylor (fsdp_taylor.py), sr-ste
    # (mask_learning.py), gradual demolition (demolition.py) and the QAT stage (stage_training.run_qat_stage), each
    # checked against one process in tests/test_distributed.py.
    return problems


class Team:
    """The processes of one run. With one process (no launcher) every collective is a no-op: the code path, and so
    every number, is the single-process one."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")

    @classmethod
    def launched(cls) -> Team:
        """The team the launcher started (joining its process group), or a team of one."""
        world = launched_world_size()
        if world == 1:
            return cls()
        from accelerate import PartialState

        # cpu=True on a machine without CUDA: the gloo back end (make_accelerator asks for the same).
        try:
            state = PartialState(cpu=not torch.cuda.is_available(), timeout=MAIN_WORK_TIMEOUT)
        except ValueError as e:  # WORLD_SIZE set by hand, without the rest of a launcher's environment
            raise ConfigError([f"WORLD_SIZE={world} is set but the process group cannot start ({e}); start the run "
                               "with torchrun or accelerate launch, or unset WORLD_SIZE"]) from None
        _close_at_exit()
        return cls(state.process_index, state.num_processes, state.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # -- the global batch ----------------------------------------------------------------------------------
    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch's rows (``check_global_batch`` made the shares equal)."""
        if not self.distributed:
            return rows
        per = len(rows) // self.world
        return rows[self.rank * per:(self.rank + 1) * per]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a scalar (a step's loss on each share → the global batch's loss)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        t = value.detach().float().reshape(1).to(self.device).clone()
        with self.collective("the ranks averaged the loss"):
            dist.all_reduce(t)
        return (t / self.world)[0]

    def total(self, count: int) -> int:
        """The sum over ranks of an integer count (each rank counted its own rows)."""
        if not self.distributed:
            return count
        import torch.distributed as dist

        t = torch.tensor([count], dtype=torch.long, device=self.device)
        with self.collective("the ranks summed a count"):
            dist.all_reduce(t)
        return int(t[0])

    # -- the main process decides --------------------------------------------------------------------------
    def on_main(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``fn`` on the main process only and give its result (pickled) to every rank; an exception there is
        raised on every rank (as itself on the main process, as ``FollowerError`` elsewhere)."""
        if not self.distributed:
            return fn(*args, **kwargs)
        payload, error = None, None
        if self.is_main:
            try:
                payload = ("ok", fn(*args, **kwargs))
            except BaseException as e:  # noqa: B902 - every failure must reach the other ranks, then re-raise here
                error = e
                payload = ("error", type(e).__name__, str(e), getattr(e, "exit_code", 1))
        payload = self.share(payload)
        if error is not None:
            raise error
        if payload[0] == "error":
            raise FollowerError(f"the main process failed ({payload[1]}: {payload[2]})", int(payload[3]))
        return payload[1]

    def share(self, obj: Any) -> Any:
        """The main process's ``obj`` on every rank (any picklable object)."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj if self.is_main else None]
        with self.collective("the ranks exchanged the main process's result"):
            broadcast_object_list(box, from_process=0)
        return box[0]

    def share_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The main process's keep masks (param name → bool tensor) on every rank, sent as tensors, not pickles."""
        if not self.distributed:
            return masks
        from accelerate.utils import broadcast

        shapes = self.share({k: tuple(v.shape) for k, v in masks.items()} if self.is_main else None)
        sent = {k: (masks[k].to(self.device, torch.uint8) if self.is_main
                    else torch.empty(s, dtype=torch.uint8, device=self.device)) for k, s in shapes.items()}
        with self.collective("the ranks exchanged the masks"):
            sent = broadcast(sent, from_process=0)
        # Back on the CPU, where the single-process path keeps them (stage_masks ranks CPU scores): NCCL broadcasts on
        # the GPU, and a GPU copy met the learner's CPU masks in MaskLearner.after_step ("two devices").
        return {k: v.bool().cpu() for k, v in sent.items()}

    def sync_module(self, module: nn.Module) -> None:
        """Copy the main process's weights and buffers into every rank's ``module`` (after it restored a
        checkpoint: the checkpoint files need not exist on the other ranks' machines)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad(), self.collective("the ranks exchanged the main process's weights"):
            for t in [*module.parameters(), *module.buffers()]:
                buf = t.data.to(self.device)
                dist.broadcast(buf, src=0)
                if buf is not t.data:
                    t.data.copy_(buf)

    def same_weights(self, module: nn.Module) -> bool:
        """Whether every rank holds exactly the main process's weights (a float64 checksum per parameter)."""
        if not self.distributed:
            return True
        import torch.distributed as dist

        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(self.device)
        mine = sums.clone()
        with self.collective("the ranks compared their weights"):
            dist.broadcast(sums, src=0)
            equal = torch.tensor([float(torch.equal(sums, mine))], device=self.device)
            dist.all_reduce(equal, op=dist.ReduceOp.MIN)
        return bool(equal.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        with self.collective("the ranks exchanged their values"):
            dist.all_gather_object(out, obj)
        return out

    def wait(self, what: str = "the main process") -> None:
        """Every rank waits here until all arrive (the others wait while the main process writes)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with self.collective(f"the ranks waited for {what}"):
            dist.barrier()

    # -- failures ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Code that talks to the other ranks (collectives, DDP's forward and backward): a failure because a peer is
        gone becomes a lost rank, said in one line; any other error passes through as it is."""
        try:
            yield
        except RuntimeError as e:  # gloo reports a closed peer as a bare RuntimeError, NCCL as DistBackendError
            if not (self.distributed and _peer_failure(e)):
                raise
            raise RankLostError(f"another process of this {self.world}-process run stopped ({_first_words(e)}) while "
                                f"{what}") from None

    @contextlib.contextmanager
    def stop_on_sigterm(self) -> Iterator[None]:
        """When one rank dies the launcher ends the others with SIGTERM: turn it into ``RankLostError`` so that this
        process releases its lock and says where the run stands instead of vanishing."""
        if not self.distributed or not _main_thread():
            yield
            return

        def stopped(signum, _frame):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the clean-up below run to its end
            raise RankLostError(f"the launcher stopped this process (signal {signal.Signals(signum).name}): another "
                                f"process of this {self.world}-process run failed or was killed")

        previous = signal.signal(signal.SIGTERM, stopped)
        try:
            yield
        except RankLostError:
            # The launcher's SIGTERM follows a lost rank within moments: ignore it, so that this process can release
            # its lock and say where the run stands (then it exits).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise
        except BaseException:
            signal.signal(signal.SIGTERM, previous)
            raise
        signal.signal(signal.SIGTERM, previous)


def _peer_failure(e: RuntimeError) -> bool:
    import re

    if isinstance(e, torch.OutOfMemoryError):
        return False
    dist_error = getattr(torch.distributed, "DistError", None)
    return (dist_error is not None and isinstance(e, dist_error)) or bool(
        re.search(r"gloo|nccl|connection (closed|reset|refused)|by peer|broken pipe|timed out", str(e), re.I))


def _first_words(e: BaseException) -> str:
    """gloo's '[.../pair.cc:537] Read error [127.0.0.1]:28827: Connection reset by peer. This is typically …' →
    'Read error [127.0.0.1]:28827: Connection reset by peer'. ``errors.first_line`` plus what only gloo needs: its
    source-file prefix and the advice after the first sentence are dropped (they would fill the one-line error)."""
    import re

    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", first_line(e))
    return first_line(line.split(". ")[0] or type(e).__name__, 160)


def leave_together() -> None:
    """The end of a launched command that finished: every rank waits here until the main process has written and
    printed everything, then all leave the process group at once. A non-main rank that left on its own (as soon as
    its share of the work was done, while the main process still wrote the run's outputs, the bundle, its
    validation) tore its end of the group down under a peer still in it, and the launcher judges the run by every
    rank's exit. A no-op in one process, or where no group was joined."""
    if launched_world_size() == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    team = Team(dist.get_rank(), dist.get_world_size())
    team.wait("every rank to finish the run")
    dist.destroy_process_group()


_closing = []


def _close_at_exit() -> None:
    """Leave the process group before the interpreter exits: left to static destructors, gloo's threads abort the
    process ("terminate called without an active exception", SIGABRT) in about a third of the runs here."""
    if _closing:
        return
    import atexit

    def close() -> None:
        import gc

        import torch.distributed as dist

        gc.collect()  # DDP wrappers in reference cycles hold the group: free them first
        if dist.is_initialized():
            dist.destroy_process_group()

    _closing.append(close)
    atexit.register(close)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class LossModule(nn.Module):
    """The module DDP (and FSDP) wraps: the student, with the KD loss of a batch as its forward.

    DDP averages gradients only for a backward pass that follows *its own* forward (``no_sync`` semantics: any other
    backward stays local), and FSDP gathers sharded weights only inside it; the chunked KD loss (``kd_objective``)
    calls the student's base model and its ``lm_head`` weight apart, outside ``student.forward``. Making the whole
    loss the wrapped module's forward routes every use of the student's parameters through the wrapper. ``loss``
    computes with this same ``student`` object and closes over the teacher, which is no submodule: it stays out of
    the wrapped training graph (never in DDP's gradient buckets, never sharded with the student).
    """

    def __init__(self, student: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]):
        super().__init__()
        self.student = student
        self._loss = loss

    def forward(self, ids: torch.Tensor | None, rows: torch.Tensor | None = None, *,
                call: Callable[[], Any] | None = None) -> Any:
        """The KD loss of ``ids``; or, given ``call``, its result: under FSDP a pass that uses the student outside
        training (held-out measurement, scoring) runs inside the root's forward, which gathers the weights the
        layer units do not hold (embeddings, final norm, head), as the chunked loss's own calls need."""
        if call is not None:
            return call()
        return self._loss(ids, rows)
