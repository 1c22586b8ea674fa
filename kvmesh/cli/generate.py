"""`kvmesh generate`: run prompts through the single-process Engine."""

import sys

import click

from kvmesh.models import resolve


@click.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option(
    "--model",
    "model_path",
    default=None,
    metavar="PATH",
    help=f"{resolve.HELP} [default: the bundled tiny model, made on first use].",
)
@click.option("--max-tokens", type=int, default=32, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 disables the filter.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--chat", is_flag=True, help="Wrap each prompt as a user turn of the chat template.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
)
def generate(prompts, model_path, max_tokens, temperature, top_p, top_k, seed, chat, device, dtype):
    """Generate a continuation of each PROMPT (all batched together), streamed as it comes.

    \b
    Example:
      kvmesh generate "The capital of France is" --max-tokens 16
    """
    from kvmesh.engine.engine import Engine
    from kvmesh.params import SamplingParams

    try:
        path = resolve.resolve_model(model_path, dtype).path
        engine = Engine.from_pretrained(path, device=device, dtype=dtype)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        inputs = list(prompts)
        if chat:  # the template writes its own special tokens: encode without adding more
            inputs = [
                engine.tokenizer.encode(
                    engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                    add_special_tokens=False,
                )
                for p in prompts
            ]
        ids = [engine.add_request(p, params) for p in inputs]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    streaming = len(ids) == 1
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if streaming:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            if out.finished:
                finals[out.request_id] = out
    if streaming:
        out = finals[ids[0]]
        click.echo(f"\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]")
        return
    for request_id, prompt in zip(ids, prompts, strict=True):
        out = finals[request_id]
        click.echo(
            f"--- {prompt!r}\n{out.text}\n[{len(out.token_ids)} tokens, "
            f"finish_reason={out.finish_reason}]"
        )
