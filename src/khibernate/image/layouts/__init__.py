"""The byte layouts of every format the image side reads and writes, as pyelftools keeps its ``structs`` apart from
its readers: one module per format, each struct declared once by field name (:class:`khibernate.layout.Layout`),
with the pure records packed into and checked out of them.  No file I/O here: the readers and writers are in
``khibernate/image/sources/``.  ELF cores' layouts are in ``khibernate/elfcore.py`` (``jump/`` builds with them too).

- ``khi``: khibernate's own image (``docs/image-format.md``)
- ``kdump``: makedumpfile's kdump-compressed file and its flattened stream
- ``xen``: the notes a Xen hypervisor leaves in a host's vmcore
"""

# Physical addresses (and so every range, max_pfn and bitmap a header describes) must lie below this: 64 TiB,
# the x86_64 4-level paging limit.  A size field beyond it is a corrupt header, not a machine.
MAX_PHYS_ADDR = 1 << 46
