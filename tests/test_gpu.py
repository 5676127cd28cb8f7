"""CUDA paths: bf16 training with the data set on the GPU, and GPU embeddings that match the CPU's."""

import math
from pathlib import Path

import pytest
import torch

from simclr.config import TrainConfig
from simclr.encoder import Encoder
from simclr.train import Trainer
from tests.helpers import TINY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_training_keeps_data_on_the_gpu_and_uses_bf16(image_folder: Path, tmp_path: Path) -> None:
    trainer = Trainer(TrainConfig(**{**TINY, "data": str(image_folder), "out": str(tmp_path), "device": "cuda", "epochs": 2}))
    assert trainer.images.device.type == "cuda"
    assert trainer.amp_dtype == torch.bfloat16
    result = trainer.fit()
    assert result.epochs == 2 and math.isfinite(result.final_loss)


def test_gpu_embeddings_match_cpu(tiny_encoder: Path) -> None:
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    cpu = Encoder.load(tiny_encoder, "cpu").embed(x)
    gpu = Encoder.load(tiny_encoder, "cuda").embed(x).cpu()
    assert torch.nn.functional.cosine_similarity(cpu, gpu).min() > 0.99  # bf16 on the GPU
