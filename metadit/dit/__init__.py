"""DIT: the adapter trained while each example's own diff is applied (`DITModule`), its data (`DiffQADataModule`)
and the question/answer tasks (`TASKS`)."""

from metadit.dit.data import DiffQADataModule
from metadit.dit.module import DITModule
from metadit.dit.tasks import TASKS, Task, get_task

__all__ = ["DITModule", "DiffQADataModule", "TASKS", "Task", "get_task"]
