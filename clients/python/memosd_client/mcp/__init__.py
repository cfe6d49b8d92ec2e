"""memosd as an MCP server: memory tools and resources for any MCP host, over stdio or streamable HTTP.

``server`` builds the server around a :class:`memosd_client.Client` and runs it; ``tools`` declares the tools
and resources; ``views`` shapes memosd's answers for a model; ``errors`` turns a refusal into an MCP
tool error. Needs the optional ``mcp`` package (``pip install 'memos-client[mcp]'``);
``memosctl mcp`` is the command that runs it.
"""
