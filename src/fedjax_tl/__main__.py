"""`python -m fedjax_tl run ...`, the same as the `fedjax-tl` command."""

import sys

from fedjax_tl.cli import main

sys.exit(main())
