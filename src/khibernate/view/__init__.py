"""One /proc/vmcore-style view of the previously booted kernel, from either side of a jump or from any image.

``open_previous(path=None)`` returns image's :class:`~khibernate.image.sources.MemorySource`; ``khibernate view``
prints from it or mounts it (FUSE: ``vmcore``, ``oldmem``, ``vmcoreinfo``, ``dmesg``, ``info.json``).
"""

from __future__ import annotations

from khibernate.view.errors import MountError, NoPreviousKernelError, ViewError
from khibernate.view.previous import boot_side, open_previous

__all__ = ["MountError", "NoPreviousKernelError", "ViewError", "boot_side", "open_previous"]
