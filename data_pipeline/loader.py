"""From a prepared corpus to collated micro-batches, in DataLoader workers, resumable.

Micro-batch k of a data-parallel rank (k = step * grad_accum + micro) is a pure function of
k: the sampler picks its sequences, the packer cuts them from the shards, the collator
draws partitions and noise keyed by their global batch slots. A DataLoader over k = start,
start+1, … hands the k's to its workers round-robin and returns them in order, so any
number of workers yields the same stream, and resuming means starting at the next k.
"""
from __future__ import annotations

import itertools
import os
import pathlib

import numpy as np
import torch

from data_pipeline import mds_format
from data_pipeline.collator import SetDiffusionCollator
from data_pipeline.manifest import SPLITS, check_tokenizer, manifest_path, read_manifest, verify_shards  # noqa: F401
from data_pipeline.packing import PackedSequences
from data_pipeline.sampler import StepSampler
from data_pipeline.shards import DEFAULT_CACHE_LIMIT, MDSDocuments, WebDatasetDocuments, cache_root, source_key


def fetch_corpus(remote: str, cache_dir: str = "") -> pathlib.Path:
    """A remote-only corpus (``data.remote`` set, ``data.path`` empty): its manifest, lengths
    files and tokenizer downloaded from the remote into ``<cache>/<key>/corpus``, fetched anew
    each time (a remote re-prepared in place is read as it now is). Returns that directory,
    which then serves as ``data.path``; the shards stay remote."""
    out = cache_root(cache_dir) / source_key(remote, local=False) / "corpus"
    out.mkdir(parents=True, exist_ok=True)

    def fetch(name: str) -> None:
        where, target = f"{remote.rstrip('/')}/{name}", out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            mds_format.download(where, str(tmp))
        except Exception as err:  # the downloaders raise their SDKs' own errors
            raise FileNotFoundError(f"data.remote: cannot download {where} ({err}); is {remote} a corpus "
                                    f"prepared by setdiff-prepare?") from None
        os.replace(tmp, target)  # ranks and workers may fetch at once

    fetch("manifest.json")
    manifest = read_manifest(out)
    for name in [manifest["splits"][split]["lengths"] for split in SPLITS] + ["tokenizer.json"]:
        fetch(name)
    if manifest.get("tokenizer_config"):  # the tokenizer's EOS name and chat template
        fetch("tokenizer_config.json")
    return out


def open_documents(data_path: str, split: str, fmt: str, manifest: dict, remote: str = "", cache_dir: str = "",
                   cache_limit: int = DEFAULT_CACHE_LIMIT):
    entry = manifest["splits"][split]
    if fmt == "mds":
        source = f"{remote.rstrip('/')}/{entry['mds']}" if remote else str(pathlib.Path(data_path) / entry["mds"])
        return MDSDocuments(source, entry["mds_shards"], cache_dir or None, download=bool(remote),
                            cache_limit=cache_limit)
    if fmt == "webdataset":
        return WebDatasetDocuments(data_path, entry["wds_shards"])
    raise ValueError(f"data.format must be 'mds' or 'webdataset', got {fmt!r}")


