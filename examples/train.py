"""Train a surgeon-converted model on the example corpus: one process, or torchrun with DDP / FSDP2.

The model is either a `surgeon convert` output directory (`--model DIR`, loaded with
`surgeon.load`), or a tiny Llama (hidden 64, 2 layers, byte vocabulary) built here and converted
on the spot with `--passes` (default "aion,hyper:streams=4,adyt"). The text is
`examples/data/toy_corpus.txt`, read as bytes (token = byte, so any model with a vocabulary of
at least 256 fits); its last tenth is held out for a validation loss.

    python examples/train.py --steps 200                                   # one process
    torchrun --nproc_per_node=4 examples/train.py --steps 200              # DDP (gloo / NCCL)
    torchrun --nproc_per_node=4 examples/train.py --fsdp                   # FSDP2 fully_shard
    python examples/train.py --model converted/ --out run/                 # a converted checkpoint
    python examples/train.py --resume run/ --steps 400                     # continue run/

Each rank draws its own batches (a generator seeded by seed, step and rank, so a resumed run
sees the batches an uninterrupted one would). `surgeon.attach` moves AION's and ADyT's
statistics at each optimizer step (all ranks together). On CUDA the forward runs under bf16
autocast (`--amp bf16`: also on CPU; surgeon's statistics stay fp32). Checkpoints go to
`OUT/checkpoint-STEP/`: `model/` (written by `surgeon.save`, reloadable with `surgeon.load`)
and `trainer_state.pt` (optimizer state and step; loadable with `torch.load(weights_only=True)`),
every `--save-every` steps and at the end. `--resume` takes a checkpoint directory or OUT itself
(its latest complete checkpoint).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import surgeon
from surgeon.recipe import split_passes

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "toy_corpus.txt"
VOCAB = 256  # byte-level tokens
STATE = "trainer_state.pt"
DEFAULT_PASSES = "aion,hyper:streams=4,adyt"


# --- set-up -----------------------------------------------------------------------------------

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group under torchrun (NCCL on CUDA,
    gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, world, device


class ByteData:
    """The corpus as byte ids, a training part and a held-out validation tail."""

    def __init__(self, path: Path, seq_len: int) -> None:
        ids = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
        cut = int(len(ids) * 0.9)
        self.train, self.val, self.seq_len = ids[:cut], ids[cut:], seq_len

    def batch(self, size: int, seed: int, step: int, rank: int) -> torch.Tensor:
        """Batch `step` of `rank`: `(size, seq_len + 1)` windows, a function of its arguments."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
        starts = torch.randint(0, len(self.train) - self.seq_len - 1, (size,), generator=gen)
        return torch.stack([self.train[s:s + self.seq_len + 1] for s in starts.tolist()])

    def val_windows(self, limit: int = 64) -> torch.Tensor:
        n = min(limit, (len(self.val) - 1) // self.seq_len)
        t = self.seq_len
        return torch.stack([self.val[i * t:i * t + t + 1] for i in range(n)])


def build_tiny(passes: list[str], seq_len: int, seed: int) -> nn.Module:
    """A tiny Llama (hidden 64, 2 layers, byte vocabulary) converted with `passes`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=max(128, seq_len), tie_word_embeddings=False)
    torch.manual_seed(seed)  # the same weights on every rank
    model = LlamaForCausalLM(config)
    example = {"input_ids": torch.randint(0, VOCAB, (2, min(seq_len, 32)),
                                          generator=torch.Generator().manual_seed(seed))}
    return surgeon.apply(model, passes, example)


def vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(embeddings.num_embeddings) if embeddings is not None else VOCAB


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the children of the model's largest
    ModuleList (a transformers model's `layers` / `h`)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: nn.Module) -> list[nn.Parameter]:
    """FSDP2: `fully_shard` on each block, then on the root. Zero-dim parameters (a model's own;
    surgeon's are at least 1-D; FSDP2 refuses them) stay out of sharding as `ignored_params`:
    each rank keeps them whole and `average_gradients` all-reduces their gradients. Returns them in
    `model.parameters()` order, the same on every rank (a set's order is not)."""
    from torch.distributed.fsdp import fully_shard

    ignored = [p for p in model.parameters() if p.dim() == 0]
    for block in find_blocks(model):
        fully_shard(block, ignored_params=set(ignored) or None)
    fully_shard(model, ignored_params=set(ignored) or None)
    return ignored


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """All-reduce (mean) the gradients FSDP does not reduce, in one collective; `params` must
    come in the same order on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or world == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(piece.view_as(g))


def clip_gradients(model: nn.Module, max_norm: float, fsdp: bool) -> None:
    """Clip the global gradient norm to `max_norm`, with no host sync. Under FSDP2 the sharded
    gradients' squared norms are summed over ranks; replicated (ignored) ones count once."""
    if not fsdp:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sharded = [g for g, src in zip(local, grads) if isinstance(src, DTensor)]
    whole = [g for g, src in zip(local, grads) if not isinstance(src, DTensor)]
    device = local[0].device
    sq = sum((g.float().pow(2).sum() for g in sharded), torch.zeros((), device=device))
    dist.all_reduce(sq)
    sq = sq + sum((g.float().pow(2).sum() for g in whole), torch.zeros((), device=device))
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(coef.to(g.dtype))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW; matrices get weight decay, vectors and scalars (norm gains, AION's α0 and β,
    ADyT's α0, hyper-connection scales) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10% (at most 30 steps), then cosine decay to a tenth."""
    warmup = max(1, min(30, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- checkpoints ------------------------------------------------------------------------------

def latest_checkpoint(path: Path) -> Path:
    """`path` if it is a checkpoint, else its complete `checkpoint-STEP` with the highest STEP."""
    if (path / STATE).is_file():
        return path
    found = [(int(m.group(1)), p) for p in path.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE).is_file()]
    if not found:
        raise SystemExit(f"error: {path} holds no checkpoint written by examples/train.py "
                         f"(a directory with model/ and {STATE}, or checkpoint-STEP/ ones)")
    return max(found)[1]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state keyed by parameter name (gathered onto rank 0 under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, out: Path, step: int,
                    args: argparse.Namespace, rank: int) -> Path:
    """`out/checkpoint-STEP/`: model/ by `surgeon.save` (every rank calls it, rank 0 writes),
    then trainer_state.pt (written last: a checkpoint without it is incomplete)."""
    where = out / f"checkpoint-{step}"
    surgeon.save(model, where / "model")
    state = optimizer_state(model, optimizer)  # a collective under FSDP
    if rank == 0:
        tmp = where / f".{STATE}.tmp"
        torch.save({"step": step, "optimizer": state, "seed": args.seed, "lr": args.lr}, tmp)
        os.replace(tmp, where / STATE)
    if dist.is_initialized():
        dist.barrier()
    return where


def load_trainer_state(model: nn.Module, optimizer: torch.optim.Optimizer, where: Path) -> int:
    """Load the optimizer state from `where/trainer_state.pt`; returns the step it was saved at."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(where / STATE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    return int(state["step"])


# --- training ---------------------------------------------------------------------------------

def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a `(B, T + 1)` batch (in fp32 under autocast)."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, autocast) -> float:
    was = model.training
    model.eval()
    with autocast():
        loss = float(lm_loss(model, windows))
    model.train(was)
    return loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="a `surgeon convert` / `surgeon.save` directory")
    src.add_argument("--passes", default=None,
                     help=f"build a tiny Llama and convert it (default {DEFAULT_PASSES!r})")
    src.add_argument("--resume", type=Path,
                     help="continue a run: a checkpoint-STEP directory or the --out of a run")
    p.add_argument("--out", type=Path, default=Path("train-out"),
                   help="where checkpoint-STEP/ directories go (default ./train-out; "
                        "with --resume: the resumed run's directory)")
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps (default 200)")
    p.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard per block + root "
                                                       "(default: DDP under torchrun)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-attach", action="store_true",
                   help="skip surgeon.attach (statistics then move as without it)")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast: auto (on CUDA only, the default), bf16 (also on CPU), off")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=10, help="log a line every N steps")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--data", type=Path, default=DATA, help="text file to train on")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq_len < 2:
        p.error("--steps and --batch must be at least 1, --seq-len at least 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    log = (lambda msg: tqdm.write(msg, file=sys.stdout)) if rank == 0 else (lambda msg: None)
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()

    resume_from = None
    if args.resume is not None:
        resume_from = latest_checkpoint(args.resume)
        model = surgeon.load(resume_from / "model")
        if args.out == Path("train-out"):  # not given: keep writing into the resumed run
            args.out = resume_from.parent if resume_from.name.startswith("checkpoint-") \
                else args.resume
        origin = f"resumed from {resume_from}"
    elif args.model is not None:
        model = surgeon.load(args.model)
        origin = f"loaded {args.model}"
    else:
        passes = split_passes(args.passes or DEFAULT_PASSES)
        model = build_tiny(passes, args.seq_len, args.seed)
        origin = f"tiny Llama converted with {passes}"
    if vocab_size(model) < VOCAB:
        raise SystemExit(f"error: the model's vocabulary ({vocab_size(model)}) is smaller than "
                         f"the {VOCAB} byte tokens this example trains on")
    model.to(device).train()

    ignored: list[nn.Parameter] = []
    if args.fsdp and world > 1:
        ignored = shard(model)
        wrapped: nn.Module = model
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                          else None)
    else:
        wrapped = model
    optimizer = make_optimizer(model, args.lr)
    start = load_trainer_state(model, optimizer, resume_from) if resume_from else 0
    if not args.no_attach:
        surgeon.attach(wrapped, optimizer)
    trained = torch.compile(wrapped) if args.compile else wrapped

    data = ByteData(args.data, args.seq_len)
    val = data.val_windows().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    mode = "FSDP2" if args.fsdp and world > 1 else "DDP" if world > 1 else "one process"
    log(f"{origin}; {n_params:,} parameters; {mode}, world {world}, {device}"
        f"{', bf16 autocast' if amp else ''}{', compiled' if args.compile else ''}; "
        f"steps {start}..{args.steps}, batch {args.batch}x{args.seq_len} per rank")

    bar = tqdm(total=args.steps, initial=start, disable=rank != 0 or args.no_progress,
               dynamic_ncols=True, file=sys.stderr)
    running = torch.zeros((), device=device)
    since, t0, loss_value = 0, time.perf_counter(), float("nan")
    for step in range(start, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        batch = data.batch(args.batch, args.seed, step, rank)
        if device.type == "cuda":  # pinned: the copy does not wait for the device
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        with autocast():
            loss = lm_loss(trained, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ignored:
            average_gradients(ignored, world)
        if args.clip > 0:
            clip_gradients(model, args.clip, fsdp=bool(args.fsdp and world > 1))
        optimizer.step()
        running += loss.detach()
        since += 1
        done = step + 1
        bar.update(1)
        if done % args.log_every == 0 or done == args.steps or done == start + 1:
            if world > 1:
                dist.all_reduce(running)
                running /= world
            loss_value = float(running) / since  # the one host sync, on logging steps only
            rate = since / (time.perf_counter() - t0)
            log(f"step {done:>6}/{args.steps}  loss {loss_value:.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {rate:.1f} steps/s")
            bar.set_postfix(loss=f"{loss_value:.4f}")
            running.zero_()
            since, t0 = 0, time.perf_counter()
        if args.save_every and done % args.save_every == 0 and done != args.steps:
            log(f"saved {save_checkpoint(model, optimizer, args.out, done, args, rank)}")
    bar.close()

    val_loss = evaluate(model, val, autocast)
    final = save_checkpoint(model, optimizer, args.out, args.steps, args, rank)
    log(f"final: step {args.steps}  train loss {loss_value:.4f}  val loss {val_loss:.4f}")
    log(f"saved {final}")
    check_reload(model, final / "model", val[:4, :-1], rank, log)
    if dist.is_initialized():
        dist.barrier()  # rank 0 checks the reload alone: none tears gloo down meanwhile
        dist.destroy_process_group()


@torch.no_grad()
def check_reload(model: nn.Module, path: Path, inputs: torch.Tensor, rank: int, log) -> None:
    """The saved model, reloaded with `surgeon.load`, must give the trained model's logits."""
    model.eval()
    logits = model(input_ids=inputs).logits.float().cpu()  # every rank: a collective under FSDP
    if rank != 0:
        return
    reloaded = surgeon.load(path).eval()
    again = reloaded(input_ids=inputs.cpu()).logits.float()
    gap = float((logits - again).abs().max())
    log(f"reload check: max |logit diff| {gap:.3e}")
    if not gap <= (1e-4 if inputs.device.type == "cpu" else 2e-3):  # GPU vs CPU kernels
        raise SystemExit(f"error: the model reloaded from {path} differs from the trained one "
                         f"(max |logit diff| {gap:.3e})")


if __name__ == "__main__":
    main()
