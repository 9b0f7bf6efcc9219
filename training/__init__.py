"""Training, evaluation and export of the node's networks."""