def open_sequences(data_path: str, split: str, fmt: str, seq_len: int, pack: bool, remote: str = "",
                   cache_dir: str = "", min_sequences: int = 1,
                   cache_limit: int = DEFAULT_CACHE_LIMIT) -> PackedSequences:
    """The split's sequences of ``seq_len``, after checking that every shard the manifest lists
    for it is there with its size (hashes are checked when a shard is first read) and that
    the split packs into at least ``min_sequences`` sequences (a global batch). With ``remote``
    and no ``data_path`` the corpus is read from the remote alone (``fetch_corpus``)."""
    if remote and not data_path:
        data_path = str(fetch_corpus(remote, cache_dir))
    manifest = read_manifest(data_path)
    where = manifest_path(data_path)
    if fmt not in ("mds", "webdataset"):
        raise ValueError(f"data.format must be 'mds' or 'webdataset', got {fmt!r}")
    if remote and fmt != "mds":
        raise ValueError(f"data.remote={remote!r} reads MDS shards only; set data.format=mds (got {fmt!r})")
    verify_shards(data_path, manifest, [split], [] if remote else [fmt])
    entry = manifest["splits"][split]
    if entry["documents"] == 0:
        raise ValueError(f"data: the {split} split of {data_path} has no documents ({where}); prepare the "
                         f"corpus with a validation split (setdiff-prepare --val-percent, at least 1)")
    lengths_path = pathlib.Path(data_path) / entry["lengths"]
    try:
        lengths = np.load(lengths_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"data: {lengths_path}: unreadable ({err}); re-run setdiff-prepare") from None
    if lengths.ndim != 1 or lengths.size != entry["documents"] or int(lengths.sum()) != entry["tokens"]:
        raise ValueError(f"data: {lengths_path}: {lengths.size} documents of {int(lengths.sum())} tokens, {where} "
                         f"lists {entry['documents']} of {entry['tokens']}; re-run setdiff-prepare")
    docs = open_documents(data_path, split, fmt, manifest, remote, cache_dir, cache_limit)
    if len(docs) != lengths.size:
        raise ValueError(f"data: {fmt} shards of {data_path} hold {len(docs)} {split} documents, "
                         f"the manifest {lengths.size}")
    chat = manifest.get("examples") == "chat"  # prompt/response examples: never split, prompts flagged
    try:
        sequences = PackedSequences(docs, lengths, seq_len, int(manifest["eos_id"]), pack, whole=chat, context=chat)
    except ValueError as err:  # an example longer than a sequence
        raise ValueError(f"data: {data_path} ({split}): {err}; prepare it with --seq-len {seq_len} "
                         f"(--skip-bad drops such examples) or raise model.seq_len") from None
    if len(sequences) < min_sequences:
        raise ValueError(f"data: model.seq_len={seq_len} is too long for the {split} split of {data_path}: its "
                         f"{entry['tokens'] + entry['documents']:,} tokens (with EOS) make {len(sequences)} sequences, "
                         f"fewer than the global batch of {min_sequences}; lower model.seq_len or the batch size, "
                         f"or prepare more {split} documents")
    return sequences


class MicroBatches(torch.utils.data.Dataset):
    """Map-style: index k -> the collated micro-batch k of one data-parallel rank."""

    def __init__(self, sequences: PackedSequences, sampler: StepSampler, collator: SetDiffusionCollator,
                 dp_rank: int):
        self.sequences, self.sampler, self.collator, self.dp_rank = sequences, sampler, collator, dp_rank

    def __len__(self) -> int:  # unbounded; the sampler wraps epochs
        return 1 << 62

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        step, micro = divmod(int(k), self.sampler.grad_accum)
        indices = self.sampler.indices(step, micro, self.dp_rank)
        tokens, doc_id, context = self.sequences.batch(indices)
        release = getattr(self.sequences.documents, "close", None)
        if release is not None:
            release()  # an idle worker must not pin cached shards another worker is waiting to evict
        batch = self.collator(torch.from_numpy(tokens), torch.from_numpy(doc_id), step=step,
                              global_batch=self.sampler.global_batch,
                              first_slot=self.sampler.first_slot(micro, self.dp_rank),
                              context=None if context is None else torch.from_numpy(context))
        batch["sequence_index"] = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return batch


class _CountFrom(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class ResumableLoader:
    """Iterates micro-batches k = start, start+1, … with ``num_workers`` worker processes."""

    def __init__(self, dataset: MicroBatches, num_workers: int = 0, start: int = 0, prefetch: int = 2):
        self.dataset, self.num_workers, self.prefetch = dataset, num_workers, prefetch
        self.next_index = start
        self._iterator = None

    def _open(self):
        kwargs = {"prefetch_factor": self.prefetch, "persistent_workers": False} if self.num_workers else {}
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, sampler=_CountFrom(self.next_index),
                                             num_workers=self.num_workers, **kwargs)
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._open()
        batch = next(self._iterator)
        self.next_index += 1
        return batch

    def state_dict(self) -> dict:
        sampler = self.dataset.sampler
        step = self.next_index // sampler.grad_accum
        return {"next_micro_batch": self.next_index, "epoch": sampler.epoch_of(step),
                "samples_consumed": self.next_index * sampler.micro_batch * sampler.dp_size}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.next_index = int(state["next_micro_batch"])

    def close(self) -> None:
        self._iterator = None  # the DataLoader iterator shuts its workers down when collected
