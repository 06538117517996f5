"""ftframe's Lightning callbacks (installed as ``ftframe.callbacks``; import them from there)."""

from ftframe.callbacks.adapter_checkpoint import AdapterCheckpoint
from ftframe.callbacks.adapter_export import AdapterExport
from ftframe.callbacks.classification_report import ClassificationReport
from ftframe.callbacks.forgetting import ForgettingMonitor
from ftframe.callbacks.graceful_stop import GracefulStop
from ftframe.callbacks.nonfinite_guard import NonFiniteGuard

__all__ = ["AdapterCheckpoint", "AdapterExport", "ClassificationReport", "ForgettingMonitor", "GracefulStop", "NonFiniteGuard"]
