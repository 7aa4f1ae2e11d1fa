"""`python -m vlmkit ...` (also what `accelerate launch -m vlmkit` runs)."""
import sys

from vlmkit.cli import main

sys.exit(main())
