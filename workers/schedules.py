"""The torch side of the LR schedule: ``PlanScheduler`` applies ``service.curve.lr_momentum(plan, step)``
to an optimizer. Its ``state_dict`` is the step counter alone; everything else comes from the plan."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from service.curve import lr_momentum
from service.plan import Plan


class PlanScheduler(LRScheduler):
    """Sets lr and momentum (SGD) or beta1 (Adam) of every param group to ``lr_momentum(plan, step)``.

    Call ``step()`` once per optimizer step, after ``optimizer.step()``, exactly like ``OneCycleLR``.
    ``last_epoch`` is the index of the next optimizer step; it may reach ``plan.total_steps`` (the
    job is done) but no further. Its state is that counter alone: everything else comes from the plan.
    """

    def __init__(self, optimizer: Optimizer, plan: Plan, start_step: int = 0):
        self.plan = plan
        self._start = start_step
        super().__init__(optimizer)  # runs step() once: last_epoch -1 -> 0, then we jump to start_step

    def step(self, epoch: None = None) -> None:  # noqa: D102 - torch signature
        if epoch is not None:
            raise TypeError("PlanScheduler.step() takes no epoch: the plan defines the curve")
        if getattr(self, "_start", None) is not None and self.last_epoch == -1:
            self.last_epoch = self._start
            self._start = None
        else:
            self.last_epoch += 1
        self._apply()

    def _apply(self) -> None:
        total = self.plan.total_steps
        if self.last_epoch > total:
            raise ValueError(
                f"PlanScheduler stepped {self.last_epoch} times, past the plan's total of {total} optimizer "
                "steps"
            )
        if self.last_epoch == total:  # after the last optimizer step: nothing left to schedule
            return
        lr, momentum = lr_momentum(self.plan, self.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            elif "momentum" in group:
                group["momentum"] = momentum
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict:
        return {"step": self.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["step"])
        self._apply()
