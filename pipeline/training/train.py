"""Train the BLIP-2 video captioner or Video-LLaMA: cross-entropy fine-tuning (``mode: ce``) or SCST (``mode: scst``).

    python -m pipeline.training.train --config configs/train/caption_msrvtt_flant5xl_ft.yaml \\
        --pretrained /models/blip2-flan-t5-xl --train_annotations ANN --video_root VIDEOS --output_dir OUT
    msrun --worker_num=8 --local_worker_num=8 --join=True pipeline/training/train.py --config ...

What trains: the Q-Former, its query tokens, the language projection and the frame-time
embedding if the model has one (always), LoRA on the language model's attention
(``lora_targets``), the vision encoder (``train_vision``), the whole language model
(``train_language_model``, for models trained from scratch such as the bundled demo).
Everything else is frozen and stays bit-identical. A Video-LLaMA folder (``model_type:
video_llama``) trains what Video-LLaMA trains: the video Q-Former, its query tokens, the frame
position embedding and ``llama_proj`` (the model's ``trainable_prefixes``), with LoRA or the
language model as above; its prompt must hold ``<ImageHere>`` (configs/train/videollama_*.yaml),
its tokenizer is its LLaMA folder's, and the export is a Video-LLaMA folder (the video branch's
``video_llama.safetensors``, plus ``llama/`` when the language model changed).

Data parallel: every rank reads its slice of each global batch (``pipeline.training.data``),
losses are normalised by global counts (tokens for CE, candidates for SCST), and the
gradients are all-reduce-summed, so N ranks compute the update one process computes on the
whole global batch. Rank 0 logs, evaluates and writes checkpoints.

The step runs in PyNative with ``mindspore.value_and_grad`` (the model's input assembly uses
numpy); the video encoder and the AdamW update are compiled with ``ms.jit``. All randomness
is derived from (seed, rank, step) or (seed, epoch, sample), so ``--resume`` continues with
exactly the losses of an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file (msrun): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops
from tqdm import tqdm

from models.layers import init_weights, sincos_grid_positions, sincos_positions
from pipeline import distributed, environment
from pipeline.config import ConfigError, parse_with_config
from pipeline.training import checkpointing
from pipeline.training.lora import apply_lora, merge_lora, reseed_lora_dropout
from pipeline.training.objectives import CaptionEncoder, Contrast, caption_loss
from pipeline.training.optim import AdamW, clip_scale, lr_at
from pipeline.training.scst import ScstConfig, make_candidates, scst_loss

logger = logging.getLogger(__name__)

ALWAYS_TRAINED = ("query_tokens", "qformer.", "language_projection.", "frame_position_embedding")


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML file of option: value pairs (configs/train/*.yaml); flags override it")
    a("--mode", choices=["ce", "scst"], default="ce", help="cross-entropy fine-tuning or SCST")
    # model
    a("--pretrained", help="BLIP-2 model folder (config.json, *.safetensors, tokenizer) or Video-LLaMA folder; "
                           "for SCST the CE result")
    a("--model_config", help="instead of --pretrained: a BLIP-2 config.json to build a randomly "
                             "initialised model from (demo / smoke runs); needs --tokenizer")
    a("--tokenizer", help="tokenizer folder (default: --pretrained, for Video-LLaMA its LLaMA folder)")
    a("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
      help="frozen weights' dtype (auto: bfloat16 on Ascend, float32 on CPU); trained weights are float32")
    a("--init", choices=["normal", "fan_in"], default="normal",
      help="with --model_config: matrices start at normal(0, 0.02) (transformers' start for these models), or "
           "projections at std 1/sqrt(fan in) (fan_in: a narrow model's layers then pass their inputs on at "
           "full scale; the demo learns shape only so)")
    a("--cross_attention_init_scale", type=float, default=1.0,
      help="with --model_config: start the Q-Former's cross-attention value and output projections at this "
           "many times their starting std (--init), so the query outputs depend on the frames from the first "
           "update (at 1 the frames make about 5 %% of their spread)")
    a("--vision_position_init", choices=["normal", "sincos"], default="normal",
      help="with --model_config: the vision encoder's patch positions start as the other tables (normal), or "
           "as fixed-scale 2-D sine-cosine values (sincos: at std 0.02 a patch's position is about 1 %% of "
           "its embedding, too little to tell where a shape is)")
    a("--language_position_init", choices=["normal", "sincos"], default="normal",
      help="with --model_config: the OPT's learned token positions start as the other tables (normal), or as "
           "fixed-scale sine-cosine values (sincos: at std 0.02 they are about 2 %% of a query output, too little "
           "to tell which frame it comes from; on the demo they drowned the word embeddings and slowed training)")
    a("--train_vision", action=argparse.BooleanOptionalAction, default=False, help="also train the vision encoder")
    a("--train_language_model", action=argparse.BooleanOptionalAction, default=False,
      help="also train every language-model weight (models trained from scratch, e.g. the demo)")
    a("--lora_targets", nargs="*", default=[], help="LM attention Linear names to adapt, e.g. q v (T5) or "
                                                   "q_proj v_proj (OPT); empty: no LoRA")
    a("--lora_rank", type=int, default=8)
    a("--lora_alpha", type=float, default=16.0)
    a("--lora_dropout", type=float, default=0.05)
    a("--lora_save", choices=["merged", "separate"], default="merged",
      help="final export: LoRA folded into the weights, or base weights + lora.safetensors")
    # data
    a("--train_annotations", help="training captions (MSR-VTT / MSVD / VATEX / COCO / LAVIS JSON or CSV)")
    a("--val_annotations", help="validation captions for periodic evaluation (optional)")
    a("--format", default="auto", help="annotation format (default: detect)")
    a("--train_split", help="MSR-VTT split name of the training videos (train)")
    a("--val_split", help="MSR-VTT split name of the validation videos (validate)")
    a("--train_split_file", help="file of training video ids (MSVD)")
    a("--val_split_file", help="file of validation video ids (MSVD)")
    a("--video_root", help="folder of the videos")
    a("--video_template", help='video file name from its id, e.g. "{video_id}.mp4"')
    a("--gebc_questions", help="GEBC annotations: YAML of the question asked for each caption type "
                               "(default configs/captioning/gebc_questions.yaml); the prompt's {question} gets it")
    a("--boundary_window", type=float, help="GEBC annotations: seconds before and after a boundary that its "
                                           "frames are sampled from (default 2)")
    a("--num_frames", type=int, default=8, help="frames per training video (headtail random sampling)")
    a("--eval_num_frames", type=int, help="frames per evaluation video (uniform; default: --num_frames)")
    a("--num_workers", type=int, default=4, help="frame-decoding threads")
    a("--prompt", default="a video of", help="text before the caption; {question} in it takes each sample's "
                                            "question (GEBC annotations)")
    a("--max_txt_len", type=int, default=32, help="longest training caption in tokens (eos included)")
    # optimisation
    a("--batch_size", type=int, default=64, help="videos per device per micro-batch")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer update")
    a("--max_steps", type=int, default=0, help="optimizer updates (iteration schedule); 0: use --max_epochs")
    a("--max_epochs", type=int, default=0, help="epochs (epoch schedule) when --max_steps is 0")
    a("--lr", type=float, default=5e-5)
    a("--min_lr", type=float, default=1e-5)
    a("--warmup_steps", type=int, default=1000)
    a("--warmup_start_lr", type=float, default=0.0)
    a("--weight_decay", type=float, default=0.05)
    a("--max_grad_norm", type=float, default=1.0, help="global-norm gradient clipping (<= 0: off)")
    a("--seed", type=int, default=42)
    a("--contrastive_weight", type=float, default=0.0,
      help="CE: add a video-caption contrastive term (CoCa's, BLIP-2 stage 1's ITC) at this weight: each video's "
           "mean query output against its captions read alone by the OPT language model, the batch's others "
           "as negatives; a direct signal for a vision side trained from scratch (0: off)")
    a("--contrastive_temperature", type=float, default=0.07, help="softmax temperature of the contrastive term")
    # SCST
    a("--scst_candidates", choices=["beam", "sample"], default="beam")
    a("--scst_num_candidates", type=int, default=5, help="beams (all returned) or samples per video")
    a("--scst_baseline", choices=["mean", "greedy"], default="mean")
    a("--scst_references", choices=["video", "pair"], default="video",
      help="reward against all of a video's references (one sample per video) or one caption per sample")
    a("--ce_references", choices=["pair", "video"], default="pair",
      help="CE samples: one per (video, caption) pair (the reference recipe), or one per video with "
           "all its captions as targets (each video encoded once: cheaper when the vision encoder trains)")
    a("--scst_temperature", type=float, default=1.0)
    # generation (evaluation and SCST)
    a("--num_beams", type=int, default=5)
    a("--max_new_tokens", type=int, default=32)
    a("--min_new_tokens", type=int, default=5)
    # bookkeeping
    a("--output_dir", default="outputs/train")
    a("--save_every", type=int, default=1000, help="checkpoint every N updates (0: only at the end)")
    a("--keep_last", type=int, default=3, help="checkpoints kept")
    a("--eval_every", type=int, default=0, help="evaluate on --val_annotations every N updates (0: at the end)")
    a("--eval_batch_size", type=int, default=16)
    a("--log_every", type=int, default=10)
    a("--resume", nargs="?", const="latest", help="continue from the latest checkpoint in --output_dir "
                                                  "(or from the given checkpoint folder)")
    a("--export", action=argparse.BooleanOptionalAction, default=True,
      help="write <output_dir>/final as a model folder at the end")
    a("--device", choices=["Ascend", "CPU"], help="default: Ascend where available, else CPU")
    environment.add_verbose_flag(p)
    a("--frame_chunk", type=int, default=8,
      help="frames per compiled vision-encoder call: more is faster, less bounds graph-mode memory")
    a("--jit", action=argparse.BooleanOptionalAction, default=True,
      help="compile the video encoder, decoding steps and optimizer update (--no-jit: PyNative, for "
           "debugging and tiny models)")
    return p


# ----------------------------------------------------------------------------- model


def resolve_dtype(dtype: str, device: str) -> str:
    return dtype if dtype != "auto" else ("float32" if device == "CPU" else "bfloat16")


def build_model(args: argparse.Namespace, dtype: str):
    """The captioner from ``--pretrained``, or a random one from ``--model_config`` (demo)."""
    if args.pretrained:
        from models import from_pretrained

        return from_pretrained(args.pretrained, dtype=dtype)
    if not args.model_config:
        raise ConfigError("give --pretrained (a BLIP-2 model folder) or --model_config (a config.json)")
    from transformers import Blip2Config

    from models.blip2.modeling import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration(Blip2Config.from_json_file(args.model_config))
    init_weights(model, seed=args.seed, fan_in=args.init == "fan_in")
    scale_cross_attention(model, args.cross_attention_init_scale)
    if args.vision_position_init == "sincos":
        set_sincos_vision_positions(model)
    if args.language_position_init == "sincos":
        set_sincos_language_positions(model)
    return model


def set_sincos_vision_positions(model) -> None:
    """Start the vision encoder's patch positions at 2-D sine-cosine values (the class token's row at zero).

    A trained demo at ``--init fan_in`` kept them near their 0.02 start (norm 0.26 per patch against its
    patches' 20 after 1200 updates), and its query outputs said nothing of where the shape was
    (benchmarks/demo_position_probe.py). This start puts position into them; it alone did not teach motion.
    """
    table = model.vision_model.embeddings.position_embedding
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    values = np.zeros(table.shape, np.float32)
    values[0, 1:] = sincos_grid_positions(grid, vision.hidden_size)
    table.set_data(Tensor(values, table.dtype))


def set_sincos_language_positions(model) -> None:
    """Start the OPT's learned token positions at 1-D sine-cosine values of their row.

    The query outputs reach the OPT at unit scale, so positions at 0.02 hardly say which frame's group a
    query output belongs to, and motion needs the frames in order. The queries of a model with sine-cosine
    patch positions tell the six position-only actions apart (84 % by a linear probe after 400 updates)
    while its captions do not (benchmarks/demo_position_probe.py). Measured, this start did not help: the
    unit-scale positions drown the word embeddings (at 0.02), and the demo's loss fell far more slowly.
    """
    decoder = getattr(getattr(model.language_model, "model", None), "decoder", None)
    if decoder is None or not hasattr(decoder, "embed_positions"):
        raise ConfigError("--language_position_init sincos needs an OPT language model (learned token positions); "
                          f"this model has {type(model.language_model).__name__}")
    table = decoder.embed_positions.weight
    table.set_data(Tensor(sincos_positions(np.arange(table.shape[0]), table.shape[1]), table.dtype))


CROSS_ATTENTION_PROJECTIONS = (".crossattention.attention.value.weight", ".crossattention.output.dense.weight")


def scale_cross_attention(model, scale: float) -> None:
    """Multiply the Q-Former's cross-attention value and output matrices by ``scale`` (a fresh model's start).

    At the plain start the learned queries, unit-scaled by the LayerNorms, outweigh the frames' term, so
    the caption loss reaches the vision encoder weakly (benchmarks/demo_vision_probe.py measures it).
    """
    if scale == 1.0:
        return
    for name, param in model.parameters_and_names():
        if name.endswith(CROSS_ATTENTION_PROJECTIONS):
            param.set_data(param * scale)


def configure_trainable(model, args: argparse.Namespace) -> list[tuple[str, Parameter]]:
    """Apply LoRA, freeze everything else than the trained parts; trained parameters become float32."""
    if args.lora_targets:
        wrapped = apply_lora(model, args.lora_targets, rank=args.lora_rank, alpha=args.lora_alpha,
                             dropout=args.lora_dropout, seed=args.seed)
        logger.info("LoRA r=%d alpha=%g on %d layers", args.lora_rank, args.lora_alpha, len(wrapped))
    if args.train_vision and hasattr(model, "trainable_prefixes"):
        raise ConfigError("--train_vision is for BLIP-2; Video-LLaMA's frame encoder stays frozen")
    prefixes = (getattr(model, "trainable_prefixes", ALWAYS_TRAINED)
                + (("vision_model.",) if args.train_vision else ())
                + (("language_model.",) if args.train_language_model else ()))
    trainable = []
    for name, param in model.parameters_and_names():
        train = name.startswith(prefixes) or name.endswith((".lora_A", ".lora_B"))
        param.requires_grad = train
        if train:
            if param.dtype != ms.float32:
                param.set_dtype(ms.float32)
            trainable.append((name, param))
    logger.info("training %d tensors (%.2fM values)", len(trainable),
                sum(int(np.prod(p.shape)) for _, p in trainable) / 1e6)
    return trainable


# ----------------------------------------------------------------------------- the step


@dataclass
class StepResult:
    loss: float           # mean loss of the global batch
    grad_norm: float      # before clipping
    lr: float
    reward: Optional[float] = None  # SCST: mean candidate reward of the global batch


class Trainer:
    """One optimizer update from this rank's micro-batches, identical to one process on the global batch."""

    def __init__(self, model, encoder: CaptionEncoder, trainable: list[tuple[str, Parameter]],
                 args: argparse.Namespace, total_steps: int, world_size: int = 1, rank: int = 0, reward_fn=None):
        self.model = model
        self.total_steps = total_steps
        self.encoder = encoder
        self.names = [n for n, _ in trainable]
        self.params = [p for _, p in trainable]
        self.args = args
        self.world_size = world_size
        self.rank = rank
        self.reward_fn = reward_fn
        self.optimizer = AdamW(trainable, weight_decay=args.weight_decay, use_jit=args.jit)
        model.use_jit = args.jit
        model.frame_chunk = args.frame_chunk
        self.all_reduce = ops.AllReduce() if world_size > 1 else None
        self.step = 0  # optimizer updates done
        self.scst = ScstConfig(num_candidates=args.scst_num_candidates, candidates=args.scst_candidates,
                               baseline=args.scst_baseline, max_new_tokens=args.max_new_tokens,
                               min_new_tokens=args.min_new_tokens, temperature=args.scst_temperature,
                               use_jit=args.jit)

    def total_over_ranks(self, value: float) -> float:
        return float(distributed.all_reduce_sum(np.asarray([value], np.float32))[0])

    def _sum_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """All-reduce-sum of every gradient through one flat buffer."""
        if self.all_reduce is None:
            return grads
        flat = self.all_reduce(ops.concat([g.reshape(-1) for g in grads]))
        out, start = [], 0
        for g in grads:
            size = int(np.prod(g.shape))
            out.append(flat[start:start + size].reshape(g.shape))
            start += size
        return out

    def _micro_loss(self, batch, rng: np.random.Generator):
        """(loss function of no arguments, extra metrics) for one micro-batch."""
        pixels = batch.pixel_values
        asked = getattr(batch, "questions", None)
        if self.args.mode == "ce":
            rows = [row for row, caps in enumerate(batch.captions) for _ in caps]
            texts = [text for caps in batch.captions for text in caps]
            questions = None if asked is None else [asked[row] for row in rows]
            caption_ids = self.encoder.caption_ids(texts)
            tokens = self.encoder.encode(caption_ids, rows, questions)
            total = self.total_over_ranks(float(tokens.token_counts.sum()))
            contrast = Contrast(caption_ids, self.args.contrastive_weight, self.args.contrastive_temperature,
                                self.world_size) if self.args.contrastive_weight > 0 else None
            return (lambda: caption_loss(self.model, pixels, tokens, total, contrast)), None
        cands = make_candidates(self.model, self.encoder, pixels, batch.captions, self.reward_fn, self.scst, rng,
                                asked)
        total = self.total_over_ranks(float(len(cands.rewards)))
        reward = self.total_over_ranks(float(cands.rewards.sum())) / total
        return (lambda: scst_loss(self.model, pixels, cands, total)), reward

    def train_step(self, micro_batches: Sequence) -> StepResult:
        rng = np.random.default_rng([self.args.seed, self.rank, self.step])
        reseed_lora_dropout(self.model, rng)
        self.model.set_train(True)
        grads, loss_sum, rewards = None, 0.0, []
        for batch in micro_batches:
            loss_fn, reward = self._micro_loss(batch, rng)
            loss, micro_grads = ms.value_and_grad(loss_fn, None, self.params)()
            loss_sum += float(loss.asnumpy())
            grads = list(micro_grads) if grads is None else [g + m for g, m in zip(grads, micro_grads)]
            if reward is not None:
                rewards.append(reward)
        count = len(micro_batches)
        if count > 1:
            grads = [g / count for g in grads]
        grads = self._sum_grads(grads)
        scale, norm = clip_scale(tuple(grads), self.args.max_grad_norm)
        lr = lr_at(self.step, self.args.lr, self.args.min_lr, self.args.warmup_steps, self.total_steps,
                   self.args.warmup_start_lr)
        self.optimizer.step(grads, lr, scale)
        self.step += 1
        loss = self.total_over_ranks(loss_sum) / count
        return StepResult(loss, norm, lr, float(np.mean(rewards)) if rewards else None)

    # --- checkpoints

    def save(self, output_dir: Path, data_state: dict, keep_last: int) -> Path:
        state = checkpointing.TrainingState(step=self.step, optimizer_steps=self.optimizer.step_count,
                                            data=data_state, rng={"seed": self.args.seed},
                                            args=vars(self.args))
        return checkpointing.save_checkpoint(output_dir, state, dict(zip(self.names, self.params)),
                                             self.optimizer.state_arrays(), keep_last=keep_last)

    def load(self, folder: Path) -> checkpointing.TrainingState:
        state, moments = checkpointing.load_checkpoint(folder, dict(zip(self.names, self.params)))
        self.optimizer.load_state_arrays(moments, state.optimizer_steps)
        self.step = state.step
        return state


