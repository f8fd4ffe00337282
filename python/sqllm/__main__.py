"""``python -m sqllm`` (and ``torchrun ... -m sqllm``): the command line, :mod:`sqllm.cli`."""
import sys

from .cli import main

sys.exit(main())
