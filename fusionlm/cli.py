"""The `fusionlm` command: data | train | generate | eval | demo | import | export | info | compare | recipes.

User errors (a bad file, key or sample) print one line naming it and exit with status 2; nothing
already written is touched. A fusionlm checkpoint read is `--checkpoint`, a directory written is
`--out`; what a command acts on (a recipe, a dataset, an imported source) is positional. Older
spellings still work and print one deprecation line to stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from .cli_deprecated import add_moved, old_data_form, old_task_file, resolve_moved
from .errors import ConfigError, FusionError


NOISY_WARNINGS = (  # known and harmless; every other warning still shows
    # transformers 5 renames the argument `cache`; the 4.x versions we support know only this name
    (FutureWarning, r"`past_key_values` is deprecated"),
)


def _quiet() -> None:
    """Mute the warnings listed in ``NOISY_WARNINGS`` and transformers' info logging."""
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()


def cmd_data_synth(args) -> None:
    from .data.sources.formats import write_llava_json
    from .data.sample import TASKS
    from .data.world import World

    tasks = args.tasks or list(TASKS)
    world = World(image_size=args.image_size, seed=args.seed)
    samples = [world.sample(task, args.split, i) for task in tasks for i in range(args.n)]
    path = write_llava_json(samples, args.out)
    print(f"wrote {len(samples)} samples ({', '.join(tasks)}) to {path}")


def cmd_data_check(args) -> None:
    from .data.check import Report, check_source
    from .data.sources import open_source

    fits = context_check(args.recipe, args.set, args.source) if args.recipe else None
    try:
        report = check_source(open_source(args.source, args.format), fits=fits)
    except FusionError as exc:  # a file that cannot be opened at all (e.g. a LLaVA JSON with a bad record)
        report = Report(problems=[str(exc)])
    print(f"{args.source}:")
    print("\n".join(report.lines(args.max_problems)))
    if report.problems:
        raise SystemExit(2)


def context_check(recipe: str, overrides: list[str], root_of: str):
    """sample -> a problem when it does not fit the recipe's context (model.llm.max_length)."""
    from .checkpoint import build_model
    from .config import load_recipe
    from .data.chat import SkipSample
    from .data.prompt import PromptEncoder
    from .data.pixels.processing import ImageSpec
    from .errors import ImageError
    from .data.sources import build_source
    from .info import shapes_only
    from .recipe import make_tokenizer

    config = load_recipe(recipe, overrides)
    config = shapes_only(config)  # pretrained parts: their configs only, no weights
    tokenizer = make_tokenizer(config, build_source(config.data))
    model = build_model(config, tokenizer, pretrained=False)
    source_dir = Path(root_of) if Path(root_of).is_dir() else Path(root_of).parent
    spec = ImageSpec.for_model(model, config, root=str(source_dir))
    prompts = PromptEncoder.of(model, tokenizer, spec, max_length=config.model.llm.max_length)

    def fits(sample) -> str | None:
        try:
            prompts.sample(sample)
        except ImageError:
            return None  # reported by the image check
        except SkipSample as exc:
            return f"{exc} ({recipe}: model.llm.max_length)" if exc.reason == "too_long" else None
        return None

    return fits