# ----------------------------------------------------------------------------- data and evaluation


def _records(args: argparse.Namespace, annotations: str, split: Optional[str], split_file: Optional[str]):
    from pipeline.datasets.captions import load_captions

    return load_captions(annotations, format=args.format, video_root=args.video_root, split=split,
                         split_file=split_file, video_template=args.video_template,
                         gebc_questions=args.gebc_questions, boundary_window=args.boundary_window)


def build_train_loader(args, records, processor, info):
    from pipeline.datasets.captions import training_samples
    from pipeline.training.data import VideoCaptionLoader

    per_video = args.scst_references if args.mode == "scst" else args.ce_references
    samples = records if per_video == "video" else training_samples(records)
    return VideoCaptionLoader(samples, args.batch_size, processor, num_frames=args.num_frames,
                              sampling="headtail", shuffle=True, seed=args.seed, rank=info.rank,
                              world_size=info.world_size, num_workers=args.num_workers)


def generate_captions(model, encoder: CaptionEncoder, loader, args) -> dict[str, str]:
    """video_id -> caption for every batch of ``loader`` (beam search, inference mode)."""
    model.set_train(False)
    out = {}
    for batch in loader:
        ids, mask = encoder.prompt_batch(len(batch.video_ids), batch.questions)
        seqs = model.generate(pixel_values=batch.pixel_values, input_ids=ids, attention_mask=mask,
                              num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                              min_new_tokens=args.min_new_tokens, use_jit=args.jit)
        out.update(zip(batch.video_ids, encoder.decode(encoder.generated_ids(seqs, ids.shape[1]))))
    return out


