"""The data of a training run as the trainer opens it: the prepared corpus checked against its
tokenizer and the model's vocabulary, the collators (the training objective, and validation's
likelihood bound), the step sampler and this data-parallel rank's micro-batches."""
from __future__ import annotations

import dataclasses
import pathlib

from data_pipeline.collator import SetDiffusionCollator
from data_pipeline.loader import (MicroBatches, ResumableLoader, check_tokenizer, fetch_corpus, open_sequences,
                                  read_manifest)
from data_pipeline.sampler import StepSampler
from data_pipeline.shard_cache import parse_size
from model.attention import make_backend
from model.config import ModelConfig
from pretrain.config import RunConfig
from pretrain.distributed import Layout


@dataclasses.dataclass
class TrainingData:
    tokenizer_path: pathlib.Path
    """The corpus's tokenizer (copied into the run directory and every checkpoint)."""
    fingerprints: dict
    """The corpus's and its tokenizer's fingerprints: a checkpoint records them, a resume checks them."""
    eos_id: int
    """The corpus's end-of-text id (ends every document; setdiff-convert's eos_token_id)."""
    sampler: StepSampler
    """The training split's shuffled order, cut into global batches of micro-batches."""
    train_loader: ResumableLoader
    """This rank's training micro-batches, in step order, resumable at any micro-batch."""
    val_batches: MicroBatches
    """This rank's validation micro-batches: fixed order, the training micro-batch layout."""
    families: list[str]
    """Every order family the training collator draws (a batch's family_id indexes it)."""
    model: ModelConfig
    """The run's model config with the corpus's vocabulary (model.vocab_size 0 takes it)."""


def open_training_data(cfg: RunConfig, layout: Layout) -> TrainingData:
    """The data of ``cfg`` for this rank, and the model config with the corpus's vocabulary (a
    recipe naming a smaller one is an error); ``cfg`` is not changed."""
    data, t, d = cfg.data, cfg.train, cfg.diffusion
    data_path = data.path or str(fetch_corpus(data.remote, data.cache_dir))  # remote-only: fetched metadata
    manifest = read_manifest(data_path)
    tokenizer_path = pathlib.Path(data.tokenizer or pathlib.Path(data_path) / "tokenizer.json")
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"data.tokenizer: {tokenizer_path} not found")
    check_tokenizer(manifest, data_path, tokenizer_path)
    vocab = int(manifest["vocab_size"])
    if cfg.model.vocab_size and cfg.model.vocab_size < vocab:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the corpus "
                         f"vocabulary {vocab} in {pathlib.Path(data_path) / 'manifest.json'}")
    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab)  # larger: a padded table
    if not -1 <= model.mask_token < model.vocab_size:
        raise ValueError(f"model.mask_token={model.mask_token} is not a token id below model.vocab_size="
                         f"{model.vocab_size} (or -1: a [MASK] row of its own)")
    mask_bits = (d.mode == "set" and make_backend(model.attention_backend).name == "sdpa"
                 and cfg.parallel.pipeline == 1)
    collator = SetDiffusionCollator(d, model.mask_id(), seed=t.seed, mask_bits=mask_bits)
    # validation reports a likelihood bound whatever the training loss (masked_ce: the NELBO)
    val_collator = SetDiffusionCollator(d.for_evaluation(), model.mask_id(), seed=t.seed, mask_bits=mask_bits)
    opened = {split: open_sequences(data_path, split, data.format, model.seq_len, data.pack,
                                    data.remote, data.cache_dir,
                                    min_sequences=t.micro_batch_size * t.grad_accum * layout.data,
                                    cache_limit=parse_size(data.cache_limit))
              for split in ("train", "val")}
    train_seq = opened["train"]
    sampler = StepSampler(len(train_seq), t.micro_batch_size, t.grad_accum, layout.data, t.seed,
                          blocks=train_seq.shard_blocks(train_seq.documents.shard_ranges()),
                          shuffle_block=data.shuffle_block)
    train_loader = ResumableLoader(MicroBatches(train_seq, sampler, collator, layout.dp_rank), data.num_workers)
    # validation: fixed order, the training micro-batch layout (a pipeline runs grad_accum of them)
    val_batches = MicroBatches(opened["val"], StepSampler(
        len(opened["val"]), t.micro_batch_size, t.grad_accum, layout.data, t.seed, shuffle=False),
        val_collator, layout.dp_rank)
    return TrainingData(tokenizer_path=tokenizer_path,
                        fingerprints={"data": manifest["fingerprint"], "tokenizer": manifest["tokenizer_sha256"]},
                        eos_id=int(manifest["eos_id"]),
                        sampler=sampler, train_loader=train_loader, val_batches=val_batches,
                        families=[str(f) for f in collator.families], model=model)
