"""`python -m retnet_jax.convert`: see retnet_jax/convert/cli.py."""

import sys

from retnet_jax.convert import cli

sys.exit(cli.main())
