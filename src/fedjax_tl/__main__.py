"""`python -m fedjax_tl run ...`, the same as the `fedjax-tl` command."""

from fedjax_tl.cli import entry

entry()
