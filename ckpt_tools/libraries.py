"""Models from libraries, built as skeletons: a transformers config, a timm or open_clip
architecture, a user's own factory; and a transformers config read from the hub at one commit.

Nothing here runs code the user did not name. A transformers config whose model lives in its
repository's own code (``auto_map``, a class transformers does not have) is refused unless
``trust_remote_code`` is given, and every transformers call passes ``trust_remote_code``
explicitly, so it is never implied. timm and open_clip build architectures only (pretrained
weights off). A factory is the user's own code, run because they named it.

``device="meta"`` (the default) allocates no weights: a 7B model's skeleton builds in a tenth of
a second once torch and transformers are imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError
from .modelconfig import call_factory, find_factory
from .sources import HfReference, open_remote_file

CONFIG_NAME = "config.json"
# The auto class a transformers class name's task suffix stands for, tried when the name itself is
# not a transformers class (or none is named).
AUTO_BY_SUFFIX: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSeq2SeqLM", "AutoModelForSeq2SeqLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForImageClassification", "AutoModelForImageClassification"),
)
# When the config names no task: a language model if the model type has one, else the bare model.
DEFAULT_AUTO = ("AutoModelForCausalLM", "AutoModel")
REMOTE_CODE_FIX = ("pass --trust-remote-code (trust_remote_code=True) to run the repository's own code "
                   "to build it: only for a repository you trust")


@dataclass(frozen=True)
class HubConfig:
    """A config.json read from the hub, pinned: its data and the commit it was read at."""

    ref: HfReference  # at the commit
    data: dict[str, Any]

    @property
    def label(self) -> str:
        """The repository at its commit (and the config's path when it is not the root's)."""
        base = f"hf://{self.ref.repo_id}@{self.ref.revision}"
        return base if self.ref.path == CONFIG_NAME else f"{base}/{self.ref.path}"


def parse_config(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"invalid config.json: {exc}", path=where, fix="fix the JSON syntax") from None
    if not isinstance(data, dict):
        raise UsageError("a config.json must be a JSON object", path=where,
                         fix='a transformers config looks like {"model_type": "llama", ...}')
    return data


def is_transformers_config(data: Mapping[str, Any]) -> bool:
    """A transformers config names its model type or its architectures."""
    return "model_type" in data or "architectures" in data


def read_local_config(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the config ({exc.strerror})", path=str(path),
                         fix="check the path and its permissions") from None
    return parse_config(raw, str(path))


def fetch_hub_config(ref: HfReference, *, endpoint: str | None = None,
                     token: str | bool | None = None) -> HubConfig:
    """The config.json ``ref`` names, at the commit its revision resolves to (one HEAD, one range
    read, through the same hub code as every remote checkpoint; ``HF_ENDPOINT`` or ``endpoint``
    may be a ``ckpt serve`` mirror). Nothing else of the repository is fetched."""
    fileobj, commit = open_remote_file(ref, endpoint=endpoint, token=token)
    try:
        raw = fileobj.readall()
    finally:
        fileobj.close()
    pinned = HfReference(ref.repo_id, commit, ref.path)
    return HubConfig(pinned, parse_config(raw, str(pinned)))


def remote_code_digest(folder: Path | None) -> str:
    """What the repository's own code is, for a cache key: its .py files' bytes (a local folder)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")) if folder is not None else ():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# transformers


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("a transformers config needs the transformers package",
                         fix="pip install transformers") from None
    return transformers


def _attr(module, name: str):
    """A class of a package by name, or None (lazy packages raise other errors than AttributeError)."""
    try:
        return getattr(module, name)
    except (AttributeError, ImportError, RuntimeError, ModuleNotFoundError):
        return None


def transformers_model(data: Mapping[str, Any], *, where: str, model_class: str | None = None,
                       device: str = "meta", trust_remote_code: bool = False,
                       code_location: str | None = None, revision: str | None = None):
    """The model a transformers config describes, built with ``from_config`` (on ``device``).

    The class: ``model_class`` when given (a model class or an auto class of transformers), else
    the config's first ``architectures`` entry, else the auto class for its task. A model that only
    the repository's own code defines is refused unless ``trust_remote_code``; then the config and
    the code come from ``code_location`` (the folder, or the repo id at ``revision``).
    """
    transformers = _transformers()
    import torch

    if _needs_remote_code(transformers, data, model_class):
        if not trust_remote_code:
            raise UsageError(f"the model of this config is defined by its repository's own code "
                             f"(auto_map: {', '.join(sorted(data.get('auto_map') or {})) or 'none'}), "
                             "which is not run by default", path=where, fix=REMOTE_CODE_FIX)
        return _remote_model(transformers, data, where, model_class, device, code_location, revision)
    config = _config(transformers, data, where)
    with torch.device(device), _library_errors("transformers", where):
        return _from_config(transformers, config, data, model_class, where)


@contextlib.contextmanager
def _library_errors(library: str, where: str):
    """A library refusing to build from what the user gave becomes one line (bad input, exit 2)."""
    try:
        yield
    except UsageError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, NotImplementedError) as exc:
        raise UsageError(f"{library} could not build the model: {type(exc).__name__}: {exc}", path=where,
                         fix="check the target (and --model-class) against what the library supports") from exc


