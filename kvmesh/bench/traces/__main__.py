"""`python -m kvmesh.bench.traces`: write the packaged default trace again."""

from kvmesh.bench.traces import DEFAULT_TRACE, make_trace, trace_text

DEFAULT_TRACE.write_text(trace_text(make_trace()))
print(f"wrote {DEFAULT_TRACE}")
