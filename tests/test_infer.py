"""infer_rules on real renames: models built tiny on the meta device (the OpenFlamingo reference on CPU,
where its alias names share storage), checkpoints renamed the way libraries, refactors and wrappers
rename them, and negative controls that must stay quiet."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from ckpt_tools.diff import compare
from ckpt_tools.infer import Inference, infer_rules
from ckpt_tools.meta import TensorMeta
from ckpt_tools.remap import Rule, apply_remap, rules_from_file
from ckpt_tools.targets import mapping_side, module_side, preset_side

pytestmark = pytest.mark.usefixtures("one_thread")


def renamed(metas: dict[str, TensorMeta], rename) -> dict[str, TensorMeta]:
    """A checkpoint listing: the same tensors under the names ``rename`` gives them."""
    return {rename(k): v.renamed(rename(k)) for k, v in metas.items()}


def rule_dicts(inference: Inference) -> list[dict]:
    return inference.to_dict()["inferred_rules"]


# ---------------------------------------------------------------------------------------------
# models


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=40, max_position_embeddings=64)
    with torch.device("meta"):
        return module_side(AutoModelForCausalLM.from_config(config))


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    # as close to the tiny OpenFlamingo's vision tower as GPT-2 gets: its width, 17 positions (the
    # tower's 4x4 patches + class token), a vocabulary the size of the tiny tokenizer
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=17, vocab_size=36, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        return module_side(GPT2LMHeadModel(config))


@pytest.fixture(scope="module")
def flamingo_tiny():
    return preset_side("openflamingo-tiny", cached=False)


@pytest.fixture(scope="module")
def reference_state_dict():
    """What ``torch.save(model.state_dict())`` holds for OpenFlamingo's own model with the tiny configs."""
    try:  # the reference pins old torch; it is installed with --no-deps for the parity tests
        from open_flamingo.src.flamingo import Flamingo as RefFlamingo
        from open_flamingo.src.flamingo_lm import FlamingoLMMixin
        from open_flamingo.src.utils import extend_instance
    except Exception as exc:  # noqa: BLE001 - any import failure means: no reference to compare with
        pytest.skip(f"reference OpenFlamingo not importable ({type(exc).__name__}: {exc})")
    import open_clip
    from transformers import AutoConfig, AutoModelForCausalLM

    from model.registry import TINY, TINY_CLIP_CONFIG, TINY_EVERY_N, TINY_LM_CONFIG

    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP_CONFIG)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**dict(TINY_LM_CONFIG, vocab_size=TINY.tokenizer_length)))
    clip.visual.output_tokens = True
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("transformer.blocks")
    ref = RefFlamingo(clip, lm, TINY.eoc_token_id, TINY.media_token_id, vis_dim=32,
                      cross_attn_every_n_layers=TINY_EVERY_N)
    return ref.state_dict()


# ---------------------------------------------------------------------------------------------
# (a) a full OpenFlamingo state dict


@pytest.fixture(scope="module")
def full_flamingo(reference_state_dict, flamingo_tiny):
    checkpoint = mapping_side(reference_state_dict, "open_flamingo state_dict")  # aliases found by storage
    inference = infer_rules(checkpoint.metas, flamingo_tiny.metas, checkpoint_aliases=checkpoint.groups,
                            target_aliases=flamingo_tiny.groups)
    return checkpoint, inference


def test_full_openflamingo_state_dict_loses_decoder_layer_and_drops_its_alias_names(full_flamingo):
    _, inference = full_flamingo
    assert rule_dicts(inference) == [
        {"rename": ["\\.decoder_layer\\.", "."], "maps": 24},
        {"drop": ["lang_encoder.gated_cross_attn_layers.*", "lang_encoder.old_decoder_blocks.*"], "maps": 46},
    ]


def test_full_openflamingo_state_dict_fits_every_key_with_the_rules(full_flamingo, flamingo_tiny):
    _, inference = full_flamingo
    assert (inference.matched_before, inference.unexpected_before, inference.missing_before) == (125, 70, 24)
    assert (inference.matched_after, inference.unexpected_after, inference.missing_after) == (149, 0, 0)
    assert inference.matched_after == len(flamingo_tiny.groups)


