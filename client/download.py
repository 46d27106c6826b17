"""A downloaded global model written straight into the client's model as it arrives.

Through a spool file, every byte of the model was copied three times on the client: into the
file, out of it by `load_state_dict`, and the file's pages faulted in between (for ResNet-18,
25 ms of CPU per download against 10 ms for one copy, measured here; docs/large-models.md). Here
each chunk is copied once, into the tensors whose bytes it holds. The payload's digest is still
checked at the end (server and client share one PayloadAssembler), and nothing may use the model
before it was: `LocalSite` refuses to train or evaluate a model whose download did not finish.

Only a layout that maps one to one onto the model's tensors is written in place: every
travelling tensor, in its own dtype and shape, contiguous on the CPU, each in its own memory.
Anything else (a GPU model, SCAFFOLD's control variate riding along, a header that does not fit)
goes to the spool file and through `load_state_dict`, whose checks and errors then apply.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO

import torch

from fedlink.common.tensors import StreamedHeader, TensorSlot, received_view


class ModelSink:
    """A ByteSink for a global model of `size` bytes: into `targets` (the model's travelling
    tensors, or None: never in place) when its header maps onto them, else into the file that
    `open_spool` gives (from its start). `in_place` says which it was, once the header is in."""

    def __init__(
        self,
        targets: Mapping[str, torch.Tensor] | None,
        size: int,
        open_spool: Callable[[], IO[bytes]],
    ) -> None:
        self._targets = targets
        self._size = size
        self._open_spool = open_spool
        # Held up to a limit: a longer header goes to the spool, where safetensors reads it.
        self._header = None if targets is None else StreamedHeader(size, len(targets))
        # (first byte, end, the tensor's bytes) in payload order, once the header fits.
        self._pieces: list[tuple[int, int, torch.Tensor]] | None = None
        self._index = 0
        self._position = 0
        self.spool: IO[bytes] | None = None

    @property
    def in_place(self) -> bool:
        """Whether the model's tensors received the bytes (False: the spool did)."""
        return self._pieces is not None

    def write(self, data: bytes | memoryview, /) -> int:
        view = memoryview(data)
        if self.spool is None and self._pieces is None:
            view = self._take_header(view)
        if self.spool is not None:
            self.spool.write(view)
        elif self._pieces is not None:
            self._copy(view)
        return len(data)

    def _take_header(self, view: memoryview) -> memoryview:
        """Collect the header, then choose where the bytes go; the bytes after the header are
        returned."""
        if self._header is not None:
            view = self._header.feed(view)
            if self._header.slots is not None:
                self._pieces = self._layout(self._header.slots)
                if self._pieces is not None:
                    self._position = len(self._header.bytes)
                    return view
            elif not self._header.refused:
                return view  # (empty: the header goes on in the next chunk)
        return self._spool_from_here(view)

    def _spool_from_here(self, view: memoryview) -> memoryview:
        self.spool = self._open_spool()
        if self._header is not None:
            self.spool.write(self._header.bytes)
        return view

    def _layout(self, slots: list[TensorSlot]) -> list[tuple[int, int, torch.Tensor]] | None:
        """Where each target's bytes lie, when the header places exactly the targets, in their
        dtypes and shapes, back to back up to the payload's end; None otherwise."""
        assert self._targets is not None and self._header is not None
        slots = sorted(slots, key=lambda slot: slot.start)
        if {slot.name for slot in slots} != self._targets.keys():
            return None
        position = len(self._header.bytes)
        for slot in slots:
            if slot.start != position or not _fits(self._targets[slot.name], slot):
                return None
            position = slot.stop
        if position != self._size or _overlapping(self._targets.values()):
            return None
        return [
            (slot.start, slot.stop, self._targets[slot.name].view(-1).view(torch.uint8))
            for slot in slots
        ]

    def _copy(self, view: memoryview) -> None:
        assert self._pieces is not None
        while view:
            start, stop, target = self._pieces[self._index]
            if self._position == stop:  # this tensor is complete (or empty)
                self._index += 1
                continue
            take = min(len(view), stop - self._position)
            offset = self._position - start
            target[offset : offset + take].copy_(received_view(view[:take]))
            self._position += take
            view = view[take:]


def _fits(tensor: torch.Tensor, slot: TensorSlot) -> bool:
    return (
        tensor.dtype == slot.dtype
        and tuple(tensor.shape) == slot.shape
        and tensor.device.type == "cpu"
        and tensor.is_contiguous()
    )


def _overlapping(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any two of the tensors share memory (tied weights): a byte would be written
    twice, the second time over the first tensor's value."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel()
    )
    return any(end > start for (_, end), (start, _) in itertools.pairwise(spans))


def nameless_spool(directory: Path | None) -> IO[bytes]:
    """A spool file for downloads that has no name in `directory` (None: the system's temp
    directory) from the moment it exists (O_TMPFILE, or created and unlinked at once): a client
    killed by SIGKILL or the OOM killer leaves no model-sized file behind, as a named temporary
    file did on every such death. Read it through `descriptor_path`."""
    return tempfile.TemporaryFile(dir=directory, prefix="global-", suffix=".safetensors")


def descriptor_path(file: IO[bytes]) -> Path:
    """A path that opens (and maps) the file behind an open descriptor, name or not (Linux)."""
    return Path(f"/proc/self/fd/{file.fileno()}")
