"""`workbench`: the command line. It parses, then calls the library; no logic of its own lives here.

    workbench data CONFIG.toml [--force] [--data.key value ...]        (build the dataset folder data.dir:
                                                                         tokenizer, shards, manifest)
    workbench diagrams OUT [--train N] [--val N] [--test N] [--size PX] [--seed S] [--kinds a,b] [--force]
                                                                         (diagram documents for a VLM: shards,
                                                                          Verilog tree, PDF; docs/diagrams.md)
    workbench train CONFIG.toml [--resume] [--section.key value ...]   (--resume: continue the run if it has
                                                                         a checkpoint, start it otherwise)
    workbench fundamentals CONFIG.toml [--resume] [--section.key value ...]
                                                                         (the fundamentals: autograd engine, CNN,
                                                                          RNN/LSTM, VAE; configs/fundamentals/)
    workbench diffusion CONFIG.toml [--resume] [--section.key value ...]
                                                                         (a small text-to-image diffusion model,
                                                                          EMA, sample grids; configs/diffusion/)
    workbench nerf CONFIG.toml [--resume] [--section.key value ...]     (a NeRF fitted to a rendered scene:
                                                                          held-out PSNR, novel-view GIF;
                                                                          configs/nerf/, docs/nerf.md)
    workbench video CONFIG.toml [--resume] [--section.key value ...]    (the causal video VAE, then a text-to-
                                                                          video AsymmDiT on its latents: GIFs;
                                                                          configs/video/, docs/video-training.md)
    workbench sweep SWEEP.toml [--resume] [--sweep.key value ...]      (Ray Tune over dotted config paths of a
                                                                          base config: ASHA / median stopping,
                                                                          trials as run folders, results table,
                                                                          plots, best.toml; configs/sweeps/,
                                                                          docs/sweeps.md)
    workbench generate (--ckpt RUN_DIR | --hf-dir DIR) [--adapter DIR] --prompt TEXT [--max-new-tokens N]
                       [--temperature T] [--top-k K] [--top-p P] [--stop S ...] [--seed S] [--chat]
                       [--image FILE [--page K]]                      (--image: a paligemma2 model reads an
                                                                         image or a PDF page; docs/paligemma2.md)
    workbench sample --hf-dir DIR --prompt TEXT --out PNG [--negative-prompt T] [--steps N] [--guidance G]
                     [--seed S] [--height H] [--width W] [--scheduler ddim|ddpm] [--eta E] [--device D]
                                                                         (text-to-image from a diffusers Stable
                                                                          Diffusion folder; docs/stable-diffusion.md)
    workbench chat (--ckpt RUN_DIR | --hf-dir DIR) [--adapter DIR] [--system TEXT] [--max-new-tokens N]
                   [--temperature T] [--top-k K] [--top-p P] [--seed S] [--max-length N]
                                                                         (a conversation: one message per line
                                                                          on stdin, /reset, /exit, EOF ends)
    workbench serve (--ckpt RUN_DIR | --hf-dir DIR) [--port N] [--host H] [--lora NAME=DIR ...] [--model-name M]
                    [--max-batch N] [--block-size N] [--num-blocks N] [--max-len N] [--api-key KEY]
                                                                         (an OpenAI-compatible HTTP server;
                                                                          prints its URL on stdout)
    workbench export (--ckpt RUN_DIR | --hf-dir DIR) [--adapter DIR] --out DIR [--dtype D] [--max-shard-mb M]
                     [--quant int8|llm-int8]                             (int8 weights + scales; docs/quantization.md)
    workbench export RUN_DIR --to hf OUT                                 (the same, short)
    workbench eval --task A,B (--ckpt RUN_DIR | --hf-dir DIR) [--out DIR] [--batch-size N] [--max-length N]
                   [--TASK.key value ...]                                (task options, e.g. --reasoning.n 50)
    workbench eval --list                                                (the tasks and their options)
    workbench report RUN_DIR                                             (rewrite the run's report.md)
    workbench plan-context [--model llama3:8B] [--seq-len 128k,1M,4M] [--cp 1,8,32] [--pattern dense]
                           [--ac full] [--dp-shard N] [--measure]      (per-rank memory and FLOPs, long context)

generate, chat, eval and export take `--quant {none,int8,llm-int8}`: the model's linear layers quantized on load.

Under a launcher, `--local_rank N` / `--local-rank=N` (which the deepspeed launcher adds before the command)
is accepted and ignored: the LOCAL_RANK environment variable, which every launcher sets, is what counts.

Errors a user can cause (a bad config key, a missing directory, a corrupt file) print one line,
`error: ...`, on stderr and exit with status 2. `generate` prints only the generated text on stdout, `chat`
only the replies (one per message); everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

from workbench.errors import WorkbenchError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def _add_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--ckpt", metavar="RUN_DIR", help="a workbench run folder (or one of its checkpoints)")
    src.add_argument("--hf-dir", metavar="DIR", help="a Hugging Face model directory (config.json, safetensors)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto keeps the stored dtype")
    p.add_argument("--quant", default="none", choices=["none", "int8", "llm-int8"],
                   help="quantize the linear layers to int8 (weight-only) or LLM.int8() (docs/quantization.md); "
                        "export writes them quantized")
    if p.prog.split()[-1] in ("generate", "chat", "export"):
        p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (adapter.safetensors + "
                                                        "adapter_config.json, e.g. a checkpoint's adapter/) merged "
                                                        "into the model first")


def cmd_data(args: argparse.Namespace, overrides: list[str]) -> int:
    from data_pipelines.shards import build_dataset
    from workbench.config import load_config
    from workbench.job import JobConfig

    job = load_config(JobConfig, args.config, overrides)
    build_dataset(job.data, force=args.force, log=_log)
    return 0


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from workbench.config import dumps_toml, load_config
    from workbench.job import JobConfig
    from workbench.train.trainer import Trainer

    job = load_config(JobConfig, args.config, overrides)
    main = int(os.environ.get("RANK", "0")) == 0  # under a launcher, rank 0 speaks for the run
    log = _log if main else (lambda *a, **k: None)
    log("# resolved config\n" + dumps_toml(job))
    trainer = Trainer(job, resume=args.resume, log=log)
    try:
        return _train(trainer, job, log, main)
    finally:
        trainer.close()


def cmd_fundamentals(args: argparse.Namespace, overrides: list[str]) -> int:
    from workbench.train.fundamentals.runner import Interrupted, run_job

    try:
        results = run_job(args.config, overrides, resume=args.resume, log=_log)
    except Interrupted as e:
        _log(str(e))
        return 128 + e.signum  # the shell's convention for "ended by signal N", checkpoint saved
    for key, value in results.items():
        if key != "run_dir":
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _task_verb(args: argparse.Namespace, overrides: list[str], names: tuple[str, ...], verb: str,
               folder: str) -> int:
    """A task verb (`workbench diffusion | nerf | video CONFIG`): the config must name one of `names`, then the
    fundamentals runner (workbench.train.fundamentals.runner) runs it."""
    from workbench.config import load_toml

    task = load_toml(args.config).get("task", {})
    if not isinstance(task, dict) or task.get("name") not in names:
        said = " or ".join(f'"{n}"' for n in names)
        raise WorkbenchError(f"{verb}: {args.config} is not a {verb} config ([task] name = {said}; see {folder})")
    return cmd_fundamentals(args, overrides)


def cmd_diffusion(args: argparse.Namespace, overrides: list[str]) -> int:
    return _task_verb(args, overrides, ("diffusion",), "diffusion", "configs/diffusion/")


def cmd_nerf(args: argparse.Namespace, overrides: list[str]) -> int:
    return _task_verb(args, overrides, ("nerf",), "nerf", "configs/nerf/")


def cmd_video(args: argparse.Namespace, overrides: list[str]) -> int:
    return _task_verb(args, overrides, ("video_vae", "video"), "video", "configs/video/")


def cmd_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    try:
        from workbench.train.sweep import run_sweep
    except ImportError as e:
        if (e.name or "").split(".")[0] != "ray":
            raise
        raise WorkbenchError("sweep: needs Ray Tune and Train: pip install -e '.[ray]' (or make setup)") from None
    summary = run_sweep(args.config, overrides, resume=args.resume, log=_log)
    if summary.get("interrupted"):
        return 128 + int(summary["signal"])  # the shell's convention for "ended by signal N", state saved
    if summary["best"] is None:
        raise WorkbenchError(f"sweep: no trial finished; see {summary['dir']}/report.md")
    print(summary["best_config"])  # stdout: the best config, for scripts
    return 0


def _train(trainer, job, _log, main: bool) -> int:
    history = trainer.fit()
    if trainer.stop_signal is not None and trainer.step < job.train.steps:
        _log(f"report: {trainer.report_path}")
        return 128 + trainer.stop_signal  # the shell's convention for "ended by signal N", checkpoint saved
    if history:
        first, last = history[0]["loss"], history[-1]["loss"]
        _log(f"loss: {first:.3f} at step {history[0]['step']} -> {last:.3f} at step {history[-1]['step']}")
    if trainer.last_val is not None:
        from workbench.train.trainer import describe_validation

        v = trainer.last_val
        _log(f"validation at step {v['step']}: {describe_validation(v, trainer.baseline)}; "
             f"curve: {trainer.run_dir / 'loss.png'}")
    if job.train.sample_tokens:
        text = trainer.sample(job.train.sample_prompt, job.train.sample_tokens, seed=job.run.seed)
        _log(f"sample ({job.train.sample_tokens} tokens after {job.train.sample_prompt!r}):")
        if main:
            print(job.train.sample_prompt + text)
    _log(f"run folder: {trainer.run_dir}")
    _log(f"report: {trainer.report_path}")
    return 0


def _sampling_params(args: argparse.Namespace):
    from workbench.config import from_dict
    from workbench.errors import ConfigError
    from workbench.inference.generator import SamplingParams

    try:
        return from_dict(SamplingParams, {
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "stop": getattr(args, "stop", None) or [], "seed": args.seed,
            "repetition_penalty": args.repetition_penalty})
    except ConfigError as e:  # name the flag the user typed, not the dataclass field
        raise ConfigError(re.sub(r"config key '(\w+)(\[\d+\])?'", lambda m: "--" + m.group(1).replace("_", "-"),
                                 str(e))) from None


def _text_only(section, command: str, source: str) -> None:
    """chat and serve run text models only: a vision-language model needs an image per prompt."""
    if section.family == "paligemma2":
        raise WorkbenchError(f"{command}: {source} is a vision-language model ({section.family}); ask it about an "
                             "image with `workbench generate --image FILE`")


def cmd_generate(args: argparse.Namespace) -> int:
    from workbench.checkpoint.load import load_for_inference
    from workbench.inference.engine import Engine
    from workbench.train.trainer import pick_device

    params = _sampling_params(args)
    if args.page is not None and args.image is None:
        raise WorkbenchError("--page K needs --image FILE (a PDF)")
    if args.image is not None and args.chat:
        raise WorkbenchError("--chat cannot be combined with --image (a vision-language prompt has no chat template)")
    image = None
    if args.image is not None:  # the file first: a bad path or page fails before minutes of model loading
        from workbench.inference.vlm import load_image

        image = load_image(args.image, args.page)
    device = pick_device(args.device, "--device")
    model, tokenizer, section = load_for_inference(args.ckpt, args.hf_dir, device, _dtype(args.dtype), args.adapter,
                                                    quant=args.quant)
    if (section.family == "paligemma2") != (args.image is not None):  # vision-language models: inference/vlm.py
        if args.image is None:
            raise WorkbenchError(f"{args.ckpt or args.hf_dir} is a vision-language model ({section.family}): "
                                 "give --image FILE (and --page K for a PDF)")
        raise WorkbenchError(f"--image needs a vision-language model (paligemma2); {args.ckpt or args.hf_dir} is a "
                             f"text-only {section.family} model")
    if image is not None:
        from workbench.inference.vlm import VLMGenerator, image_prompt

        prompt = image_prompt(model, tokenizer, image, args.prompt)
        completion = VLMGenerator(model, tokenizer).generate([prompt], params)[0]
        sys.stdout.write(completion.text + "\n")
        sys.stdout.flush()
        return 0
    if args.chat:  # the prompt as a user turn of the chat template; the reply ends at <|end|>
        from workbench.data.chat import ChatTemplate

        template = ChatTemplate(tokenizer)
        prompt, params.stop_token_ids = template.ask(args.prompt), template.stop_ids
    else:
        prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise WorkbenchError("--prompt: encodes to no tokens and the tokenizer adds no bos; give some text")
    # one request: the engine's cache holds exactly it (generate does not cap a prompt at the model's max_seq_len)
    engine = Engine(model, tokenizer, max_batch=1, max_len=len(prompt) + params.max_new_tokens + 1)
    completion = engine.generate([prompt], params)[0]
    sys.stdout.write(completion.text + "\n")
    sys.stdout.flush()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from evals.runner import default_max_length
    from workbench.checkpoint.load import load_for_inference, load_run_config
    from workbench.data.chat import ChatTemplate
    from workbench.inference.chat import ChatSession, run_chat
    from workbench.inference.engine import Engine
    from workbench.train.trainer import pick_device

    params = _sampling_params(args)
    if args.max_length is not None and args.max_length < 2:
        raise WorkbenchError(f"--max-length: expected an integer >= 2, got {args.max_length}")
    device = pick_device(args.device, "--device")
    model, tokenizer, section = load_for_inference(args.ckpt, args.hf_dir, device, _dtype(args.dtype), args.adapter,
                                                    quant=args.quant)
    _text_only(section, "chat", args.ckpt or args.hf_dir)
    template = ChatTemplate(tokenizer)  # names the reserved chat tokens a foreign tokenizer lacks
    job = load_run_config(args.ckpt) if args.ckpt else None
    window = args.max_length or default_max_length(job, model)  # a run's training window (data.seq_len)
    engine = Engine(model, tokenizer, max_batch=1, max_len=window)  # the session keeps prompt + reply in the window
    session = ChatSession(engine, template, params, window, args.system)
    interactive = sys.stdin.isatty()
    _log(f"chat with {args.ckpt or args.hf_dir}: window {window} tokens, replies up to {params.max_new_tokens}; "
         f"{', '.join(f'{c} to {what}' for c, what in (('/reset', 'start over'), ('/exit', 'end')))}")

    def lines():
        if not interactive:
            yield from sys.stdin
            return
        while True:
            try:
                yield input("you> ")
            except EOFError:
                return

    def say(text: str) -> None:
        sys.stdout.write(("bot> " if interactive else "") + text + "\n")
        sys.stdout.flush()

    run_chat(session, lines(), say, _log)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from workbench.checkpoint.load import load_for_inference, run_dir_of
    from workbench.checkpoint.run import resolve_checkpoint
    from workbench.inference.engine import Engine
    from workbench.inference.server import serve
    from workbench.train.trainer import pick_device

    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--block-size", args.block_size, 1),
                             ("--num-blocks", args.num_blocks, 2), ("--max-len", args.max_len, 2),
                             ("--max-body-bytes", args.max_body_bytes, 1)):
        if value is not None and value < low:
            raise WorkbenchError(f"{flag}: expected an integer >= {low}, got {value}")
    if not 0 <= args.port <= 65535:
        raise WorkbenchError(f"--port: expected 0 (any free port) to 65535, got {args.port}")
    loras = {}
    for spec in args.lora or []:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder or name in loras:
            raise WorkbenchError(f"--lora: expected NAME=DIR with a new name, got {spec!r}")
        loras[name] = folder
    device = pick_device(args.device, "--device")
    quant = {"quant": args.quant} if getattr(args, "quant", "none") != "none" else {}
    model, tokenizer, section = load_for_inference(args.ckpt, args.hf_dir, device, _dtype(args.dtype), **quant)
    _text_only(section, "serve", args.ckpt or args.hf_dir)
    base = Path(args.hf_dir) if args.hf_dir else run_dir_of(resolve_checkpoint(args.ckpt))
    registry = None
    if loras:
        from workbench.inference.adapters import load_adapters

        try:
            registry = load_adapters(model, loras, tokenizer=base / "tokenizer.json")
        except ValueError as e:
            raise WorkbenchError(f"--lora: {e}") from None
    try:
        engine = Engine(model, tokenizer, block_size=args.block_size, num_blocks=args.num_blocks,
                        max_batch=args.max_batch, max_len=args.max_len, adapters=registry)
    except ValueError as e:
        raise WorkbenchError(str(e)) from None
    name = args.model_name or base.resolve().name
    _log(f"engine: max_len {engine.max_len}, KV cache {engine.capacity_tokens} tokens "
         f"({engine.free_blocks} blocks of {engine.block_size}), max_batch {engine.max_batch}"
         + (f", adapters {', '.join(registry.names)}" if registry else ""))

    def announce(line: str) -> None:
        print(line, flush=True)

    return serve(engine, tokenizer, name, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
                 api_key=args.api_key or os.environ.get("WORKBENCH_API_KEY"), log=_log, announce=announce)


def cmd_export(args: argparse.Namespace) -> int:
    from workbench.checkpoint.hf import export_hf_dir
    from workbench.checkpoint.load import load_for_inference

    # `export RUN_DIR --to hf OUT` is the short form of `export --ckpt RUN_DIR --out OUT`
    if args.run_dir is not None:
        if args.ckpt or args.hf_dir:
            raise WorkbenchError("export: give the model once: RUN_DIR, --ckpt RUN_DIR or --hf-dir DIR")
        args.ckpt = args.run_dir
    if args.to is not None:
        if args.to[0] != "hf":
            raise WorkbenchError(f"--to: unknown format {args.to[0]!r} (expected 'hf')")
        if args.out is not None:
            raise WorkbenchError("export: give the output once: --to hf OUT or --out OUT")
        args.out = args.to[1]
    if not (args.ckpt or args.hf_dir):
        raise WorkbenchError("export: which model? give RUN_DIR, --ckpt RUN_DIR or --hf-dir DIR")
    if args.out is None:
        raise WorkbenchError("export: where to? give --to hf OUT or --out DIR")
    if args.max_shard_mb is not None and args.max_shard_mb <= 0:
        raise WorkbenchError(f"--max-shard-mb: expected a size > 0 in MiB, got {args.max_shard_mb}")
    model, tokenizer, section = load_for_inference(args.ckpt, args.hf_dir, "cpu", _dtype(args.dtype), args.adapter,
                                                   quant=args.quant)
    max_bytes = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    quantized = getattr(model, "quantization", None)  # --quant, or a quantized source: int8 weights + scales
    if quantized:
        from workbench.inference.quant import save_quantized

        out = save_quantized(model, section, tokenizer, args.out, tokenizer_source=args.hf_dir, max_shard_bytes=max_bytes)
    else:
        out = export_hf_dir(model, section, tokenizer, args.out, tokenizer_source=args.hf_dir, max_shard_bytes=max_bytes)
    _log(f"exported {section.family}{' ' + quantized['method'] if quantized else ''} to {out}")
    return 0


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from evals import registry
    from evals.runner import run_eval

    if args.list:
        for name, task in registry.tasks().items():
            print(f"{name:14s} {task.description}")
            for f in dataclasses.fields(task.Config):
                doc = f.metadata.get("doc", "")
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                print(f"    --{name}.{f.name} (default {default!r}){': ' + doc if doc else ''}")
        return 0
    if args.task is None:
        raise WorkbenchError("eval: which tasks? give --task A,B (`workbench eval --list` names them)")
    if not (args.ckpt or args.hf_dir):
        raise WorkbenchError("eval: which model? give --ckpt RUN_DIR or --hf-dir DIR")
    out = run_eval(args.task, ckpt=args.ckpt, hf_dir=args.hf_dir, out=args.out, options=overrides,
                   batch_size=args.batch_size, max_length=args.max_length, device=args.device,
                   dtype=_dtype(args.dtype), log=_log, quant=args.quant)
    print(out / "report.md")  # stdout: the eval's report, for scripts
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.checkpoint.load import run_dir_of
    from workbench.train.report import write_run_report

    run_dir = run_dir_of(Path(args.run_dir))
    if not (run_dir / "config.toml").is_file():
        raise WorkbenchError(f"report: {run_dir} is not a run folder (no config.toml)")
    print(write_run_report(run_dir))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from workbench.checkpoint.hf.diffusers_sd import load_sd_dir
    from workbench.models.diffusion.pipeline import check_size, sample_from, save_png

    for name, value, ok in (("--steps", args.steps, args.steps > 0), ("--guidance", args.guidance, args.guidance >= 0),
                            ("--eta", args.eta, args.eta >= 0)):
        if not ok:
            raise WorkbenchError(f"sample: {name} must be {'> 0' if name == '--steps' else '>= 0'}, got {value}")
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value <= 0 or value % 8):
            raise WorkbenchError(f"sample: {name} must be a positive multiple of 8, got {value}")
    if not args.out.lower().endswith(".png"):
        raise WorkbenchError(f"sample: --out must name a .png file, got {args.out!r}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.ckpt is not None:  # a `workbench diffusion` run: its EMA weights, its own pixel size and vocabulary
        from workbench.train.diffusion import load_run, prompt_condition, sample, schedule_config

        run = load_run(args.ckpt, device)
        x = run.data().images.train[0]
        images = sample(run.net, prompt_condition(run, args.prompt), tuple(x.shape[1:]), schedule_config(run.cfg),
                        steps=args.steps, guidance=args.guidance, eta=args.eta, sampler=args.scheduler,
                        generator=torch.Generator().manual_seed(args.seed))
        for path in save_png(images.permute(0, 2, 3, 1).expand(-1, -1, -1, 3), args.out):  # (B, H, W, 3)
            print(path)
        return 0
    components = load_sd_dir(args.hf_dir, device=device, dtype=_dtype(args.dtype) if args.dtype != "auto" else None)
    try:
        f = components.vae.cfg.downscale
        check_size(args.height or components.unet.cfg.sample_size * f, args.width or components.unet.cfg.sample_size * f, f)
    except ValueError as e:
        raise WorkbenchError(f"sample: {e}") from None
    with tqdm(total=args.steps, desc="sample", unit="step", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        images = sample_from(components, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                             guidance=args.guidance, seed=args.seed, height=args.height, width=args.width,
                             scheduler=args.scheduler, eta=args.eta, guidance_rescale=args.guidance_rescale,
                             progress=bar.update)
    for path in save_png(images, args.out):
        print(path)
    return 0


def cmd_plan_context(args: argparse.Namespace) -> int:
    from workbench.parallel.memory_plan import run_cli

    default = ("256,512,1024,2048" if args.measure else "128k,1M,4M")
    print(run_cli(args.model, args.seq_len or default, args.cp, args.pattern, args.ac, args.dp_shard, args.tp,
                  args.ep, args.micro_batch, args.precision, args.kernel, measure_mode=args.measure))
    return 0


def _add_local_rank(p: argparse.ArgumentParser) -> None:
    """`--local_rank=N`, as the deepspeed launcher appends it (and torch.distributed.launch); ignored."""
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def cmd_diagrams(args: argparse.Namespace) -> int:
    from workbench.data.vision import build_vision_dataset

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    build_vision_dataset(args.out, n_train=args.train, n_val=args.val, n_test=args.test, size=args.size,
                         seed=args.seed, kinds=kinds, force=args.force, log=_log)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.split("\n")[0])
    _add_local_rank(parser)  # the deepspeed launcher puts it before the command
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="build a dataset folder (tokenizer, webdataset shards, manifest) from a config")
    p.add_argument("config", help="experiment file; its [data] section says what to build")
    p.add_argument("--force", action="store_true", help="rebuild data.dir even if it was built from other settings")

    p = sub.add_parser("diagrams", help="build the diagram dataset (flowcharts, circuits with Verilog netlists, "
                                        "captioned shapes): webdataset shards, verilog/, documents.pdf")
    p.add_argument("out", help="dataset folder (reused when built with the same settings)")
    p.add_argument("--train", type=int, default=3000, help="training samples")
    p.add_argument("--val", type=int, default=300, help="validation samples")
    p.add_argument("--test", type=int, default=300, help="test samples")
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="flowchart,circuit,shapes", help="comma-separated: flowchart, circuit, shapes")
    p.add_argument("--force", action="store_true", help="rebuild OUT even if it was built with other settings")

    p = sub.add_parser("train", help="train a model from a TOML config (overrides: --section.key value)")
    p.add_argument("config", help="experiment file, e.g. configs/llama3/demo.toml")
    p.add_argument("--resume", action="store_true",
                   help="continue the run folder's newest complete checkpoint (start the run if it has none)")
    _add_local_rank(p)

    # the fundamentals runner's verbs: a config, --resume, then dotted overrides
    for verb, example, help_ in (
        ("fundamentals", "configs/fundamentals/resnet.toml",
         "run a fundamentals experiment (autograd engine, CNN, RNN/LSTM, VAE) from configs/fundamentals/"),
        ("diffusion", "configs/diffusion/shapes.toml",
         "train a small text-to-image diffusion model (EMA, sample grids) from configs/diffusion/"),
        ("nerf", "configs/nerf/scene.toml",
         "fit a NeRF to a scene rendered from known geometry (or a Blender-format folder) from configs/nerf/"),
        ("video", "configs/video/vae.toml", "train the causal video VAE (configs/video/vae.toml) or the "
                                            "text-to-video AsymmDiT on its latents (configs/video/dit.toml)"),
    ):
        p = sub.add_parser(verb, help=help_ + "; prints its results")
        p.add_argument("config", help=f"experiment file, e.g. {example}")
        p.add_argument("--resume", action="store_true",
                       help="continue the run folder's newest complete checkpoint (start the run if it has none)")

    p = sub.add_parser("sweep", help="a Ray Tune sweep over dotted config paths of a base config (trials are run "
                                     "folders; ASHA or median stopping); prints the best config's path")
    p.add_argument("config", help="sweep file, e.g. configs/sweeps/llama3-lr.toml")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep folder's sweep: finished trials are kept, unfinished ones continue "
                        "from their checkpoints (start the sweep if there is none)")

    p = sub.add_parser("generate", help="generate a continuation of a prompt")
    _add_source(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off; > 1 discourages repeats")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="ask the prompt as a user turn of the chat template (an SFT or "
                                                       "DPO model's format); the reply ends at <|end|>")
    p.add_argument("--image", metavar="FILE", help="an image (PNG, JPEG, ...) or a PDF for a vision-language model "
                                                   "(paligemma2): the prompt is asked about it (docs/paligemma2.md)")
    p.add_argument("--page", type=int, metavar="K", help="with a PDF --image: the page to read, numbered from 1 "
                                                         "(default 1)")

    p = sub.add_parser("chat", help="talk to a chat model: one message per line on stdin (interactive or piped), "
                                    "the conversation kept (and cut from its oldest turns to fit the window)")
    _add_source(p)
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the longest reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off; > 1 discourages repeats")
    p.add_argument("--seed", type=int, default=None, help="turn n samples with seed + n")
    p.add_argument("--max-length", type=int, default=None,
                   help="the window in tokens, conversation and reply together (default: the run's data.seq_len; "
                        "for --hf-dir the model's limit up to 2048)")

    p = sub.add_parser("serve", help="serve a model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, "
                                     "/v1/models) on the continuous-batching engine; see docs/inference.md")
    _add_source(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port (the URL printed on start names it)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the run or HF folder name)")
    p.add_argument("--lora", action="append", metavar="NAME=DIR",
                   help="serve a LoRA/DoRA adapter folder under NAME (repeatable): requests whose `model` is NAME use it")
    p.add_argument("--max-batch", type=int, default=16, help="requests in one step at most")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: max-batch full windows, "
                                                                "1 GiB at most)")
    p.add_argument("--max-len", type=int, default=None, help="prompt + completion tokens at most (default: the "
                                                             "model's max_seq_len)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: the "
                                                   "WORKBENCH_API_KEY environment variable; unset = no key)")

    p = sub.add_parser("export", help="write a Hugging Face directory (safetensors + config + tokenizer)")
    _add_source(p, required=False)
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="the same as --ckpt RUN_DIR")
    p.add_argument("--to", nargs=2, metavar=("FORMAT", "OUT"), help="`--to hf OUT`: the same as --out OUT")
    p.add_argument("--out", metavar="DIR")
    p.add_argument("--max-shard-mb", type=float, default=None, help="split the weights into shards of this size")

    p = sub.add_parser("eval", help="run eval tasks on a model; results.json + report.md (task options: --TASK.key value)")
    _add_source(p, required=False)
    p.add_argument("--task", metavar="A,B", help="comma-separated task names (see --list)")
    p.add_argument("--list", action="store_true", help="list the tasks and their options")
    p.add_argument("--out", metavar="DIR", help="default: RUN_DIR/evals/step-N, or runs/evals/NAME for --hf-dir")
    p.add_argument("--batch-size", type=int, default=16, help="prompts or windows per forward")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest window (default: the run's data.seq_len; for --hf-dir the model's limit up to 2048)")

    p = sub.add_parser("report", help="rewrite a run folder's report.md (training runs write it at each checkpoint)")
    p.add_argument("run_dir", metavar="RUN_DIR")

    p = sub.add_parser("sample", help="text-to-image with classifier-free guidance from a diffusers Stable Diffusion "
                                      "folder (the same image diffusers gives for the seed); prints the PNG path")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", metavar="DIR", help="a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, "
                                                     "text_encoder/, tokenizer/, scheduler/)")
    src.add_argument("--ckpt", metavar="RUN_DIR", help="a `workbench diffusion` run (its EMA weights; the prompt in its "
                                                       "caption words, e.g. 'a star')")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="the unconditional branch's prompt (default: empty)")
    p.add_argument("--out", required=True, metavar="PNG", help="the image file to write")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 turns it off")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="0 = off; 0.7 for zero-terminal-SNR models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the UNet's sample size x 8)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--eta", type=float, default=0.0, help="DDIM: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto = float32")

    p = sub.add_parser("plan-context", help="per-rank memory and attention FLOPs of long-context training "
                                            "(comma-separated values give one row each; see docs/context-memory.md)")
    p.add_argument("--model", default="llama3:8B", help="FAMILY:FLAVOR, e.g. llama3:8B, deepseek_v3:671B, kimi-k2")
    p.add_argument("--seq-len", default=None, help="tokens per sequence, k/M suffixes (default 128k,1M,4M; "
                                                   "with --measure 256,512,1024,2048)")
    p.add_argument("--cp", default="1", help="context-parallel degrees")
    p.add_argument("--pattern", default="dense", help="dense | sliding:W | moba:B:k")
    p.add_argument("--ac", default="none", help="activation checkpointing: none | full | selective")
    p.add_argument("--dp-shard", default="1", help="FSDP / ZeRO-3 degree (parameters shard over dp_shard * cp)")
    p.add_argument("--tp", default="1")
    p.add_argument("--ep", default="1")
    p.add_argument("--micro-batch", default="1", help="sequences per micro-batch")
    p.add_argument("--precision", default="bf16", help="bf16 (fp32 master and Adam moments) | fp32")
    p.add_argument("--kernel", default="flash", help="flash (no T x T scores kept) | eager (T x T probabilities kept)")
    p.add_argument("--measure", action="store_true",
                   help="check the formulas against memory measured on small CPU models instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command in ("train", "data", "eval", "fundamentals", "diffusion", "nerf", "video", "sweep"):
            return {"train": cmd_train, "data": cmd_data, "eval": cmd_eval,
                    "fundamentals": cmd_fundamentals, "diffusion": cmd_diffusion,
                    "nerf": cmd_nerf, "video": cmd_video, "sweep": cmd_sweep}[args.command](args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return {"generate": cmd_generate, "chat": cmd_chat, "export": cmd_export, "report": cmd_report,
                "plan-context": cmd_plan_context, "serve": cmd_serve, "diagrams": cmd_diagrams,
                "sample": cmd_sample}[args.command](args)
    except (WorkbenchError, OSError) as e:  # OSError: the file system said no (permissions, full disk, ...)
        msg = " ".join(str(e).split())  # one line, always
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
