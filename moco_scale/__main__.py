"""`python -m moco_scale COMMAND ...`: what launchers run (`torchrun -m moco_scale pretrain`,
`deepspeed --module moco_scale pretrain`)."""

import sys

from moco_scale.cli import main

sys.exit(main())
