"""A zoo of real training checkpoints, one builder per framework.

Each ``build_<name>(folder)`` trains a tiny model for one step with the framework itself where it
installs from the package index (the ``zoo`` extra), else writes the structure its save code
writes (the function it mirrors is named in the builder), and returns a ``ZooCase``: where the file
is, the state dict a reader must find in it, and what else a report must list. Builders read no
pickle back; what they expect comes from the objects they handed to the framework.

``python tests/zoo.py deepspeed-child FOLDER`` is the DeepSpeed run itself: DeepSpeed needs a
process group and rank variables in the environment, so it runs in a child process that leaves the
test session untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import socket
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class ZooCase:
    """One framework's checkpoint and what reading it must give.

    name          short id (test ids, table rows)
    framework     who wrote it
    version       the writer's version, or "reproduced from <pkg> <version> <function>"
    path          what a user passes: the file, or the folder for folder checkpoints
    state         {key: tensor} the model's weights as the file names them (prefixes kept)
    selected      file: dotted path of the weights in the pickle (None = the root object);
                  folder: the name of the file that holds the weights
    alternatives  dotted paths of other state dicts in the file (EMA copies)
    extras        top-level entries beside the weights that a report must list (those every version
                  in the zoo extra's range writes; newer versions add a few, e.g. timm's `saver`)
    not_executed  dotted names of the globals that must be read without being run
    other_files   folder: the other files a report must list
    """

    name: str
    framework: str
    version: str
    path: Path
    state: dict[str, Any]
    selected: str | None
    alternatives: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    not_executed: tuple[str, ...] = ()
    other_files: tuple[str, ...] = ()

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()


# -- shared pieces --

def _snapshot(state: dict) -> dict:
    """Detached copies, so later training steps cannot change what the case expects."""
    return {key: value.detach().clone() for key, value in state.items()}


def _batch(features: int = 4, classes: int = 2, rows: int = 4):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, features, generator=generator), torch.randint(0, classes, (rows,), generator=generator)


def _mlp():
    """Linear + BatchNorm: parameters and buffers (running stats, an int64 step counter)."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _version(package: str) -> str:
    from importlib.metadata import version

    return f"{package} {version(package)}"


