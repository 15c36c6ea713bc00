"""Train the bundled sample model: a byte-level GLA causal LM on the King James Bible.

    python samples/train_sample.py --minutes 30                      # CPU, 2 threads (the shipped model)
    python samples/train_sample.py --device cuda --minutes 6         # a GPU; takes bigger batches
    python samples/train_sample.py --steps 1800 --seed 0             # exactly reproducible

Writes ``config.json``, ``model.safetensors`` (float16, ≤ 10 MiB), ``training_log.txt`` and a
``README.md`` model card into ``--out`` (default ``gla_export/assets/sample-model``, the default
model of every gla-export command). The corpus comes from ``samples/corpus.py``; on a machine
with no network pass ``--corpus PATH`` to a copy of ``samples/data/kjv.txt``.

Determinism: the model, the batches and the sampled continuations depend only on ``--seed`` and
the number of steps. With ``--minutes`` the number of steps is fixed once, from the speed of the
first steps, and logged: rerun with ``--steps`` that number to get the same weights (on the same
hardware and thread count; float sums differ between CPUs and GPUs).

Training windows start at a line start (a verse or a chapter heading) and are prefixed by BOS,
so a prompt encoded with BOS (``ByteTokenizer.encode``) starts where the model expects text to
start. The held-out score carries the recurrent state across each held-out stream: every held-out
byte is predicted once, with all preceding text of its stream as context, the way the exported
step graph decodes.
"""

from __future__ import annotations

import os

# cuBLAS needs this before it starts to give the same sums every run (deterministic algorithms)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# on a shared CPU, OpenMP threads that spin at barriers while their partner is descheduled made
# steps 3-5x slower than sleeping ones (measured with the machine's 2 cores oversubscribed)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import datetime
import itertools
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # run from a checkout without installing

import corpus

from gla_export.models import (
    ByteTokenizer,
    GLAForCausalLM,
    count_parameters,
    load_model,
    recommended_config,
    sample_model_path,
    save_model,
)

LN2 = math.log(2.0)
PROMPTS = ("In the beginning", "And the LORD said unto Moses,")
MAX_WEIGHTS_BYTES = 10 * 2**20
BYTE_PRESETS = ("sample", "hybrid-sample", "sample-small")  # the byte-level shapes of RECOMMENDED
DEVICE_DEFAULTS = {  # (batch size, sequence length)
    "cpu": (8, 256),
    "cuda": (64, 1024),
}


# ---------------------------------------------------------------- data


