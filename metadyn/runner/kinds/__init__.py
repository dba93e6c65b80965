"""One module per task kind; each registers its :class:`~metadyn.runner.TaskKind` in ``TASK_KINDS``."""
