"""HTTP/2 protocol code: the frame machine behind a small interface, request and
response fields mapped to and from the engine's heads, abuse budgets. No I/O."""
