"""`python -m harp` (and `torchrun -m harp train ...`) run the harp CLI."""

from .console import harp

harp()
