"""``gla-export generate EXPORT_DIR``: constant-memory text generation from an export.

Only the generated text goes to stdout, streamed as it comes (raw UTF-8 bytes, so the output of
an interrupted run followed by its resumed run is byte-for-byte the uninterrupted output);
everything else goes to stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from . import RUNTIMES


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", default=None, help="Text to continue (a new conversation starts with BOS).")
@click.option("--prompt-ids", default=None,
              help="Token ids instead of text, e.g. '256,72,105' (for exports without a tokenizer).")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=0), default=128, show_default=True,
              help="Stop after this many tokens (0: only read the prompt, e.g. to --save-state it).")
@click.option("-b", "--backend", type=click.Choice(RUNTIMES), default="ort-cpu", show_default=True,
              help="ort-cpu / ort-cuda: ONNX Runtime; trt: TensorRT engines from `gla-export build`.")
@click.option("-t", "--temperature", type=click.FloatRange(min=0), default=None,
              help="0 is greedy  [default: 0, or the loaded state's]")
@click.option("--top-k", type=click.IntRange(min=0), default=None,
              help="Keep the k most likely tokens (0: all)  [default: 0]")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="Keep the most likely tokens up to this probability mass  [default: 1]")
@click.option("-s", "--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the sampler (default: a fresh one, printed on stderr; a loaded state keeps its position).")
@click.option("--save-state", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the conversation's state here when generation stops (also on Ctrl-C).")
@click.option("--load-state", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Continue the conversation saved in this file (with or without a new --prompt).")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the end-of-sequence token.")
@click.option("--output-ids", is_flag=True, help="Print the generated token ids (one per line) instead of text.")
@click.option("--device-id", type=click.IntRange(min=0), default=0, show_default=True, help="GPU for ort-cuda and trt.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=None,
              help="Read prompts in pieces of at most this many tokens.")
@click.option("--engines-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="TensorRT engines (default: EXPORT_DIR/tensorrt).")
@click.option("--cuda-graph/--no-cuda-graph", default=False, show_default=True,
              help="ort-cuda: replay the step as CUDA graphs captured by ONNX Runtime (opt-in until proven on a GPU).")
@click.option("--sample-on-device/--sample-on-host", default=False, show_default=True,
              help="GPU backends: pick tokens on the GPU (only token ids come to the host each step; opt-in).")
@click.option("-i", "--interactive", is_flag=True,
              help="Chat: after each answer, read the next prompt from stdin (one line; empty: go on); Ctrl-D ends.")
@click.option("-q", "--quiet", is_flag=True, help="No status on stderr.")
def generate(export_dir: Path, prompt: str | None, prompt_ids: str | None, max_new_tokens: int, backend: str,
             temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None,
             save_state: Path | None, load_state: Path | None, ignore_eos: bool, output_ids: bool, device_id: int,
             threads: int | None, prefill_chunk: int | None, engines_dir: Path | None, cuda_graph: bool,
             sample_on_device: bool, interactive: bool, quiet: bool) -> None:
    """Generate text from the export in EXPORT_DIR, streaming it to stdout.

    Memory stays constant however many tokens are generated: the prompt is read once by
    prefill.onnx, then step.onnx runs once per token on the recurrent states. Greedy by default;
    --temperature, --top-k, --top-p and --seed sample. --save-state and --load-state stop and
    resume a conversation exactly; --interactive keeps it going, one prompt per line of stdin.
    """
    from .._files import check_output_path
    from ..errors import UsageError
    from ..runtime.decoder import FINISH_INTERRUPTED, StatefulDecoder
    from ..runtime.sampling import SamplingParams
    from ..runtime.state import load_state as read_state
    from ..runtime.state import save_state as write_state
    from ..runtime.tokenizers import parse_ids

    def status(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    if prompt is not None and prompt_ids is not None:
        raise UsageError("give --prompt or --prompt-ids, not both")
    if save_state is not None:
        check_output_path(save_state)
    if prompt is not None:
        # bytes of the command line that are not UTF-8 reach Python as lone surrogates: take the
        # bytes back and replace what is not text by U+FFFD, as for --interactive's stdin
        try:
            text = prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # surrogates that no byte stands for
            text = prompt.encode("utf-8", "replace").decode("utf-8")
        if text != prompt:
            status("note: bytes of --prompt that are not UTF-8 text were replaced by U+FFFD")
        prompt = text
    t0 = time.perf_counter()
    decoder = StatefulDecoder(export_dir, backend, device_id=device_id, threads=threads, prefill_chunk=prefill_chunk,
                              engines_dir=engines_dir, cuda_graph=cuda_graph if backend == "ort-cuda" else None,
                              sample_on_device=sample_on_device if backend != "ort-cpu" else None)
    ids = parse_ids(prompt_ids, decoder.vocab_size) if prompt_ids is not None else None

    state = None
    saved: dict = {}
    if load_state is not None:
        state = read_state(load_state, identity=decoder.identity, device=decoder.device)
        saved = (state.sampler or {}).get("params", {})
        status(f"loaded {load_state}: {state.consumed} tokens of context, {state.generated} generated, "
               f"last stop: {state.finish_reason or 'unknown'}")
        if state.finish_reason == "eos" and prompt is None and ids is None:
            status("note: that conversation ended with the end-of-sequence token; continuing anyway")
    elif prompt is None and ids is None and not interactive:
        status("no prompt: generating from the beginning-of-sequence token")
        prompt = ""
    params = SamplingParams(
        temperature=temperature if temperature is not None else saved.get("temperature", 0.0),
        top_k=top_k if top_k is not None else saved.get("top_k", 0),
        top_p=top_p if top_p is not None else saved.get("top_p", 1.0),
        seed=seed,
    )
    # a resumed conversation keeps its parameters and position unless options say otherwise
    explicit = any(v is not None for v in (temperature, top_k, top_p, seed))
    sampling = params if state is None or explicit else None

    desc = "greedy" if params.temperature == 0 else (
        f"temperature {params.temperature}" + (f", top-k {params.top_k}" if params.top_k else "")
        + (f", top-p {params.top_p}" if params.top_p < 1 else ""))
    if sampling is None and state is not None:
        desc = "the saved state's sampler"
    form = decoder.metadata.form
    status(f"{backend}: {decoder.runtime_name}, {form} GLA op, loaded in {time.perf_counter() - t0:.2f} s; "
           f"state {decoder.state_nbytes / 2**10:.0f} KiB; {desc}")

    first = prompt is not None or ids is not None or state is not None or not interactive
    if interactive and hasattr(sys.stdin, "reconfigure"):
        # bytes that are not text in stdin's encoding become U+FFFD (and a note), not a traceback
        sys.stdin.reconfigure(errors="replace")
    while True:
        if not first:  # interactive: the next prompt is a line of stdin
            if not quiet:
                click.echo("\n> ", err=True, nl=False)
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if "\ufffd" in line:
                encoding = getattr(sys.stdin, "encoding", None) or "UTF-8"
                status(f"note: bytes of that line that are not {encoding} text were replaced by U+FFFD")
            prompt, ids = (line if line or state is None else None), None
        first = False
        stop_requested: list = []  # Ctrl-C appends: the generation stops after the current token
        gen = decoder.generate(prompts=prompt, prompt_ids=ids, states=state, max_new_tokens=max_new_tokens,
                               sampling=sampling, ignore_eos=ignore_eos, keep_tokens=False,
                               should_stop=stop_requested.__len__)
        result = _stream(gen, output_ids, status, stop_requested)
        state, sampling = result.state, None  # later turns continue this conversation and its sampler
        if save_state is not None:
            write_state(save_state, state, decoder.metadata)
            status(f"state saved to {save_state} ({state.consumed} tokens of context + 1 pending)")
        if result.finish_reason == FINISH_INTERRUPTED and not interactive:
            raise KeyboardInterrupt  # the CLI's usual exit for Ctrl-C (130), now that the state is safe
        if not interactive:
            break


def _stream(gen, output_ids: bool, status, stop_requested: list):  # noqa: ANN001
    """Write a generation's text (or ids) to stdout as it comes; Ctrl-C asks it to stop cleanly."""
    import signal

    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # noqa: ANN001
        stop_requested.append(True)
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C stops at once

    out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    n, t_first, t_start = 0, None, time.perf_counter()
    in_main_thread = _is_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        for event in gen:
            if t_first is None:
                t_first = time.perf_counter()
            if event.token >= 0:
                n += 1
            if output_ids:
                if event.token >= 0:
                    sys.stdout.write(f"{event.token}\n")
                    sys.stdout.flush()
            elif event.piece:
                if out is not None:
                    out.write(event.piece)
                    out.flush()
                else:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    t_end = time.perf_counter()
    result = gen.results[0]
    if sys.stdout.isatty() and not output_ids:
        click.echo("", err=True)
    sampler = result.state.sampler or {}
    sampled = sampler.get("params", {}).get("temperature", 0) > 0
    rate = f" ({(n - 1) / (t_end - t_first):.0f} tokens/s after the first)" if n > 1 and t_end > t_first else ""
    status(f"{n} tokens in {t_end - t_start:.2f} s{rate}; stopped: {result.finish_reason}"
           + (f"; sampler seed {sampler['seed']}" if sampled else ""))
    return result


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