def line_starts(data: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Offsets of the lines of ``data`` (uint8) that have ``seq_len`` bytes after their start."""
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (data == ord("\n")).nonzero().flatten() + 1])
    return starts[starts + seq_len <= data.numel()]


class WindowSampler:
    """Random training windows ``[BOS] + data[s : s + seq_len]`` with ``s`` a line start."""

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, bos: int, seed: int):
        self.data, self.batch_size, self.seq_len, self.bos = data.long(), batch_size, seq_len, bos
        self.starts = line_starts(data, seq_len)
        if self.starts.numel() == 0:
            raise ValueError(f"training text ({data.numel()} bytes) is shorter than --seq-len {seq_len}")
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(seq_len)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, both ``[batch_size, seq_len]``: every target is a byte of the corpus."""
        pick = self.starts[torch.randint(self.starts.numel(), (self.batch_size,), generator=self.gen)]
        window = self.data[pick[:, None] + self.offsets]  # [B, L]
        bos = torch.full((self.batch_size, 1), self.bos, dtype=torch.long)
        return torch.cat([bos, window[:, :-1]], dim=1), window


def split_streams(text: str, n: int) -> list[bytes]:
    """``text`` cut at line starts into ``n`` consecutive parts of about equal size."""
    data = text.encode("utf-8")
    cuts = [0]
    for i in range(1, n):
        at = data.find(b"\n", len(data) * i // n)
        cuts.append(len(data) if at < 0 else at + 1)
    cuts.append(len(data))
    return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]


# ---------------------------------------------------------------- evaluation and generation


@torch.no_grad()
def evaluate_bpb(
    model: GLAForCausalLM,
    streams: list[bytes],
    seg_len: int,
    bos: int,
    device: torch.device,
    autocast=nullcontext,
    backend: str = "chunk",
) -> tuple[float, int]:
    """Bits per byte over every byte of ``streams``: each stream starts from BOS and a zero state,
    and is read ``seg_len`` tokens at a time with the recurrent state carried across segments.

    Returns ``(bits per byte, number of bytes scored)``.
    """
    was_training = model.training
    model.eval()
    L = max(len(s) for s in streams)
    ids = torch.zeros(len(streams), L + 1, dtype=torch.long)
    valid = torch.zeros(len(streams), L + 1, dtype=torch.bool)
    for i, s in enumerate(streams):
        ids[i, 0] = bos
        ids[i, 1 : len(s) + 1] = torch.frombuffer(bytearray(s), dtype=torch.uint8).long()
        valid[i, : len(s) + 1] = True
    ids, valid = ids.to(device), valid.to(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    states = None
    for a in range(0, L, seg_len):
        b = min(a + seg_len, L)
        with autocast():
            out = model(ids[:, a:b], states=states, gla_backend=backend)
        states = out.states
        target, mask = ids[:, a + 1 : b + 1], valid[:, a + 1 : b + 1]
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), target.flatten(), reduction="none")
        nats += (loss * mask.flatten()).sum(dtype=torch.float64)
    scored = sum(len(s) for s in streams)
    model.train(was_training)
    return float(nats) / LN2 / scored, scored


@torch.no_grad()
def generate(
    model: GLAForCausalLM,
    prompt: str,
    n_bytes: int,
    device: torch.device,
    temperature: float = 0.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    backend: str = "chunk",
) -> str:
    """Continue ``prompt`` by ``n_bytes`` bytes, one recurrent step per byte (greedy at temperature 0)."""
    tok = ByteTokenizer()
    was_training = model.training
    model.eval()
    ids = torch.tensor([tok.encode(prompt)], device=device)
    out = model(ids, gla_backend=backend)
    new: list[int] = []
    for _ in range(n_bytes):
        logits = out.logits[0, -1].float()
        logits[256:] = -math.inf  # BOS/EOS never occur inside the text
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, top_k).values[-1]
                logits[logits < kth] = -math.inf
            nxt = int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator))
        new.append(nxt)
        # one step: the reference loop is exact, and on the CPU cheaper than a chunk padded to 16
        step_backend = "naive" if device.type == "cpu" else backend
        out = model(torch.tensor([[nxt]], device=device), states=out.states, gla_backend=step_backend)
    model.train(was_training)
    return tok.decode(new)


# ---------------------------------------------------------------- training


