"""The student sharded over the ranks with FSDP2 (``--fsdp``): each rank holds a dim-0 shard of every parameter.

Built on torch's ``fully_shard`` directly, not Accelerate's FSDP plug-in: Accelerate turns its FSDP type on only for
GPU distributed types (``accelerate/state.py``: a CPU run stays MULTI_CPU and ignores the plug-in), and this run's
process group is joined before the student exists (``Team.launched``). ``fully_shard`` with a device mesh of the
launched ranks is the same call over gloo on CPUs and NCCL on GPUs.

What the rest of the run needs from a sharded student, and how it gets it:

- a forward pass gathers each unit's weights from every rank, so every rank runs it (``LossModule.forward``'s
  ``call``: the held-out measurement and the scoring passes run inside the root's forward, on the same data);
- whole weights, one parameter at a time (``gathered``): the main process scores and masks with them; a tensor each
  rank computed for its own rows (Taylor's scores, SR-STE's latents) is gathered the same way (``gathered_like``),
  and ``use_gathered`` keeps the ranks in step while the main process uses each whole tensor;
- a mask applied to a shard (``local_part``): each rank multiplies its own rows, cut as the parameter's own
  placement cuts them (uneven splits included);
- a tensor with one row per row (or per m rows) of a parameter, cut as its rows are (``local_rows``) or gathered
  from them (``gathered_rows``): SR-STE's per-group scores of an n:m layer (fsdp_nm.py);
- a whole copy for files (``full_state``): gathered to the main process's CPU, loaded back with
  ``load_full_state`` (broadcast from the main process: checkpoint files need not exist on other machines).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters import PrunableLayer


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def shard_student(module: nn.Module, student: nn.Module, device: torch.device, world: int) -> int:
    """FSDP2 over ``world`` ranks: every decoder layer of ``student`` (the classes its model names in
    ``_no_split_modules``, as Accelerate's transformer auto-wrap picks them) is its own unit, then ``module`` (the
    ``LossModule`` holding the student) is the root, holding the rest (embeddings, final norm, head). Returns the
    number of layer units. ``reshard_after_forward=True`` on the root too: after a no-grad forward (held-out,
    scoring) its weights go back to shards, so mask application and checkpoints always meet sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    names = set(getattr(student, "_no_split_modules", None) or ())
    layers = [m for m in student.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return len(layers)


def in_root(root: nn.Module, fn):
    """``fn()`` run inside the sharded ``root``'s forward (``LossModule``'s ``call``), on every rank. When ``fn``
    raises, FSDP's post-forward hooks never run and the units it entered stay unsharded: their whole weights stand in
    for the parameters, and a write to them (a mask, a restore) would be lost at the next reshard, leaving the
    shards stale. So every unit is resharded before the error goes on."""
    try:
        return root(None, call=fn)
    except BaseException:
        reshard_all(root)
        raise


def reshard_all(root: nn.Module) -> None:
    """Every FSDP unit under ``root`` back to its shards (after a pass or a backward that raised midway)."""
    from torch.distributed.fsdp import FSDPModule

    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_numel(model: nn.Module) -> int:
    """Parameter elements this rank holds (its shards; the whole model without FSDP)."""
    return sum((p.to_local() if is_sharded(p) else p).numel() for p in model.parameters())


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter (a collective: every rank calls it, for the same parameter, in order)."""
    return t.full_tensor() if is_sharded(t) else t


def local_part(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` (shaped like the parameter) as the parameter's placement cuts it; no
    communication (every rank holds ``whole``). A parameter that is not sharded takes all of it."""
    if not is_sharded(param):
        return whole
    if tuple(whole.shape) == tuple(param.to_local().shape):  # this rank's part is the whole (or it was cut already)
        return whole
    from torch.distributed.tensor import distribute_tensor

    local = param.to_local()
    return distribute_tensor(whole.to(local.device), param.device_mesh, param.placements, src_data_rank=None).to_local()


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The storage this rank updates in place: the shard of a sharded parameter, else the parameter."""
    return param.to_local() if is_sharded(param) else param


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the main process's CPU (gathered parameter by parameter); {} on the other ranks.
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the main process's whole ``state`` into every rank's shards (the others pass {}). strict=False:
    ``save_pretrained`` drops tied weights (head ↔ embeddings), shared anyway."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=False))


def gathered_like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose part on this rank is ``local``, cut as ``param``'s placement cuts it (a score or a
    gradient held per shard); a collective like ``gathered``. A parameter that is not sharded: ``local`` itself."""
    if not is_sharded(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride()).full_tensor()


def rows_cut(param: torch.Tensor, multiple: int = 1) -> bool:
    """Is ``param`` unsharded, or cut along dim 0 only (FSDP2's ``Shard(0)``) at row boundaries that are all
    multiples of ``multiple``? Then a tensor of ``param.shape[0] // multiple`` rows is cut the same way, one row per
    ``multiple`` of the parameter's (``local_rows``, ``gathered_rows``)."""
    if not is_sharded(param):
        return True
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        return False
    # the split Shard(0) makes (torch.chunk: equal chunks of ceil(rows / world), the last ones short or empty)
    sizes = [len(c) for c in torch.arange(param.shape[0]).chunk(param.device_mesh.size())]
    return all(n % multiple == 0 for n in sizes)


def local_rows(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``whole``, a tensor of any shape whose dim 0 is cut as ``param``'s is (``rows_cut``); no
    communication. A parameter that is not sharded takes all of it."""
    if not is_sharded(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    local = param.to_local()
    return distribute_tensor(whole.to(local.device), param.device_mesh, param.placements, src_data_rank=None).to_local()


def gathered_rows(param: torch.Tensor, local: torch.Tensor, rows: int) -> torch.Tensor:
    """The whole ``rows``-row tensor whose rows on this rank are ``local``, cut as ``param``'s dim 0 is cut
    (``rows_cut``); a collective like ``gathered``. A parameter that is not sharded: ``local`` itself."""
    if not is_sharded(param):
        return local
    from torch.distributed.tensor import DTensor

    shape = (rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.contiguous(), param.device_mesh, param.placements, shape=shape,
                              stride=stride).full_tensor()


def use_gathered(team, what: str, items: list, gather, use) -> None:
    """For each of ``items`` in order, every rank gathers a whole tensor (``gather(item)``, a collective: the ranks
    stay in step) and the main process alone calls ``use(item, whole)``. A failure of ``use`` is held until every
    gather is done (the other ranks would otherwise wait in the next one), then raised on every rank in one line: as
    itself on the main process, as ``FollowerError`` elsewhere."""
    failed: list[BaseException] = []
    with team.collective(what):
        for item in items:
            whole = gather(item).detach()
            if team.is_main and not failed:
                try:
                    use(item, whole)
                except Exception as e:  # noqa: BLE001 - raised below on every rank, once the gathers are done
                    failed.append(e)
            del whole

    def check() -> None:
        if failed:
            raise failed[0]

    team.on_main(check)


def sharded_prune_masks(team, on_student, model: nn.Module, pruner, importance: str, fraction: float,
                        calib: list[torch.Tensor], masks: dict[str, torch.Tensor],
                        allocation: dict[str, float] | None = None,
                        fisher: dict[str, torch.Tensor] | None = None,
                        taylor: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``stage.prune_stage``'s masks for a sharded student: Wanda's input norms from forward passes every rank runs
    on the same calibration batches (``on_student``), then per layer its weight gathered whole — one parameter at a
    time, never the whole model — and scored by the main process with the run's criterion (``importance.score``, the
    single-process code). The main process's masks (whole, CPU, bool) go to every rank. Fisher scores from the Σ
    measured on every rank beforehand (``fisher``: fsdp_channels.sharded_fisher); Taylor's |W·∂L/∂W| computed on
    each rank's shard (``taylor``: fsdp_taylor.sharded_taylor) is gathered instead of the weight, one layer at a
    time, and the main process masks the earlier stages' zeros and ranks it as ``importance.score`` does."""
    from .importance import ScoringContext, input_norms, score
    from .stage import stage_masks

    norms = None
    if importance == "wanda":
        norms = on_student(lambda: input_norms(ScoringContext(model, pruner.layers, calib)))
    scores: dict[str, torch.Tensor] = {}

    def whole_of(layer) -> torch.Tensor:
        p = layer.module.weight
        return gathered(p) if taylor is None else gathered_like(p, taylor[layer.param_name])

    def score_one(layer, whole: torch.Tensor) -> None:
        view = GatheredLayer(layer.name, layer.module, whole)
        given = {layer.param_name: whole} if taylor is not None else None
        scores.update(score(importance, ScoringContext(None, [view], [], masks=masks, norms=norms, fisher=fisher,
                                                        taylor=given)))

    use_gathered(team, "the ranks gathered a weight to score", pruner.layers, whole_of, score_one)
    chosen: dict[str, dict[str, torch.Tensor]] = {}

    def choose() -> None:  # on the main process; its failure reaches every rank as one line
        chosen["masks"] = stage_masks(pruner, scores, fraction, allocation)

    team.on_main(choose)
    return team.share_masks(chosen.get("masks", {}))


@dataclass
class GatheredLayer(PrunableLayer):
    """A prunable layer whose weight is read from a gathered whole copy instead of the (sharded) module."""

    whole: torch.Tensor | None = None

    def weight_oi(self) -> torch.Tensor:
        return self.whole.t() if self.transposed else self.whole
