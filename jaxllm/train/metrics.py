"""Metrics: tensorboard event files (no TensorFlow needed) and a JSONL log."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping, Sequence

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricsWriter:
    """Scalars and text to `<run_dir>/tensorboard` (for `tensorboard --logdir`) and `metrics.jsonl`."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self._tb = EventFileWriter(str(Path(run_dir) / "tensorboard"))
            self._jsonl = (Path(run_dir) / "metrics.jsonl").open("a")

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        summary = Summary(value=[Summary.Value(tag=prefix + k, simple_value=float(v)) for k, v in values.items()])
        self._tb.add_event(Event(wall_time=time.time(), step=step, summary=summary))
        self._jsonl.write(json.dumps({"step": step, **{prefix + k: float(v) for k, v in values.items()}}) + "\n")
        self._jsonl.flush()

    def histogram(self, step: int, tag: str, shares: Sequence[float]) -> None:
        """A tensorboard histogram whose bucket i holds shares[i] (e.g. the share of tokens expert i took)."""
        if not self.enabled:
            return
        shares = [float(x) for x in shares]
        hist = HistogramProto(min=0.0, max=float(len(shares) - 1), num=float(sum(shares)),
                              sum=float(sum(i * x for i, x in enumerate(shares))),
                              sum_squares=float(sum(i * i * x for i, x in enumerate(shares))),
                              bucket_limit=[i + 0.5 for i in range(len(shares))], bucket=shares)
        summary = Summary(value=[Summary.Value(tag=tag, histo=hist)])
        self._tb.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        tensor = TensorProto(dtype=7, string_val=[text.encode()], tensor_shape=TensorShapeProto(dim=[]))  # DT_STRING
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        summary = Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor)])
        self._tb.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