def test_the_diff_with_the_inferred_rules_is_ok_with_nothing_left_over(full_flamingo, flamingo_tiny):
    checkpoint, inference = full_flamingo
    report = compare(checkpoint, flamingo_tiny, remap=inference.rules)
    assert report.verdict == "ok"
    assert report.counts["unexpected"] == 0
    assert report.counts["matched"] == 149


def test_summary_says_how_many_rules_and_what_they_give(full_flamingo):
    assert full_flamingo[1].summary() == "with these 2 rules: 149 matched, 0 unexpected"


def test_markdown_shows_each_rule_as_the_flag_that_says_it(full_flamingo):
    assert "| `--rename '\\.decoder_layer\\.=.'` | 24 |" in full_flamingo[1].to_markdown()


def test_rules_file_reads_back_to_the_same_rules(full_flamingo, tmp_path):
    inference = full_flamingo[1]
    path = tmp_path / "inferred.toml"
    path.write_text(inference.to_toml(), encoding="utf-8")
    assert [(r.kind, r.args) for r in rules_from_file(path)] == [(r.kind, r.args) for r in inference.rules]


def test_rules_file_round_trip_of_quotes_backslashes_and_prefixes(tmp_path):
    rules = [Rule("rename", ("^it's\\.(\\d+)\\.", "its.\\1."), "inferred"), Rule("strip_prefix", ("module.",), "inferred"),
             Rule("drop", ("a[[]0].*", 'say "x".*'), "inferred")]
    inference = Inference(rules, [1, 2, 3], 0, 3, 3, 0, 3, 0)
    path = tmp_path / "rules.toml"
    path.write_text(inference.to_toml(), encoding="utf-8")
    assert [(r.kind, r.args) for r in rules_from_file(path)] == [(r.kind, r.args) for r in rules]


# ---------------------------------------------------------------------------------------------
# (b) timm: original Swin checkpoints against timm's Swin


@pytest.fixture(scope="module")
def swin():
    import timm

    with torch.device("meta"):
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
                                  depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=10)
    return model, module_side(model)


def original_swin_name(key: str) -> str:
    """The rename timm's ``swin_transformer.checkpoint_filter_fn`` undoes for the original (Microsoft)
    checkpoints: they downsample at the end of a stage (``layers.N.downsample``), timm at the start of
    the next (``layers.N+1.downsample``), and their classifier is ``head``, timm's ``head.fc``."""
    key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
    return key.replace("head.fc.", "head.")


def test_original_swin_downsample_shift_and_head_become_rules(swin):
    model, target = swin
    checkpoint = renamed(target.metas, original_swin_name)
    # the original files also keep the relative position index, a buffer timm no longer saves
    for name, buffer in model.named_buffers():
        if name.endswith("relative_position_index"):
            checkpoint[name] = TensorMeta.of(name, buffer.shape, "I64")
    inference = infer_rules(checkpoint, target.metas, target_aliases=target.groups)
    assert rule_dicts(inference) == [
        {"rename": ["^layers\\.2\\.downsample\\.", "layers.3.downsample."], "maps": 3},
        {"rename": ["^layers\\.1\\.downsample\\.", "layers.2.downsample."], "maps": 3},
        {"rename": ["^layers\\.0\\.downsample\\.", "layers.1.downsample."], "maps": 3},
        {"rename": ["^head\\.", "head.fc."], "maps": 2},
    ]
    assert (inference.matched_after, inference.unexpected_after, inference.missing_after) == (69, 4, 0)


# ---------------------------------------------------------------------------------------------
# (c) an open_clip vision tower against transformers' CLIPVisionModel


@pytest.fixture(scope="module")
def clip_towers():
    import open_clip
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from model.registry import TINY_CLIP_CONFIG

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    with torch.device("meta"):
        hf = module_side(CLIPVisionModel(config))
        ours = module_side(open_clip.CLIP(**TINY_CLIP_CONFIG).visual)
    return ours, hf, infer_rules(ours.metas, hf.metas, target_aliases=hf.groups)


