"""Numerical parity with OpenFlamingo v2 (the ``open-flamingo==2.0.1`` package) on tiny models.

Both implementations wrap copies of the same randomly initialised open_clip tower and HF LM; the
reference's state dict is filled from ours through an explicit name translation (which also
proves the two name sets correspond one to one), the gates are set away from 0 so the
cross-attention really contributes, and logits, loss and generated ids are compared.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

try:  # the reference pins torch 2.0.1; it is installed with --no-deps and only its model code is used
    from open_flamingo.src.flamingo import Flamingo as RefFlamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
except Exception as exc:  # noqa: BLE001 - any import failure means: no reference to compare with
    pytest.skip(f"reference OpenFlamingo not importable ({type(exc).__name__}: {exc}); "
                "install it with: pip install --no-deps open-flamingo==2.0.1 einops-exts",
                allow_module_level=True)

import open_clip
from transformers import AutoModelForCausalLM, GPTJConfig, GPTNeoXConfig, LlamaConfig, MptConfig, OPTConfig

from model.flamingo import Flamingo
from model.registry import TINY_CLIP_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, EOC, MEDIA = 40, 38, 39
TOLERANCE = 1e-4

LMS = {
    "mpt": (lambda: MptConfig(d_model=32, n_heads=4, n_layers=4, expansion_ratio=4, max_seq_len=64,
                              vocab_size=VOCAB, no_bias=True), "transformer.blocks"),
    "gpt_neox": (lambda: GPTNeoXConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                                       tie_word_embeddings=False, use_parallel_residual=False),
                 "gpt_neox.layers"),
    "llama": (lambda: LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                  max_position_embeddings=64), "model.layers"),
    "opt": (lambda: OPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64,
                              vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32),
            "model.decoder.layers"),
    "gptj": (lambda: GPTJConfig(n_embd=32, n_layer=4, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64,
                                bos_token_id=0, eos_token_id=0), "transformer.h"),
}




def our_name(ref_name: str, path: str) -> str:
    """The name in our state dict of a tensor OpenFlamingo calls ``ref_name``."""
    ref_name = ref_name.replace("lang_encoder.old_decoder_blocks.", f"lang_encoder.{path}.", 1)
    ref_name = re.sub(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.",
                      rf"lang_encoder.{path}.\1.gated_cross_attn_layer.", ref_name)
    return re.sub(rf"^(lang_encoder\.{re.escape(path)}\.\d+)\.decoder_layer\.", r"\1.", ref_name)


def make_pair(family: str, every_n: int) -> tuple[Flamingo, torch.nn.Module]:
    config, path = LMS[family]
    torch.manual_seed(0)
    clip, lm = open_clip.CLIP(**TINY_CLIP_CONFIG), AutoModelForCausalLM.from_config(config())
    ref_clip, ref_lm = copy.deepcopy(clip), copy.deepcopy(lm)
    ours = Flamingo(clip, lm, EOC, MEDIA, vis_dim=32, cross_attn_every_n_layers=every_n).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("_gate"):
                p.uniform_(0.5, 1.5)
    ref_clip.visual.output_tokens = True  # done by OpenFlamingo's factory
    extend_instance(ref_lm, FlamingoLMMixin)
    ref_lm.set_decoder_layers_attr_name(path)
    ref = RefFlamingo(ref_clip, ref_lm, EOC, MEDIA, vis_dim=32, cross_attn_every_n_layers=every_n).eval()
    ours_sd, ref_keys = ours.state_dict(), list(ref.state_dict())
    assert {our_name(k, path) for k in ref_keys} == set(ours_sd)
    ref.load_state_dict({k: ours_sd[our_name(k, path)] for k in ref_keys}, strict=True)
    return ours, ref


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows: images at the start and mid-text; three images in one row; left padding with
    text before the first image; up to three images per row (unused slots stay unreferenced)."""
    ids = torch.tensor([[MEDIA, 5, 6, 7, EOC, MEDIA, 8, 9, 10, 11],
                        [3, 4, MEDIA, 5, 6, MEDIA, 7, 8, MEDIA, 9],
                        [0, 0, 0, 1, 2, MEDIA, 12, 13, 14, 15]])
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    torch.manual_seed(1)
    return torch.randn(3, 3, 1, 3, 32, 32), ids, mask


@pytest.mark.parametrize("every_n", [1, 2])
@pytest.mark.parametrize("family", list(LMS))
def test_logits_and_loss_match_openflamingo(family, every_n):
    ours, ref = make_pair(family, every_n)
    vision_x, ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = ours(vision_x, ids, attention_mask=mask, labels=labels)
        b = ref(vision_x, ids, attention_mask=mask, labels=labels)
    assert (a.logits - b.logits).abs().max().item() <= TOLERANCE
    assert abs(a.loss.item() - b.loss.item()) <= TOLERANCE
    other_images = torch.randn_like(vision_x)
    with torch.no_grad():
        c = ours(other_images, ids, attention_mask=mask)
    assert (a.logits - c.logits).abs().max().item() > 1e-3  # the cross-attention is live


@pytest.mark.parametrize("family", ["mpt", "gpt_neox", "llama"])
def test_generate_matches_openflamingo(family):
    ours, ref = make_pair(family, 2)
    vision_x, ids, mask = batch()
    prompt, prompt_mask = ids[:, :6], mask[:, :6]
    greedy = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(vision_x, prompt, prompt_mask, **greedy),
                       ref.generate(vision_x, prompt, prompt_mask, **greedy))
    sampled = []
    for model in (ours, ref):
        torch.manual_seed(7)
        sampled.append(model.generate(vision_x, prompt, prompt_mask, max_new_tokens=5, do_sample=True,
                                      top_k=0, temperature=2.0, pad_token_id=0))
    assert torch.equal(*sampled)


def test_cached_media_forward_matches_openflamingo():
    ours, ref = make_pair("llama", 1)
    vision_x, ids, mask = batch()
    continuation = torch.tensor([[5, 6], [7, 8], [9, 10]])
    outputs = []
    for model in (ours, ref):
        model.cache_media(input_ids=ids, vision_x=vision_x)
        with torch.no_grad():
            outputs.append(model(None, continuation, clear_conditioned_layers=False).logits)
        model.uncache_media()
    assert (outputs[0] - outputs[1]).abs().max().item() <= TOLERANCE