def evaluate(model, encoder: CaptionEncoder, records, processor, args) -> tuple[dict[str, float], dict[str, str]]:
    """Caption the validation videos (uniform frames) and score them with pycocoevalcap (rank 0 only); the
    scores and the captions by video id.

    Records with a ``group`` (GEBC's caption types) are scored per group: keys ``<group>/<metric>``.
    """
    from pipeline.datasets.captions import references
    from pipeline.training.data import VideoCaptionLoader
    from pipeline.training.evaluate import score_captions

    loader = VideoCaptionLoader(records, args.eval_batch_size, processor,
                                num_frames=args.eval_num_frames or args.num_frames, sampling="uniform",
                                shuffle=False, drop_last=False, replace_unreadable=False,
                                num_workers=args.num_workers)
    predictions = generate_captions(model, encoder, loader, args)
    groups: dict[str | None, list] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    if list(groups) == [None]:
        return score_captions(predictions, references(records)), predictions
    scores = {}
    for group, members in groups.items():
        scored = score_captions({r.video_id: predictions[r.video_id] for r in members if r.video_id in predictions},
                                references(members))
        scores.update({f"{group}/{metric}": value for metric, value in scored.items()})
    return scores, predictions


def write_evaluation(output_dir: Path, step: int, scores: dict[str, float], predictions: dict[str, str]) -> Path:
    """``<output_dir>/eval/update-<step>.json``: one evaluation's scores and captions, so what the model says
    can be followed through training (``benchmarks/demo_design.py`` reads them as learning curves)."""
    path = output_dir / "eval" / f"update-{step:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"update": step, "scores": scores, "captions": predictions}, indent=1))
    return path


