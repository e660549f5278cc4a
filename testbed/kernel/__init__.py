"""The kernel lab: a real Linux guest in qemu swapping over NBD (docs/kernel.md)."""
