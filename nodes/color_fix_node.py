"""FiDeSR Color Fix: the decoder's colour correction for any pair of images."""

from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from ..fidesr_core.ops.color_fix import apply_color_fix
from ..fidesr_core.ops.preprocess import resize_image
from .errors import node_error
from .images import image_from_engine, image_to_engine
from .inputs import image_output, schema

COLOR_FIX_NODE = "FiDeSR Color Fix"


class FiDeSRColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "FiDeSRColorFix",
            COLOR_FIX_NODE,
            "Corrects the colours of an image towards a reference (e.g. the low-quality input), which is "
            "resized to the image first: adain matches each channel's mean and std; wavelet keeps the image's detail "
            "and takes the reference's low frequencies.",
            [
                io.Image.Input("image", tooltip="The image whose colours are corrected."),
                io.Image.Input(
                    "reference", tooltip="The image with the right colours; resized (bicubic) to the image's size."
                ),
                io.Combo.Input(
                    "method",
                    options=["adain", "wavelet"],
                    default="adain",
                    tooltip="adain: match each channel's mean and std. wavelet: the image's high frequencies plus "
                    "the reference's low frequencies.",
                ),
            ],
            [image_output("The colour-corrected image.")],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, reference: torch.Tensor, method: str = "adain") -> io.NodeOutput:
        node = COLOR_FIX_NODE
        target = image_to_engine(image, node, "image")
        source = image_to_engine(reference, node, "reference")
        if source.shape[0] not in (1, target.shape[0]):
            raise node_error(
                node,
                f"reference has a batch of {source.shape[0]} but image has {target.shape[0]}; use 1 or "
                f"{target.shape[0]} reference images",
            )
        source = source.expand(target.shape[0], -1, -1, -1)
        fixed = apply_color_fix(target, resize_image(source, tuple(target.shape[-2:])), method)
        return io.NodeOutput(image_from_engine(fixed))