def test_open_clip_tower_gets_transformers_names_where_shapes_allow(clip_towers):
    assert rule_dicts(clip_towers[2]) == [
        {"rename": ["\\.c_fc\\.", ".fc1."], "maps": 4},
        {"rename": ["\\.c_proj\\.", ".fc2."], "maps": 4},
        {"rename": ["\\.attn\\.", ".self_attn."], "maps": 8},
        {"rename": ["\\.ln_1\\.", ".layer_norm1."], "maps": 4},
        {"rename": ["\\.ln_2\\.", ".layer_norm2."], "maps": 4},
        {"rename": ["^transformer\\.resblocks\\.", "encoder.layers."], "maps": 24},
        {"rename": ["^ln_pre\\.", "pre_layrnorm."], "maps": 2},
        {"rename": ["^ln_post\\.", "post_layernorm."], "maps": 2},
        {"rename": ["^class_embedding$", "embeddings.class_embedding"], "maps": 1},
        {"rename": ["^positional_embedding$", "embeddings.position_embedding.weight"], "maps": 1},
        {"rename": ["^conv1\\.", "embeddings.patch_embedding."], "maps": 1},
    ]


def test_open_clip_fused_attention_and_projection_stay_unexpected(clip_towers):
    ours, hf, inference = clip_towers
    names = apply_remap(ours.metas, inference.rules).mapping.values()
    assert sorted(n for n in names if n not in hf.metas) == [
        "encoder.layers.0.self_attn.in_proj_bias", "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.1.self_attn.in_proj_bias", "encoder.layers.1.self_attn.in_proj_weight", "proj"]


def test_transformers_split_attention_stays_missing(clip_towers):
    ours, hf, inference = clip_towers
    names = set(apply_remap(ours.metas, inference.rules).mapping.values())
    assert sorted(set(hf.metas) - names) == [f"encoder.layers.{i}.self_attn.{p}_proj.{leaf}"
                                             for i in (0, 1) for p in "kqv" for leaf in ("bias", "weight")]


# ---------------------------------------------------------------------------------------------
# (d) a layer offset, (e) PEFT prefixes, (f) a refactor, tail rules


def test_layers_saved_one_up_get_one_rename_per_index_in_chain_order(llama):
    checkpoint = renamed(llama.metas, lambda k: re.sub(r"^model\.layers\.(\d+)\.",
                                                       lambda m: f"model.layers.{int(m.group(1)) + 1}.", k))
    inference = infer_rules(checkpoint, llama.metas, target_aliases=llama.groups)
    assert rule_dicts(inference) == [
        {"rename": ["^model\\.layers\\.1\\.", "model.layers.0."], "maps": 9},
        {"rename": ["^model\\.layers\\.2\\.", "model.layers.1."], "maps": 9},
        {"rename": ["^model\\.layers\\.3\\.", "model.layers.2."], "maps": 9},
    ]
    assert (inference.matched_after, inference.unexpected_after, inference.missing_after) == (30, 0, 0)


def peft_lora_names(metas: dict[str, TensorMeta], rank: int = 4) -> dict[str, TensorMeta]:
    """A PeftModel's state dict for LoRA on q_proj and v_proj: everything under ``base_model.model.``,
    the adapted layer's own weight under ``base_layer``, and the adapter's A and B matrices."""
    out: dict[str, TensorMeta] = {}
    for key, meta in metas.items():
        module, leaf = key.rsplit(".", 1)
        if not module.endswith(("q_proj", "v_proj")):
            out[f"base_model.model.{key}"] = meta.renamed(f"base_model.model.{key}")
            continue
        name = f"base_model.model.{module}.base_layer.{leaf}"
        out[name] = meta.renamed(name)
        rows, cols = meta.shape
        for adapter, shape in (("lora_A", (rank, cols)), ("lora_B", (rows, rank))):
            name = f"base_model.model.{module}.{adapter}.default.weight"
            out[name] = TensorMeta.of(name, shape, meta.dtype)
    return out


def test_peft_prefix_and_base_layer_are_removed_and_adapters_stay(llama):
    inference = infer_rules(peft_lora_names(llama.metas), llama.metas, target_aliases=llama.groups)
    assert rule_dicts(inference) == [
        {"rename": ["\\.base_layer\\.", "."], "maps": 6},
        {"strip_prefix": "base_model.model.", "maps": 42},
    ]
    assert (inference.matched_after, inference.unexpected_after, inference.missing_after) == (30, 12, 0)