def _needs_remote_code(transformers, data: Mapping[str, Any], model_class: str | None) -> bool:
    if not data.get("auto_map"):
        return False
    from transformers import CONFIG_MAPPING

    if data.get("model_type") not in CONFIG_MAPPING:
        return True
    named = model_class or next(iter(data.get("architectures") or []), None)
    return named is not None and _attr(transformers, named) is None and _auto_for(named) is None


def _config(transformers, data: Mapping[str, Any], where: str):
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"transformers {transformers.__version__} knows no model_type {model_type!r}",
                         path=where, fix="upgrade transformers, or check the config's model_type")
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(data))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"transformers rejected the config: {exc}", path=where,
                         fix="check the config against its model type") from None


def _auto_for(name: str) -> str | None:
    for suffix, auto in AUTO_BY_SUFFIX:
        if name.endswith(suffix):
            return auto
    return None


def _from_config(transformers, config, data: Mapping[str, Any], model_class: str | None, where: str):
    named = model_class or next(iter(data.get("architectures") or []), None)
    cls = _attr(transformers, named) if named else None
    if cls is not None and not named.startswith("Auto"):
        return cls._from_config(config)  # what from_config does for a named class (dtype from the config)
    if model_class is not None and cls is None:
        raise UsageError(f"transformers {transformers.__version__} has no class {model_class!r}", path=where,
                         fix="pass a transformers model class (LlamaForCausalLM) or an auto class "
                             "(AutoModelForCausalLM) to --model-class")
    if cls is not None:  # an auto class was asked for
        autos = [named]
    else:  # a class transformers lacks (a fine-tune's own name): the auto class of its task
        autos = [auto for auto in (_auto_for(named) if named else None,) if auto] + list(DEFAULT_AUTO)
    for auto in autos:
        try:
            return getattr(transformers, auto).from_config(config, trust_remote_code=False)
        except ValueError:  # this auto class has no model for the config's type: try the next
            continue
    raise UsageError(f"{' and '.join(autos)} of transformers {transformers.__version__} hold no model for "
                     f"model_type {data.get('model_type')!r}", path=where,
                     fix="pass the model class with --model-class NAME")


def _remote_model(transformers, data: Mapping[str, Any], where: str, model_class: str | None, device: str,
                  code_location: str | None, revision: str | None):
    """The model the repository's own code defines (the user opted in): transformers imports the
    code from the folder, or fetches it from the hub at ``revision`` (HF_ENDPOINT applies)."""
    import torch

    if code_location is None:
        raise UsageError("the repository's code cannot be found", path=where,
                         fix="pass the model's folder or hf://ORG/NAME, not a lone config.json")
    config = transformers.AutoConfig.from_pretrained(code_location, revision=revision, trust_remote_code=True)
    auto_map = data.get("auto_map") or {}
    named = model_class or next((a for a in (_auto_for(n) for n in data.get("architectures") or []) if a in auto_map),
                                None) or next((a for a in (*DEFAULT_AUTO, *auto_map) if a in auto_map and
                                               a.startswith("AutoModel")), None)
    if named is None:
        raise UsageError("the repository's auto_map names no model class", path=where,
                         fix="pass the auto class with --model-class NAME")
    with torch.device(device), _library_errors("the repository's code", where):
        return getattr(transformers, named).from_config(config, trust_remote_code=True)


# ---------------------------------------------------------------------------------------------
# timm, open_clip, a factory


def timm_model(name: str, *, device: str = "meta"):
    """A timm architecture with ``pretrained=False``."""
    try:
        import timm
    except ImportError:
        raise UsageError("a timm: target needs the timm package", fix="pip install timm") from None
    import torch

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        raise UsageError(f"timm {timm.__version__} has no model {name!r}", path=f"timm:{name}",
                         fix=f"one of: {', '.join(close)}" if close else "see timm.list_models()")
    with torch.device(device), _library_errors("timm", f"timm:{name}"):
        return timm.create_model(name, pretrained=False)


def open_clip_model(name: str, *, device: str = "meta"):
    """An open_clip architecture with ``pretrained=None``."""
    try:
        import open_clip
    except ImportError:
        raise UsageError("an open_clip: target needs the open_clip_torch package",
                         fix="pip install open_clip_torch") from None
    known = open_clip.list_models()
    if name not in known:
        close = [m for m in known if name.lower() in m.lower()][:5]
        raise UsageError(f"open_clip has no model {name!r}", path=f"open_clip:{name}",
                         fix=f"one of: {', '.join(close)}" if close else "see open_clip.list_models()")
    with _library_errors("open_clip", f"open_clip:{name}"):
        return open_clip.create_model(name, pretrained=None, device=device)


def factory_model(spec: str, *, device: str = "meta"):
    """What the user's ``package.module:callable`` returns (called with no arguments but
    ``device``); runs the user's code."""
    built = call_factory(find_factory(spec, config_path=spec), device=device, where=spec)
    if not (hasattr(built, "state_dict") and hasattr(built, "named_parameters")):
        raise UsageError(f"the factory returned a {type(built).__name__}, not a model", path=spec,
                         fix="return an nn.Module (or a tuple whose first element is one)")
    return built
