"""The model package on tiny real models: every LM family, the factory, freezing, special tokens."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MptConfig,
    OPTConfig,
)

from ckpt_tools.errors import UsageError
from model import create_model_and_transforms, registry
from model.flamingo import Flamingo
from model.flamingo_lm import resolve_decoder_layers_attr_name

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, EOC, MEDIA = 40, 38, 39
FAMILIES = {
    "mpt": (lambda: MptConfig(d_model=32, n_heads=4, n_layers=4, expansion_ratio=4, max_seq_len=64,
                              vocab_size=VOCAB, no_bias=True), "transformer.blocks"),
    "gpt_neox": (lambda: GPTNeoXConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64),
                 "gpt_neox.layers"),
    "llama": (lambda: LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64),
              "model.layers"),
    "opt": (lambda: OPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64,
                              vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32),
            "model.decoder.layers"),
    "gpt2": (lambda: GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=64,
                                bos_token_id=0, eos_token_id=0), "transformer.h"),
    "gptj": (lambda: GPTJConfig(n_embd=32, n_layer=4, n_head=4, rotary_dim=4, vocab_size=VOCAB, n_positions=64,
                                bos_token_id=0, eos_token_id=0), "transformer.h"),
}




def tiny_flamingo(family: str, every_n: int = 2, **kwargs) -> Flamingo:
    import open_clip

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(FAMILIES[family][0]())
    model = Flamingo(open_clip.CLIP(**registry.TINY_CLIP_CONFIG), lm, EOC, MEDIA, vis_dim=32,
                     cross_attn_every_n_layers=every_n, **kwargs)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    return model.eval()


IDS = torch.tensor([[3, 4, MEDIA, 5, 6, 7], [MEDIA, 8, 9, MEDIA, 10, 11]])
MASK = torch.ones_like(IDS)


def images(seed: int = 1, count: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(2, count, 1, 3, 32, 32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_runs_forward_and_generate(family):
    model = tiny_flamingo(family)
    assert model.decoder_layers_attr_name == FAMILIES[family][1]
    with torch.no_grad():
        out = model(images(), IDS, attention_mask=MASK, labels=IDS)
    assert out.logits.shape == (2, 6, VOCAB)
    assert torch.isfinite(out.loss)
    greedy = model.generate(images(), IDS, MASK, max_new_tokens=4, pad_token_id=0)
    assert greedy.shape == (2, 10) and torch.equal(greedy[:, :6], IDS)
    assert torch.equal(greedy, model.generate(images(), IDS, MASK, max_new_tokens=4, pad_token_id=0))
    torch.manual_seed(3)
    sampled = model.generate(images(), IDS, MASK, max_new_tokens=4, do_sample=True, top_k=0, pad_token_id=0)
    assert sampled.shape[0] == 2 and torch.equal(sampled[:, :6], IDS)
    leftovers = [block.vis_x for block in model.gated_cross_attn_layers]
    assert leftovers  # the model has cross-attention layers to look at
    assert leftovers == [None] * len(leftovers)  # nothing left behind


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_images_only_reach_text_after_their_image_token(family):
    model = tiny_flamingo(family, every_n=1)
    with torch.no_grad():
        a = model(images(1), IDS, attention_mask=MASK).logits
        b = model(images(2), IDS, attention_mask=MASK).logits
        # a third image no <image> token refers to is never attended
        c = model(torch.cat([images(1), images(5, 1)], dim=1), IDS, attention_mask=MASK).logits
    assert torch.equal(a[0, :2], b[0, :2])  # text before row 0's first <image> ignores the images
    assert (a[0, 2:] - b[0, 2:]).abs().max() > 1e-3
    assert (a[1] - b[1]).abs().max() > 1e-3
    assert torch.allclose(a, c, atol=1e-6)


def test_zero_gates_leave_the_language_model_unchanged():
    model = tiny_flamingo("gpt_neox")
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.zero_()
            block.ff_gate.zero_()
        flamingo = model(images(), IDS, attention_mask=MASK).logits
    plain = AutoModelForCausalLM.from_config(FAMILIES["gpt_neox"][0]()).eval()
    plain.load_state_dict({k: v for k, v in model.lang_encoder.state_dict().items()
                           if "gated_cross_attn_layer" not in k})
    with torch.no_grad():
        assert torch.allclose(flamingo, plain(IDS, attention_mask=MASK).logits, atol=1e-6)


def test_state_dict_has_one_name_per_tensor_and_openflamingo_names():
    model = tiny_flamingo("mpt", every_n=2)
    keys = list(model.state_dict())
    assert not [k for k in keys if "old_decoder_blocks" in k or "gated_cross_attn_layers" in k]
    xattn = sorted({k.split(".gated_cross_attn_layer.")[0] for k in keys if ".gated_cross_attn_layer." in k})
    assert xattn == ["lang_encoder.transformer.blocks.1", "lang_encoder.transformer.blocks.3"]
    assert sorted(k.split(".gated_cross_attn_layer.")[1] for k in keys
                  if k.startswith("lang_encoder.transformer.blocks.1.gated_cross_attn_layer.")) == sorted([
        "attn_gate", "ff_gate", "attn.norm.weight", "attn.norm.bias", "attn.to_q.weight", "attn.to_kv.weight",
        "attn.to_out.weight", "ff.0.weight", "ff.0.bias", "ff.1.weight", "ff.3.weight"])
    perceiver = [k for k in keys if k.startswith("perceiver.")]
    assert len(perceiver) == 69
    assert "perceiver.layers.5.1.3.weight" in perceiver and "perceiver.layers.0.0.to_kv.weight" in perceiver
    # the LM keeps its own names: a plain MPT state dict loads into lang_encoder as is
    assert "lang_encoder.transformer.blocks.0.attn.Wqkv.weight" in keys
    gates = model.gated_cross_attn_layers[0]
    assert gates.attn_gate.shape == (1,) and gates.ff_gate.shape == (1,)


def test_decoder_layers_come_from_override_table_or_structure():
    lm = AutoModelForCausalLM.from_config(FAMILIES["llama"][0]())
    assert resolve_decoder_layers_attr_name(lm) == "model.layers"
    assert resolve_decoder_layers_attr_name(lm, "model.layers") == "model.layers"
    with pytest.raises(UsageError, match="model.norm.*fix: use one of: model.layers"):
        resolve_decoder_layers_attr_name(lm, "model.norm")

    class Unknown(nn.Module):  # no family entry: the longest list of identical blocks wins
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2)] * 2)
            self.stack = nn.ModuleList(nn.Sequential(nn.Linear(2, 2)) for _ in range(5))

    assert resolve_decoder_layers_attr_name(Unknown()) == "stack"
    with pytest.raises(UsageError, match="pass decoder_layers_attr_name"):
        resolve_decoder_layers_attr_name(nn.Linear(2, 2))


def test_gradient_checkpointing_and_cross_attention_train():
    model = tiny_flamingo("llama", gradient_checkpointing=True).train()
    from model.factory import freeze_backbones

    freeze_backbones(model)
    loss = model(images(), IDS, attention_mask=MASK, labels=IDS).loss
    loss.backward()
    block = model.gated_cross_attn_layers[0]
    assert block.attn.to_q.weight.grad is not None and block.attn.to_q.weight.grad.abs().sum() > 0
    assert model.perceiver.latents.grad is not None
    assert model.lang_encoder.model.layers[0].mlp.up_proj.weight.grad is None


def test_tiny_tokenizer_special_tokens_in_openflamingo_order():
    tokenizer = registry.tiny_tokenizer()
    base = len(registry.TINY_WORDS)
    assert tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"]) == [base, base + 1, base + 2]
    assert tokenizer.pad_token == "<PAD>"
    ids = tokenizer("<image>a photo of a cat.<|endofchunk|>")["input_ids"]
    assert ids[0] == base + 1 and ids[-1] == base and tokenizer.unk_token_id not in ids


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    return registry.save_tiny_assets(tmp_path_factory.mktemp("tiny"))


def test_factory_builds_from_local_folders_and_a_clip_config_json(tiny_assets):
    model, image_processor, tokenizer = create_model_and_transforms(
        str(tiny_assets["clip"]), None, str(tiny_assets["lm"]), str(tiny_assets["lm"]),
        cross_attn_every_n_layers=registry.TINY_EVERY_N, use_local_files=True)
    base = len(registry.TINY_WORDS)
    assert len(tokenizer) == base + 3 == registry.TINY.tokenizer_length
    assert tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"]) == [base, base + 1, base + 2]
    assert (model.eoc_token_id, model.media_token_id) == (base, base + 1)
    assert model.lang_encoder.get_input_embeddings().weight.shape == (base + 3, 32)
    # the same architecture as the tiny preset: same names and shapes
    preset = registry.TINY.build(device="meta").state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in preset.items()}
    # freezing as OpenFlamingo: resampler, cross-attention and input embeddings only
    trainable = {n.split(".")[0] if n.startswith("perceiver") else n
                 for n, p in model.named_parameters() if p.requires_grad}
    assert "perceiver" in trainable and "lang_encoder.transformer.wte.weight" in trainable
    assert {n for n in trainable if n.startswith("lang_encoder.")} - {"lang_encoder.transformer.wte.weight"} == {
        n for n, _ in model.named_parameters() if ".gated_cross_attn_layer." in n}
    assert not [n for n, p in model.named_parameters() if n.startswith("vision_encoder.") and p.requires_grad]
    pixels = image_processor(Image.new("RGB", (48, 40), "red"))
    assert pixels.shape == (3, 32, 32)
    prompt = tokenizer(["<image>a photo of a"], return_tensors="pt")
    out = model.generate(pixels[None, None, None], prompt["input_ids"], prompt["attention_mask"],
                         max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
    length = prompt["input_ids"].shape[1]
    assert torch.equal(out[:, :length], prompt["input_ids"]) and length < out.shape[1] <= length + 3


def test_factory_freezes_embeddings_on_request_and_casts_dtype(tiny_assets):
    model, _, _ = create_model_and_transforms(
        str(tiny_assets["clip"]), None, str(tiny_assets["lm"]), str(tiny_assets["lm"]),
        use_local_files=True, freeze_lm_embeddings=True, dtype=torch.bfloat16)
    assert not model.lang_encoder.get_input_embeddings().weight.requires_grad
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(model.gated_cross_attn_layers) == 4  # cross_attn_every_n_layers defaults to 1


def test_factory_on_meta_allocates_nothing(tiny_assets):
    model, _, tokenizer = create_model_and_transforms(
        str(tiny_assets["clip"]), None, str(tiny_assets["lm"]), str(tiny_assets["lm"]),
        cross_attn_every_n_layers=2, use_local_files=True, device="meta")
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
    assert model.lang_encoder.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_clip_config_json_sets_the_vision_width(tmp_path, tiny_assets):
    config = json.loads(tiny_assets["clip"].read_text())
    config["vision_cfg"]["width"] = 48
    wider = tmp_path / "tiny-vit-48.json"
    wider.write_text(json.dumps(config))
    model, _, _ = create_model_and_transforms(str(wider), None, str(tiny_assets["lm"]), str(tiny_assets["lm"]),
                                              use_local_files=True, device="meta")
    assert model.vis_dim == 48 and model.perceiver.latents.shape == (64, 48)
    assert model.gated_cross_attn_layers[0].attn.to_kv.weight.shape == (1024, 48)


def test_missing_vision_input_is_a_clear_error():
    model = tiny_flamingo("mpt")
    with pytest.raises(ValueError, match="pass vision_x"):
        model(None, IDS)
    with pytest.raises(ValueError, match=r"\(B, T_img, F, C, H, W\)"):
        model(torch.randn(2, 3, 32, 32), IDS)
    with pytest.raises(RuntimeError, match="not conditioned on images"):
        model.lang_encoder(IDS)


def test_a_tokenizer_with_a_pad_token_gets_no_extra_pad():
    from model.factory import add_special_tokens

    tokenizer = registry.tiny_tokenizer(with_flamingo_tokens=False)
    tokenizer.pad_token = "<unk>"
    add_special_tokens(tokenizer)
    base = len(registry.TINY_WORDS)
    assert len(tokenizer) == base + 2 and tokenizer.pad_token == "<unk>"
    assert tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>"]) == [base, base + 1]


def test_a_deep_copy_is_an_independent_working_model():
    import copy

    model = tiny_flamingo("mpt")
    clone = copy.deepcopy(model)
    assert clone.gated_cross_attn_layers[0] is not model.gated_cross_attn_layers[0]
    with torch.no_grad():
        expected = model(images(), IDS, attention_mask=MASK).logits
        clone.gated_cross_attn_layers[0].attn_gate.fill_(0.0)
        assert torch.equal(model(images(), IDS, attention_mask=MASK).logits, expected)
        assert not torch.equal(clone(images(), IDS, attention_mask=MASK).logits, expected)


def test_factory_loads_hub_ids_at_a_pinned_revision(tmp_path, tiny_assets):
    """Through the local hub mirror; transformers reads HF_ENDPOINT at import, hence the child."""
    import os
    import subprocess
    import sys

    from ckpt_tools.server import HubServer, publish

    root = tmp_path / "hub"
    files = {p.name: p for p in tiny_assets["lm"].iterdir()}
    commit = publish(root, "tiny-org/tiny-lm", files)
    publish(root, "tiny-org/tiny-lm", {**files, "config.json": b"{}"})  # main moves on; the pin must hold
    code = ("import sys; from model import create_model_and_transforms as c; "
            "m, _, t = c(sys.argv[1], None, 'tiny-org/tiny-lm', 'tiny-org/tiny-lm', 2, "
            "lang_encoder_revision=sys.argv[2]); print(len(t), len(m.gated_cross_attn_layers))")
    with HubServer(root) as server:
        env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HOME": str(tmp_path / "home")}
        out = subprocess.run([sys.executable, "-c", code, str(tiny_assets["clip"]), commit], env=env,
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(registry.TINY.tokenizer_length), "2"]


def test_a_pretrained_tag_that_cannot_be_fetched_fails_at_once_in_one_line(tmp_path):
    from model.factory import load_vision_encoder

    with pytest.raises(UsageError) as refused:
        load_vision_encoder("ViT-L-14", "openai", device=torch.device("cpu"), cache_dir=str(tmp_path))
    assert "timm/vit_large_patch14_clip_224.openai" in refused.value.one_line()
    assert "\n" not in refused.value.one_line()