def cmd_train(args) -> None:
    from .config import load_recipe
    from .train.loop import train

    config = load_recipe(args.recipe, args.set + ([f"train.init_from={args.init}"] if args.init else []))
    progress = train(config, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        return
    print(f"done: {progress.step} steps, {progress.samples_trained} samples trained, skipped {progress.skipped}; "
          f"checkpoints in {Path(args.out) / 'checkpoints'}")


def _load(checkpoint: str, device: str):
    from .checkpoint import load_model
    from .data.batching.batches import ImageSpec

    model, tokenizer, config = load_model(checkpoint, device=device)
    return model, tokenizer, config, ImageSpec.for_model(model, config)


def cmd_generate(args) -> None:
    from .data.pixels.video import Video
    from .generate import MAX_NEW_TOKENS, Request, generate

    model, tokenizer, _, spec = _load(args.checkpoint, args.device)
    for path in args.image + args.video:
        if not Path(path).exists():
            raise FusionError(f"{path}: file not found")
    items = list(args.image) + [Video(path) for path in args.video]  # in this order when the prompt has no placeholders
    if args.image_out and args.pictures_out:
        args.parser.error("argument --pictures-out: not with --image-out (which draws instead of answering)")
    if args.image_out:
        return _draw(args, model, tokenizer, spec, items)
    if args.pictures_out:
        return _answer(args, model, tokenizer, spec, items)
    (answer,) = generate(model, tokenizer, [Request(args.prompt, items)], spec,
                         max_new_tokens=MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
                         temperature=args.temperature or 0.0, top_p=args.top_p, seed=args.seed)
    print(answer)


def _draw(args, model, tokenizer, spec, items) -> None:
    """``generate --image-out``: ``--n`` pictures of the prompt, seeds ``--seed`` … ``--seed + n - 1``,
    sampled as the model's ``generation`` config says unless a flag overrides it."""
    from .draw import DrawRequest, Sampling, draw

    sampling = Sampling.of(model.config.generation, cfg=args.cfg, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, steps=args.steps)
    out = Path(args.image_out)
    if args.n < 1:
        args.parser.error(f"argument --n: must be >= 1, got {args.n}")
    paths = [out] if args.n == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix or '.png'}") for k in range(args.n)]
    requests = [DrawRequest(args.prompt, seed=args.seed + k, images=items) for k in range(args.n)]
    pictures = draw(model, tokenizer, requests, spec, sampling=sampling)
    out.parent.mkdir(parents=True, exist_ok=True)
    for picture, path in zip(pictures, paths):
        picture.save(path, format="PNG")
        print(path)


def _answer(args, model, tokenizer, spec, items) -> None:
    """``generate --pictures-out DIR``: an answer in text and pictures; each picture it draws is
    written to DIR and printed as its path where it sits in the answer."""
    from .converse import AnswerRequest, answer
    from .draw import Sampling
    from .generate import MAX_NEW_TOKENS

    if not model.draws:
        raise ConfigError("--pictures-out: this model does not draw (model.generation.kind: none)")
    sampling = Sampling.of(model.config.generation, cfg=args.cfg, top_k=args.top_k)
    request = AnswerRequest(args.prompt, items, seed=args.seed)
    (said,) = answer(model, tokenizer, [request], spec, sampling=sampling, temperature=args.temperature or 0.0,
                     top_p=args.top_p, seed=args.seed,
                     max_new_tokens=MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens)
    out = Path(args.pictures_out)
    out.mkdir(parents=True, exist_ok=True)
    shown = []
    for part in said.parts:
        if isinstance(part, str):
            shown.append(part)
        else:
            path = out / f"answer-{len(shown)}.png"
            part.save(path, format="PNG")
            shown.append(f" {path} ")
    print("".join(shown).strip())


def cmd_eval(args) -> None:
    from .data.sources import build_source
    from .evaluate.harness import evaluate, evaluate_tasks, markdown_table, skipped_lines, write_results
    from .evaluate.tasks import load_task_file

    _check_eval(args)
    model, tokenizer, config, spec = _load(args.checkpoint, args.device)
    kw = dict(per_task=args.per_task or config.train.eval_per_task, seed=args.seed, progress=print,
              batch_size=args.batch_size or config.train.eval_batch_size)
    task_defs = load_task_file(args.tasks_file) if args.tasks_file else None
    source = None if task_defs else build_source(config.data, args.data)
    names = _task_names(source, args.tasks) if args.tasks else None
    results = []
    for shots in args.shots:
        if task_defs:
            results += evaluate_tasks(model, tokenizer, task_defs, spec, shots=shots, **kw)
        else:
            results += evaluate(model, tokenizer, source, spec, split=args.split, tasks=names, shots=shots, **kw)
    print(markdown_table(results))
    for line in skipped_lines(results):  # questions over the context: not asked, not scored
        print(line)
    if args.out:
        write_results(results, args.out)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


