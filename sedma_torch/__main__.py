"""``python -m sedma_torch``: the ``sedma`` command line (sedma_torch.experiments.cli)."""

import sys

from sedma_torch.experiments.cli import main

sys.exit(main())
