"""`press` command line: `press serve` runs the HTTP server, `press generate` denoises one prompt in the
terminal, redrawing the draft canvas in place pass by pass."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from engine.config import EngineConfig
from engine.host_allocator import tune_host_allocator
from server.config import load_settings


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory, hub id, or 'tiny-random' (default)")
    p.add_argument("--config", default=None, help="YAML preset (configs/*.yaml); env vars and flags override it")
    p.add_argument("--dtype", default=None, help="auto (bf16 on CUDA or with int4, else fp32), float32, bfloat16")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--max-model-len", type=int, default=None, help="context length to enforce")
    p.add_argument("--default-max-tokens", type=int, default=None, help="answer budget when max_tokens is unset")
    p.add_argument("--max-num-seqs", type=int, default=None, help="requests denoising at once (rows of a pass)")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting for a slot before 503")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens encoded per engine step")
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="prompt-prefix tokens whose encoder cache is kept for reuse (0 = off)")  # fmt: skip
    p.add_argument("--batch-invariant", default=None, action=argparse.BooleanOptionalAction,
                   help="same tokens alone or batched (default on unless --compile)")  # fmt: skip
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="compiled static-shape passes, compiled at startup (default on CUDA, off on CPU)")  # fmt: skip
    p.add_argument("--quantization", default=None, choices=["none", "int8", "int4", "fp8"],
                   help="weight-only quantization applied at load (default none)")  # fmt: skip
    p.add_argument(
        "--gpu-memory",
        default=None,
        help="memory Press may use, e.g. 24GiB (host RAM on CPU; default: the device's free memory)",
    )
    p.add_argument("--served-model-name", default=None, help="model name reported by the API")
    p.add_argument("--cache-dir", default=None, help="where built-in models are materialised")


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require this key on /v1/* (Bearer or x-api-key)")
    p.add_argument("--metrics-require-key", default=None, action=argparse.BooleanOptionalAction,
                   help="also require the key on /metrics")  # fmt: skip
    p.add_argument("--cors-origins", default=None, help="comma-separated allowed origins, or *")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (413 beyond)")
    p.add_argument("--body-timeout", type=float, default=None, help="seconds to receive a request body (408 beyond)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request, 0 = none")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted")
    p.add_argument("--shutdown-timeout", type=float, default=None, help="seconds to drain on SIGTERM")
    p.add_argument("--log-requests", default=None, action=argparse.BooleanOptionalAction,
                   help="one JSON log line per request (default on)")  # fmt: skip
    p.add_argument("--log-level", default=None, help="debug, info, warning, error")
    p.add_argument("--playground", default=None, action=argparse.BooleanOptionalAction,
                   help="serve the browser playground at / (default on)")  # fmt: skip
    p.add_argument("--max-images", type=int, default=None, help="images per request (default 16)")
    p.add_argument("--max-image-bytes", type=int, default=None, help="encoded size of one image (default 20 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=None, help="width x height of one image (default 4096^2)")
    p.add_argument("--image-fetch", default=None, action=argparse.BooleanOptionalAction,
                   help="fetch http(s) image URLs (default on; off: data: URLs only)")  # fmt: skip
    p.add_argument("--image-fetch-private", default=None, action=argparse.BooleanOptionalAction,
                   help="allow image URLs on private, loopback and link-local addresses (default off)")  # fmt: skip
    p.add_argument("--image-fetch-timeout", type=float, default=None, help="seconds per image fetch (default 10)")
    p.add_argument("--ray", default=None, action=argparse.BooleanOptionalAction,
                   help="engine replicas behind one endpoint on Ray Serve (pip install press[ray])")  # fmt: skip
    p.add_argument("--ray-replicas", type=int, default=None, help="engine replicas (default 1)")
    p.add_argument("--ray-min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    p.add_argument("--ray-max-replicas", type=int, default=None, help="autoscaling: most replicas (turns it on)")
    p.add_argument("--ray-replica-cpus", type=float, default=None, help="CPUs per replica (default 1)")
    p.add_argument("--ray-replica-gpus", type=float, default=None, help="GPUs per replica (default: 1 on CUDA)")
    p.add_argument("--ray-affinity-imbalance", type=int, default=None,
                   help="requests a conversation's replica may have beyond the least loaded (default 4)")  # fmt: skip


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine half of the settings (same precedence as `press serve`)."""
    return load_settings(args).engine