def _task_names(source, names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in source.tasks()]
    if unknown:
        raise ConfigError(f"eval --tasks: no task {', '.join(map(repr, unknown))} in the data "
                          f"(it has: {', '.join(source.tasks())})")
    return names




def _check_eval(args) -> None:
    """A task file names each task's data and its tasks: --data and --tasks do not go with it."""
    old_task_file(args)
    for flag, value in (("--data", args.data), ("--tasks", args.tasks)):
        if args.tasks_file and value:
            args.parser.error(f"argument {flag}: not allowed with --tasks-file (the task file names each task "
                              "and its data); give one")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, args.set)


def cmd_import(args) -> None:
    from .interop import import_checkpoint

    import_checkpoint(args.source, args.out, dtype=args.dtype, allow_custom_code=args.allow_custom_code)


def cmd_export(args) -> None:
    from .interop import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, args.format)


def cmd_serve(args) -> None:
    from .serve.app import api_key_from_env, serve
    from .serve.state import ServeSettings
    from .serve.media import MediaPolicy

    local = args.allowed_local_media_path
    if local is not None and not Path(local).is_dir():
        raise ConfigError(f"--allowed-local-media-path: {local} is not a directory")
    media = MediaPolicy(allowed_domains=tuple(args.allowed_media_domains), allow_private=args.allow_private_media,
                        allowed_local_path=local, max_bytes=args.max_media_bytes)
    settings = ServeSettings(checkpoint=args.checkpoint, model_name=args.model_name, device=args.device,
                             slots=args.slots, max_queue=args.max_queue, max_images=args.max_images_per_request,
                             api_key=args.api_key or api_key_from_env(), cors_origins=tuple(args.cors_origin),
                             media=media)
    serve(settings, args.host, args.port)


def cmd_info(args) -> None:
    from .config import load_recipe
    from .info import report, training_summary

    for recipe in args.recipe:
        run = Path(recipe)
        trained = run.is_dir() and (run / "config.yaml").is_file()  # a run directory: its recipe as it ran
        print(report(load_recipe(run / "config.yaml" if trained else recipe, args.set), name=str(recipe)).markdown())
        if trained:
            print("\n".join(training_summary(run)))
        print()


def cmd_compare(args) -> None:
    from .compare import compare

    if (args.steps is None) == (args.minutes is None):
        raise FusionError("compare: give the budget as --steps N or --minutes M (one of them)")
    compare(args.recipe, args.out, steps=args.steps, minutes=args.minutes, shots=tuple(args.shots),
            per_task=args.per_task, overrides=args.set)
    print(f"wrote {Path(args.out) / 'report.md'}")


def cmd_recipes(args) -> None:
    from .config import shipped_recipes

    print("\n".join(shipped_recipes()))




def _command(sub, name: str, help: str, fn) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(fn=fn, parser=p)
    return p








def _device(name: str) -> str:
    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name) is None:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device (auto, cpu, cuda, cuda:N, mps)")
    return name


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device, default="auto", metavar="DEVICE",
                   help="auto (a GPU when there is one) | cpu | cuda | cuda:N | mps (default: auto)")


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"{help}; several after one --set (--set a=1 b=2) or --set again")


def _add_tasks(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--tasks", nargs="*", metavar="TASK", help=help)


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="write synthetic-world samples, or check a dataset",
                       description="write synthetic-world samples, or check a dataset")
    dsub = d.add_subparsers(dest="action", required=True, metavar="{synth,check}", help="what to do")

    w = _command(dsub, "synth", "write synthetic-world samples as PNGs (motion clips as GIFs) + a LLaVA-style JSON",
                 cmd_data_synth)
    w.add_argument("--out", required=True, help="the directory to write (data.json and images/)")
    w.add_argument("--n", type=int, default=10, help="samples per task")
    w.add_argument("--split", default="train", choices=["train", "val", "test"], help="which split's samples")
    _add_tasks(w, "task names (default: all the world's tasks)")
    w.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    w.add_argument("--seed", type=int, default=0, help="the world's random seed")

    c = _command(dsub, "check", "validate a dataset and print its counts and problems (exit 2 when any)",
                 cmd_data_check)
    c.add_argument("source", metavar="SOURCE", help="a dataset file or folder")
    c.add_argument("--format", default="auto", help="the format of SOURCE (auto | llava | qa | webdataset | "
                                                    "parquet | jsonl | hf)")
    c.add_argument("--max-problems", type=int, default=20, help="list at most this many problems")
    c.add_argument("--recipe", help="also find samples longer than this recipe's context (with its images)")
    _add_set(c, "override a key of --recipe")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusionlm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, help="the command")
    _add_data(sub)

    t = _command(sub, "train", "train a recipe (a YAML path or a shipped recipe name)", cmd_train)
    t.add_argument("recipe", help="a recipe YAML path or a shipped recipe name")
    t.add_argument("--out", required=True, help="the run directory (config, logs, checkpoints/)")
    _add_set(t, "override a dotted key")
    t.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    t.add_argument("--init", metavar="CHECKPOINT", help="start from this checkpoint's model and weights "
                   "(e.g. an imported LLaVA); the same as --set train.init_from=CHECKPOINT")

    g = _command(sub, "generate", "answer a prompt about images (in text, or text and pictures: --pictures-out), "
                 "or draw it (--image-out)", cmd_generate)
    g.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a checkpoint")
    g.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    g.add_argument("--video", action="append", default=[], help="a folder of frames or an animated GIF")
    g.add_argument("--prompt", required=True, help="the question; <image> marks where each image goes")
    g.add_argument("--max-new-tokens", type=int, help="the answer's budget in tokens (default: the library's, "
                   "fusionlm.generate.MAX_NEW_TOKENS, as for eval)")
    g.add_argument("--temperature", type=float, help="sampling temperature (0: greedy; default: 0 for text, the "
                   "model's model.generation.temperature for pictures)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    g.add_argument("--seed", type=int, default=0, help="the sampling seed (pictures: the first picture's)")
    g.add_argument("--image-out", metavar="PNG", help="draw the prompt instead of answering it (a model that draws): "
                   "the picture's path; with --n K, PNG's stem gets -0 … -(K-1)")
    g.add_argument("--n", type=int, default=1, help="pictures to draw (--image-out), each with its own seed")
    g.add_argument("--pictures-out", metavar="DIR", help="answer in text and pictures (a model that draws): each "
                   "picture the answer draws is written to DIR and printed as its path")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale for pictures (1: none; default: the "
                   "model's model.generation.cfg)")
    g.add_argument("--steps", type=int, help="pictures of a masked or diffusion model: the parallel passes (unmasking "
                   "or denoising) that draw one (default: the model's model.generation.steps)")
    g.add_argument("--top-k", type=int, help="pictures: sample among the k most likely codes (0: all; default: "
                   "the model's model.generation.top_k)")
    _add_device(g)

    e = _command(sub, "eval", "score a checkpoint per task", cmd_eval)
    e.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a checkpoint")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="the world's split to ask")
    e.add_argument("--data", metavar="FILE",
                   help="a LLaVA-style JSON or question JSONL to evaluate on instead of the run's data")
    _add_tasks(e, "task names to score (default: every task of the data)")
    e.add_argument("--tasks-file", metavar="FILE",
                   help="a YAML file of task definitions (data, prompt template, metric)")
    e.add_argument("--shots", type=int, nargs="+", default=[0], help="in-context examples per question, e.g. 0 4 8")
    e.add_argument("--seed", type=int, default=0, help="which k-shot examples are drawn")
    e.add_argument("--batch-size", type=int, help="questions per batch (default: the recipe's train.eval_batch_size)")
    e.add_argument("--per-task", type=int, help="questions per task (default: the recipe's train.eval_per_task)")
    e.add_argument("--out", help="write scores as JSON here (and a Markdown table next to it)")
    _add_device(e)

    m = _command(sub, "demo", "train the default model on the synthetic world, evaluate, report", cmd_demo)
    m.add_argument("--out", default="runs/demo", help="the directory for the run and the report")
    _add_set(m, "override a key of the demo recipe")

    i = _command(sub, "import", "convert a transformers LLaVA / Mllama / Fuyu / Janus / Emu3 checkpoint to a fusionlm one",
                 cmd_import)
    i.add_argument("source", metavar="SOURCE", help="a transformers checkpoint directory or a hub id")
    add_moved(i, "--out", "OUT", "the fusionlm checkpoint directory to write")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the weights' dtype in the written checkpoint")
    i.add_argument("--allow-custom-code", action="store_true", help="let the checkpoint's own code (auto_map) run")

    x = _command(sub, "export", "write a fusionlm checkpoint in a transformers format, or whole", cmd_export)
    add_moved(x, "--checkpoint", "CHECKPOINT", "a checkpoint or a run directory (its latest checkpoint)")
    add_moved(x, "--out", "OUT", "the directory to write")
    x.add_argument("--format", required=True, choices=["llava", "mllama", "fuyu", "janus", "emu3", "fusionlm"],
                   help="a transformers format, or fusionlm: one whole fusionlm checkpoint (e.g. of a run that "
                        "wrote shards)")

    v = _command(sub, "serve", "serve a checkpoint over HTTP: OpenAI's chat-completions API, metrics and a chat page",
                 cmd_serve)
    v.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a checkpoint")
    v.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    v.add_argument("--port", type=int, default=8000, help="the port to listen on (default: 8000)")
    _add_device(v)
    v.add_argument("--model-name", help="the model id /v1/models lists (default: the checkpoint's folder name)")
    v.add_argument("--slots", type=int, default=8, help="requests decoded at once (continuous batching)")
    v.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond those; more get 429 at once")
    v.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set FUSIONLM_API_KEY)")
    v.add_argument("--allowed-media-domains", nargs="*", default=[], metavar="DOMAIN",
                   help="fetch image URLs from these hosts (and their subdomains) only")
    v.add_argument("--allow-private-media", action="store_true",
                   help="let image URLs reach loopback, private and link-local addresses (a lab's own network)")
    v.add_argument("--allowed-local-media-path", metavar="DIR", help="let file:// image URLs read files under DIR")
    v.add_argument("--max-media-bytes", type=int, default=20 * 2**20, help="the largest image a request may send")
    v.add_argument("--max-images-per-request", type=int, default=8, help="more images in one request get 413")
    v.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (CORS is off unless given)")

    n = _command(sub, "info", "parameters, image tokens and FLOPs per part of one or more recipes", cmd_info)
    n.add_argument("recipe", nargs="+", help="recipe YAML paths, shipped recipe names or run directories (a run "
                   "also gets what its stages ended at: loss, and the image tokenizer's PSNR and codebook use)")
    _add_set(n, "override a dotted key")

    c = _command(sub, "compare", "train recipes on the same budget, evaluate them alike, report and plot",
                 cmd_compare)
    c.add_argument("recipe", nargs="+", help="recipe YAML paths or shipped recipe names")
    c.add_argument("--out", required=True, help="the directory for the runs, report and plots")
    c.add_argument("--steps", type=int, help="optimizer steps per recipe, shared among its stages")
    c.add_argument("--minutes", type=float, help="wall-clock training minutes per recipe, shared among its stages")
    c.add_argument("--shots", type=int, nargs="+", default=[0, 4], help="in-context examples per question")
    c.add_argument("--per-task", type=int, default=50, help="questions per task")
    _add_set(c, "override a key in every recipe")

    _command(sub, "recipes", "list the shipped recipes", cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(old_data_form(sys.argv[1:] if argv is None else list(argv)))
    resolve_moved(args)
    _quiet()
    try:
        args.fn(args)
    except FusionError as exc:
        print(f"fusionlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusionlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
