"""Making a student from its teacher by depth pruning: the teacher's weights with some decoder layers removed.

    pair.student.path=<the teacher's path> pair.student.init.keep_layers=[0,1,...,13,16,...,29]

A pruned copy keeps the teacher's tokenizer, chat template, embeddings, output layer and every kept
layer's weights, so it starts close to the teacher (it writes the same kind of text) and lower in
capacity: a student that is capacity-limited against its teacher, from a model that can be had offline.
Llama and Qwen-family decoders (`model.layers.<i>.` in their state dicts) are supported.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# model_type values whose decoder layers live at `model.layers.<i>` and are independent of their index
# but for `layer_idx` (the KV cache slot) and `layer_types`, which pruning rewrites.
PRUNABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class StudentInit:
    """How a student is made from the checkpoint at its `path` (usually the teacher's): which layers stay.

    Attributes:
        keep_layers: indices of the decoder layers to keep, strictly increasing, each in
            [0, num_hidden_layers); None keeps every layer.
        drop_layers: the layers to remove instead (the complement of `keep_layers`); give one of the two.
    """

    keep_layers: tuple[int, ...] | None = None
    drop_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.keep_layers is None) == (self.drop_layers is None):
            raise ValueError(
                "pair.student.init: give exactly one of keep_layers and drop_layers, e.g. "
                "pair.student.init.drop_layers=[14,15]"
            )
        for name in ("keep_layers", "drop_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(value)
            object.__setattr__(self, name, value)
            if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in value):
                raise ValueError(f"pair.student.init.{name}={list(value)} must hold layer indices >= 0")
            if list(value) != sorted(set(value)):
                raise ValueError(
                    f"pair.student.init.{name}={list(value)} must be strictly increasing (each layer once, "
                    "in order)"
                )
        if self.keep_layers == ():
            raise ValueError("pair.student.init.keep_layers=[] keeps no layer; keep at least one")

    def kept(self, num_layers: int) -> tuple[int, ...]:
        """The kept layer indices for a model of `num_layers` layers; ValueError naming the field otherwise."""
        name, given = (
            ("keep_layers", self.keep_layers)
            if self.keep_layers is not None
            else ("drop_layers", self.drop_layers)
        )
        assert given is not None
        outside = [i for i in given if i >= num_layers]
        if outside:
            raise ValueError(
                f"pair.student.init.{name}={list(given)}: layers {outside} do not exist, the model has "
                f"{num_layers} (0..{num_layers - 1})"
            )
        kept = given if name == "keep_layers" else tuple(i for i in range(num_layers) if i not in given)
        if not kept:
            raise ValueError(
                f"pair.student.init.drop_layers={list(given)} removes every layer; keep at least one"
            )
        return kept


def load_pruned(path: str, init: StudentInit, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The checkpoint at `path` with only the layers `init` keeps; the choice is checked against the
    checkpoint's config before its weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    keep = init.kept(AutoConfig.from_pretrained(path).num_hidden_layers)
    return prune_layers(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), keep)


def prune_layers(model: PreTrainedModel, keep: Sequence[int]) -> PreTrainedModel:
    """A new model with only the decoder layers `keep` of `model`, in that order; `model` is left as it is.

    The copy's config says `num_hidden_layers = len(keep)` (and `layer_types` is cut to match), its layers
    are renumbered 0..len(keep)-1 so that each uses its own KV cache slot, and every weight is a copy:
    training the result never touches `model`. Saved with `save_pretrained`, it loads as a plain model.

    Args:
        model: a Llama or Qwen-family causal LM (`PRUNABLE_MODEL_TYPES`).
        keep: layer indices, strictly increasing, in [0, num_hidden_layers).

    Raises:
        ValueError: another architecture, or indices outside the model.
    """
    config = model.config
    if config.model_type not in PRUNABLE_MODEL_TYPES:
        raise ValueError(
            f"pair.student.init: depth pruning supports model types {', '.join(PRUNABLE_MODEL_TYPES)}; "
            f"this checkpoint is {config.model_type!r}. Give the student its own path instead"
        )
    keep = StudentInit(keep_layers=tuple(keep)).kept(config.num_hidden_layers)
    new_config = config.__class__.from_dict(config.to_dict())
    new_config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        new_config.layer_types = [config.layer_types[i] for i in keep]
    position = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value.detach().clone()
        elif int(match[1]) in position:
            state[f"model.layers.{position[int(match[1])]}.{match[2]}"] = value.detach().clone()
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten; keep the caller's stream
        pruned = type(model)(new_config).to(next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        pruned.tie_weights()
    pruned.generation_config = copy.deepcopy(model.generation_config)  # its own: a trainer may write to it
    pruned.train(model.training)
    return pruned
