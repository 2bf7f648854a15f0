"""One module per `moco-scale` command: its argument parser and `main`."""
