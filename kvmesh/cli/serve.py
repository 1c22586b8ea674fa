"""`kvmesh serve`: the OpenAI-compatible HTTP server over one in-process engine."""

import click
import structlog

from kvmesh.models import resolve

log = structlog.get_logger(__name__)


@click.command()
@click.option(
    "--model",
    "model_path",
    default=None,
    metavar="PATH",
    help=f"{resolve.HELP} [default: the bundled tiny model, made on first use].",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 also serves other machines.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on (0 picks a free one).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--num-blocks",
    type=click.IntRange(min=1),
    default=None,
    help="KV-cache blocks [default: sized to the device's memory].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads of the engine [default: on a CPU machine with fewer than 8 usable "
    "CPUs, all but one (the HTTP server's); else torch's choice; OMP_NUM_THREADS wins].",
)
def serve(model_path, host, port, device, dtype, num_blocks, threads):
    """Serve a model over the OpenAI API from this one process (no cluster).

    \b
    Routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics
    Example:
      kvmesh serve --port 8000
      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 16}'
    """
    import uvicorn

    from kvmesh.config.topology import engine_threads
    from kvmesh.frontend.app import create_app
    from kvmesh.frontend.backend import LocalBackend

    if threads is None and device == "cpu":
        threads = engine_threads()
    try:
        model = resolve.resolve_model(model_path, dtype)
        backend = LocalBackend.from_pretrained(
            model.path,
            device=device,
            dtype=dtype,
            num_blocks=num_blocks,
            model_name=model.name,
            threads=threads,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    log.info(
        "serve", model=backend.model_name, host=host, port=port, device=device, threads=threads
    )
    # log_config=None: uvicorn logs through the logging that `kvmesh --log-level` set up.
    try:
        uvicorn.run(create_app(backend), host=host, port=port, log_config=None)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C once it has shut down gracefully
