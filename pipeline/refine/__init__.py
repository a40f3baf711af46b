"""Refiners that turn CAMs into pseudo masks: CRF seeds (seeds.py, crf.py), AffinityNet training and
the random walk (affinity_training.py, random_walk.py, feature_affinity.py), instances. The built-in
seed makers ("affinitynet", "irnet") are registered in ``pipeline.registry.REFINERS`` by seeds.py,
which the registry imports when ``crf.mode`` first names one."""
