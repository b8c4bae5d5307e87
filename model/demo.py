"""The model side of ``ckpt demo``: a tiny OpenFlamingo published the way the real ones are.

``ckpt_tools`` finds this through the ``openflamingo-tiny`` preset's ``info["demo"]`` and never
imports ``model`` by name. It writes base weights (an open_clip vision tower file and an LM
folder, as if pretrained), a trained-parts ``checkpoint.pt`` in the published layout, the factory
arguments that rebuild the model from a hub cache, and runs a short generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROMPT = "<image> a photo of"


class TinyDemo:
    preset = "openflamingo-tiny"
    repo_id = "openflamingo/OpenFlamingo-tiny"
    lm_repo_id = "ckpt-demo/tiny-mpt"
    filename = "checkpoint.pt"

    def write_base_weights(self, folder: str | Path) -> dict[str, Path]:
        """The pretrained parts: ``clip`` (config JSON), ``clip_pretrained`` (weights), ``lm`` (folder)."""
        from .registry import save_tiny_assets

        return save_tiny_assets(folder)

    def write_checkpoint(self, assets: dict[str, Path], path: str | Path, seed: int = 0) -> int:
        """Train-looking values for the trained parts, saved as OpenFlamingo's training saves them.
        Returns the number of tensors written."""
        import torch

        from .factory import create_model_and_transforms
        from .registry import TINY_EVERY_N
        from .trained import make_trained_looking, trained_state_dict

        model, _, _ = create_model_and_transforms(str(assets["clip"]), str(assets["clip_pretrained"]),
                                                  str(assets["lm"]), str(assets["lm"]),
                                                  cross_attn_every_n_layers=TINY_EVERY_N)
        make_trained_looking(model, seed)
        state = {k: v.clone() for k, v in trained_state_dict(model).items()}
        torch.save(state, path)
        return len(state)

    def factory_kwargs(self, assets: dict[str, Path], *, lm_commit: str, cache_dir: str | Path) -> dict[str, Any]:
        """``create_model_and_transforms`` arguments: the vision tower from its file, the LM from
        the hub cache at a pinned commit (offline)."""
        from .registry import TINY_EVERY_N

        return {"factory": "model.factory:create_model_and_transforms",
                "clip_vision_encoder_path": str(assets["clip"]),
                "clip_vision_encoder_pretrained": str(assets["clip_pretrained"]),
                "lang_encoder_path": self.lm_repo_id, "tokenizer_path": self.lm_repo_id,
                "lang_encoder_revision": lm_commit, "cache_dir": str(cache_dir), "use_local_files": True,
                "cross_attn_every_n_layers": TINY_EVERY_N}

    def generate(self, model, image_processor, tokenizer, *, max_new_tokens: int = 8) -> str:
        """Greedy continuation of ``PROMPT`` about one synthetic image."""
        import torch
        from PIL import Image

        pixels = (torch.arange(64 * 64 * 3) % 251).to(torch.uint8).reshape(64, 64, 3).numpy()
        vision_x = image_processor(Image.fromarray(pixels)).unsqueeze(0).unsqueeze(0).unsqueeze(0)
        lang = tokenizer([PROMPT], return_tensors="pt")
        model.eval()
        with torch.no_grad():
            out = model.generate(vision_x=vision_x, lang_x=lang["input_ids"],
                                 attention_mask=lang["attention_mask"], max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0], skip_special_tokens=False)
