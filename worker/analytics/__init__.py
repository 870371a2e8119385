"""The read side over stored runs: accuracy, similarity, plots, summaries."""
