"""One stage's training inside a distillation run (``StagedDistiller`` mixes this in): the optimizer step, the
held-out measurement, and a stage — its lr range test (first stage), prune, optional mask learning, recovery with
retries — plus the optional quantization-aware stage after the last one.

Kept apart from ``distill.py``, which sets a run up, sequences its stages, and writes its outputs.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from ..errors import NonFiniteLossError
from .demolition import Fade
from .evaluate import heldout_metrics
from .importance import ScoringContext, input_norms
from .lr_search import search_lr, wanted
from .mask_learning import MaskLearner, learning_start
from .pruner import Masks, apply_masks, device_masks
from .recovery import Recovery, cosine_lr, recovery_lr, restore, snapshot
from .schedule import Stage, opening_steps
from .stage import StageOutcome, prune_stage, stop_reason


class StageTraining:
    """Methods of ``StagedDistiller`` that train and measure; the attributes they use are set up there."""

    # -- one optimizer step --------------------------------------------------------------------------------
    def loss_on(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """KD loss on ``ids``; ``rows``: their row numbers in the training set (a top-K cache finds them by content
        when None). Called as it is (scoring), gradients stay local; a training step calls it through the wrapped
        ``self.student`` (``distributed.LossModule``), whose backward DDP averages over the ranks."""
        if self.cfg.teacher_access == "text":
            with self.accelerator.autocast():
                s_logits = self.raw(input_ids=ids).logits
                # Black-box teacher: its sampled tokens are the targets (sequence-level KD).
                return F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return self.kd(self.raw, self.teacher, ids, rows, self.accelerator.autocast)

    def batches(self, seed: int) -> torch.Generator:
        """The batch order of one recovery attempt: the same generator on every rank, which draws the global batch
        and takes its share (``train_steps``)."""
        return torch.Generator().manual_seed(seed * 1009)

    def train_steps(self, gen: torch.Generator, start: int, stop: int, total: int, peak_lr: float,
                    stage_label: str) -> None:
        """Steps ``start..stop-1`` of a ``total``-step cosine schedule peaking at ``peak_lr``."""
        cfg = self.cfg
        self.whole_stale = True
        self.student.train()
        began = time.perf_counter()
        with self.team.collective(f"stage {stage_label} trained"):  # DDP averages gradients with the other ranks
            self._train_range(gen, start, stop, total, peak_lr, stage_label)
        if self.device.type == "cuda":  # the last step's kernels are queued, not done: time them too
            torch.cuda.synchronize(self.device)
        self._train_seconds += time.perf_counter() - began
        self._trained_tokens += (stop - start) * cfg.batch_size * cfg.seq_len
        self.tokens_per_second = self._trained_tokens / max(self._train_seconds, 1e-9)

    def _train_range(self, gen: torch.Generator, start: int, stop: int, total: int, peak_lr: float,
                     stage_label: str) -> None:
        cfg = self.cfg
        # The masks live on the CPU (checkpoints, ranks) and stay fixed through a range of steps (a learning stage
        # re-chooses its own); the steps enforce one copy on the student's device, not a fresh ~1 GB move per step
        # at 1 B parameters.
        masks = device_masks(self.raw, self.masks, self.device) if not self.mask_learner else None
        for i in range(start, stop):
            lr = cosine_lr(peak_lr, i, total)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            # The global batch, drawn alike on every rank; this rank trains its share (all of it with one process).
            rows = self.team.shard(torch.randint(len(self.train_ids), (cfg.batch_size,), generator=gen))
            ids = self.train_ids[rows].to(self.device)
            loss = self.student(ids, rows)
            reported = self.team.mean(loss)  # the global batch's loss: every rank takes the same decision on it
            if not torch.isfinite(reported):
                raise NonFiniteLossError(f"non-finite loss ({reported.item()}) at stage {stage_label}, step {i + 1}")
            self.accelerator.backward(loss)
            self.accelerator.clip_grad_norm_(self.student.parameters(), 1.0)
            if self.mask_learner:
                self.mask_learner.before_step()  # the step updates the dense latents (straight-through)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            # Masks are enforced after every step: pruned weights stay exactly zero (a learning stage re-chooses them).
            if self.mask_learner:
                self.mask_learner.after_step(lr)
            else:
                apply_masks(self.raw, masks)
                if self.fade:  # a gradual demolition holds the stage's removed weights at their fading values
                    self.fade.after_step()
            self.reporter.advance(reported.item())

    def reset_throughput(self) -> None:
        self._trained_tokens, self._train_seconds = 0, 0.0
        self.peak.reset()

    # -- measurements ----------------------------------------------------------------------------------
    def measure(self) -> dict:
        """Held-out metrics, measured by the main process and shared: every rank's recovery keeps the same state.
        Under FSDP every rank measures on the same rows (a forward needs them all), and the main process's count."""
        if self.sharded:
            return self.on_student(heldout_metrics, self.teacher, self.raw, self.heldout_ids, self.local_batch,
                                   self.device, cached=self.cache.heldout if self.cache is not None else None)
        return self.team.on_main(heldout_metrics, self.teacher, self.raw, self.heldout_ids, self.local_batch,
                                 self.device, cached=self.cache.heldout if self.cache is not None else None)

    def run_stage(self, stage: Stage, calib: list[torch.Tensor]) -> StageOutcome:
        """Prune to the stage's share of the pattern, then recover: train at an lr sized to the damage, keeping the
        best held-out state (the post-prune one included); retries (each longer) while it is over the budget."""
        cfg = self.cfg
        self.reset_throughput()
        self.reporter.stage_begin(stage.label, stage.steps)
        searched = self._search_lr(stage, calib) if self._base_lr() is None else None
        before = self.masks
        k = opening_steps(stage.steps, cfg.mask_learning_share) if cfg.mask_learning != "off" else 0
        fading = opening_steps(stage.steps, cfg.demolition_share) if cfg.demolition == "gradual" else 0
        # The latents start from the weights before the prune, and the masks are re-ranked with the activation norms
        # the one-shot criterion scored (so the first re-rank moves nothing that the gradient did not move). A fade
        # starts from the same weights.
        dense = learning_start(self.raw, self.pruner) if k or fading else None
        # (a forward of the student: under FSDP every rank runs it, on_student)
        norms = (self.on_student(input_norms, ScoringContext(self.raw, self.pruner.layers, calib))
                 if k and cfg.importance != "magnitude" else None)
        self._prune(stage.fraction, calib)
        self.optimizer.state.clear()  # momentum from the previous stage points at a different model
        after = self.measure()
        if fading:
            return self._demolish(stage, fading, dense, before, after, searched)
        learned = None
        if dense is not None:
            try:
                learned = self._learn_masks(stage, k, dense, norms, before, recovery_lr(self.base_lr, after["kl"]))
            except NonFiniteLossError as e:  # the run stops at its last accepted stage, as a diverging recovery does
                outcome = StageOutcome(after["kl"], recovery_lr(self.base_lr, after["kl"]), Recovery.start(self.raw, after))
                outcome.error, outcome.lr_search = str(e), searched
                outcome.recovery.release()
                return outcome
        start = learned["after"] if learned else after
        outcome = StageOutcome(after["kl"], recovery_lr(self.base_lr, start["kl"]), Recovery.start(self.raw, start))
        outcome.lr_search = searched
        if learned:
            outcome.mask_learning = {**{k: v for k, v in learned.items() if k != "after"}, "kl_after": start["kl"]}
        first = stage.steps - learned["steps"] if learned else None  # the learning phase used the rest
        return self._recover(stage, outcome, first)

    def _demolish(self, stage: Stage, steps: int, dense: dict, before: Masks, after: dict,
                  searched: dict | None) -> StageOutcome:
        """Gradual demolition (demolition.py): the stage's removal fades out over its first ``steps`` while the KD
        loss trains the rest, then the recovery goes on under the masks for the remaining steps, continuing the same
        cosine schedule. The state right after the (hard) prune stays the recovery's first candidate, so the stage
        still never ends above its post-prune KL."""
        cfg = self.cfg
        outcome = StageOutcome(after["kl"], recovery_lr(self.base_lr, after["kl"]), Recovery.start(self.raw, after))
        outcome.lr_search = searched
        self.fade = Fade(self.raw, self.pruner, dense, before, self.masks, steps)
        self.fade.hold()  # the removed weights are back, at factor 1
        try:
            self.train_steps(self.batches(cfg.seed + 100 * stage.index + 60), 0, steps, stage.steps, outcome.lr,
                             stage.label)
        except NonFiniteLossError as e:  # the run stops at its last accepted stage, as a diverging recovery does
            outcome.error = str(e)
            outcome.recovery.release()
            return outcome
        finally:
            self.fade = None
            apply_masks(self.raw, self.masks)  # the factor ended at 0: the masks hold exactly
        faded = self.measure()
        outcome.recovery.offer(self.raw, faded, steps)
        outcome.demolition = {"method": cfg.demolition, "steps": steps, "kl_after": faded["kl"]}
        return self._recover(stage, outcome, first=stage.steps - steps, offset=steps)

    def _recover(self, stage: Stage, outcome: StageOutcome, first: int | None = None, offset: int = 0) -> StageOutcome:
        """Train toward the teacher at ``outcome.lr``, keeping the best held-out state (``recovery.Recovery``);
        retries, each longer than the last, while it is over the budget. ``first``: the first attempt's steps when
        part of the stage's budget went elsewhere (default ``stage.steps``); ``offset``: steps of the first
        attempt's cosine schedule already trained (by a fade), which it continues."""
        cfg = self.cfg
        try:
            for attempt in range(cfg.retries + 1):
                n = stage.steps * (attempt + 1) if attempt or first is None else first
                if attempt:
                    self.reporter.add_steps(n)
                outcome.attempts = attempt + 1
                skip = 0 if attempt else offset
                gen = self.batches(cfg.seed + 100 * stage.index + attempt)

                def train(start, stop, gen=gen, skip=skip, n=n):
                    self.train_steps(gen, start + skip, stop + skip, total=n + skip, peak_lr=outcome.lr,
                                     stage_label=stage.label)

                if outcome.recovery.attempt(self.raw, n, train, self.measure):
                    self.optimizer.state.clear()  # the moments belong to the state that was dropped
                if outcome.recovery.metrics["kl"] <= cfg.kl_budget:
                    outcome.accepted = True
                    break
                if attempt < cfg.retries:
                    self.reporter.note(f"stage {stage.label}: held-out KL {outcome.recovery.metrics['kl']:.4f} > "
                                       f"budget {cfg.kl_budget}; retry {attempt + 1}/{cfg.retries} with more steps")
        except NonFiniteLossError as e:
            outcome.error = str(e)
        finally:
            outcome.recovery.release()
        return outcome

    def _prune(self, fraction: float, calib: list[torch.Tensor]) -> None:
        """Scored and masked once, by the main process (taylor's gradients stay local there); every rank applies
        the masks. Under FSDP every rank runs the scoring passes (Fisher's gradients, the grams of ls, taylor's
        backward on its share of each calibration batch), the main process scores gathered weights (taylor: the
        gathered shard scores) and refits, and every rank masks and refits its shards (fsdp_channels)."""
        self.whole_stale = True
        if self.sharded:
            from .fsdp_channels import sharded_prune_stage

            self.masks = sharded_prune_stage(self.team, self.on_student, self.student, self.raw, self.pruner,
                                             self.cfg.importance, fraction, calib, self.masks,
                                             self.load_plan.allocation if self.load_plan else None,
                                             compensation=self.cfg.compensation, chunk=self.kd_chunk,
                                             batch_size=self.cfg.batch_size)
            return
        if self.team.is_main:
            self.masks = prune_stage(self.raw, self.pruner, self.cfg.importance, fraction, calib, self.masks,
                                     kd_loss=lambda ids: self.loss_on(ids.to(self.device)),
                                     allocation=self.load_plan.allocation if self.load_plan else None,
                                     compensation=self.cfg.compensation, chunk=self.kd_chunk)
        self.masks = self.team.share_masks(self.masks)
        if not self.team.is_main:
            apply_masks(self.raw, self.masks)
        if self.cfg.compensation == "ls" and self.pruner.blocks:  # the main process refitted its output projections
            for block in self.pruner.blocks:
                self.team.sync_module(block.output.module)

    def _base_lr(self) -> float | None:
        """The run's base lr once known: the one its first stage's range test chose (read back from the trajectory
        when the run was resumed: a resumed run trains on at the lr it began with), or ``cfg.lr`` when the run did
        not search; None before the first stage decided."""
        if self.base_lr is None:
            done = [r["lr_search"] for r in self.trajectory if r.get("lr_search")]
            if done:
                self.base_lr = done[0]["chosen"]
            elif any(r["stage"] > 0 for r in self.trajectory):  # resumed past stage 1 without a search
                self.base_lr = self.cfg.lr
        return self.base_lr

    def _search_lr(self, stage: Stage, calib: list[torch.Tensor]) -> dict | None:
        """Sets the run's base lr on its first stage: from a range test when ``lr_search`` asks for one
        (lr_search.py), else ``cfg.lr``. The trials train the student pruned to the *whole* target, whatever share
        of it this first stage removes, and restore it after: the base lr is the one for full damage (recovery.py
        scales it down for lighter stages). A first stage at 20 % picked half the lr that suited the run's 80 %
        stages on the wide teacher."""
        cfg = self.cfg
        budget = cfg.stages * cfg.steps_per_stage
        if not wanted(cfg.lr_search, budget, sparsity_search=self.search is not None):
            self.base_lr = cfg.lr
            return None

        def trial(lr: float, steps: int) -> float:
            self.reporter.add_steps(steps)
            self.optimizer.state.clear()
            # at the lr the run would give a stage with this damage, were ``lr`` its base
            try:
                self.train_steps(self.batches(cfg.seed + 100 * stage.index + 77), 0, steps, steps,
                                 recovery_lr(lr, damage), f"{stage.label} lr {lr:.2g}")
            except NonFiniteLossError:  # a diverging trial loses; the walk goes on from the others
                return math.inf
            return self.measure()["kl"]

        start = snapshot(self.raw)
        masks = self.masks
        try:
            self._prune(1.0, calib)
            damage = self.measure()["kl"]
            search = search_lr(self.raw, cfg.lr, budget, trial)
        finally:
            restore(self.raw, start)
            self.masks = masks
        self.optimizer.state.clear()
        self.base_lr = search.chosen
        self.reporter.note(f"learning rate: {search.chosen:.3g} (range test from {cfg.lr:.3g}: "
                           + ", ".join(f"{lr:.3g} → KL {kl:.4f}" for lr, kl in search.trials) + ")")
        return search.to_dict()

    def _learn_masks(self, stage: Stage, steps: int, dense: dict, norms: dict | None, before: Masks,
                     lr: float) -> dict:
        """The first ``steps`` of a stage choose its masks through the KD loss (SR-STE, mask_learning.py), then
        freeze them; returns what it did and the held-out metrics where the recovery starts. ``norms``: the input
        norms the masks are re-ranked with, |W| · ‖x‖ (Wanda's form, also under taylor); None ranks by |W|."""
        one_shot = {k: v.clone() for k, v in self.masks.items()}
        allocation = self.load_plan.allocation if self.load_plan else None
        learner = self.mask_learner = MaskLearner(self.raw, self.pruner, self.masks, stage.fraction, norms,
                                                  frozen=before, allocation=allocation, team=self.team)
        learner.start(dense)
        # Under FSDP ``finish`` is a collective. Only a failure every rank meets may reach it: a non-finite loss (the
        # global batch's, so every rank raises it). Any other may be this rank's alone, its peers inside another
        # collective (the next forward's gather): a gather here would wait with them until gloo's / NCCL's timeout,
        # where leaving lets them see a lost rank at once and say so in one line.
        every_rank = False
        try:
            self.train_steps(self.batches(self.cfg.seed + 100 * stage.index + 50), 0, steps, steps, lr, stage.label)
            every_rank = True
        except NonFiniteLossError:
            every_rank = True
            raise
        finally:
            self.mask_learner = None
            if every_rank or not learner.sharded:
                self.masks = learner.finish()
            else:
                learner.abandon()
        flips = learner.flips
        self.optimizer.state.clear()  # the moments were the latents'
        new = sum(int((m & ~one_shot[k]).sum()) for k, m in self.masks.items())
        kept = sum(int(m.sum()) for m in self.masks.values())
        # share_new: of the weights the stage keeps, how many the one-shot criterion had pruned
        return {"method": self.cfg.mask_learning, "steps": steps, "lr": lr, "flips": flips,
                "share_new": round(new / max(kept, 1), 6), "after": self.measure()}

    def run_qat_stage(self, accepted: int, reason: str) -> tuple[int, str]:
        """The quantization-aware stage (``--qat-steps``, core/qat.py) after the last pruning stage: train with the
        Linear layers fake-quantized as ``cfg.quantize`` will quantize them, under the same KL budget, recorded in
        the trajectory with a ``qat`` entry. Its KL is the fake-quantized student's. Rejected, the run keeps the
        last pruning stage's student and says so. Returns (last accepted stage, the run's reason)."""
        from . import qat

        cfg = self.cfg
        stage = Stage(accepted + 1, 1.0, f"qat {cfg.quantize}", cfg.qat_steps)
        layers = qat.quantized_linears(self.raw, cfg.quantize)
        ranges = None
        if cfg.quantize in ("int8", "fp8"):  # the exporter calibrates on the same leading training sequences
            ids = self.train_ids[: cfg.calibration_samples]
            # The main process's ranges on every rank: a rank that rounded with its own would train another model.
            # Under FSDP every rank runs the calibration forwards (on the same rows; each unit gathers its weights).
            calibrate = self.on_student if self.sharded else self.team.on_main
            ranges = calibrate(qat.calibrate, self.raw, layers, list(ids.split(self.local_batch)), self.device)
        before = self.measure()  # the float student, for the record and the damage the rounding does
        # Under FSDP each Linear's forward meets its whole weight (its unit gathered it), so the per-row scales are
        # the whole rows'. The main process's whole CPU copy, which the accepted stage's consistency and stability
        # are measured on, is fake-quantized alike.
        whole = self.whole if self.sharded and self.team.is_main else None
        target = cfg.qat_target  # the graph the build exports: its int8 activations differ per runtime
        with qat.fake_quantized(self.raw, cfg.quantize, ranges, target), \
                (qat.fake_quantized(whole, cfg.quantize, ranges, target) if whole is not None
                 else contextlib.nullcontext()):
            self.optimizer.state.clear()
            after = self.measure()
            # Rule 1 of recovery.py (the step size follows the damage), the damage being what the rounding added.
            outcome = StageOutcome(after["kl"], recovery_lr(self._base_lr() or cfg.lr, max(after["kl"] - before["kl"], 0.0)),
                                   Recovery.start(self.raw, after))
            self.reset_throughput()
            self.reporter.stage_begin(stage.label, stage.steps)
            self._recover(stage, outcome)
            record = self._record(stage, outcome)
            record["qat"] = {**qat.describe(cfg.quantize, target), "layers": len(layers), "kl_float_before": before["kl"],
                             "top1_float_before": before["top1"]}
            if outcome.accepted:
                accepted = self._accept(stage, record)
        record["qat"]["kl_float_after"] = self.measure()["kl"]  # the trained student without the rounding
        if not outcome.accepted:
            self.restore_everywhere(accepted)
            return accepted, (f"{reason}; the QAT stage was dropped ({stop_reason(stage, outcome, cfg.kl_budget, cfg.retries)}): "
                              "the student is the last pruning stage's")
        return accepted, f"{reason}, then {stage.steps} quantization-aware ({cfg.quantize}) step(s)"
