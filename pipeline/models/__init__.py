"""Networks: backbones (a registry), the CAM classifier, AffinityNet and the segmenter."""
