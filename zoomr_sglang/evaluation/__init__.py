"""Accuracy evaluation: the synthetic program-trace reasoning task and its tiny trained reasoner."""
