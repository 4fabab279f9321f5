"""`python -m flexgen_helm ...` (e.g. under `torchrun --nproc-per-node N -m flexgen_helm run ...`)."""
import sys

from .cli import main

sys.exit(main())
