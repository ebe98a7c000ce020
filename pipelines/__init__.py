"""Text-to-image pipelines: the jitted denoising loop, FLUX.1, PixArt-Sigma, SDXL, pipeline
folders, image saving, the quantize workflow, LoRAs at run time (`loras=`) and LoRA training
(`pipelines.train_lora`).

    pipe = load_pipeline("FLUX.1-schnell")                 # or FluxPipeline.from_pretrained(...)
    images = pipe("a red cat", height=1024, width=1024)   # (B, H, W, 3) float32 in [0, 1]
    save_images(images, "cat.png", prompts=["a red cat"], seed=0)

A pipeline folder (diffusers layout, or ours from `svdq-jax quantize` / `convert`) is read and
checked once into a `PipelineFolder` record (`pipelines.folder`), which loading takes.
"""

from pipelines.flux import FluxPipeline
from pipelines.folder import PipelineFolder, pipeline_name, read_model_index
from pipelines.images import check_png_path, save_images
from pipelines.inputs import check_image_size
from pipelines.load import PIPELINES, image_size_multiple, load_pipeline
from pipelines.loop import NonFiniteError
from pipelines.pixart import PixArtSigmaPipeline
from pipelines.quantize import calibrate_denoiser, quantize_denoiser, quantize_pipeline
from pipelines.sdxl import StableDiffusionXLPipeline

__all__ = ["PIPELINES", "FluxPipeline", "NonFiniteError", "PipelineFolder", "PixArtSigmaPipeline",
           "StableDiffusionXLPipeline", "calibrate_denoiser", "check_image_size",
           "check_png_path", "image_size_multiple", "load_pipeline", "pipeline_name",
           "quantize_denoiser", "quantize_pipeline", "read_model_index", "save_images"]
