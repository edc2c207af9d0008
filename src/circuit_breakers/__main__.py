"""`python -m circuit_breakers` (and `accelerate launch -m circuit_breakers`)."""
import sys

from .cli import main

sys.exit(main())
