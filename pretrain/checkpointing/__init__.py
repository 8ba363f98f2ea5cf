"""A run's checkpoints, in one package:

    manager.py   CheckpointManager: save(step) and resume(directory), the two entry points; each
                 stateful part of a run (DeepSpeed's state, the unsharded weights, Adam's moments,
                 the EMA, the trainer's counters and data position, the tokenizer) saves and loads
                 itself through it; the one definition of "same layout"
    files.py     the directory layout, atomic publication, the free-space check, and which
                 checkpoints are complete and loadable
    run_dir.py   one owner per run directory, no training over an old run, the checkpoint to resume
    sharding.py  unsharded tensors from a TP / ZeRO-3 / PP layout and back
"""
from pretrain.checkpointing.files import NoSpaceError, free_bytes_at, read_trainer_state, tag_of
from pretrain.checkpointing.manager import CheckpointManager
from pretrain.checkpointing.run_dir import RunDirError, claim

__all__ = ["CheckpointManager", "NoSpaceError", "RunDirError", "claim", "free_bytes_at", "read_trainer_state",
           "tag_of"]
