#!/usr/bin/env python3
"""Entry point: ``python3 main.py [--distributed] ...`` opens the SynapticLlamas shell."""
from synapticllamas.cli import main

if __name__ == "__main__":
    main()
