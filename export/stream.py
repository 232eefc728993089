"""Write GGUF tensor data from a background thread, so reading, converting and writing overlap.

``GGUFWriter.write_tensor_data`` copies a tensor into the page cache (numpy's ``tofile``
releases the GIL while it does), and the kernel writes it to disk when the file is synced
at the end. Done in line, both stall the conversion of the next tensor: on a 1.1B model
the final ``fsync`` alone took more than half a second. Here a writer thread takes the
converted tensors from a short queue (at most ``depth`` + 2 tensors are held at once: the
one being written, the queued ones and the one being converted), and every ``kick_bytes``
it asks the kernel to start writing out what it has written so far
(``posix_fadvise(DONTNEED)`` starts writeback of the range's dirty pages and drops its
clean ones), so the disk works while the CPU converts and the final sync has little left.
"""

from __future__ import annotations

import os
import queue
import threading

import numpy as np

_DONE = object()


class TensorWriter:
    """``with TensorWriter(writer) as out: out.write(array)`` for each tensor, in tensor-info order.

    An error in the writer thread (a full disk) is raised from the next ``write`` or at the end
    of the ``with`` block. Leaving the block by an exception makes the thread skip what is left.
    """

    def __init__(self, writer, depth: int = 1, kick_bytes: int = 64 * 2**20):
        self.writer = writer
        self.kick_bytes = kick_bytes
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abort = False
        self._kicked = 0  # file offset up to which writeback has been started
        self._thread = threading.Thread(target=self._run, name="lowrank-gguf-writer", daemon=True)

    def __enter__(self) -> TensorWriter:
        self._thread.start()
        return self

    def write(self, array: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(array)  # the thread takes items until _DONE, so this never blocks for good

    def __exit__(self, exc_type, exc, tb) -> None:
        self._abort = exc_type is not None
        self._queue.put(_DONE)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (array := self._queue.get()) is not _DONE:
            if self._error is None and not self._abort:
                try:
                    self.writer.write_tensor_data(array)
                    self._start_writeback()
                except BaseException as e:  # noqa: BLE001 - raised in the main thread
                    self._error = e
            del array

    def _start_writeback(self) -> None:
        fout = self.writer.fout[0]
        end = fout.tell()
        if end - self._kicked >= self.kick_bytes and hasattr(os, "posix_fadvise"):
            fout.flush()
            os.posix_fadvise(fout.fileno(), self._kicked, end - self._kicked, os.POSIX_FADV_DONTNEED)
            self._kicked = end
