"""`python -m gopher_jax COMMAND [flags]`: see gopher_jax/cli/app.py."""

from gopher_jax.cli import run

if __name__ == "__main__":
    run()
