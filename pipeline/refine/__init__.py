"""Refiners that turn CAMs into pseudo masks: CRF seeds (seeds.py, crf.py) and the AffinityNet
random walk (random_walk.py). Importing the package registers the built-in seed makers in
``pipeline.registry.REFINERS`` ("affinitynet", "irnet")."""
from pipeline.refine import seeds  # noqa: F401  (registers the seed makers)
