"""`kvmesh model …`: make and inspect model checkpoints."""

import click


@click.group()
def model() -> None:
    """Make and inspect model checkpoints (Hugging Face format directories)."""


@model.command("init-tiny")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, writable=True))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def init_tiny(directory: str, seed: int) -> None:
    """Write the ~4M-parameter tiny Llama (random weights, local tokenizer) into DIR."""
    from kvmesh.gpu import tiny

    path = tiny.init_tiny(directory, seed)
    click.echo(f"{path}  ({tiny.num_parameters():,} parameters, seed {seed})")


@model.command("import")
@click.argument("file", metavar="FILE.gguf", type=click.Path(dir_okay=False))
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, writable=True))
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Dtype the weights are stored in (quantized tensors are dequantized to it).",
)
def import_(file: str, directory: str, dtype: str) -> None:
    """Import a GGUF checkpoint (Llama, Mistral or Qwen2; F32, F16, BF16, Q8_0, Q4_0 or
    Q4_1 tensors) into DIR as a Hugging Face directory any --model accepts. Needs
    `pip install 'kvmesh[gguf]'`.

    \b
    Example:
      kvmesh model import SmolLM2-135M-Instruct.Q4_1.gguf smollm2-hf
      kvmesh generate --model smollm2-hf --chat "What is the capital of France?"
    """
    from kvmesh.models.gguf import GGUFImportError, import_gguf

    try:
        path = import_gguf(file, directory, dtype)
    except GGUFImportError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{path}  ({dtype})")
