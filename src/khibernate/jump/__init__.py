"""Loading and entering kernels: kexec, kdump and kexec jump (preserve-context) from Python."""
