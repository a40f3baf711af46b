"""Class activation maps: methods (a registry), multi-scale inference, evaluation, training, pictures.

Importing this package registers the built-in methods ``cam``, ``gradcam`` and ``gradcampp`` in
``pipeline.registry.CAM_METHODS``.
"""
from pipeline.cam.evaluate import ThresholdSweep, pseudo_label, threshold_range, top_label
from pipeline.cam.infer import CamInference, compute_cams
from pipeline.cam.methods import (CamMethod, CamOutput, ClassActivationMap, GradCAM, GradCAMPlusPlus, GradientCamMethod,
                                  build_method)

__all__ = ["CamInference", "CamMethod", "CamOutput", "ClassActivationMap", "GradCAM", "GradCAMPlusPlus",
           "GradientCamMethod", "ThresholdSweep", "build_method", "compute_cams", "pseudo_label",
           "threshold_range", "top_label"]
