"""Tasks: a model, a dataset and how to evaluate, shared by server and client.

``get_task(name)`` returns a :class:`Task`; its data are numpy arrays so partitioning, validation
and attacks work the same for images and tables.
"""

from fedshield.tasks.base import TASKS, Split, Task, evaluate, get_task, resolve_device, task_for

__all__ = ["Split", "Task", "TASKS", "evaluate", "get_task", "resolve_device", "task_for"]
