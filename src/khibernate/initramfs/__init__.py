"""Building the initramfs of the jumped-to (capture) kernel: newc cpio, ELF dependencies, Python."""
