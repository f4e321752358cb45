"""An ONNX model as a torch module for forward passes (`onnx:` URIs).

ONNX Runtime runs the forwards (CUDA execution provider where this machine has one, CPU
otherwise); wrapping the session as an nn.Module lets the perturbed-forward core chunk, count
and retry its forwards exactly as for a torch model. It offers nothing beyond forwards: no
gradients, activations, layer types or weights (LoadedModel.capabilities is empty), so only
forward-only methods and metrics run on it.
"""

from __future__ import annotations

import torch
from torch import nn


class OnnxClassifier(nn.Module):
    def __init__(self, model: bytes, name: str):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        # as many threads as torch was given here (an actor's share of its node), not every core
        options.intra_op_num_threads = torch.get_num_threads()
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as e:
            raise ValueError(f"{name!r} is not a model ONNX Runtime can run: {e}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            shapes = [(i.name, i.shape) for i in inputs]
            raise ValueError(f"{name!r}: expected one image input [B,3,H,W], got {shapes}")
        self.input_name = inputs[0].name
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().contiguous().numpy()
        (logits, *_) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(logits).to(x.device)

    def __deepcopy__(self, memo):  # a session cannot be copied; say which model refused
        raise TypeError(f"{self.name!r} is an ONNX session and cannot be copied")
