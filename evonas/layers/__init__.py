"""The layers: ops, genomes, spaces, their interpreter, exporter, symbolic view and zoo."""
