"""Staged Sparse Knowledge Distillation: score → prune → distill → measure → accept | retry | stop.

The teacher's output distribution is the global stability constraint: a stage is accepted only when the
student's held-out KL(teacher‖student) is within the budget. Otherwise it gets more steps (bounded), and
if that fails the run stops at the last accepted stage and says so.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path

import torch

from ..config import DistillConfig, settle_qat_target
from ..locks import dir_lock
from ..models.loading import load_model, load_tokenizer, resolve_teacher
from . import consistency
from .auto_search import AutoSearch
from .distributed import LossModule, RankLostError, Team, check_global_batch
from .flops import Utilisation
from .kd_objective import KDObjective
from .load_plan import LoadPlan, plan_load_paths
from .losses import make_loss
from .mask_learning import MaskLearner
from .memory import PeakMemory, release_memory
from .operators import make_operator
from .patterns import is_auto, make_pattern
from .pruner import Masks, Pruner, apply_masks, final_report, sparsity_report
from .result import NullReporter, Result
from .rundir import STATE, RunDir, check_resume_config, damaged_run, writing
from .schedule import Stage, plan
from .stability import StageStability
from .stage import StageOutcome, stage_record, stop_reason
from .stage_training import StageTraining


def _untied(model, missing: list[str]) -> list[str]:
    """The ``missing`` state-dict keys that are not tied to a loaded tensor (same storage): really missing weights."""
    tensors = model.state_dict()
    loaded = {t.data_ptr() for k, t in tensors.items() if k not in set(missing)}
    return [k for k in missing if tensors[k].data_ptr() not in loaded]


def make_accelerator(precision: str):
    """Under ``torchrun`` / ``accelerate launch`` this joins the launched processes (DDP; gloo on CPU, NCCL on GPUs)."""
    from accelerate import Accelerator

    if not torch.cuda.is_available():
        return Accelerator(cpu=True, mixed_precision="no")  # CPU runs fp32: bf16 autocast is slower there
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision)


class StagedDistiller(StageTraining):
    """Runs the stages of one distillation: for each, prune (``stage.prune_stage``) → recover (``recovery.Recovery``)
    → record (``stage.stage_record``), then accept it, or stop at the last accepted one."""

    def __init__(self, cfg: DistillConfig, reporter=None):
        self.cfg = cfg
        # Under a launcher (torchrun, accelerate launch) this is one of several processes (core/distributed.py): the
        # main one decides, writes and reports; the others train their share of each batch and follow.
        check_global_batch(cfg.batch_size)
        self.team = Team.launched()
        # Rows one process holds at once: its share of a training batch, and the batch of the main process's
        # forward passes alone (held-out measurement, scoring), so that the main GPU needs no more than the others.
        self.local_batch = cfg.batch_size // self.team.world
        self.reporter = (reporter or NullReporter()) if self.team.is_main else NullReporter()
        # An auto pattern searches its sparsity stage by stage (auto_search.py); self.pattern is the current one.
        self.search = AutoSearch.for_spec(cfg.pattern, cfg.stages) if is_auto(cfg.pattern) else None
        self.pattern = self.search.pattern_at(0.5) if self.search else make_pattern(cfg.pattern)
        self.operator = make_operator(cfg.operator)
        self.loss_fn = make_loss(cfg.loss)
        self.teacher_dir = resolve_teacher(cfg.teacher)
        self.teacher = load_model(self.teacher_dir, role="teacher")  # None once a top-K cache stands in for it
        self.teacher_params = sum(p.numel() for p in self.teacher.parameters())
        # Text data needs the tokenizer; data-free runs work on token ids and go without one when the teacher has none.
        self.tokenizer = load_tokenizer(self.teacher_dir, cfg.tokenizer, required=cfg.data is not None)
        self.keep_dense = {}
        if cfg.sparsify_only_faster:
            from .speed_profile import slower_layers

            self.keep_dense = slower_layers(cfg.sparsify_only_faster)
        if cfg.loadpaths and not self.search:  # a file from another teacher or pattern fails before any sampling
            from .loadpaths import load_report

            load_report(cfg.loadpaths, self.teacher_dir, self.pattern.spec)
        # The pruner is built on a throw-away view first so a pattern that fits nothing fails before any I/O.
        Pruner(self.teacher, self.pattern, cfg.include, cfg.exclude, self.keep_dense)
        # Built by _setup (they need the device, the student and the data):
        self.run: RunDir | None = None
        self.accelerator = None
        self.device: torch.device | None = None
        self.student: torch.nn.Module | None = None  # LossModule(raw) as prepared by accelerate (DDP-wrapped)
        self.raw: torch.nn.Module | None = None  # the unwrapped student: what is pruned, measured and saved
        self.optimizer: torch.optim.Optimizer | None = None
        self.pruner: Pruner | None = None
        self.masks: Masks = {}
        self.mask_learner: MaskLearner | None = None  # while a stage learns its masks (mask_learning.py)
        self.fade = None  # while a stage's removal fades out (demolition.py)
        self.base_lr: float | None = None  # cfg.lr, or the lr the first stage's range test chose (lr_search.py)
        self.load_plan: LoadPlan | None = None  # --allocation loadpath / --dense-layers (load_plan.py)
        self.train_ids: torch.Tensor | None = None  # [N, L] token ids distilled on
        self.heldout_ids: torch.Tensor | None = None  # [M, L] token ids every KL is measured on
        self.prompts: torch.Tensor | None = None  # consistency prompts (held-out prefixes)
        self.stability: StageStability | None = None  # per accepted stage: jitter, confidence, sensitivity
        self.trajectory: list[dict] = []
        self.teacher_consistency: dict = {}
        self.tokens_per_second = 0.0  # training throughput since the last reset_throughput() (one per stage)
        self.kd: KDObjective | None = None  # the KD loss of a batch (chunked or not; teacher or its top-K cache)
        self.cache = None  # topk_cache.TopKCache under --teacher-access topk:K
        self.peak: PeakMemory | None = None  # peak memory since the last reset_throughput()
        self.utilisation: Utilisation | None = None  # on CUDA: the stage records' model-FLOPs utilisation (flops.py)
        self._trained_tokens = 0
        self._train_seconds = 0.0
        # --fsdp: the student is sharded over the ranks (core/fsdp.py); the main process keeps a whole CPU copy,
        # refreshed from the shards after each stage, for what reads every weight at once (records, consistency,
        # checkpoints, the final student).
        self.sharded = cfg.fsdp and self.team.distributed
        self.teacher_dtype = torch.float32  # the teacher's weights; 16-bit once training begins (teacher_precision.py)
        self.whole: torch.nn.Module | None = None
        # Whether the shards may differ from the whole copy's last refresh (training, a prune, a restore set it; a
        # refresh clears it): the end of a run gathers the student again only then (a completed run's last stage
        # record has just gathered it).
        self.whole_stale = True
        # Settings a resumed run adopted because its state.json predates them (rundir.check_resume_config): left out
        # of the state it writes, so a later resume adopts them again instead of meeting them as changed flags.
        self.unrecorded: set[str] = set()

    def on_student(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, a pass that runs the student. Under FSDP every rank runs it, inside the sharded
        root's forward (each layer gathers its weights from all ranks), and the main process's result is every
        rank's; otherwise it runs here as it is."""
        if not self.sharded:
            return fn(*args, **kwargs)
        from .fsdp import in_root

        with self.team.collective("the ranks ran the sharded student"):
            result = in_root(self.student, lambda: fn(*args, **kwargs))
        return self.team.share(result)

    def refresh_whole(self) -> torch.nn.Module:
        """The whole student, as the main process reads it: the student itself, or under FSDP (a collective: every
        rank calls it) the main process's CPU copy loaded from the shards gathered to its CPU."""
        if not self.sharded:
            return self.raw
        from .fsdp import full_state

        with self.team.collective("the ranks gathered the student"):
            state = full_state(self.raw)
        if self.team.is_main:
            self.whole.load_state_dict(state, strict=False)
        self.whole_stale = False
        return self.whole

    @property
    def whole_student(self) -> torch.nn.Module:
        """The whole student as ``refresh_whole`` last gave it (under FSDP: the main process's CPU copy)."""
        return self.whole if self.sharded else self.raw

    def whole_pruner(self) -> Pruner:
        """The pruner over the model ``refresh_whole`` gives (same layers, same names)."""
        if not self.sharded:
            return self.pruner
        return Pruner(self.whole, self.pattern, self.cfg.include, self.cfg.exclude, self.keep_dense)

    def consistency_of(self, model) -> dict:
        cfg = self.cfg
        return {
            f"{t:g}": consistency.measure(model, self.prompts, cfg.consistency_samples, cfg.consistency_tokens, t,
                                          cfg.consistency_m, seed=cfg.seed)
            for t in cfg.consistency_temperatures
        }

    def sparsity(self) -> float:
        return sparsity_report(self.pruner, self.raw)["overall_sparsity"]

    # -- state -----------------------------------------------------------------------------------------

    def restore(self, stage: int) -> None:
        """Load the weights and masks of an accepted stage (0 = the dense teacher)."""
        state, self.masks = self._read_stage(stage)
        # strict=False: save_pretrained drops tied weights (lm_head ↔ embeddings); they are shared anyway. Any other
        # gap (a checkpoint of another model put in the run dir) is refused: it would resume from the teacher's weights.
        try:
            missing, unexpected = self.raw.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise damaged_run(self.run.partial, f"checkpoint of stage {stage}", e) from None
        self._check_fits(self.raw, missing, unexpected, stage)
        apply_masks(self.raw, self.masks)

    def _check_fits(self, model, missing: list[str], unexpected: list[str], stage: int) -> None:
        """Refuse a checkpoint that leaves ``model`` weights it does not hold (other than tied ones) or holds others."""
        untied = _untied(model, missing)
        if untied or unexpected:
            raise damaged_run(self.run.partial, f"checkpoint of stage {stage}",
                              f"it does not fit the teacher's architecture: {len(untied)} weight(s) missing, "
                              f"{len(unexpected)} unexpected")

    def _read_stage(self, stage: int) -> tuple[dict[str, torch.Tensor], Masks]:
        """The weights and masks of an accepted stage, read from its checkpoint (stage 0: the teacher's)."""
        if stage == 0:  # the fp32 weights: from memory while the teacher is held in fp32, else from disk
            in_memory = self.teacher is not None and self.teacher_dtype == torch.float32
            teacher = self.teacher if in_memory else load_model(self.teacher_dir, role="teacher")
            return teacher.state_dict(), {}
        return self.run.load_checkpoint(stage)

    def restore_everywhere(self, stage: int) -> None:
        """``restore`` on the main process, then its weights and masks on every rank (the checkpoint files need not
        be on the other ranks' machines). Under FSDP the main process's whole state is loaded into every rank's
        shards (broadcast from the main process)."""
        if self.sharded:
            from .fsdp import load_full_state

            read: dict = {}

            def read_on_main() -> None:  # the tensors stay on the main process; only a failure is sent to every rank
                read["state"], read["masks"] = self._read_stage(stage)
                # Checked against the main process's whole copy (same names, same ties): the sharded load below is
                # strict=False for the tied head, and would silently keep the current weights for whatever is absent.
                names = set(self.whole.state_dict())
                self._check_fits(self.whole, [k for k in names if k not in read["state"]],
                                 [k for k in read["state"] if k not in names], stage)

            # A damaged checkpoint stops every rank in one line here, before the collective load below.
            self.team.on_main(read_on_main)
            self.whole_stale = True
            state, masks = read.get("state", {}), read.get("masks", {})
            with self.team.collective("the ranks loaded the main process's weights"):
                load_full_state(self.raw, state)
            self.masks = self.team.share_masks(masks)
            apply_masks(self.raw, self.masks)
            return
        self.team.on_main(self.restore, stage)  # a damaged checkpoint: every rank stops in one line, none waits
        self.team.sync_module(self.raw)
        self.masks = self.team.share_masks(self.masks)

    def save_state(self, accepted: int, status: str = "running") -> None:
        if not self.team.is_main:
            return
        self.run.write_json(STATE, {
            "config": {k: v for k, v in self.cfg.to_dict().items() if k not in self.unrecorded}, "accepted": accepted, "status": status,
            "trajectory": self.trajectory, "teacher_consistency": self.teacher_consistency,
        })

    # -- the run ---------------------------------------------------------------------------------------
    def run_all(self, resume: bool = False, overwrite: bool = False) -> Result:
        # A second run into the same output is refused while this one lives (the error names its pid and start);
        # without the lock, `--overwrite` would replace this run's directory under its feet. The lock is the main
        # process's: the other ranks of a distributed run write nothing.
        with self.team.stop_on_sigterm(), contextlib.ExitStack() as held:
            def take_lock() -> None:
                held.enter_context(dir_lock(self.cfg.out))

            self.team.on_main(take_lock)  # a refusal (another run holds it) is raised on every rank
            return self._run_locked(resume, overwrite)

    def _run_locked(self, resume: bool, overwrite: bool) -> Result:
        self.run = RunDir(self.cfg.out)
        resuming = self.team.on_main(self.run.prepare, resume, overwrite)
        try:
            return self._run(resuming)
        except RankLostError as e:
            if not (self.team.is_main and (self.run.partial / STATE).exists()):
                raise
            kept = self.run.read_state().get("accepted")
            raise RankLostError(f"{e}. The run stopped at its last accepted stage ({kept}), kept in "
                                f"{self.run.partial}: launch the same command with --resume to continue") from None
        except BaseException:
            # Nothing worth resuming yet: do not leave an empty work dir that blocks the next run.
            if self.team.is_main and not (self.run.partial / STATE).exists():
                import shutil

                shutil.rmtree(self.run.partial, ignore_errors=True)
            raise

    def _setup(self, resuming: bool) -> int:
        """Student, optimizer and data on the device; returns the last accepted stage (0 on a fresh run)."""
        self._prepare_student()
        k, layers = self.cfg.dense_layers, len(self.pruner.layers)
        if k is not None and k.isdigit() and int(k) > layers:  # refused before the run leaves any state to resume
            from .allocation import AllocationError

            raise AllocationError(f"--dense-layers {k}: the model has {layers} prunable layers; pass 0..{layers} "
                                  "or auto")
        from .kd_objective import check_topk_sizes

        # before the data set is sampled from the teacher: a K the vocabulary cannot hold leaves nothing behind
        check_topk_sizes(self.cfg, self.operator, self.raw.get_output_embeddings().weight.shape[0])
        accepted = self._load_state() if resuming else self._start_state()
        self._prepare_objective()
        self.prompts = self.heldout_ids[: self.cfg.consistency_prompts, : max(1, min(16, self.cfg.seq_len // 2))]
        if self.team.is_main:  # stability and consistency go into the records, which only the main process writes
            self.stability = StageStability(self.teacher, self.prompts, self.tokenizer)
        if not resuming:
            if self.team.is_main:
                self.teacher_consistency = self.consistency_of(self.teacher)
            self.trajectory = [{
                "stage": 0, "label": "dense", "fraction": 0.0, "sparsity": 0.0, "kl": 0.0, "kl_after_prune": 0.0,
                "top1": 1.0, "steps": 0, "attempts": 0, "accepted": True,
                "consistency": {"student": self.teacher_consistency, "teacher": self.teacher_consistency},
            }]
            self.save_state(0)
        return accepted

    def _prepare_student(self) -> None:
        cfg = self.cfg
        self.accelerator = make_accelerator(cfg.precision)
        self.device = self.accelerator.device
        torch.manual_seed(cfg.seed)
        if self.sharded and self.team.is_main:  # the main process's whole CPU copy (refresh_whole), before the move
            self.whole = copy.deepcopy(self.teacher).cpu()
        self.teacher.to(self.device)
        student = copy.deepcopy(self.teacher)
        # The KD loss is the wrapped module's forward (distributed.LossModule): the chunked path's calls to the base
        # model and lm_head then sit inside DDP's forward, so their gradients are averaged too. The teacher is no
        # submodule: it stays out of the wrapped graph.
        module = LossModule(student, lambda ids, rows: self.loss_on(ids, rows))
        if self.sharded:
            from .fsdp import shard_student

            units = shard_student(module, student, self.device, self.team.world)
            self.reporter.note(f"fsdp: the student sharded over {self.team.world} processes ({units} layer units "
                               "and the root)")
            # Built after sharding: the optimizer must hold the sharded parameters; the optimizer alone goes through
            # Accelerate (its gradient scaler under fp16).
            optimizer = self.accelerator.prepare(torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=0.0))
            self.student, self.optimizer, self.raw = module, optimizer, student
        else:
            optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
            self.student, self.optimizer = self.accelerator.prepare(module, optimizer)
            self.raw = self.accelerator.unwrap_model(self.student).student
        self.pruner = Pruner(self.raw, self.pattern, cfg.include, cfg.exclude, self.keep_dense)
        self.masks = {}

    def _prepare_objective(self) -> None:
        """The KD loss of a batch (``kd_objective.prepare``): chunked or not, against the teacher in memory or, with
        ``--teacher-access topk:K``, against its top-K cache (written here once, or reused when its stamp matches)."""
        from .kd_objective import prepare

        self.peak = PeakMemory(self.device)
        # Every rank: each writes its shard of a new top-K cache, and all open it once complete (topk_cache.py).
        self.kd, self.cache = prepare(self.cfg, self.raw, self.teacher, self.teacher_dir, self.operator, self.loss_fn,
                                      self.train_ids, self.heldout_ids, self.device,
                                      self.run.partial / "teacher-topk", self.reporter, team=self.team,
                                      on_student=self.on_student)
        self.kd_chunk = self.kd.chunk
        # A training step runs the teacher's forward only when it distils from the teacher in memory.
        in_step = self.teacher if self.cfg.teacher_access == "logits" else None
        self.utilisation = Utilisation.for_run(self.device, self.raw, in_step, self.cfg.seq_len, self.team.world,
                                               str(self.accelerator.mixed_precision))

    def _release_teacher(self) -> None:
        """With a top-K cache, the teacher's work is done once the run is set up (data, cache, consistency, load
        paths): drop it, so training and measurements run without it in memory (stage 0 reloads it from disk)."""
        if self.cache is None or self.teacher is None:
            return
        self.teacher = None
        release_memory()
        self.reporter.note("teacher freed from memory: training on its top-K cache")

    def _teacher_for_training(self) -> None:
        """The teacher in the precision it keeps while the student trains (``--teacher-precision``): from here on it
        only gives the KD loss and the held-out measurements their targets."""
        from .teacher_precision import name, teacher_dtype

        if self.teacher is None:
            return
        self.teacher_dtype = teacher_dtype(self.cfg.teacher_precision, self.device,
                                           str(self.accelerator.mixed_precision))
        if self.teacher_dtype != torch.float32:
            self.teacher.to(self.teacher_dtype)
            release_memory()
            self.reporter.note(f"teacher held in {name(self.teacher_dtype)} while the student trains")

    def _load_state(self) -> int:
        def read():
            state = self.run.read_resume_state()
            data = self.run.load_tensors("data.safetensors", keys=("train", "heldout"))
            return (data["train"], data["heldout"], state["trajectory"], state["teacher_consistency"],
                    int(state["accepted"]))

        (self.train_ids, self.heldout_ids, self.trajectory, self.teacher_consistency,
         accepted) = self.team.on_main(read)
        self.restore_everywhere(accepted)
        self.reporter.note(f"resuming after accepted stage {accepted}")
        return accepted

    def _start_state(self) -> int:
        def build():
            self.reporter.note("building the distillation set"
                               + (" (sampling the teacher)" if self.cfg.data is None else ""))
            from . import teacher

            train, heldout = teacher.build_data(self.cfg, self.teacher.cpu(), self.tokenizer)
            self.run.save_tensors("data.safetensors", {"train": train, "heldout": heldout})
            return train, heldout

        # Sampled once, by the main process: every rank distils on the same sequences.
        self.train_ids, self.heldout_ids = self.team.on_main(build)
        self.teacher.to(self.device)
        return 0

    def _run(self, resuming: bool) -> Result:
        cfg = self.cfg
        accepted = self._setup(resuming)
        calib = list(self.train_ids[: cfg.calib_batches * cfg.batch_size].split(self.local_batch))
        if self.search is not None:
            self._release_teacher()
            self._teacher_for_training()
            return self._run_auto(accepted, calib)
        self._plan_load_paths(calib)
        self._release_teacher()
        self._teacher_for_training()
        for stage in plan(self.pattern, cfg.stages, cfg.steps_per_stage, cfg.step_schedule, cfg.sparsity_schedule)[accepted:]:
            outcome = self.run_stage(stage, calib)
            record = self._record(stage, outcome)
            if not outcome.accepted:
                self.restore_everywhere(accepted)
                return self._finish("stopped", stop_reason(stage, outcome, cfg.kl_budget, cfg.retries), accepted)
            accepted = self._accept(stage, record)
        reason = f"reached {self.pattern.spec} in {cfg.stages} stage(s)"
        if cfg.qat_steps and accepted == cfg.stages:  # a resumed run whose QAT stage was accepted skips it
            accepted, reason = self.run_qat_stage(accepted, reason)
        return self._finish("complete", reason, accepted)

    def _run_auto(self, accepted: int, calib: list[torch.Tensor]) -> Result:
        """Stages add sparsity until the next would break the budget; a rejected one is undone and the step halved."""
        cfg, search = self.cfg, self.search
        search.replay(self.trajectory)  # a resumed search continues where it stopped (a fresh one: only stage 0)
        best_pattern = search.pattern_at(search.accepted_sparsity) if search.accepted_sparsity else None
        while (nxt := search.next_stage(cfg.steps_per_stage)) is not None:
            stage, pattern = nxt
            self._use_pattern(pattern)
            outcome = self.run_stage(stage, calib)
            record = self._record(stage, outcome)
            record["target_sparsity"] = pattern.target_sparsity()
            if outcome.accepted:
                search.accept(pattern.target_sparsity())
                best_pattern = pattern
                accepted = self._accept(stage, record)
            else:
                search.reject(pattern.target_sparsity(), outcome.recovery.metrics["kl"])
                self.restore_everywhere(accepted)
                # The rejection is part of the search (replay halves the step on it): saved now, a run stopped
                # before the next accepted stage resumes at the next attempt instead of trying this one again.
                self.team.on_main(self.save_state, accepted)
        if best_pattern is None:
            return self._finish("stopped", f"even {search.last_rejected[0]:.1%} {search.kind} broke the KL budget "
                                           f"{cfg.kl_budget}; the student is the dense teacher", accepted)
        self._use_pattern(best_pattern)
        return self._finish("complete", search.reason(cfg.kl_budget), accepted)

    def _use_pattern(self, pattern) -> None:
        self.pattern = pattern
        self.pruner = Pruner(self.raw, pattern, self.cfg.include, self.cfg.exclude, self.keep_dense)

    def _plan_load_paths(self, calib: list[torch.Tensor]) -> None:
        def plan_and_write():
            plan = plan_load_paths(self.cfg, self.teacher, self.teacher_dir, self.pattern, self.train_ids, calib)
            if plan is not None:
                self.run.write_json("loadpaths.json", plan.report.to_dict())
            return plan

        self.load_plan = self.team.on_main(plan_and_write)
        if self.load_plan is None:
            return
        if self.load_plan.dense:
            self.keep_dense = {**self.keep_dense, **self.load_plan.dense}
            self.pruner = Pruner(self.raw, self.pattern, self.cfg.include, self.cfg.exclude, self.keep_dense)
            self.reporter.note(f"keeping {len(self.load_plan.dense)} load-bearing layer(s) dense:")
            for name, why in self.load_plan.dense.items():
                self.reporter.note(f"  {name}: {why}")
        if self.load_plan.allocation:
            lo, hi = min(self.load_plan.allocation.values()), max(self.load_plan.allocation.values())
            self.reporter.note(f"per-layer sparsity by load path: {lo:.1%}..{hi:.1%} around {self.pattern.spec}")

    def _record(self, stage: Stage, outcome: StageOutcome) -> dict:
        whole = self.refresh_whole()
        report = self.team.on_main(lambda: sparsity_report(self.whole_pruner(), whole)) if self.sharded else \
            sparsity_report(self.pruner, self.raw)
        record = stage_record(stage, outcome, report["overall_sparsity"], self.tokens_per_second)
        record["layer_sparsity"] = {name: e["sparsity"] for name, e in report["layers"].items()}
        # Training + held-out measurements of this stage (memory.py), this process's; a launched run's `ranks` also
        # carries every rank's peak (the main process's differs: under FSDP it alone keeps a whole CPU copy).
        record.update(self.peak.read())
        record["kd_chunk"] = self.kd_chunk
        if self.teacher is not None:
            from .teacher_precision import name

            record["teacher_precision"] = name(self.teacher_dtype)
        if self.utilisation is not None:
            record.update(self.utilisation.record(self.tokens_per_second))
        if self.team.distributed:
            from .fsdp import local_numel

            # Measured, not assumed: the parameter elements each rank holds (its shards under FSDP) and its peak.
            ranks = {"world_size": self.team.world, "local_parameters": self.team.gather(local_numel(self.raw)),
                     "peak_memory_mb": self.team.gather(record["peak_memory_mb"])}
            if self.sharded:
                ranks.update(fsdp=True, parameters=report_parameters(whole) if self.team.is_main else None)
            else:
                # Checked, not assumed: DDP's averaged gradients must leave every rank with the main process's weights.
                ranks["weights_identical"] = self.team.same_weights(self.raw)
                if not ranks["weights_identical"]:
                    from ..errors import IntegrityError

                    raise IntegrityError(f"the {self.team.world} ranks hold different weights after stage "
                                         f"{stage.label}: gradients were not averaged over the ranks; the run stops here")
            record["ranks"] = ranks
        if self.cache is not None:
            record["kl_measure"] = f"top-{self.cache.stamp.k} buckets + tail (a lower bound of the full KL)"
        if not outcome.accepted:
            self.trajectory.append(record)
            self.reporter.stage_end(record)
        return record

    def _accept(self, stage: Stage, record: dict) -> int:
        def measure_and_write() -> None:  # the other ranks hold the same weights (checked in _record), write nothing
            whole = self.whole_student  # refreshed by _record
            record["consistency"] = {"student": self.consistency_of(whole), "teacher": self.teacher_consistency}
            record["stability"] = self.stability.entry(whole, record.pop("confidence", {}), record["consistency"])
            self.run.save_checkpoint(stage.index, whole, self.masks)

        # A failure on the main process (a full disk under the checkpoint) stops every rank here in one line, rather
        # than leaving the others in the next stage's collectives until the launcher notices.
        self.team.on_main(measure_and_write)
        self.trajectory.append(record)
        self.team.on_main(self.save_state, stage.index)
        self.reporter.stage_end(record)
        return stage.index

    def _finish(self, status: str, reason: str, accepted: int) -> Result:
        """The run's outputs, written by the main process; the other ranks wait for it and return the same result."""
        if self.whole_stale:  # under FSDP: the main process's whole copy of the final student
            self.refresh_whole()
        final, trajectory, summary = self.team.on_main(self._write_outputs, status, reason, accepted)
        return Result(status, reason, final, trajectory, summary)

    def _write_outputs(self, status: str, reason: str, accepted: int) -> tuple[Path, list[dict], dict]:
        cfg = self.cfg
        out = self.run.partial
        whole = self.whole_student  # refreshed by _finish
        report = final_report(self.whole_pruner(), whole, self.masks, complete=status == "complete")
        report.update({"final_stage": accepted, "stages": cfg.stages})
        report["parameters"] = {"teacher": self.teacher_params, "student": report_parameters(whole)}
        student_dir = out / "student"
        with writing(student_dir):
            whole.to("cpu").save_pretrained(student_dir, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(student_dir)
        self.run.write_json("sparsity.json", report)
        self.run.write_json("trajectory.json", {"budget": cfg.kl_budget, "pattern": self.pattern.spec,
                                                 "status": status, "reason": reason, "stages": self.trajectory})
        from .trajectory_plot import plot_trajectory

        plot_trajectory(self.trajectory, cfg.kl_budget, out / "trajectory.png")
        last = next(r for r in reversed(self.trajectory) if r["accepted"])
        summary = {
            "status": status, "reason": reason, "reached_target": status == "complete", "final_stage": accepted,
            "stages": cfg.stages, "pattern": self.pattern.spec, "kl": last["kl"], "top1": last["top1"],
            "sparsity": report["overall_sparsity"], "parameters": report["parameters"],
            "teacher": str(self.teacher_dir), "out": str(self.run.final),
            "student": str(self.run.final / "student"), "train_tokens_per_second": round(self.tokens_per_second, 1),
        }
        self.save_state(accepted, status)
        self.run.write_json("summary.json", summary)
        if self.cache is not None and not cfg.teacher_cache:  # the run's own cache is a work file (--teacher-cache keeps one)
            import shutil

            shutil.rmtree(self.cache.directory, ignore_errors=True)
        final = self.run.finish()
        return final, self.trajectory, summary


def report_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def distill(cfg: DistillConfig, resume: bool = False, overwrite: bool = False, reporter=None) -> Result:
    """Library entry point (the CLI is a thin layer over this)."""
    settle_qat_target(cfg)  # an open qat_target is onnxruntime's; one with no graph for the mode is refused now
    if resume:
        # A resumed run must continue with the flags it began with (and what its version did where it had no flag).
        adopted = check_resume_config(RunDir(cfg.out), cfg.to_dict())
        distiller = StagedDistiller(dataclasses.replace(cfg, **adopted), reporter)
        distiller.unrecorded = set(adopted)
        return distiller.run_all(resume=resume, overwrite=overwrite)
    return StagedDistiller(cfg, reporter).run_all(resume=resume, overwrite=overwrite)
