"""Reading, filtering, saving and exporting the old kernel's memory.

Arranged as pyelftools arranges ELF: the bytes of each format apart from the code that reads and writes them.

- ``layouts/``: the byte layouts of khibernate's image (``khi``), makedumpfile's kdump file (``kdump``) and Xen's
  crash notes (``xen``), each struct declared once by field name, with its pure records; no I/O.  ELF cores' are in
  ``khibernate/elfcore.py`` (``jump/`` builds with them too).
- ``sources/``: every reader, a :class:`~khibernate.image.sources.MemorySource` (``base.py``), opened through one
  door (``detect.open_source``): one module per format with its writer beside its reader (``elf``, ``kdump``,
  ``khi``), raw physical memory (``raw``), the frozen jump target (``frozen``), and sources over another source
  (``adapters``, ``xen``).
- what is done with a source: ``plan`` (which pages go into an output) over ``pagefilter`` (struct page classes,
  with ``x86_64`` address translation and ``vmcoreinfo``), ``export``, ``dmesg``, ``info``; the writers' shared
  ``pipeline``, ``atomic`` outputs, ``inputfile`` (opening inputs safely), ``errors``, ``levels``.
- ``cli.py``: ``khibernate image`` (click only).
"""
