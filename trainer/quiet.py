"""Quiet by default: TensorFlow's, absl's and the TFLite runtime's start-up chatter off unless ``--verbose``.

Most of that chatter does not pass through Python at all: TensorFlow's and the converter's C++ code write
straight to file descriptor 2 (absl's "All log messages before absl::InitializeLog() ...", oneDNN and
CUDA notes, "fully_quantize: 0, ...", LiteRT's "Created TensorFlow Lite XNNPACK delegate"), and
``TF_CPP_MIN_LOG_LEVEL`` no longer reaches the messages absl logs before it is initialised. So
:func:`quiet_native` points fd 2 at a pipe (wurlitzer, which forwards it from a thread) and passes every
line on to the real stderr except the known noise (:data:`NOISE`): an unknown native message, a
fatal one (``F...``) or a native error that is not on the list still shows. Python's own ``sys.stderr``
(progress bars, our warnings and errors) is pointed at the real stderr directly, so tqdm's in-place
updates are not held up by the line filter.

One limit: a native crash that kills the process (abort) may take its last message with it while it
sits in the pipe; ``--verbose`` runs without the filter.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from typing import IO, Iterator, List, Pattern

NOISE: List[Pattern[str]] = [re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$",
    r"^[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] ",             # absl/glog INFO and WARNING lines
    r"^E\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ cuda_[a-z_]+\.cc:\d+\] failed call to cuInit",  # no GPU: expected
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] ",                        # older TensorFlow's own format
    r"^fully_quantize: \d+, inference_type: \d+",                          # the TFLite converter's printf
    r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.\s*$",      # LiteRT's interpreter
    r"^INFO: Initialized TensorFlow Lite runtime\.\s*$",
)]


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


class LineFilter(io.TextIOBase):
    """A text stream that passes whole lines on to ``target`` unless they are known noise."""

    def __init__(self, target: IO[str]) -> None:
        super().__init__()
        self.target = target
        self._partial = ""
        self.dropped = 0

    def write(self, data: str) -> int:
        text = self._partial + data
        *lines, self._partial = text.split("\n")
        for line in lines:
            if is_noise(line):
                self.dropped += 1
            else:
                self.target.write(line + "\n")
        if lines:
            self.target.flush()
        return len(data)

    def flush(self) -> None:
        self.target.flush()

    def close(self) -> None:
        if self._partial and not is_noise(self._partial):
            self.target.write(self._partial + "\n")
        self._partial = ""
        self.target.flush()
        super().close()


def quiet_python() -> None:
    """Silence the ML libraries' Python-side chatter (deprecations, h5 "legacy format" notes), not everything:
    our data checks raise errors rather than relying on library warnings being seen."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", module=r"(tensorflow|tf_keras|keras|tensorflow_model_optimization|absl|h5py)")
    warnings.filterwarnings("ignore", message=r".*(HDF5|legacy|quantized inputs).*")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def quiet_native() -> Iterator[LineFilter]:
    """Filter the native libraries' writes to fd 2 for the duration (see the module doc)."""
    from wurlitzer import pipes

    real_fd = os.dup(2)
    real = io.TextIOWrapper(io.FileIO(real_fd, "w", closefd=True), encoding="utf-8", errors="replace",
                            line_buffering=True, write_through=True)
    line_filter = LineFilter(real)
    # Python's own stderr goes straight to the terminal when it is the process's (a test that redirected
    # sys.stderr keeps its redirect)
    rebind = sys.stderr is sys.__stderr__
    saved = sys.stderr
    try:
        with pipes(stdout=None, stderr=line_filter):
            if rebind:
                sys.stderr = real
            try:
                yield line_filter
            finally:
                if rebind:
                    sys.stderr = saved
    finally:
        line_filter.close()
        real.close()
