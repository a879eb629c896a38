"""HTTP/1 machinery shared by the engines: receive buffer, heads, bodies, the h11
fallback, hop-by-hop rules. Protocol only: nothing here reads config or identity."""