def _dotted(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


@contextlib.contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """``folder`` on sys.path while a module written there is imported, and off it afterwards."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


# -- PyTorch Lightning --

def build_lightning(folder: Path) -> ZooCase:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class TinyClassifier(pl.LightningModule):
        # The script's parsed arguments passed whole: save_hyperparameters() records the init
        # arguments, so the Namespace itself lands in the checkpoint. (Passing the Namespace to
        # save_hyperparameters(args) instead stores a plain dict in 2.x.)
        def __init__(self, args: argparse.Namespace, hidden: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = _mlp()

        def training_step(self, batch, batch_index):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.args.lr)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}

    torch.manual_seed(0)
    model = TinyClassifier(argparse.Namespace(lr=1e-2, run="zoo"))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(folder),
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(folder / "auto"))])
    trainer.fit(model, DataLoader(TensorDataset(*_batch()), batch_size=4))
    path = folder / "tiny.ckpt"
    trainer.save_checkpoint(path)  # the default keeps optimizer, scheduler, loop and callback states
    return ZooCase(
        name="lightning", framework="PyTorch Lightning", version=_version("pytorch-lightning"), path=path,
        state=_snapshot(model.state_dict()), selected="state_dict",
        extras=("epoch", "global_step", "pytorch-lightning_version", "loops", "callbacks", "optimizer_states",
                "lr_schedulers", "hparams_name", "hyper_parameters"),
        not_executed=("argparse.Namespace",))


# -- timm --

def build_timm(folder: Path) -> ZooCase:
    import timm
    import torch
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver, ModelEmaV3

    torch.manual_seed(0)
    args = argparse.Namespace(model="vit_tiny_patch16_224", lr=1e-3, epochs=1, model_ema=True, model_ema_decay=0.9)
    model = timm.create_model(args.model, pretrained=False, img_size=16, patch_size=8, embed_dim=16, depth=1,
                              num_heads=2, num_classes=3)
    ema = ModelEmaV3(model, decay=args.model_ema_decay)
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 2])).backward()
    optimizer.step()
    ema.update(model, step=1)
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=ema,
                            checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=0, metric=0.5)
    return ZooCase(
        name="timm", framework="timm CheckpointSaver", version=_version("timm"), path=folder / "last.pth.tar",
        state=_snapshot(model.state_dict()), selected="state_dict", alternatives=("state_dict_ema",),
        extras=("epoch", "arch", "optimizer", "version", "args", "metric"),
        not_executed=("argparse.Namespace",))


# -- Hugging Face Trainer --

HF_TRAINER_FILES = ("config.json", "generation_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                    "training_args.bin", "trainer_state.json")


def build_hf_trainer(folder: Path) -> ZooCase:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    # Untied head: the saved file then holds every tensor of state_dict() under its own name.
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(folder), max_steps=1, save_strategy="steps", save_steps=1,
                             per_device_train_batch_size=2, report_to="none", use_cpu=True, logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    Trainer(model=model, args=args, train_dataset=rows).train()
    return ZooCase(
        name="hf-trainer", framework="Hugging Face Trainer", version=_version("transformers"),
        path=folder / "checkpoint-1", state=_snapshot(model.state_dict()), selected="model.safetensors",
        other_files=HF_TRAINER_FILES)


# -- accelerate --

ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def build_accelerate(folder: Path) -> ZooCase:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    torch.manual_seed(0)
    try:
        accelerator = Accelerator(cpu=True)
        model = _mlp()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        x, y = _batch()
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        path = folder / "state"
        accelerator.save_state(str(path))
        state = _snapshot(accelerator.unwrap_model(model).state_dict())
    finally:
        # accelerate keeps its state in process-wide singletons; later Trainer runs build their own.
        AcceleratorState._reset_state(reset_partial_state=True)
    return ZooCase(
        name="accelerate", framework="accelerate save_state", version=_version("accelerate"), path=path,
        state=state, selected="model.safetensors", other_files=ACCELERATE_FILES)


# -- DeepSpeed --

DEEPSPEED_EXTRAS = ("buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                    "lr_scheduler", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                    "ds_config", "ds_version")


def build_deepspeed(folder: Path) -> ZooCase:
    from safetensors.torch import load_file

    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    done = subprocess.run([sys.executable, str(HERE), "deepspeed-child", str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the DeepSpeed run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return ZooCase(
        name="deepspeed", framework="DeepSpeed (ZeRO-1)", version=_version("deepspeed"),
        path=folder / "ds" / "global_step1" / "mp_rank_00_model_states.pt",
        state=load_file(folder / "expected.safetensors"), selected="module", extras=DEEPSPEED_EXTRAS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deepspeed_child(folder: Path) -> None:
    import deepspeed
    import torch
    from safetensors.torch import save_file

    # The shared-memory all-reduce op is a C++ extension built on first use; one rank never
    # communicates, so skip a 40 s compile on a fresh machine.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(0)
    model = _mlp()
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2}},
        "zero_optimization": {"stage": 1},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x, y = _batch()
    engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
    engine.step()
    engine.save_checkpoint(str(folder / "ds"), tag="global_step1")
    save_file({k: v.contiguous() for k, v in _snapshot(engine.module.state_dict()).items()},
              folder / "expected.safetensors")
    deepspeed.comm.destroy_process_group()


# -- nanoGPT --

def _nano_gpt():
    """A one-block GPT with nanoGPT's parameter names and its tied input/output embedding."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.attn = nn.ModuleDict({"c_attn": nn.Linear(width, 3 * width), "c_proj": nn.Linear(width, width)})
            self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)})

        def forward(self, x):
            q, k, v = self.attn["c_attn"](self.ln_1(x)).split(x.shape[-1], dim=2)
            x = x + self.attn["c_proj"](nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
            return x + self.mlp["c_proj"](nn.functional.gelu(self.mlp["c_fc"](self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self, vocab: int = 32, block: int = 8, width: int = 8) -> None:
            super().__init__()
            self.transformer = nn.ModuleDict({"wte": nn.Embedding(vocab, width), "wpe": nn.Embedding(block, width),
                                              "h": nn.ModuleList([Block(width)]), "ln_f": nn.LayerNorm(width)})
            self.lm_head = nn.Linear(width, vocab, bias=False)
            self.transformer["wte"].weight = self.lm_head.weight

        def forward(self, idx, targets):
            import torch

            t = self.transformer
            x = t["wte"](idx) + t["wpe"](torch.arange(idx.shape[1]))
            logits = self.lm_head(t["ln_f"](t["h"][0](x)))
            return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return GPT()


def build_nanogpt(folder: Path) -> ZooCase:
    import torch

    torch.manual_seed(0)
    raw = _nano_gpt()
    model_args = dict(n_layer=1, n_head=1, n_embd=8, block_size=8, bias=True, vocab_size=32, dropout=0.0)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=1e-3, betas=(0.9, 0.95))
    # nanoGPT compiles before saving; backend "eager" traces with dynamo without generating code.
    model = torch.compile(raw, backend="eager")
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    model(idx, idx.roll(-1, dims=1)).backward()
    optimizer.step()
    with torch.no_grad():
        best_val_loss = model(idx, idx.roll(-1, dims=1))
    config = {"out_dir": str(folder), "eval_interval": 1, "batch_size": 2, "learning_rate": 1e-3,
              "compile": True, "dataset": "zoo", "dtype": "float32"}
    # Mirrors karpathy/nanoGPT train.py (master): the dict saved to out_dir/ckpt.pt, where
    # raw_model is the compiled module (hence `_orig_mod.` keys) and best_val_loss is the 0-d
    # tensor estimate_loss() returned.
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": 1,
        "best_val_loss": best_val_loss,
        "config": config,
    }
    path = folder / "ckpt.pt"
    torch.save(checkpoint, path)
    return ZooCase(
        name="nanogpt", framework="nanoGPT", version="reproduced from karpathy/nanoGPT train.py (master) checkpoint",
        path=path, state=_snapshot(checkpoint["model"]), selected="model",
        extras=("optimizer", "model_args", "iter_num", "best_val_loss", "config"))


# -- fairseq --

def _fairseq_lm(vocab: int = 16, width: int = 8):
    """A one-layer decoder with fairseq's transformer_lm names, its `version` buffer and tied output."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
                setattr(self, name, nn.Linear(width, width))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attention()
            self.self_attn_layer_norm = nn.LayerNorm(width)
            self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
            self.final_layer_norm = nn.LayerNorm(width)

        def forward(self, x):
            attn = self.self_attn
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            x = self.self_attn_layer_norm(x + attn.out_proj(nn.functional.scaled_dot_product_attention(q, k, v)))
            return self.final_layer_norm(x + self.fc2(torch.relu(self.fc1(x))))

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("version", torch.Tensor([3]))
            self.embed_tokens = nn.Embedding(vocab, width, padding_idx=1)
            self.layers = nn.ModuleList([Layer()])
            self.output_projection = nn.Linear(width, vocab, bias=False)
            self.output_projection.weight = self.embed_tokens.weight

        def forward(self, tokens):
            return self.output_projection(self.layers[0](self.embed_tokens(tokens)))

    class LanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = Decoder()

    return LanguageModel()


def build_fairseq(folder: Path) -> ZooCase:
    import torch
    from omegaconf import DictConfig, OmegaConf

    torch.manual_seed(0)
    model = _fairseq_lm()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.98))
    tokens = torch.randint(2, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(model.decoder(tokens).flatten(0, 1), tokens.flatten()).backward()
    optimizer.step()
    cfg = OmegaConf.create({
        "_name": None,
        "common": {"seed": 1, "fp16": False, "log_interval": 100},
        "checkpoint": {"save_dir": str(folder), "no_save_optimizer_state": False, "restore_file": "checkpoint_last.pt"},
        "task": {"_name": "language_modeling", "data": "data-bin/zoo", "tokens_per_sample": 6},
        "model": {"_name": "transformer_lm", "decoder_layers": 1, "decoder_embed_dim": 8,
                  "share_decoder_input_output_embed": True},
        "optimizer": {"_name": "adam", "adam_betas": "(0.9, 0.98)", "lr": [5e-4]},
        "lr_scheduler": {"_name": "inverse_sqrt", "warmup_updates": 4000},
    })
    # Mirrors fairseq checkpoint_utils.save_state (main, 2021, the Hydra-config era; called from
    # Trainer.save_checkpoint): cfg is stored as the DictConfig itself, args is the legacy slot.
    state = {
        "cfg": cfg,
        "args": None,
        "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": 2.5}, "num_updates": 1}],
        "extra_state": {"train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": 1, "shuffle": True},
                        "val_loss": 2.5, "best": 2.5, "metrics": OrderedDict(), "previous_training_time": 0.25},
        "last_optimizer_state": optimizer.state_dict(),
    }
    path = folder / "checkpoint_last.pt"
    torch.save(state, path)
    return ZooCase(
        name="fairseq", framework="fairseq",
        version=f"reproduced from fairseq checkpoint_utils.save_state (2021), {_version('omegaconf')}",
        path=path, state=_snapshot(state["model"]), selected="model",
        extras=("cfg", "args", "optimizer_history", "extra_state", "last_optimizer_state"),
        not_executed=_omegaconf_globals(DictConfig))


def _omegaconf_globals(dict_config) -> tuple[str, ...]:
    """The omegaconf classes a pickled DictConfig of plain values names: the containers, their
    metadata, and the node class of untyped values. (It also names builtins and typing.Any as
    type references; those are left out, a reader may resolve them.)"""
    from omegaconf import base, listconfig, nodes

    return (_dotted(dict_config), _dotted(listconfig.ListConfig), _dotted(base.ContainerMetadata),
            _dotted(base.Metadata), _dotted(nodes.AnyNode))


# -- OpenFlamingo --

def _flamingo_like():
    """A frozen vision tower and LM block, trained perceiver and gated cross-attention, and an
    input embedding, named as OpenFlamingo names them."""
    import torch
    from torch import nn

    class CrossAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_gate = nn.Parameter(torch.zeros(1))
            self.to_q = nn.Linear(4, 4, bias=False)
            self.ff_gate = nn.Parameter(torch.zeros(1))

    class Flamingo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_encoder = nn.Linear(4, 4)
            self.perceiver = nn.ModuleDict({"norm_media": nn.LayerNorm(4)})
            self.perceiver.latents = nn.Parameter(torch.randn(2, 4))
            self.lang_encoder = nn.Module()
            self.lang_encoder.transformer = nn.Module()
            self.lang_encoder.transformer.wte = nn.Embedding(8, 4)
            block = nn.Module()
            block.decoder_layer = nn.Linear(4, 4)
            block.gated_cross_attn_layer = CrossAttention()
            self.lang_encoder.transformer.blocks = nn.ModuleList([block])

    model = Flamingo()
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.transformer.blocks[0].gated_cross_attn_layer.requires_grad_(True)
    model.lang_encoder.transformer.wte.requires_grad_(True)
    return model


def _trainable_only(wrapped, state: dict) -> dict:
    """The rule open_flamingo.train.train_utils.filter_state_dict_to_trainable (2.0.1) applies:
    frozen parameters are dropped unless their name says embedding; the vision encoder is dropped."""
    frozen = {name for name, p in wrapped.named_parameters() if not p.requires_grad and "embed" not in name}
    return OrderedDict((k, v) for k, v in state.items() if k not in frozen and "vision_encoder" not in k)


def build_openflamingo(folder: Path) -> ZooCase:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    wrapped = torch.nn.ModuleDict({"module": _flamingo_like()})  # DDP's `module.` naming, without a process group
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=4)
    sum(p.sum() for p in trainable).backward()
    optimizer.step()
    scheduler.step()
    # Mirrors open_flamingo.train.train_utils.save_checkpoint (open-flamingo 2.0.1, not FSDP):
    # the trainable part of the DDP model's state dict, then the optimizer and scheduler states.
    checkpoint = {
        "epoch": 0,
        "model_state_dict": _trainable_only(wrapped, wrapped.state_dict()),
        "optimizer_state_dict": optimizer.state_dict(),
        "lr_scheduler_state_dict": scheduler.state_dict(),
    }
    path = folder / "checkpoint_0.pt"
    torch.save(checkpoint, path)
    return ZooCase(
        name="openflamingo", framework="OpenFlamingo training",
        version="reproduced from open-flamingo 2.0.1 open_flamingo.train.train_utils.save_checkpoint",
        path=path, state=_snapshot(checkpoint["model_state_dict"]), selected="model_state_dict",
        extras=("epoch", "optimizer_state_dict", "lr_scheduler_state_dict"))


# -- whole pickled modules --

_NET_SOURCE = '''
"""Written by the checkpoint zoo: a tiny conv net pickled whole. Importing it leaves a mark."""

import os

from torch import nn

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imported.log"), "a") as _log:
    _log.write(__name__ + "\\n")


class ConvBN(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.yaml = {"nc": 2, "depth_multiple": 0.33}
        self.names = ["cat", "dog"]
        self.model = nn.Sequential(ConvBN(3, 4), ConvBN(4, 4), nn.Conv2d(4, 7, 1))

    def forward(self, x):
        return self.model(x)
'''


def _net_module(folder: Path, name: str):
    """Write the net's module file into ``folder`` and import it under ``name``."""
    (folder / f"{name}.py").write_text(_NET_SOURCE)
    with _importable(folder):
        return importlib.import_module(name)


def _trained(model):
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def _module_globals(net, extra: tuple[type, ...] = ()) -> tuple[str, ...]:
    from torch import nn

    return tuple(_dotted(c) for c in (nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.SiLU, net.ConvBN, *extra))


def build_torch_save_module(folder: Path) -> ZooCase:
    import torch

    torch.manual_seed(0)
    net = _net_module(folder, "zoo_whole_net")
    model = torch.nn.Sequential(net.ConvBN(3, 4), net.ConvBN(4, 4), torch.nn.Conv2d(4, 7, 1))
    _trained(model)
    path = folder / "model.pt"
    torch.save(model, path)
    return ZooCase(
        name="torch-save-module", framework="torch.save(model)", version=_version("torch"), path=path,
        state=_snapshot(model.state_dict()), selected=None, not_executed=_module_globals(net))


def build_yolo(folder: Path) -> ZooCase:
    import copy
    from datetime import datetime

    import numpy as np
    import torch

    torch.manual_seed(0)
    net = _net_module(folder, "zoo_yolo_net")
    model = net.TinyDetector()
    optimizer = _trained(model)
    ema = copy.deepcopy(model).eval()
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.mul_(0.9).add_(p, alpha=0.1)
    # Mirrors ultralytics/yolov5 train.py (v7.0): whole modules in half precision beside the
    # optimizer state; best_fitness is the numpy array fitness() returns.
    checkpoint = {
        "epoch": 0,
        "best_fitness": np.array([0.25]),
        "model": copy.deepcopy(model).half(),
        "ema": copy.deepcopy(ema).half(),
        "updates": 1,
        "optimizer": optimizer.state_dict(),
        "opt": {"epochs": 1, "batch_size": 2, "imgsz": 8, "hyp": {"lr0": 0.1}},
        "git": {"remote": None, "branch": None, "commit": None},
        "date": datetime(2024, 1, 1).isoformat(),
    }
    path = folder / "last.pt"
    torch.save(checkpoint, path)
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    return ZooCase(
        name="yolo", framework="YOLOv5-style {'model': module}",
        version="reproduced from ultralytics/yolov5 v7.0 train.py checkpoint", path=path,
        state=_snapshot(checkpoint["model"].state_dict()), selected="model", alternatives=("ema",),
        extras=("epoch", "best_fitness", "updates", "optimizer", "opt", "git", "date"),
        not_executed=_module_globals(net, (net.TinyDetector,)) + (
            _dotted(reconstruct), _dotted(np.ndarray), _dotted(np.dtype)))


# -- the zoo --

BUILDERS: dict[str, Callable[[Path], ZooCase]] = {
    "lightning": build_lightning,
    "timm": build_timm,
    "hf-trainer": build_hf_trainer,
    "accelerate": build_accelerate,
    "deepspeed": build_deepspeed,
    "nanogpt": build_nanogpt,
    "fairseq": build_fairseq,
    "openflamingo": build_openflamingo,
    "torch-save-module": build_torch_save_module,
    "yolo": build_yolo,
}


def build_zoo(root: Path, names: list[str] | None = None) -> dict[str, ZooCase]:
    """Build the named cases (all by default), each in its own folder under ``root``."""
    cases = {}
    for name in names or list(BUILDERS):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        cases[name] = BUILDERS[name](folder)
    return cases


def describe(case: ZooCase) -> dict[str, Any]:
    """The case as JSON-able facts (for the table script and for debugging a failing build)."""
    return {"name": case.name, "framework": case.framework, "version": case.version, "path": str(case.path),
            "selected": case.selected, "tensors": len(case.state), "alternatives": list(case.alternatives),
            "extras": list(case.extras), "not_executed": list(case.not_executed),
            "other_files": list(case.other_files)}


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["deepspeed-child", "build"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "deepspeed-child":
        _deepspeed_child(args.folder)
    else:
        with contextlib.redirect_stdout(sys.stderr):  # frameworks print progress; stdout is the JSON
            cases = build_zoo(args.folder)
        print(json.dumps([describe(c) for c in cases.values()], indent=1))


if __name__ == "__main__":
    _main(sys.argv[1:])
