"""The `trainer` group as Lightning Trainer arguments, and the check that Lightning accepts them before any
model loads (`eopd.train.run` calls it right after `eopd.plan.plan`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from eopd.plan import SHARDED, ConfigError, plain


def check_trainer_options(trainer: DictConfig) -> None:
    """Raise a ConfigError naming the option when Lightning's Trainer would reject `trainer`: an option it
    does not have, or a value its constructor refuses. Builds (and drops) a Trainer from these options
    alone, before any model loads; imports Lightning."""
    import inspect
    import tempfile

    import lightning as L

    kwargs = trainer_arguments(trainer)
    known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    if unknown := sorted(set(kwargs) - known):
        raise ConfigError(
            f"config 'trainer.{unknown[0]}'={kwargs[unknown[0]]!r} is not an option of Lightning's Trainer; "
            f"remove it (options: {', '.join(sorted(known))})"
        )
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    with tempfile.TemporaryDirectory() as scratch:
        try:
            L.Trainer(**{**kwargs, **quiet, "enable_model_summary": False, "default_root_dir": scratch})
        except Exception as error:  # noqa: BLE001 - Lightning raises several types for a bad option
            raise ConfigError(
                f"config 'trainer': Lightning's Trainer rejects these options ({', '.join(f'{k}={v!r}' for k, v in plain(trainer).items())}): "
                f"{error}. Fix the value in conf/trainer/ or on the command line (trainer.<option>=...)"
            ) from None


def trainer_arguments(trainer: DictConfig) -> dict[str, Any]:
    """Lightning Trainer arguments; strategy 'fsdp' becomes FSDP2 over all ranks (ModelParallelStrategy).

    DistillModule.configure_model shards the student over the mesh's data-parallel dimension, which spans
    every process (devices x num_nodes); tensor parallelism stays 1.
    """
    kwargs = plain(trainer)
    if kwargs.get("strategy") != SHARDED:
        return kwargs
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    devices = kwargs.get("devices", 1)
    if devices == -1:
        devices = torch.cuda.device_count()
    # Checkpoints gathered whole on rank 0 and written as one file through the run's CheckpointIO: the
    # same atomic files, resume=auto and finished-run rules as every other strategy.
    kwargs["strategy"] = ModelParallelStrategy(
        data_parallel_size=devices * kwargs.get("num_nodes", 1),
        tensor_parallel_size=1,
        save_distributed_checkpoint=False,
    )
    return kwargs
