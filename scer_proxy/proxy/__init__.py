"""The data plane: the /v1/* handler, the stream relay, upstream routing, accounting, serving."""
