"""``python -m svdllm_plugin.cli`` (and ``torchrun -m svdllm_plugin.cli``): the `svdllm` command."""

import sys

from svdllm_plugin.cli import main

sys.exit(main())