def test_base_rules_run_first_and_are_not_repeated(llama):
    base = [Rule("strip_prefix", ("base_model.model.",), "--strip-prefix")]
    inference = infer_rules(peft_lora_names(llama.metas), llama.metas, target_aliases=llama.groups, base_rules=base)
    assert rule_dicts(inference) == [{"rename": ["\\.base_layer\\.", "."], "maps": 6}]
    assert inference.matched_before == 24


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)


class OldBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.mlp = nn.Linear(width, 2 * width)


class NewBlock(nn.Module):
    """The block after the refactor: ``attn`` is now ``attention``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = Attention(width)
        self.mlp = nn.Linear(width, 2 * width)


class OldNet(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.layers = nn.ModuleList(OldBlock(width) for _ in range(depth))


class NewNet(nn.Module):
    """The model after the refactor: ``layers`` is now ``blocks``."""

    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.blocks = nn.ModuleList(NewBlock(width) for _ in range(depth))


def test_layers_to_blocks_and_attn_to_attention_refactor():
    with torch.device("meta"):
        old, new = module_side(OldNet()), module_side(NewNet())
    inference = infer_rules(old.metas, new.metas)
    assert rule_dicts(inference) == [
        {"rename": ["\\.attn\\.", ".attention."], "maps": 12},
        {"rename": ["^layers\\.", "blocks."], "maps": 24},
    ]
    assert (inference.matched_after, inference.unexpected_after, inference.missing_after) == (25, 0, 0)


def test_tail_rules_are_not_inferred_again():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           vocab_size=40, max_position_embeddings=64, tie_word_embeddings=False)
    with torch.device("meta"):
        target = module_side(AutoModelForCausalLM.from_config(config))
    # a DDP training checkpoint from before transformers 5 renamed GPT-NeoX's embed_out to lm_head
    checkpoint = renamed(target.metas, lambda k: "module." + k.replace("lm_head.", "embed_out."))
    preset = [Rule("rename", ("^embed_out\\.", "lm_head."), "model preset")]
    inference = infer_rules(checkpoint, target.metas, tail_rules=preset)
    assert rule_dicts(inference) == [{"strip_prefix": "module.", "maps": 28}]
    assert inference.matched_after == 28


# ---------------------------------------------------------------------------------------------
# negative controls


def test_gpt2_against_a_vit_gets_no_rule(gpt2):
    import timm

    with torch.device("meta"):
        vit = module_side(timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2,
                                            num_heads=2, img_size=32, patch_size=8, num_classes=10))
    inference = infer_rules(gpt2.metas, vit.metas, checkpoint_aliases=gpt2.groups, target_aliases=vit.groups)
    assert inference.rules == []
    assert inference.note.startswith("no rules suggested")


def test_gpt2_against_the_tiny_openflamingo_gets_no_rule(gpt2, flamingo_tiny):
    # its blocks share the vision tower's width, layer norms and MLP biases: shapes alone would move
    # transformer.h. to vision_encoder.transformer.resblocks.
    inference = infer_rules(gpt2.metas, flamingo_tiny.metas, checkpoint_aliases=gpt2.groups,
                            target_aliases=flamingo_tiny.groups)
    assert rule_dicts(inference) == []
    assert (inference.matched_after, inference.unexpected_after) == (0, 29)


def test_two_equally_plausible_pairings_are_reported_not_guessed(llama):
    # Meta's LLaMA names the two input projections of the MLP w1 and w3; both have the shape of
    # gate_proj and of up_proj, and nothing in the names says which is which
    checkpoint = renamed(llama.metas, lambda k: k.replace(".mlp.gate_proj.", ".mlp.w1.").replace(".mlp.up_proj.", ".mlp.w3."))
    inference = infer_rules(checkpoint, llama.metas, target_aliases=llama.groups)
    assert inference.rules == []
    assert inference.ambiguous == [
        {"side": "checkpoint", "key": f"model.layers.{i}.mlp.{w}.weight",
         "candidates": [f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"]}
        for i in range(3) for w in ("w1", "w3")]


def test_a_checkpoint_that_already_fits_gets_no_rule(llama):
    inference = infer_rules(llama.metas, llama.metas, target_aliases=llama.groups)
    assert inference.to_dict()["inferred_rules"] == []
    assert inference.summary() == "no rule inferred: 30 matched, 0 unexpected, 0 missing"


def test_alias_names_alone_are_not_worth_a_rule(llama):
    checkpoint = dict(llama.metas)
    checkpoint["copy.of.norm.weight"] = llama.metas["model.norm.weight"].renamed("copy.of.norm.weight")
    inference = infer_rules(checkpoint, llama.metas, target_aliases=llama.groups,
                            checkpoint_aliases=[["model.norm.weight", "copy.of.norm.weight"]])
    assert inference.rules == []


# ---------------------------------------------------------------------------------------------
# rule forms


def listing(shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorMeta]:
    return {k: TensorMeta.of(k, s, "F32") for k, s in shapes.items()}


def test_old_layernorm_leaf_names_become_leaf_renames():
    model = listing({f"enc.{i}.{m}.{leaf}": (8, 8) if m == "fc" else (8,)
                     for i in range(3) for m, leaves in (("norm", ("weight", "bias")), ("fc", ("weight",)))
                     for leaf in leaves})
    old = renamed(model, lambda k: k.replace("norm.weight", "norm.gamma").replace("norm.bias", "norm.beta"))
    assert rule_dicts(infer_rules(old, model)) == [{"rename": ["\\.beta$", ".bias"], "maps": 3},
                                                   {"rename": ["\\.gamma$", ".weight"], "maps": 3}]


def test_an_inserted_numbered_segment_is_found_beside_a_same_numbered_rename():
    # diffusers' old attention names: query -> to_q, and the output projection moved into a list
    model = listing({f"b.{i}.attn.{p}": s for i in range(2)
                     for p, s in (("to_q.weight", (8, 8)), ("to_out.0.weight", (8, 8)), ("to_out.0.bias", (8,)))})
    old = renamed(model, lambda k: k.replace("to_out.0", "to_out").replace("to_q", "query"))
    assert rule_dicts(infer_rules(old, model)) == [{"rename": ["\\.to_out\\.", ".to_out.0."], "maps": 4},
                                                   {"rename": ["\\.query\\.", ".to_q."], "maps": 2}]


def test_fsdp_wrappers_at_two_depths(llama):
    def wrapped(key: str) -> str:
        return "_fsdp_wrapped_module." + re.sub(r"^(model\.layers\.\d+)\.", r"\1._fsdp_wrapped_module.", key)

    inference = infer_rules(renamed(llama.metas, wrapped), llama.metas, target_aliases=llama.groups)
    assert rule_dicts(inference) == [{"rename": ["\\._fsdp_wrapped_module\\.", "."], "maps": 27},
                                     {"strip_prefix": "_fsdp_wrapped_module.", "maps": 30}]


def test_an_index_at_the_end_of_the_key_shifts_with_a_lookahead():
    model = listing({f"scales.{i}": (i + 2,) for i in range(3)} | {"w": (3, 3)})
    old = listing({f"scales.{i + 1}": (i + 2,) for i in range(3)} | {"w": (3, 3)})
    assert rule_dicts(infer_rules(old, model)) == [
        {"rename": ["^scales\\.1(?=\\.|$)", "scales.0"], "maps": 1},
        {"rename": ["^scales\\.2(?=\\.|$)", "scales.1"], "maps": 1},
        {"rename": ["^scales\\.3(?=\\.|$)", "scales.2"], "maps": 1}]


def test_a_layer_that_fits_at_several_offsets_is_ambiguous():
    model = listing({f"layers.{i}.w": (4, 4) for i in range(4)} | {"head.w": (2, 4)})
    old = listing({"layers.7.w": (4, 4), "head.w": (2, 4)})
    inference = infer_rules(old, model)
    assert inference.rules == []
    assert inference.ambiguous == [{"side": "checkpoint", "key": "layers.7.w",
                                    "candidates": ["layers.0.w", "layers.1.w", "layers.2.w", "layers.3.w"]}]


# ---------------------------------------------------------------------------------------------
# in the diff, the CLI and the presets


def test_the_presets_read_a_full_openflamingo_state_dict(reference_state_dict, flamingo_tiny):
    report = compare(mapping_side(reference_state_dict, "full"), flamingo_tiny)
    assert (report.verdict, report.counts["matched"], report.inference) == ("ok", 149, None)


@pytest.fixture(scope="module")
def renamed_flamingo(reference_state_dict, tmp_path_factory):
    """The full state dict after a refactor renamed the perceiver's layers (``layers`` -> ``blocks``),
    its gates opened as training does (a closed gate means the cross-attention never landed)."""
    import copy

    state = copy.deepcopy(reference_state_dict)  # keeps the alias names on shared tensors
    for key, value in state.items():
        if key.endswith(("attn_gate", "ff_gate")):
            value.fill_(0.5)
    renamed = {k.replace("perceiver.layers.", "perceiver.blocks."): v for k, v in state.items()}
    path = tmp_path_factory.mktemp("renamed") / "renamed.pt"
    torch.save(renamed, path)
    return path


def test_a_renamed_checkpoint_fails_and_says_which_rules_make_it_ok(renamed_flamingo, run_cli):
    result = run_cli("diff", renamed_flamingo, "--model", "openflamingo-tiny", "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["inferred_rules"] == [{"rename": ["^perceiver\\.blocks\\.", "perceiver.layers."], "maps": 66}]
    assert data["inference"]["with_rules"]["verdict"] == "ok"


def test_auto_remap_applies_the_inferred_rules_and_says_so(renamed_flamingo, run_cli):
    result = run_cli("diff", renamed_flamingo, "--model", "openflamingo-tiny", "--auto-remap", "--format", "json")
    assert result.exit_code == 0, result.stdout[-2000:]
    data = json.loads(result.stdout)
    assert (data["verdict"], data["auto_remap"], len(data["inferred_rules"])) == ("ok", True, 1)


def test_written_rules_make_the_checkpoint_fit_in_every_command(renamed_flamingo, run_cli, tmp_path):
    rules = tmp_path / "fix.toml"
    written = run_cli("diff", renamed_flamingo, "--model", "openflamingo-tiny", "--write-rules", rules)
    assert f"wrote 1 inferred rule to {rules}" in written.stderr
    assert run_cli("diff", renamed_flamingo, "--model", "openflamingo-tiny", "--rules", rules).exit_code == 0
    converted = run_cli("convert", renamed_flamingo, tmp_path / "fit.safetensors", "--rules", rules)
    assert converted.exit_code == 0, converted.stderr
    assert run_cli("diff", tmp_path / "fit.safetensors", "--model", "openflamingo-tiny").exit_code == 0


def test_convert_with_auto_remap_names_the_rules_it_applied(renamed_flamingo, run_cli, tmp_path):
    result = run_cli("convert", renamed_flamingo, tmp_path / "auto.safetensors", "--auto-remap",
                     "--model", "openflamingo-tiny", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["inferred_rules"] == [{"rename": ["^perceiver\\.blocks\\.", "perceiver.layers."]}]


def test_validate_with_auto_remap_and_convert_names_the_rules_the_conversion_applied(renamed_flamingo, run_cli,
                                                                                      tmp_path):
    result = run_cli("validate", renamed_flamingo, "--model", "openflamingo-tiny", "--auto-remap",
                     "--convert", tmp_path / "auto.safetensors", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["conversion"]["inferred_rules"] == [
        {"rename": ["^perceiver\\.blocks\\.", "perceiver.layers."]}]


def test_load_checkpoint_with_auto_remap_lands_every_tensor(renamed_flamingo):
    from ckpt_tools import load_checkpoint
    from ckpt_tools.presets import get_preset

    preset = get_preset("openflamingo-tiny")
    report = load_checkpoint(renamed_flamingo, preset.build(device="meta"), preset=preset, auto_remap=True)
    assert (report.load["verified"], report.auto_remapped) == (True, True)