# ----------------------------------------------------------------------------- the run


def export(model, trainer_args, output_dir: Path, tokenizer) -> Path:
    """``<output_dir>/final``: a model folder for ``from_pretrained`` (LoRA merged or beside it).

    Video-LLaMA: LoRA is always merged, and the language model is saved only when it was trained.
    """
    from pipeline.training.lora import lora_parameters

    final = output_dir / "final"
    if hasattr(model, "save_pretrained"):
        language_model_trained = bool(lora_parameters(model)) or trainer_args.train_language_model
        merge_lora(model)
        return model.save_pretrained(final, tokenizer, save_language_model=language_model_trained,
                                     exclude=(".lora_A", ".lora_B"))
    if lora_parameters(model) and trainer_args.lora_save == "separate":
        checkpointing.save_adapter(model, final)
        return checkpointing.export_model(model, final, tokenizer, exclude=(".lora_A", ".lora_B"))
    merge_lora(model)
    return checkpointing.export_model(model, final, tokenizer, exclude=(".lora_A", ".lora_B"))


def train(args: argparse.Namespace, loader=None, val_records=None) -> list[StepResult]:
    """Run training as configured; returns the per-update results of this run (rank 0's view).

    ``loader``: any iterable of batches with ``state_dict``/``load_state_dict`` (tests); by default the
    video loader over ``--train_annotations``.
    """
    from transformers import AutoTokenizer

    from models.blip2.processing import Blip2FrameProcessor

    environment.set_verbose(getattr(args, "verbose", False))
    info = distributed.setup(args.device)
    ms.set_seed(args.seed)
    model = build_model(args, resolve_dtype(args.dtype, info.device))
    sources = getattr(model, "sources", None)
    tokenizer_dir = args.tokenizer or (sources.llama_model if sources is not None else args.pretrained)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = CaptionEncoder(model, tokenizer, prompt=args.prompt, max_txt_len=args.max_txt_len)
    if args.contrastive_weight > 0 and (args.mode != "ce" or not encoder.is_decoder_only
                                        or hasattr(model, "prompt_ids")):
        raise ConfigError("--contrastive_weight is for CE training of a BLIP-2 OPT model (it reads captions with the "
                          f"OPT language model); got mode {args.mode} and {type(model.language_model).__name__}")
    processor = Blip2FrameProcessor.from_pretrained(tokenizer_dir, image_size=model.config.vision_config.image_size)
    train_records = None
    if loader is None:
        if not args.train_annotations:
            raise ConfigError("--train_annotations is required")
        train_records = _records(args, args.train_annotations, args.train_split, args.train_split_file)
        loader = build_train_loader(args, train_records, processor, info)
    first = (getattr(loader, "samples", None) or [None])[0]
    encoder.prompt_for(getattr(first, "question", None))  # a prompt that cannot work fails before training
    if val_records is None and args.val_annotations and info.is_main:
        val_records = _records(args, args.val_annotations, args.val_split, args.val_split_file)
    evaluating = bool(val_records or args.val_annotations)  # the same on every rank
    reward_fn = None
    if args.mode == "scst":
        from pipeline.training.scst import cider_reward

        corpus: dict[str, list[str]] = {}
        for sample in train_records if train_records is not None else loader.samples:
            corpus.setdefault(sample.video_id, []).extend(sample.captions)
        reward_fn = cider_reward(list(corpus.values()))

    total_steps = args.max_steps or args.max_epochs * max(len(loader) // args.grad_accum, 1)
    if total_steps <= 0:
        raise ConfigError("set --max_steps or --max_epochs")
    trainable = configure_trainable(model, args)
    trainer = Trainer(model, encoder, trainable, args, total_steps, info.world_size, info.rank, reward_fn)
    output_dir = Path(args.output_dir)
    if args.resume:
        folder = checkpointing.latest_checkpoint(output_dir) if args.resume == "latest" else Path(args.resume)
        if folder is None:
            logger.info("no checkpoint in %s: starting from the beginning", output_dir)
        else:
            state = trainer.load(folder)
            loader.load_state_dict(state.data)
            logger.info("resumed from %s at update %d", folder, trainer.step)

    results: list[StepResult] = []
    bar = tqdm(total=trainer.total_steps, initial=trainer.step, disable=not info.is_main, desc=args.mode)
    micro, started, seen = [], time.perf_counter(), 0
    while trainer.step < trainer.total_steps:
        for batch in loader:
            micro.append(batch)
            if len(micro) < args.grad_accum:
                continue
            result = trainer.train_step(micro)
            seen += sum(len(b.pixel_values) for b in micro) * info.world_size
            micro = []
            results.append(result)
            bar.update(1)
            if info.is_main and (trainer.step % args.log_every == 0 or trainer.step == trainer.total_steps):
                rate = seen / (time.perf_counter() - started)
                extra = {"reward": f"{result.reward:.3f}"} if result.reward is not None else {}
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", videos_s=f"{rate:.1f}", **extra)
                logger.info("update %d: loss %.4f lr %.3e grad_norm %.3f %.1f videos/s%s", trainer.step,
                            result.loss, result.lr, result.grad_norm, rate,
                            f" reward {result.reward:.4f}" if result.reward is not None else "")
            done = trainer.step >= trainer.total_steps
            if (args.save_every and trainer.step % args.save_every == 0) or done:
                if info.is_main:
                    trainer.save(output_dir, loader.state_dict(), args.keep_last)
                distributed.barrier()
            if evaluating and ((args.eval_every and trainer.step % args.eval_every == 0) or done):
                if info.is_main:
                    scores, captions = evaluate(model, encoder, val_records, processor, args)
                    write_evaluation(output_dir, trainer.step, scores, captions)
                    logger.info("update %d evaluation: %s", trainer.step,
                                ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                distributed.barrier()
            if done:
                break
    bar.close()
    if args.export and info.is_main:
        logger.info("exported %s", export(model, args, output_dir, tokenizer))
    distributed.barrier()
    return results


def main(argv: Optional[Sequence[str]] = None) -> list[StepResult]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args = parse_with_config(parser, argv)
    except ConfigError as exc:
        parser.error(str(exc))
    return train(args)


if __name__ == "__main__":
    main()
