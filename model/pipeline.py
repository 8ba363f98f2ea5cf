"""Pipeline parallelism: the same network as a DeepSpeed PipelineModule.

Why DeepSpeed's pipeline engine rather than megatron-core's schedules: its engine owns the
1F1B schedule, the gradient reduction and the optimizer step together, so ZeRO-1 and
clipping across stages work as one unit. megatron's schedules driven next to a DeepSpeed
engine were only correct with ZeRO-1 through a fragile call pattern, hang under ZeRO-3,
and allocate on ``device="cuda"`` literally (see ../shared/STACK_NOTES.md). DeepSpeed
refuses ZeRO-2/3 with pipeline parallelism; config validation says so up front.

Between stages travels one tuple, model/batch.py's StageTuple (hidden states, position ids, set
ranks, doc ids, dropout keys; the first stage gets the input ids in the hidden states' place), and
the last stage's loss reads model/batch.py's Labels: both named once there. The first block of a stage builds the rotary tables and the
attention mask from it and the stage's other blocks reuse them (StageInputs): once per
micro-batch and stage, as the flat model builds them once per batch. The dropout keys make
each block draw the masks the flat model draws (model/dropout.py).

Tied embeddings (model.tie_embeddings): the embedding is a DeepSpeed TiedLayerSpec built on the
first stage and again on the last, where a layer before the head hands its weight on with the
hidden states; DeepSpeed broadcasts the first stage's copy at the start and sums the two copies'
gradients before each step, so both uses add up as in one process.
"""
from __future__ import annotations

from functools import partial

import torch

from model.attention import make_backend
from model.batch import Labels, StageTuple
from model.masks import causal_meta, two_copy_meta
from model.objectives import loss_fn
from model.transformer import Block, Embedding, Head, ModelParts, branch_dropout, rotary_cos_sin


class EmbeddingPipe(Embedding):
    """Pipeline layer 0: the embedding, passing the micro-batch's other inputs on."""

    def forward(self, inputs):
        inputs = StageTuple(*inputs)
        return inputs._replace(x=super().forward(inputs.x))


class StageInputs:
    """The attention mask and rotary tables of the micro-batch passing through a stage, built
    by its first block and reused by the next ones, which receive the very same tensors.

    Keyed by tensor identity; holding the key tensors keeps that safe (no id reuse). A new
    micro-batch (or a recomputation in the backward pass under 1F1B) rebuilds them.
    """

    def __init__(self):
        self.key: tuple | None = None
        self.value = None
        self.builds = 0

    def get(self, key: tuple, build):
        if self.key is None or len(key) != len(self.key) or any(a is not b for a, b in zip(key, self.key)):
            self.key, self.value = key, build()
            self.builds += 1
        return self.value


class BlockPipe(Block):
    def __init__(self, parts: ModelParts, layer: int, stage_inputs: StageInputs | None = None):
        super().__init__(parts, layer_index=layer)
        cfg = parts.cfg
        self.cfg = cfg
        self.set_mode = parts.set_mode
        self.backend = make_backend(cfg.attention_backend)
        self.stage_inputs = stage_inputs or StageInputs()

    def _mask_and_rotary(self, position_ids, set_rank, doc_id, dtype):
        meta = two_copy_meta(set_rank, doc_id) if self.set_mode else causal_meta(doc_id)
        return self.backend.prepare(meta), rotary_cos_sin(position_ids, self.cfg, dtype)

    def forward(self, inputs):
        inputs = StageTuple(*inputs)
        x_SBH = inputs.x
        mask, (cos, sin) = self.stage_inputs.get(
            (inputs.position_ids, inputs.set_rank, inputs.doc_id, x_SBH.dtype),
            lambda: self._mask_and_rotary(inputs.position_ids, inputs.set_rank, inputs.doc_id, x_SBH.dtype))
        dropout = branch_dropout(self.cfg, self.training, inputs.dropout_key)
        return inputs._replace(x=super().forward(x_SBH, cos, sin, self.backend, mask, dropout))


