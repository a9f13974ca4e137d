"""Routing traces: the file format, the engine's recorder, importers, statistics and the simulator."""

from traces.format import Trace, TraceFormatError, load_trace, save_trace
from traces.recorder import TraceRecorder

__all__ = ["Trace", "TraceFormatError", "TraceRecorder", "load_trace", "save_trace"]