def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up for ``warmup`` steps, then a cosine from ``peak`` down to ``min_ratio · peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: GLAForCausalLM, weight_decay: float) -> list[dict]:
    """Weight decay on the projection matrices only: not on norms, biases or the (tied) embedding."""
    embedding = model.model.embeddings.weight
    decay, rest, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and p is not embedding else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Log:
    """Lines to stdout and to ``<out>/training_log.txt.partial``, renamed when the run completes."""

    def __init__(self, out: Path):
        self.final = out / "training_log.txt"
        self.partial = out / "training_log.txt.partial"
        self.file = open(self.partial, "w", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def finish(self) -> None:
        self.file.close()
        os.replace(self.partial, self.final)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "samples", "gla_export"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if head.returncode != 0:
            return "unknown"
        return head.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Train the bundled sample GLA model on the King James Bible.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--preset",
        choices=BYTE_PRESETS,
        default="sample",
        help="model shape (gla_export.models.RECOMMENDED): sample (the bundled model), hybrid-sample (GLA + windowed "
        "softmax attention, samples/hybrid-model) or sample-small (hybrid-sample's shape, GLA only)",
    )
    ap.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget of the whole run (default 30 when --steps is not given)",
    )
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (with --minutes: at most this many)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 8 on cpu, 64 on cuda)")
    ap.add_argument(
        "--seq-len", type=int, default=None, help="bytes per training sequence (default: 256 on cpu, 1024 on cuda)"
    )
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at this fraction of --lr")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout on the residual branches (long GPU runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=sample_model_path(), help="checkpoint directory to write")
    ap.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help=f"cleaned KJV text (default {corpus.DEFAULT_CORPUS}, downloaded when absent)",
    )
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument(
        "--amp", choices=("auto", "bf16", "off"), default="auto", help="bf16 autocast: auto = on for cuda only"
    )
    ap.add_argument(
        "--backend", default="chunk", help="GLA backend of gla_export.ops for training (must be differentiable)"
    )
    ap.add_argument("--save-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ap.add_argument("--eval-every", type=int, default=200, help="steps between held-out estimates")
    ap.add_argument("--eval-streams", type=int, default=8, help="held-out split is read as this many parallel streams")
    ap.add_argument("--eval-subset", type=int, default=4096, help="bytes per stream of the periodic estimate")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--gen-bytes", type=int, default=240, help="bytes of each continuation written to the log")
    args = ap.parse_args(argv)
    if args.minutes is None and args.steps is None:
        args.minutes = 30.0
    bs, sl = DEVICE_DEFAULTS[args.device]
    args.batch_size = args.batch_size or bs
    args.seq_len = args.seq_len or sl
    for name in (
        "batch_size",
        "seq_len",
        "warmup",
        "eval_every",
        "eval_streams",
        "eval_subset",
        "log_every",
        "threads",
    ):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.steps is not None and args.steps <= 0:
        ap.error(f"--steps must be positive, got {args.steps}")
    if args.minutes is not None and args.minutes <= 0:
        ap.error(f"--minutes must be positive, got {args.minutes}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available to this torch")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    use_amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else nullcontext()

    try:
        text = corpus.load(args.corpus)
        train_text, held_text = corpus.split(text)
    except corpus.CorpusError as e:
        print(f"train_sample: error: {e}", file=sys.stderr)
        return 1
    train_data = torch.frombuffer(bytearray(train_text.encode("utf-8")), dtype=torch.uint8)
    streams = split_streams(held_text, args.eval_streams)
    subset = [s[: s.rfind(b"\n", 0, args.eval_subset) + 1] or s[: args.eval_subset] for s in streams]

    tok = ByteTokenizer()
    config = recommended_config(args.preset, dropout=args.dropout)
    assert config.vocab_size == tok.vocab_size and config.bos_token_id == tok.bos_token_id
    torch.manual_seed(args.seed)
    model = GLAForCausalLM(config).to(device).train()
    sampler = WindowSampler(train_data, args.batch_size, args.seq_len, tok.bos_token_id, seed=args.seed + 1)
    opt = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out)
    log(f"# sample model training log, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    log(f"command: python samples/train_sample.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    log(f"code: git {git_commit()}; torch {torch.__version__}; python {platform.python_version()}")
    log(f"hardware: {hardware(device)}; bf16 autocast: {'on' if use_amp else 'off'}")
    log(f"corpus: King James Bible from Debian bible-kjv-text, {len(text)} bytes, sha256 {corpus.sha256_text(text)}")
    log(f"split: train {len(train_text)} bytes; held out {len(held_text)} bytes = {', '.join(corpus.HELDOUT_BOOKS)}")
    log(
        f"held-out score: {len(streams)} streams, state carried, {args.seq_len} tokens per segment; periodic estimate on {sum(map(len, subset))} bytes"
    )
    log(
        f"model: GLAForCausalLM {count_parameters(model):,} parameters; config {json.dumps(config.to_dict(), sort_keys=True)}"
    )
    hp = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    log(f"hyperparameters: {json.dumps(hp, sort_keys=True)}")
    log(f"tokens per step: {args.batch_size * args.seq_len}")

    def estimate(step: int) -> float:
        bpb, _ = evaluate_bpb(model, subset, args.seq_len, tok.bos_token_id, device, autocast, args.backend)
        log(f"eval step {step:6d} heldout_bpb_estimate {bpb:.4f}")
        return bpb

    t0 = time.time()
    estimate(0)
    eval_seconds = time.time() - t0
    total = args.steps  # None until the speed of the first steps is known (--minutes)
    # steps timed to fix `total`; they end inside the warm-up, whose rates do not depend on `total`
    calib_end = min(23, args.warmup + 1)
    calib = (max(0, min(3, calib_end - 2)), calib_end)
    budget = None if args.minutes is None else args.minutes * 60.0
    held_bytes = sum(map(len, streams))
    tokens = args.batch_size * args.seq_len
    loss_sum, loss_n, t_log, step, stopped_early = 0.0, 0, time.time(), 0, False

    while total is None or step < total:
        if step == calib[0]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_calib = time.time()
        if step == calib[1] and budget is not None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_s = (time.time() - t_calib) / (calib[1] - calib[0])
            final_s = eval_seconds * held_bytes / sum(map(len, subset)) * 1.2 + 30.0  # final score, samples, save
            per_step = step_s + eval_seconds / args.eval_every
            fit = step + int((budget - (time.time() - t_start) - final_s) / per_step)
            total = max(args.warmup + 1, fit if args.steps is None else min(args.steps, fit))
            log(
                f"timing: {step_s:.3f} s/step, periodic estimate {eval_seconds:.1f} s -> {total} steps fit in {args.minutes:g} min (rerun with --steps {total} to reproduce)"
            )

        lr = lr_at(step, total or 10**9, args.warmup, args.lr, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = (t.to(device, non_blocking=True) for t in sampler.next())
        with autocast():
            logits = model(x, gla_backend=args.backend).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_value = float(loss.detach())
        loss_sum += loss_value
        loss_n += 1
        if not math.isfinite(loss_value):
            log(f"step {step}: loss is {loss_value}; stopping (lower --lr?)")
            log.finish()
            return 1

        if step % args.log_every == 0 or step == total:
            dt = time.time() - t_log
            log(
                f"step {step:6d}/{total or '?'} loss {loss_sum / loss_n:.4f} bpb {loss_sum / loss_n / LN2:.4f} "
                f"lr {lr:.2e} gnorm {float(gnorm):.2f} tok/s {tokens * loss_n / dt:,.0f} elapsed {time.time() - t_start:.0f}s"
            )
            loss_sum, loss_n, t_log = 0.0, 0, time.time()
        if step % args.eval_every == 0 and step != total:
            estimate(step)
            t_log = time.time()
        if budget is not None and total is not None and time.time() - t_start > 1.25 * budget:
            log(f"stopping early at step {step} of {total}: past 1.25x the --minutes budget (the machine slowed down)")
            stopped_early = True
            break
    train_seconds = time.time() - t_start
    estimate(step)

    # ship the stored dtype and score what ships: reload the written files
    model.eval()
    stored = copy.deepcopy(model).to(getattr(torch, args.save_dtype))
    # no extra metadata: safetensors writes it in hash order, and the same run should give the same bytes
    save_model(stored, args.out)
    size = (args.out / "model.safetensors").stat().st_size
    shipped = load_model(args.out, device=device)
    bpb, scored = evaluate_bpb(shipped, streams, args.seq_len, tok.bos_token_id, device, nullcontext, args.backend)
    log(
        f"saved {args.out / 'model.safetensors'} ({size / 2**20:.2f} MiB, {args.save_dtype}) after {step} steps, {train_seconds / 60:.1f} min"
    )
    if size > MAX_WEIGHTS_BYTES:
        log(f"WARNING: the weights file exceeds {MAX_WEIGHTS_BYTES / 2**20:.0f} MiB, the bundled model's limit")
    log(
        f"final heldout_bpb {bpb:.4f} over all {scored} held-out bytes (shipped {args.save_dtype} weights, float32 compute)"
    )
    gen = torch.Generator().manual_seed(args.seed + 2)
    samples = []
    for prompt in PROMPTS:
        greedy = generate(shipped, prompt, args.gen_bytes, device, backend=args.backend)
        sampled = generate(shipped, prompt, args.gen_bytes, device, 0.8, 40, gen, args.backend)
        samples.append((prompt, greedy, sampled))
        log(f"greedy  {json.dumps(prompt + greedy)}")
        log(f"sampled {json.dumps(prompt + sampled)} (temperature 0.8, top-k 40)")
    write_model_card(args, config, step, train_seconds, bpb, scored, size, device, samples, stopped_early, text)
    log(f"done in {(time.time() - t_start) / 60:.1f} min")
    log.finish()
    return 0


def write_model_card(args, config, steps, seconds, bpb, scored, size, device, samples, stopped_early, text) -> None:
    if args.preset == "sample":
        title, intro = "# gla-export sample model", [
            "A byte-level Gated Linear Attention causal LM trained on the King James Bible: the default",
            "model of every gla-export command. Written by `samples/train_sample.py` (see samples/README.md",
            "for the corpus, its licence and how to reproduce); `training_log.txt` is the run's full log.",
        ]
    else:
        kind = "hybrid GLA + softmax-attention" if config.attn is not None else "Gated Linear Attention"
        title, intro = f"# gla-export {args.preset} model", [
            f"A byte-level {kind} causal LM trained on the King James Bible by",
            f"`samples/train_sample.py --preset {args.preset}` (see samples/README.md for the corpus, its licence",
            "and how to reproduce); `training_log.txt` is the run's full log.",
        ]
    gla_layers = [i for i in range(config.num_hidden_layers) if i not in set(config.attention_layers)]
    attention = ""
    for i in config.attention_layers:
        a = config.attention_spec(i)
        window = f"a sliding window of {a['window_size']} bytes" if a["window_size"] else "full causal attention"
        attention += (f"; layer {i}: softmax attention, {a['num_heads']} heads / {a['num_kv_heads']} kv heads of "
                      f"{config.hidden_size // a['num_heads']}, rotary θ {a['rope_theta']:g}, {window}")
    lines = [
        title,
        "",
        *intro,
        "",
        "| | |",
        "|---|---|",
        (
            f"| architecture | fla-compatible `GLAForCausalLM`: hidden {config.hidden_size}, {config.num_hidden_layers} layers "
            f"(GLA at {', '.join(map(str, gla_layers))}: {config.num_heads} heads, d_k {config.head_k_dim}, d_v {config.head_v_dim}"
            f"{attention}), SwiGLU MLP {config.mlp_intermediate_size}, fused gated output norm, tied embeddings, no short convolution |"
        ),
        f"| parameters | {count_parameters(config):,} |",
        f"| weights | `model.safetensors`, {args.save_dtype}, {size / 2**20:.2f} MiB (load_model casts to float32) |",
        f"| tokenizer | `gla_export.models.ByteTokenizer`: bytes 0-255, BOS 256, EOS 257 (vocab {config.vocab_size}) |",
        f"| corpus | KJV from Debian `bible-kjv-text` (public domain), {len(text):,} bytes, sha256 `{corpus.sha256_text(text)[:16]}…` |",
        f"| held out | {', '.join(corpus.HELDOUT_BOOKS)} ({scored:,} bytes), never trained on |",
        f"| **held-out bits per byte** | **{bpb:.3f}** (all held-out bytes, state carried) |",
        (
            f"| training | {steps} steps × {args.batch_size} × {args.seq_len} bytes, AdamW lr {args.lr:g} cosine, "
            f"seed {args.seed}, {seconds / 60:.1f} min on {hardware(device)}{' (stopped early)' if stopped_early else ''} |"
        ),
        "",
        "Continuations from BOS + prompt, greedy and then sampled (temperature 0.8, top-k 40):",
        "",
    ]
    for prompt, greedy, sampled in samples:
        lines += ["```", (prompt + greedy).rstrip(), "```", "", "```", (prompt + sampled).rstrip(), "```", ""]
    (args.out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