class HeadPipe(Head):
    """Pipeline layer N + 1: the head, on the hidden states (and the tied embedding's weight)."""

    def __init__(self, parts: ModelParts):
        super().__init__(parts)
        self.tied = parts.cfg.tie_embeddings

    def forward(self, inputs):
        """inputs: the last block's tuple, or (hidden, the tied embedding weight) (pass_output_weight)."""
        return super().forward(inputs[0], inputs[1] if self.tied else None)


TIED_EMBEDDING = "embedding"
"""DeepSpeed's key of the tied embedding; its parameters are named tied_modules.embedding.*"""


def pass_output_weight(embedding: EmbeddingPipe, inputs):
    """The last stage's use of the tied embedding: hand its weight to the head."""
    return inputs[0], embedding.word.weight


def pipeline_loss(logits: torch.Tensor, labels, recorder=None) -> torch.Tensor:
    """The flat model's ``loss_fn`` on the labels the pipeline engine passes (model/batch.py's
    Labels); ``recorder`` gets the per-token cross-entropy for the loss breakdown (last stage only)."""
    labels = Labels(*labels)
    loss, token_ce = loss_fn(labels._asdict(), logits)
    if recorder is not None:
        recorder(token_ce, labels.loss_weight, labels.set_rank, labels.family_id, labels.sequence_normalizer)
    return loss


def build_pipeline_module(parts: ModelParts, num_stages: int, activation_checkpointing: bool, recorder=None):
    """A PipelineModule whose layer i holds exactly the weights of component i of the flat
    model (0 embedding, 1..N blocks, N+1 head), whichever stage builds it; stages get equal
    numbers of blocks."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    tied = parts.cfg.tie_embeddings
    tie = partial(TiedLayerSpec, TIED_EMBEDDING, EmbeddingPipe, parts, tied_weight_attr=["word.weight"])
    specs = [tie() if tied else LayerSpec(EmbeddingPipe, parts)]
    stage_inputs = StageInputs()  # shared by the blocks a stage builds
    specs += [LayerSpec(BlockPipe, parts, i, stage_inputs) for i in range(parts.cfg.num_layers)]
    if tied:
        specs.append(tie(forward_fn=pass_output_weight))
    specs.append(LayerSpec(HeadPipe, parts))
    tp = parts.parallel.tp_size
    world = torch.distributed.get_world_size()
    # axes (pipe, data, model), model fastest: megatron's default rank order (tp, dp, pp)
    topology = PipeModelDataParallelTopology(num_pp=num_stages, num_mp=tp, num_dp=world // (num_stages * tp))
    extra = {}
    if activation_checkpointing:
        extra = {"activation_checkpoint_interval": 1,
                 "activation_checkpoint_func": lambda fn, *args: torch.utils.checkpoint.checkpoint(
                     fn, *args, use_reentrant=False)}
    return PipelineModule(layers=specs, topology=topology, loss_fn=partial(pipeline_loss, recorder=recorder),
                          partition_method="type:BlockPipe", **extra)


def pipeline_name_to_flat(name: str, num_layers: int) -> str:
    """'3.attn.qkv.weight' -> 'layers.2.attn.qkv.weight' (the flat model's names); the tied
    embedding's 'tied_modules.embedding.word.weight' -> 'embedding.word.weight'."""
    tied_prefix = f"tied_modules.{TIED_EMBEDDING}."
    if name.startswith(tied_prefix):
        return "embedding." + name[len(tied_prefix):]
    index, _, rest = name.partition(".")
    index = int(index)
    if index == 0:
        return f"embedding.{rest}"
    if index > num_layers:  # the head: after the blocks (and the tied embedding's layer)
        return f"head.{rest}"
    return f"layers.{index - 1}.{rest}"


def pipeline_vocab_parameter_rows(parts: ModelParts) -> dict[str, int]:
    """The PipelineModule's names of its vocabulary-sized parameters (layer 0's embedding, or the
    tied one, and layer N + 1's output) and their rows of real ids and [MASK]: the flat model's
    ``vocab_parameter_rows`` under pipeline names."""
    embedding = f"tied_modules.{TIED_EMBEDDING}" if parts.cfg.tie_embeddings else "0"
    return parts.vocab_parameter_rows(embedding, str(parts.cfg.num_layers + 1))