def serve(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from engine.loader import plan_memory, resolve_device, resolve_model_path
    from server.app import create_app
    from server.shutdown import run_server

    settings = load_settings(args)
    if settings.server.ray:  # each replica loads (and plans) its engine where Ray places it
        try:
            from server.ray_serve.app import serve_forever
        except ImportError as exc:
            raise SystemExit(f"press serve --ray: Ray Serve is missing (pip install 'press[ray]'): {exc}") from None
        serve_forever(settings)
        return
    config = settings.engine
    try:  # refuse settings that cannot fit before anything loads (engine/memory_plan.py)
        device = resolve_device(config.device)
        model_config = AutoConfig.from_pretrained(resolve_model_path(config.model, config.cache_dir))
        plan_memory(config, model_config, device, report=False)
    except ValueError as exc:
        raise SystemExit(f"press serve: {exc}") from None
    except Exception:  # no readable config.json (a missing model): the server starts and reports it (503)
        logging.getLogger("press.server").debug("no memory plan before loading", exc_info=True)
    run_server(create_app(settings), settings.server)


def plan(args: argparse.Namespace) -> None:
    """`press plan`: the memory a model needs under these settings, from its config.json alone."""
    import torch

    from engine.loader import settings_plan
    from engine.memory_plan import describe, device_memory, load_config, parse_size

    config = load_settings(args).engine
    device = torch.device(args.plan_device)
    memory_plan = settings_plan(config, load_config(config.model, config.cache_dir), device)
    max_len = min(config.max_model_len or memory_plan.context_limit, memory_plan.context_limit)
    memory = parse_size(config.gpu_memory) if config.gpu_memory else None
    if memory is None and (device.type == "cpu" or torch.cuda.is_available()):
        memory = device_memory(device)
    print(describe(memory_plan, memory, max_len, config.max_num_seqs, config.prefix_cache_tokens))


def generate(args: argparse.Namespace) -> None:
    from engine.engine import LLMEngine
    from engine.events import CommitEvent, FinishEvent, PassEvent

    engine = LLMEngine(engine_config(args))
    tok = engine.tokenizer
    if args.raw:
        prompt = list(tok(args.prompt)["input_ids"])
    else:
        text = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
        prompt = list(tok(text, add_special_tokens=False)["input_ids"])
    params = engine.defaults.with_changes(
        max_tokens=args.max_tokens or engine.default_max_tokens(len(prompt)), seed=args.seed, include_drafts=True
    )
    if args.denoising_steps:
        params = params.with_changes(denoising_steps=args.denoising_steps)
    if args.temperature is not None:
        params = params.with_changes(t_max=args.temperature, t_min=args.temperature / 2)
    state = engine.make_request(prompt, params)
    engine.add_request(state)
    tty = sys.stdout.isatty()
    committed = ""
    drawn_lines = 0
    finish: FinishEvent | None = None
    start = time.perf_counter()

    def clear() -> None:
        nonlocal drawn_lines
        if tty and drawn_lines:
            sys.stdout.write(f"\x1b[{drawn_lines}F\x1b[J")
        drawn_lines = 0

    def emit(_state, event) -> None:
        nonlocal committed, drawn_lines, finish
        if isinstance(event, PassEvent):
            line = (
                f"[canvas {event.canvas_index} pass {event.pass_index + 1:>3}/{params.denoising_steps} "
                f"accepted {event.accepted_fraction:4.0%} entropy {event.mean_entropy:.3f}]"
            )
            if tty:
                clear()
                out = _screen(f"{line}\n{committed}{event.draft_text}")
                sys.stdout.write(out)
                drawn_lines = out.count("\n")
                sys.stdout.flush()
            else:
                print(line)
        elif isinstance(event, CommitEvent):
            committed += event.text
        elif isinstance(event, FinishEvent):
            committed += event.text
            finish = event

    while engine.has_unfinished():
        engine.step(emit)
    clear()
    elapsed = time.perf_counter() - start
    print(committed)
    if finish is not None:
        print(
            f"\n--- finish: {finish.finish_reason} | {finish.completion_tokens} tokens | {finish.canvases} canvases "
            f"| {finish.passes} passes | {finish.tokens_per_forward:.2f} tokens per forward | {elapsed:.2f} s",
            file=sys.stderr,
        )


def _screen(text: str) -> str:
    """Text made safe to redraw in place: control characters shown as '·', long lines wrapped by hand so the
    number of terminal rows is known, and only the last rows kept so the cursor can always move back up."""
    import shutil

    width, height = shutil.get_terminal_size((100, 30))
    clean = "".join(ch if ch == "\n" or ch.isprintable() else "·" for ch in text)
    rows: list[str] = []
    for line in clean.split("\n"):
        rows.extend(line[i : i + width - 1] for i in range(0, max(len(line), 1), width - 1))
    return "\n".join(rows[-(height - 2) :]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="press", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _engine_args(p_serve)
    _server_args(p_serve)
    p_plan = sub.add_parser("plan", help="memory a model needs (weights, KV cache, passes), from config.json alone")
    _engine_args(p_plan)
    p_plan.add_argument("--plan-device", default="cuda", choices=["cuda", "cpu"],
                        help="layout to plan for (quantized formats differ; default cuda)")  # fmt: skip
    p_gen = sub.add_parser("generate", help="denoise one prompt in the terminal, showing every pass")
    _engine_args(p_gen)
    p_gen.add_argument("prompt")
    p_gen.add_argument("--max-tokens", type=int, default=None)
    p_gen.add_argument("--denoising-steps", type=int, default=None)
    p_gen.add_argument("--temperature", type=float, default=None)
    p_gen.add_argument("--seed", type=int, default=None)
    p_gen.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as text")
    args = parser.parse_args(argv)
    level = (getattr(args, "log_level", None) or os.environ.get("PRESS_LOG_LEVEL") or "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The request log is machine-readable: bare JSON lines on stdout, one per request.
    request_log = logging.getLogger("press.requests")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False
    tune_host_allocator()  # before the model loads: steady CPU pass times (engine/host_allocator.py)
    if args.command == "serve":
        serve(args)
    elif args.command == "plan":
        plan(args)
    else:
        generate(args)


if __name__ == "__main__":
    main()
