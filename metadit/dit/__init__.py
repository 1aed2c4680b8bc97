"""DIT: the adapter trained while each example's own diff is applied (`DITModule`, in the injected
`PatchedBaseModel`), its data (`DiffQADataModule`), the question/answer tasks (`TASKS`) and the callbacks that
write a run's files (`metadit.dit.callbacks`)."""

from metadit.dit.base import PatchedBaseModel
from metadit.dit.data import DiffQADataModule
from metadit.dit.module import DITModule
from metadit.dit.tasks import TASKS, Task, get_task

__all__ = ["DITModule", "DiffQADataModule", "PatchedBaseModel", "TASKS", "Task", "get_task"]
