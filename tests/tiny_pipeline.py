"""Tiny random Stable Diffusion pipelines, built offline, for tests and benchmarks.

`build_tiny_sd(folder, inpainting=False, seed=0)` writes a diffusers pipeline
folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/)
with `save_pretrained`, so tests load it through the same config path users
use (`models.diffusion = "<folder>"`). Nothing touches the Hub.

- UNet2DConditionModel / AutoencoderKL / CLIPTextModel with tiny configs in the
  spirit of diffusers' own `get_dummy_components`, except that the VAE has
  four blocks so it downsamples by 8 like a real SD VAE (image sides must be
  multiples of 8, a 256x256 image has 32x32 latents).
- The CLIPTokenizer is built in memory from a byte-level vocabulary (the 256
  GPT-2/CLIP byte symbols, each also with the `</w>` word-end suffix, a few
  merges, and the two specials), then saved with the pipeline.
- `inpainting=False` (default): a 4-channel UNet. This one folder serves both
  text-to-image and inpainting: diffusers 0.42's StableDiffusionInpaintPipeline
  takes a 4-channel UNet through its legacy path (denoise the whole latent, and
  after every step put back the noised image latents outside the mask), which
  is how a regular SD 1.x/2.x checkpoint inpaints with the same weights.
- `inpainting=True`: a 9-channel UNet (4 latent + 1 mask + 4 masked-image
  latents), the layout of dedicated SD inpainting checkpoints; such a folder
  inpaints but cannot do text-to-image.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch

from engine import _compat

_BYTE_MERGES = ["t h", "th e</w>", "a n", "i n", "e r", "o n", "a r", "e n", "f a", "fa c", "fac e</w>"]


def _prepare() -> None:
    """The torchvision shim and offline environment, before transformers/diffusers import."""
    _compat.prepare(Path(tempfile.gettempdir()) / "atelier-tiny-cache")


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2 / CLIP BPE."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def tiny_clip_tokenizer(model_max_length: int = 32):
    """A CLIPTokenizer over a byte-level vocabulary, with no file from the Hub."""
    _prepare()
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    for merge in _BYTE_MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        merges_file = Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(_BYTE_MERGES) + "\n", encoding="utf-8")
        tok = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=model_max_length)
    return tok


def tiny_components(*, inpainting: bool = False, seed: int = 0) -> dict:
    """The components of a tiny StableDiffusion(Inpaint)Pipeline, random but seeded."""
    _prepare()
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
        in_channels=9 if inpainting else 4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=8, sample_size=128,
    )
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    return {"unet": unet.eval(), "scheduler": scheduler, "vae": vae.eval(), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "safety_checker": None, "feature_extractor": None,
            "image_encoder": None}


def build_tiny_sd(folder: str | Path, *, inpainting: bool = False, seed: int = 0) -> Path:
    """Write a tiny pipeline folder (loadable with DiffusionPipeline.from_pretrained); return it."""
    _prepare()
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    folder = Path(folder)
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(**tiny_components(inpainting=inpainting, seed=seed), requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


_CACHE: dict[bool, Path] = {}


def cached_tiny_sd(*, inpainting: bool = False) -> Path:
    """One tiny pipeline folder per kind per process (tests share it; it is read-only after saving), removed
    when the process exits (servers started from it have stopped by then: their fixtures stop them)."""
    if inpainting not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix="atelier-tiny-sd-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _CACHE[inpainting] = build_tiny_sd(root / ("sd-inpaint" if inpainting else "sd"), inpainting=inpainting)
    return _CACHE[inpainting]


if __name__ == "__main__":  # python tests/tiny_pipeline.py OUT_DIR [--inpainting]
    import sys

    out = build_tiny_sd(sys.argv[1], inpainting="--inpainting" in sys.argv)
    print(out)
