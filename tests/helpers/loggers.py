"""A Lightning logger that records every ``log_metrics`` call, for tests."""

from lightning.pytorch.loggers import Logger


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass
