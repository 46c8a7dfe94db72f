"""The `fusionlm` command: data | train | generate | eval | demo | import | export | info | compare | recipes.

User errors (a bad file, key or sample) print one line naming it and exit with status 2; nothing
already written is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import ConfigError, FusionError


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()


def cmd_data(args) -> None:
    from .data.formats import write_llava_json
    from .data.sample import TASKS
    from .data.synthetic import World

    if args.action == "check":
        return cmd_data_check(args)
    if args.action is not None or args.out is None:
        raise ConfigError("fusionlm data: give --out (write synthetic samples) or `check SOURCE`")
    tasks = args.tasks or list(TASKS)
    world = World(image_size=args.image_size, seed=args.seed)
    samples = [world.sample(task, args.split, i) for task in tasks for i in range(args.n)]
    path = write_llava_json(samples, args.out)
    print(f"wrote {len(samples)} samples ({', '.join(tasks)}) to {path}")


def cmd_data_check(args) -> None:
    from .data.check import Report, check_source
    from .data.mix import open_source

    if not args.source:
        raise ConfigError("fusionlm data check: name the SOURCE to check")
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
    from .data.chat import SkipSample, encode
    from .data.processing import ImageSpec
    from .errors import ImageError
    from .data.sources import build_source
    from .info import shapes_only
    from .train.loop import make_tokenizer

    config = load_recipe(recipe, overrides)
    shapes_only(config)  # pretrained parts: their configs only, no weights
    tokenizer = make_tokenizer(config, build_source(config.data))
    model = build_model(config, tokenizer, pretrained=False)
    source_dir = Path(root_of) if Path(root_of).is_dir() else Path(root_of).parent
    spec = ImageSpec.for_model(model, config, root=str(source_dir))
    tcfg, limit = config.model.tokenizer, config.model.llm.max_length

    def fits(sample) -> str | None:
        try:
            layouts = [model.layout.image_tokens(spec.process_all(img)) for img in sample.images]
        except ImageError:
            return None  # reported by the image check
        try:
            encode(sample, tokenizer, layouts, max_length=limit, image_token=tcfg.image_token,
                   end_token=tcfg.end_token)
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


def _load(checkpoint: str):
    from .checkpoint import load_model
    from .data.batches import ImageSpec

    model, tokenizer, config = load_model(checkpoint, device="auto")
    return model, tokenizer, config, ImageSpec.for_model(model, config)


def cmd_generate(args) -> None:
    from .data.video import Video
    from .generate import MAX_NEW_TOKENS, Request, generate

    model, tokenizer, _, spec = _load(args.checkpoint)
    for path in args.image + args.video:
        if not Path(path).exists():
            raise FusionError(f"{path}: file not found")
    items = list(args.image) + [Video(path) for path in args.video]  # in this order when the prompt has no placeholders
    (answer,) = generate(model, tokenizer, [Request(args.prompt, items)], spec,
                         max_new_tokens=MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(answer)


def cmd_eval(args) -> None:
    from .data.sources import build_source
    from .evaluate.harness import evaluate, evaluate_tasks, markdown_table, skipped_lines, write_results
    from .evaluate.tasks import load_task_file

    model, tokenizer, config, spec = _load(args.checkpoint)
    kw = dict(per_task=args.per_task or config.train.eval_per_task, seed=args.seed, progress=print,
              batch_size=args.batch_size or config.train.eval_batch_size)
    task_defs = load_task_file(args.tasks) if args.tasks else None
    source = None if task_defs else build_source(config.data, args.data)
    results = []
    for shots in args.shots:
        if task_defs:
            results += evaluate_tasks(model, tokenizer, task_defs, spec, shots=shots, **kw)
        else:
            results += evaluate(model, tokenizer, source, spec, split=args.split, shots=shots, **kw)
    print(markdown_table(results))
    for line in skipped_lines(results):  # questions over the context: not asked, not scored
        print(line)
    if args.out:
        write_results(results, args.out)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, args.set)


def cmd_import(args) -> None:
    from .interop import import_checkpoint

    import_checkpoint(args.source, args.out, dtype=args.dtype, allow_custom_code=args.allow_custom_code)


def cmd_export(args) -> None:
    from .interop import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, args.format)


def cmd_info(args) -> None:
    from .config import load_recipe
    from .info import report

    for recipe in args.recipe:
        print(report(load_recipe(recipe, args.set), name=str(recipe)).markdown())
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusionlm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="write synthetic-world samples as PNGs (motion clips as GIFs) + a LLaVA-style JSON")
    d.add_argument("action", nargs="?", choices=["check"], help="check: validate SOURCE and print counts and problems")
    d.add_argument("source", nargs="?", help="check: a dataset file or folder")
    d.add_argument("--format", default="auto", help="check: the format of SOURCE (auto | llava | qa | webdataset | "
                                                     "parquet | jsonl | hf)")
    d.add_argument("--max-problems", type=int, default=20, help="check: list at most this many problems")
    d.add_argument("--recipe", help="check: also find samples longer than this recipe's context (with its images)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="check: override a recipe key")
    d.add_argument("--out")
    d.add_argument("--n", type=int, default=10, help="samples per task")
    d.add_argument("--split", default="train", choices=["train", "val", "test"])
    d.add_argument("--tasks", nargs="*")
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_data)

    t = sub.add_parser("train", help="train a recipe (a YAML path or a shipped recipe name)")
    t.add_argument("recipe")
    t.add_argument("--out", required=True)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted key")
    t.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    t.add_argument("--init", metavar="CHECKPOINT", help="start from this checkpoint's model and weights "
                   "(e.g. an imported LLaVA); the same as --set train.init_from=CHECKPOINT")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="answer a prompt about images")
    g.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a checkpoint")
    g.add_argument("--image", action="append", default=[])
    g.add_argument("--video", action="append", default=[], help="a folder of frames or an animated GIF")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, help="the answer's budget in tokens (default: the library's, "
                   "fusionlm.generate.MAX_NEW_TOKENS, as for eval)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("eval", help="score a checkpoint per task")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--data", help="a LLaVA-style JSON or question JSONL to evaluate on instead of the run's data")
    e.add_argument("--tasks", help="a YAML file of task definitions (data, prompt template, metric)")
    e.add_argument("--shots", type=int, nargs="+", default=[0], help="in-context examples per question, e.g. 0 4 8")
    e.add_argument("--seed", type=int, default=0, help="which k-shot examples are drawn")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--per-task", type=int)
    e.add_argument("--out", help="write scores as JSON here (and a Markdown table next to it)")
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("demo", help="train the default model on the synthetic world, evaluate, report")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    m.set_defaults(fn=cmd_demo)

    i = sub.add_parser("import", help="convert a transformers LLaVA / Mllama / Fuyu checkpoint to a fusionlm one")
    i.add_argument("source", help="a checkpoint directory or a hub id")
    i.add_argument("out")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    i.add_argument("--allow-custom-code", action="store_true", help="let the checkpoint's own code (auto_map) run")
    i.set_defaults(fn=cmd_import)

    x = sub.add_parser("export", help="write a fusionlm checkpoint in a transformers format, or whole")
    x.add_argument("checkpoint", help="a checkpoint or a run directory (its latest checkpoint)")
    x.add_argument("out")
    x.add_argument("--format", required=True, choices=["llava", "mllama", "fuyu", "fusionlm"],
                   help="fusionlm: one whole fusionlm checkpoint (e.g. of a run that wrote shards)")
    x.set_defaults(fn=cmd_export)

    n = sub.add_parser("info", help="parameters, image tokens and FLOPs per part of one or more recipes")
    n.add_argument("recipe", nargs="+", help="recipe YAML paths or shipped recipe names")
    n.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted key")
    n.set_defaults(fn=cmd_info)

    c = sub.add_parser("compare", help="train recipes on the same budget, evaluate them alike, report and plot")
    c.add_argument("recipe", nargs="+", help="recipe YAML paths or shipped recipe names")
    c.add_argument("--out", required=True)
    c.add_argument("--steps", type=int, help="optimizer steps per recipe, shared among its stages")
    c.add_argument("--minutes", type=float, help="wall-clock training minutes per recipe, shared among its stages")
    c.add_argument("--shots", type=int, nargs="+", default=[0, 4])
    c.add_argument("--per-task", type=int, default=50)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every recipe")
    c.set_defaults(fn=cmd_compare)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(fn=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
